"""Checkpoints that contradict themselves, members loaded through transformers, router digests.

Each case is either handled (and a number checked) or refused through the real CLI entry point
(``fusekit.cli.main``, in this process) with exit 2 and one line naming the file at fault, as
tests/test_bad_inputs.py does for the merge corpus.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import in_process_cli
from safetensors.torch import load_file, save_file

from fusekit.arch import layer_count_conflict
from fusekit.errors import CheckpointError, CheckpointNotFoundError
from fusekit.io.manifest import canonical_sha256, digest_mismatch, with_digests
from fusekit.io.reader import CheckpointReader
from fusekit.io.refs import resolve_model
from fusekit.lm.load import check_weights, load_lm, load_tokenizer

LAYER1 = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run ``fusekit ...`` in ``tmp_path``, offline; return (exit code, stdout, stderr)."""
    import huggingface_hub.constants as constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    return in_process_cli(capsys)


def refused(result: tuple[int, str, str], *culprits: str) -> str:
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("fusekit: error: ") and "Traceback" not in err, err
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    return lines[0]


def linear(first: Path | str, second: Path | str, extra: str = "") -> str:
    return (f"merge_method: linear\n{extra}models:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {second}\n    parameters: {{weight: 0.5}}\n")


def merge(cli: Any, tmp_path: Path, recipe: str, *args: str) -> tuple[int, str, str]:
    (tmp_path / "r.yaml").write_text(recipe, encoding="utf-8")
    return cli("merge", "r.yaml", "out", *args)  # type: ignore[no-any-return]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_config(folder: Path, **values: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **values}))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# -- config.json -------------------------------------------------------------------------------------


def test_donor_without_config_is_refused_and_a_member_without_one_is_merged(
        cli: Any, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    bare = copy(tiny_models["math"], tmp_path / "bare")
    (bare / "config.json").unlink()
    refused(merge(cli, tmp_path, linear("bare", tiny_models["base"])), "bare/config.json is missing")
    assert not (tmp_path / "out").exists()
    code, _, err = merge(cli, tmp_path, linear(tiny_models["base"], "bare"))
    assert code == 0, err
    out = weights(tmp_path / "out")
    a, b = weights(tiny_models["base"]), weights(tiny_models["math"])
    for name in a:
        torch.testing.assert_close(out[name], ((a[name].double() + b[name].double()) / 2).float())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tiny_models["base"] / "config.json").read_text())


@pytest.mark.parametrize(("count", "rename", "clause"), [
    (1, None, "num_hidden_layers is 1 but the weights hold block model.layers.1"),
    (3, None, "num_hidden_layers is 3 but the weights hold only 2 block(s)"),
    (3, ("model.layers.1.", "model.layers.2."), "lack model.layers.1"),
])
def test_config_that_counts_other_blocks_is_refused(cli: Any, tmp_path: Path, tiny_models: dict[str, Path],
                                                    count: int, rename: tuple[str, str] | None,
                                                    clause: str) -> None:
    folder = copy(tiny_models["math"], tmp_path / "liar")
    set_config(folder, num_hidden_layers=count)
    if rename is not None:
        tensors = {n.replace(*rename): t for n, t in weights(folder).items()}
        save_file(tensors, folder / "model.safetensors")
    # as the second model (its layers would be dropped or invented), and run as a member
    refused(merge(cli, tmp_path, linear(tiny_models["base"], "liar")), "liar/config.json", clause)
    (tmp_path / "t.txt").write_text("some text to score", encoding="utf-8")
    refused(cli("score", "liar", "--text", "t.txt"), "liar/config.json", clause)
    assert not (tmp_path / "out").exists()


def test_layer_count_rules() -> None:
    names = [f"model.layers.{i}.w" for i in range(3)] + ["model.embed_tokens.weight"]
    assert layer_count_conflict({"num_hidden_layers": 3}, names) is None
    assert layer_count_conflict({}, names) is None  # nothing stated, nothing to contradict
    assert layer_count_conflict({"num_hidden_layers": 3}, ["lm_head.weight"]) is None
    # a multi-token-prediction block after the counted ones is declared, so allowed
    mtp = {"num_hidden_layers": 2, "num_nextn_predict_layers": 1}
    assert layer_count_conflict(mtp, names) is None
    assert layer_count_conflict({"n_layer": 2}, names) == (
        "n_layer is 2 but the weights hold block model.layers.2")
    # a vision tower deeper than the text stack would be cut at the text stack's count
    vision = [*names, *(f"visual.blocks.{i}.w" for i in range(5))]
    assert layer_count_conflict({"num_hidden_layers": 3}, vision) == (
        "num_hidden_layers is 3 but the weights hold block visual.blocks.4")
    assert layer_count_conflict({"num_hidden_layers": True}, names) is None  # not a count


# -- weight files ------------------------------------------------------------------------------------


def test_same_tensor_in_two_unindexed_files_is_refused(cli: Any, tmp_path: Path,
                                                       tiny_models: dict[str, Path]) -> None:
    folder = copy(tiny_models["math"], tmp_path / "two")
    save_file({LAYER1: weights(folder)[LAYER1] * 2}, folder / "zz-extra.safetensors")
    line = refused(merge(cli, tmp_path, linear(tiny_models["base"], "two")), "two/zz-extra.safetensors",
                   "also in model.safetensors", LAYER1)
    assert "no index" in line


def test_index_decides_which_file_holds_a_tensor_defined_twice(tmp_path: Path,
                                                               tiny_models: dict[str, Path]) -> None:
    folder = copy(tiny_models["math"], tmp_path / "indexed")
    tensors = weights(folder)
    norm = "model.norm.weight"
    save_file({LAYER1: tensors[LAYER1] * 2, norm: tensors[norm] * 3}, folder / "a-other.safetensors")
    weight_map = {n: "model.safetensors" for n in tensors} | {norm: "a-other.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with CheckpointReader(resolve_model(str(folder))) as reader:  # each from the file the index names
        assert torch.equal(reader.get(LAYER1), tensors[LAYER1])
        assert torch.equal(reader.get(norm), tensors[norm] * 3)
        assert reader.info(norm).file.name == "a-other.safetensors"


def test_float8_needs_a_dtype_and_merges_with_one(cli: Any, tmp_path: Path,
                                                  tiny_models: dict[str, Path]) -> None:
    folders = []
    for name in ("base", "math"):
        folder = copy(tiny_models[name], tmp_path / f"f8-{name}")
        save_file({n: t.to(torch.float8_e4m3fn) for n, t in weights(folder).items()},
                  folder / "model.safetensors")
        folders.append(folder)
    refused(merge(cli, tmp_path, linear("f8-base", "f8-math")), "f8-base/model.safetensors",
            "F8_E4M3", "dtype: float32")
    code, _, err = merge(cli, tmp_path, linear("f8-base", "f8-math", "dtype: float32\n"))
    assert code == 0, err
    out, a, b = weights(tmp_path / "out"), weights(folders[0]), weights(folders[1])
    for name in a:  # float8 values are exact in float64: the reference is exact
        torch.testing.assert_close(out[name], ((a[name].double() + b[name].double()) / 2).float())


def test_links_to_devices_are_refused(cli: Any, tmp_path: Path, tokenizer_models: dict[str, Path]) -> None:
    weights_link = copy(tokenizer_models["math"], tmp_path / "dev-weights")
    (weights_link / "model.safetensors").unlink()
    os.symlink("/dev/zero", weights_link / "model.safetensors")
    base = tokenizer_models["base"]
    refused(merge(cli, tmp_path, linear(base, "dev-weights")), "dev-weights/model.safetensors",
            "not a regular file")
    refused(merge(cli, tmp_path, linear(base, "dev-weights/model.safetensors")),
            "dev-weights/model.safetensors", "not a regular file or a folder")
    tokenizer_link = copy(tokenizer_models["math"], tmp_path / "dev-tokenizer")
    (tokenizer_link / "tokenizer.json").unlink()
    os.symlink("/dev/zero", tokenizer_link / "tokenizer.json")  # would be hashed and copied forever
    refused(merge(cli, tmp_path, linear("dev-tokenizer", base)), "dev-tokenizer/tokenizer.json",
            "not a regular file")
    assert not (tmp_path / "out").exists()


# -- tokenizer files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "why"), [("{ not json", "is not valid JSON"),
                                           ("[1, 2]", "holds a JSON list, not an object"),
                                           ('"text"', "holds a JSON str, not an object")])
def test_broken_tokenizer_config_is_refused(cli: Any, tmp_path: Path, tokenizer_models: dict[str, Path],
                                            text: str, why: str) -> None:
    folder = copy(tokenizer_models["math"], tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text(text)
    for extra in ("", "chat_template: chatml\n"):
        refused(merge(cli, tmp_path, linear("tok", tokenizer_models["base"], extra)),
                "tok/tokenizer_config.json", why)
    refused(cli("plan", "r.yaml"), "tok/tokenizer_config.json", why)
    with pytest.raises(CheckpointError, match=f"tok/tokenizer_config.json: {why}"):
        load_tokenizer("tok", folder)
    # the broken file is not the tokenizer source here, so the merge goes on
    code, _, err = merge(cli, tmp_path, linear(tokenizer_models["base"], "tok"))
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == (
        tokenizer_models["base"] / "tokenizer_config.json").read_bytes()


# -- members loaded through transformers -------------------------------------------------------------


def test_members_pass_the_merge_readers_checks_first(cli: Any, tmp_path: Path,
                                                     tiny_models: dict[str, Path]) -> None:
    truncated = copy(tiny_models["math"], tmp_path / "cut")
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[:-1000])
    with pytest.raises(CheckpointError, match="cut/model.safetensors: tensor .* ends at byte"):
        check_weights(resolve_model(str(truncated)))
    (tmp_path / "t.txt").write_text("some text to score", encoding="utf-8")
    refused(cli("score", "cut", "--text", "t.txt"), "cut/model.safetensors")
    bare = copy(tiny_models["math"], tmp_path / "noconf")
    (bare / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="noconf/config.json is missing"):
        load_lm(bare, tokenizer=False)
    loaded = load_lm(tiny_models["math"], tokenizer=False)  # a sound member loads as it is
    state = loaded.model.state_dict()
    for name, tensor in weights(tiny_models["math"]).items():
        assert torch.equal(state[name], tensor)


# -- router folders ----------------------------------------------------------------------------------


def _router(tmp_path: Path, models: dict[str, Path], out: str, seed: int) -> Path:
    from fusekit.route import build_router

    words = ["alpha", "beta", "gamma", "delta"]
    rows = [{"text": f"{kind} {w} {i}", "label": kind}
            for i in range(6) for w in words for kind in ("base", "math")]
    data = tmp_path / f"{out}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[seed:]), encoding="utf-8")
    recipe = tmp_path / f"{out}.yaml"
    recipe.write_text(f"models:\n  - model: {models['base']}\n    name: base\n    cost: 1\n"
                      f"  - model: {models['math']}\n    name: math\n    cost: 2\n"
                      f"data: {data}\nlabels: given\nrouter: logistic\nfolds: 2\n", encoding="utf-8")
    build_router(recipe, tmp_path / out)
    return tmp_path / out


def test_router_folder_records_and_checks_its_digests(cli: Any, tmp_path: Path,
                                                      tiny_models: dict[str, Path]) -> None:
    from fusekit.io.files import file_sha256
    from fusekit.route import load_router

    folder = _router(tmp_path, tiny_models, "router", seed=0)
    other = _router(tmp_path, tiny_models, "other", seed=3)
    config = json.loads((folder / "router.json").read_text())
    recorded = config["sha256"]
    assert recorded["router.safetensors"] == file_sha256(folder / "router.safetensors")
    assert recorded["route.yaml"] == file_sha256(folder / "route.yaml")
    files = {k: v for k, v in recorded.items() if k != "router.json"}
    assert recorded["router.json"] == canonical_sha256({**config, "sha256": files})
    (folder / "README.md").write_text("# my router\n")  # the card may be edited
    want = load_router(folder).probabilities(["math beta 3"])
    code, out, err = cli("route", "run", "router", "--prompt", "math beta 3")
    assert code == 0, err

    pristine = {name: (folder / name).read_bytes() for name in ("router.json", "router.safetensors")}
    edited = {**config, "models": [{**m, "cost": 0.5} for m in config["models"]]}
    (folder / "router.json").write_text(json.dumps(edited, indent=2))
    refused(cli("route", "run", "router", "--prompt", "x"), "router/router.json", "was edited")
    (folder / "router.json").write_bytes(pristine["router.json"])
    shutil.copy(other / "router.safetensors", folder / "router.safetensors")
    refused(cli("route", "run", "router", "--prompt", "x"), "router/router.safetensors", "differs")
    (folder / "router.safetensors").write_bytes(pristine["router.safetensors"][:-64])
    refused(cli("route", "run", "router", "--prompt", "x"), "router/router.safetensors", "differs")
    (folder / "router.safetensors").write_bytes(pristine["router.safetensors"])
    assert torch.equal(load_router(folder).probabilities(["math beta 3"]), want)


def test_routers_written_before_digests_still_load(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from fusekit.route import load_router

    folder = _router(tmp_path, tiny_models, "router", seed=0)
    want = load_router(folder).probabilities(["base gamma 1"])
    config = json.loads((folder / "router.json").read_text())
    del config["sha256"]
    (folder / "router.json").write_text(json.dumps(config))
    assert torch.equal(load_router(folder).probabilities(["base gamma 1"]), want)


def test_manifest_digests(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    meta = with_digests(tmp_path, "meta.json", {"x": (1, 2.5), "y": {"z": None}}, ["a.bin", "absent"])
    assert meta["sha256"]["a.bin"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert "absent" not in meta["sha256"]
    reread = json.loads(json.dumps(meta, indent=4))  # formatting does not matter
    assert digest_mismatch(tmp_path, "meta.json", reread) is None
    assert "meta.json: was edited" in str(digest_mismatch(tmp_path, "meta.json", {**reread, "x": [1, 2.4]}))
    forged = {**reread, "sha256": {**reread["sha256"], "a.bin": "0" * 64}}
    assert "meta.json: was edited" in str(digest_mismatch(tmp_path, "meta.json", forged))
    (tmp_path / "a.bin").write_bytes(b"abd")
    assert "a.bin: differs" in str(digest_mismatch(tmp_path, "meta.json", reread))
    (tmp_path / "a.bin").unlink()
    assert "a.bin: is missing" in str(digest_mismatch(tmp_path, "meta.json", reread))
    assert digest_mismatch(tmp_path, "meta.json", {"x": 1}) is None  # written before digests
    assert "damaged" in str(digest_mismatch(tmp_path, "meta.json", {"sha256": [1]}))
