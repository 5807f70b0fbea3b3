"""LoRA adapters where a model runs: ``load_lm``, ``fusekit score``, ensembles and routers.

Each adapter is made in the test with PEFT (non-zero ``lora_B``) over a tiny Llama with a tokenizer;
the reference for "the base with the adapter applied" is PEFT's own ``merge_and_unload()`` saved as a
full model folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli
from peft_helpers import make_peft_adapter
from safetensors.torch import load_file, save_file

from fusekit.errors import FusekitError
from fusekit.lm import load_lm, score_text
from fusekit.lm.load import tokenizer_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "def add(a, b):\n    return a + b  # sum\n\nint main(void) { return 0; }\n" * 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Adapted:
    base: Path
    adapter: Path  # a PEFT adapter folder whose config names ``base``
    merged: Path  # PEFT's merge_and_unload() of the two, saved as a full model with the base's tokenizer




def _merged_by_peft(base: Path, adapter: Path, out: Path) -> Path:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    return out


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return in_process_cli(capsys)


@pytest.fixture(scope="module")
def adapted(tokenizer_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Adapted:
    root = tmp_path_factory.mktemp("lora-inference")
    base = tokenizer_models["base"]
    adapter = make_peft_adapter(base, root / "adapter", seed=0, targets=["q_proj", "v_proj", "down_proj"])
    return Adapted(base, adapter, _merged_by_peft(base, adapter, root / "merged"))


def test_base_plus_adapter_is_peft_merge_and_unload(adapted: Adapted) -> None:
    lm = load_lm(f"{adapted.base}+{adapted.adapter}")
    reference = load_lm(adapted.merged)
    assert lm.resolved.adapter is not None and lm.resolved.folder == adapted.base
    ours, theirs = lm.model.state_dict(), reference.model.state_dict()
    assert sorted(ours) == sorted(theirs) and not any("lora" in name for name in ours)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    base_q = load_file(adapted.base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base_q)  # the adapter acts
    got, want = score_text(lm, TEXT), score_text(reference, TEXT)
    assert got.nll_nats == want.nll_nats and got.n_tokens == want.n_tokens
    assert got.nll_nats != score_text(load_lm(adapted.base), TEXT).nll_nats


def test_bare_adapter_loads_on_the_base_its_config_names(adapted: Adapted) -> None:
    config = json.loads((adapted.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert Path(config["base_model_name_or_path"]) == adapted.base
    lm = load_lm(adapted.adapter)
    assert lm.resolved.base_ref == str(adapted.base)
    want = load_lm(adapted.merged).model.state_dict()
    assert all(torch.equal(value, want[name]) for name, value in lm.model.state_dict().items())


def test_tokenizer_comes_from_the_adapter_folder_when_it_has_one(adapted: Adapted, tmp_path: Path) -> None:
    plain = load_lm(adapted.adapter)
    assert tokenizer_folder(plain.resolved) == adapted.base
    own = shutil.copytree(adapted.adapter, tmp_path / "with-tokenizer")
    for name in TOKENIZER_FILES:
        if (adapted.base / name).is_file():
            shutil.copy(adapted.base / name, own / name)
    settings = json.loads((own / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings["model_max_length"] = 77
    (own / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    lm = load_lm(f"{adapted.base}+{own}")
    assert tokenizer_folder(lm.resolved) == own
    assert lm.tokenizer is not None and lm.tokenizer.model_max_length == 77
    assert plain.tokenizer is not None and plain.tokenizer.model_max_length != 77


def test_score_cli_scores_adapters_like_the_merged_model(adapted: Adapted, tmp_path: Path,
                                                         cli: Callable[..., tuple[int, str, str]]
                                                         ) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    refs = [f"{adapted.base}+{adapted.adapter}", str(adapted.adapter), str(adapted.merged)]
    code, out, err = cli("score", *refs, "--text", str(text), "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["model"] for r in rows] == refs
    assert rows[0]["nll_nats"] == rows[1]["nll_nats"] == rows[2]["nll_nats"]
    assert rows[0]["bits_per_byte"] == rows[2]["bits_per_byte"]


def _bad_copy(adapter: Path, folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def bad_adapters(adapted: Adapted, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the adapter: a lora_A wider than the base's q_proj, a missing lora_A, a cut file."""
    root = tmp_path_factory.mktemp("bad-adapters")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def widen(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 3)

    truncated = shutil.copytree(adapted.adapter, root / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return {"wide": _bad_copy(adapted.adapter, root / "wide", widen),
            "lacking": _bad_copy(adapted.adapter, root / "lacking", lambda t: t.pop(name)),
            "truncated": truncated}


def test_adapter_that_does_not_fit_the_base_exits_2_with_one_line(
        adapted: Adapted, bad_adapters: dict[str, Path], tmp_path: Path,
        cli: Callable[..., tuple[int, str, str]]) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    for why, bad in bad_adapters.items():
        code, out, err = cli("score", f"{adapted.base}+{bad}", "--text", str(text))
        assert code == 2 and out == "", (why, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (why, err)
        assert str(bad) in err, (why, err)
    assert "corrupt or truncated" in err


def test_peft_refusals_become_one_line_errors(adapted: Adapted, bad_adapters: dict[str, Path]) -> None:
    """What PEFT itself refuses (past the header checks) is a one-line error naming adapter and base."""
    from transformers import AutoModelForCausalLM

    from fusekit.errors import CheckpointError
    from fusekit.io.refs import resolve_model
    from fusekit.lm.load import apply_adapter

    for why, words in (("wide", "PEFT cannot apply it"), ("lacking", "do not match the base's modules")):
        model = AutoModelForCausalLM.from_pretrained(adapted.base, dtype=torch.float32)
        with pytest.raises(CheckpointError) as info:
            apply_adapter(model, resolve_model(f"{adapted.base}+{bad_adapters[why]}"))
        message = str(info.value)
        assert words in message and "\n" not in message, (why, message)
        assert message.startswith(f"adapter '{bad_adapters[why]}' on base '{adapted.base}'"), message


def test_missing_peft_names_the_lora_extra(adapted: Adapted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(FusekitError, match=r"pip install 'peft>=0\.13'"):
        load_lm(f"{adapted.base}+{adapted.adapter}")
    load_lm(adapted.base)  # a plain model needs no peft


def test_ensemble_member_may_be_an_adapter(adapted: Adapted, tmp_path: Path) -> None:
    from fusekit.ensemble.check import check_ensemble, format_report
    from fusekit.ensemble.engine import load_ensemble
    from fusekit.ensemble.scoring import score_ensemble

    recipe = tmp_path / "e.yaml"
    recipe.write_text(f"models:\n  - model: {adapted.base}\n  - model: {adapted.adapter}\n"
                      f"  - model: {adapted.base}+{adapted.adapter}\nmethod: prob_avg\n", encoding="utf-8")
    result = score_ensemble(load_ensemble(recipe), TEXT)
    # Members 1 and 2 share the base loaded for member 0, the adapter unmerged: float32 rounding apart.
    assert result.members[1].nll_nats == pytest.approx(score_text(load_lm(adapted.merged), TEXT).nll_nats,
                                                       rel=1e-6)
    assert result.members[2].nll_nats == result.members[1].nll_nats
    assert result.members[0].nll_nats == score_text(load_lm(adapted.base), TEXT).nll_nats
    report = check_ensemble(recipe)
    assert report["members"][0]["adapter"] is None
    assert report["members"][1]["adapter"] == {"adapter": str(adapted.adapter), "base": str(adapted.base),
                                               "r": 4, "lora_alpha": 8.0}
    assert report["members"][2]["adapter"] == report["members"][1]["adapter"]
    assert report["one_vocabulary"] and f"LoRA r=4 on {adapted.base}" in format_report(report)


def test_router_routes_to_an_adapter_and_runs_it(adapted: Adapted, tmp_path: Path) -> None:
    from fusekit.route import build_router, run_router

    rows = [{"text": f"def f{i}(x):\n    return x + {i}\n", "label": "adapter"} for i in range(6)]
    rows += [{"text": f"The meadow {i} was quiet after the rain.\n", "label": "base"} for i in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  - model: {adapted.base}\n    name: base\n  - model: {adapted.adapter}\n"
                      f"    name: adapter\n    cost: 2\ndata: {data}\nlabels: given\nfeatures: tfidf\n"
                      "router:\n  type: knn\n  k: 3\nfolds: 2\n", encoding="utf-8")
    built = build_router(recipe, tmp_path / "router")
    assert built.router.models[1].folder == f"{adapted.base.resolve()}+{adapted.adapter.resolve()}"
    result = run_router(tmp_path / "router", "def g(y):\n    return y + 1\n", generate=True,
                        max_new_tokens=4, threshold=0.5)
    assert result.decision.model.name == "adapter"
    merged = load_lm(adapted.merged)
    from fusekit.lm.generate import generate

    assert result.answer == generate(merged, ["def g(y):\n    return y + 1\n"], max_new_tokens=4)[0]
