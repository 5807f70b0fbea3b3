"""Build the binary half of the bad-inputs corpus: corrupt, lying and hostile checkpoints.

``python scripts/make_bad_inputs.py DEST`` writes::

    DEST/models/{base,math}/         two small, valid Llama checkpoints (the good inputs)
    DEST/bad/<case>/                 one broken checkpoint per case in CASES
    DEST/recipes/<case>.yaml         a linear merge of models/base with bad/<case>
    DEST/recipes/*.yaml              the text cases of tests/bad_inputs/, copied
    DEST/recipes/...                 recipe files that are the problem (RECIPE_CASES): a folder, a
                                     FIFO, /dev/zero, 17 MiB, not UTF-8

Every case must make ``fusekit merge`` (run in DEST) exit with status 2 and one line naming the
culprit; tests/test_bad_inputs.py runs them all. Nothing here is committed as a binary: the test
builds the tree at session start. Cases are data (name → builder, culprit, extra CLI arguments), so
adding one is one entry.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEXT_CASES = ROOT / "tests" / "bad_inputs"


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, Path], None]  # (good model folder, case folder) -> None
    culprit: str = ""  # text the error line must contain; default "bad/<case>"
    args: tuple[str, ...] = ()


def _source(good: Path) -> tuple[dict[str, Any], bytes]:
    """The good model's header (without metadata) and data section."""
    raw = (good / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    return header, raw[8 + size:]


def _raw(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", *,
         length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _copy_side(good: Path, case: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        shutil.copy(good / name, case / name)


def _with_header(change: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], None]:
    """A case whose header is the good one after ``change`` (data section kept)."""
    def build(good: Path, case: Path) -> None:
        header, data = _source(good)
        change(header)
        _copy_side(good, case)
        _raw(case / "model.safetensors", header, data)
    return build


def _with_bytes(content: bytes) -> Callable[[Path, Path], None]:
    def build(good: Path, case: Path) -> None:
        _copy_side(good, case)
        (case / "model.safetensors").write_bytes(content)
    return build


def _first(header: dict[str, Any]) -> dict[str, Any]:
    return header[sorted(header)[0]]


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        _first(header)[key] = value
    return change


def _overlap(header: dict[str, Any]) -> None:
    entries = sorted(header.values(), key=lambda e: e["data_offsets"][0])
    first, second = entries[0], entries[1]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]


def _duplicate(good: Path, case: Path) -> None:
    header, data = _source(good)
    name = sorted(header)[0]
    text = json.dumps(header)
    text = text[:-1] + ", " + json.dumps(name) + ": " + json.dumps(header[name]) + "}"
    _copy_side(good, case)
    _raw(case / "model.safetensors", text.encode(), data)


def _trailing(good: Path, case: Path) -> None:
    header, data = _source(good)
    _copy_side(good, case)
    _raw(case / "model.safetensors", header, data + b"\0" * 64)


def _gap(good: Path, case: Path) -> None:
    header, data = _source(good)
    for entry in header.values():
        entry["data_offsets"] = [o + 16 for o in entry["data_offsets"]]
    _copy_side(good, case)
    _raw(case / "model.safetensors", header, b"\0" * 16 + data)


def _truncated(good: Path, case: Path) -> None:
    raw = (good / "model.safetensors").read_bytes()
    _copy_side(good, case)
    (case / "model.safetensors").write_bytes(raw[:len(raw) - 1000])


def _tensors(good: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(good / "model.safetensors")


def _save(case: Path, tensors: dict[str, Any], good: Path) -> None:
    from safetensors.torch import save_file

    _copy_side(good, case)
    save_file(tensors, case / "model.safetensors")


def _nonfinite(value: float) -> Callable[[Path, Path], None]:
    def build(good: Path, case: Path) -> None:
        tensors = _tensors(good)
        tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = value
        _save(case, tensors, good)
    return build


def _reshaped(good: Path, case: Path) -> None:
    tensors = _tensors(good)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-8].clone()
    _save(case, tensors, good)


def _missing_tensor(good: Path, case: Path) -> None:
    tensors = _tensors(good)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    _save(case, tensors, good)


def _sharded(good: Path, case: Path) -> dict[str, str]:
    """Split the good model into two shards with an index; return its weight map."""
    from safetensors.torch import save_file

    tensors = _tensors(good)
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for number, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-{number:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, case / file)
        weight_map.update({n: file for n in part})
    _copy_side(good, case)
    return weight_map


def _index(change: Callable[[Path, dict[str, str]], Any]) -> Callable[[Path, Path], None]:
    def build(good: Path, case: Path) -> None:
        weight_map = _sharded(good, case)
        payload = change(case, weight_map)
        text = payload if isinstance(payload, str) else json.dumps(
            {"metadata": {}, "weight_map": weight_map if payload is None else payload})
        (case / "model.safetensors.index.json").write_text(text)
    return build


def _escape_parent(case: Path, weight_map: dict[str, str]) -> dict[str, str]:
    (case.parent / "outside.safetensors").write_bytes(
        (case / "model-00001-of-00002.safetensors").read_bytes())
    return {name: "../outside.safetensors" for name in weight_map}


def _escape_symlink(case: Path, weight_map: dict[str, str]) -> None:
    target = case.parent / "elsewhere.safetensors"
    shard = case / "model-00001-of-00002.safetensors"
    target.write_bytes(shard.read_bytes())
    shard.unlink()
    os.symlink(target, shard)


def _fifo(good: Path, case: Path) -> None:
    _copy_side(good, case)
    os.mkfifo(case / "model.safetensors")


def _directory(good: Path, case: Path) -> None:
    _copy_side(good, case)
    (case / "model.safetensors").mkdir()


def _no_weights(good: Path, case: Path) -> None:
    _copy_side(good, case)


class _Hostile:
    """Unpickling this calls ``print``: harmless, but no weights-only loader may do it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return print, ("fusekit: a pickle ran code",)


def _pickle(good: Path, case: Path) -> None:
    _copy_side(good, case)
    with (case / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Hostile()}, handle)


# -- checkpoints that contradict themselves (config vs weights, file vs file, device links) --------


def _layer_count(count: int) -> Callable[[Path, Path], None]:
    """Good weights, with a config.json that counts ``count`` blocks."""
    def build(good: Path, case: Path) -> None:
        shutil.copy(good / "model.safetensors", case / "model.safetensors")
        config = json.loads((good / "config.json").read_text())
        (case / "config.json").write_text(json.dumps({**config, "num_hidden_layers": count}))
    return build


def _same_tensor_twice(good: Path, case: Path) -> None:
    """An extra un-indexed file redefining one tensor of model.safetensors."""
    from safetensors.torch import save_file

    tensors = _tensors(good)
    name = "model.layers.1.mlp.down_proj.weight"
    _copy_side(good, case)
    shutil.copy(good / "model.safetensors", case / "model.safetensors")
    save_file({name: tensors[name] * 2}, case / "model-extra.safetensors")


def _float8(good: Path, case: Path) -> None:
    import torch

    _save(case, {n: t.to(torch.float8_e4m3fn) for n, t in _tensors(good).items()}, good)


def _device_link(good: Path, case: Path) -> None:
    _copy_side(good, case)
    os.symlink("/dev/zero", case / "model.safetensors")


def _config(text: str | None) -> Callable[[Path, Path], None]:
    def build(good: Path, case: Path) -> None:
        shutil.copy(good / "model.safetensors", case / "model.safetensors")
        if text is not None:
            (case / "config.json").write_text(text)
    return build


CASES: dict[str, Case] = {
    "empty_file": Case(_with_bytes(b"")),
    "short_prefix": Case(_with_bytes(b"\x01\x02\x03")),
    "header_length_huge": Case(_with_bytes(struct.pack("<Q", 2**63) + b"{}      ")),
    "header_length_beyond_file": Case(_with_bytes(struct.pack("<Q", 4096) + b"{}      ")),
    "header_not_json": Case(_with_bytes(struct.pack("<Q", 8) + b"not json")),
    "header_array": Case(_with_bytes(struct.pack("<Q", 8) + b"[1,2,3] ")),
    "header_not_utf8": Case(_with_bytes(struct.pack("<Q", 8) + b"{\xff\xfe}    ")),
    "header_nested_bomb": Case(_with_bytes(struct.pack("<Q", 200_000) + b"{" + b"[" * 199_999)),
    "duplicate_tensor": Case(_duplicate),
    "entry_not_object": Case(_with_header(lambda h: h.update({sorted(h)[0]: 5}))),
    "unknown_dtype": Case(_with_header(_set("dtype", "F4"))),
    "dtype_not_string": Case(_with_header(_set("dtype", 7))),
    "shape_negative": Case(_with_header(_set("shape", [-1, 4]))),
    "shape_bool": Case(_with_header(_set("shape", [True]))),
    "shape_too_many_dims": Case(_with_header(_set("shape", [1] * 40))),
    "shape_huge": Case(_with_header(_set("shape", [2**40, 2**40]))),
    "offsets_outside_file": Case(_with_header(lambda h: _first(h).update(
        {"shape": [250_000_000_000], "data_offsets": [0, 10**12]}))),
    "offsets_reversed": Case(_with_header(_set("data_offsets", [64, 0]))),
    "offsets_one_number": Case(_with_header(_set("data_offsets", [0]))),
    "offsets_not_numbers": Case(_with_header(_set("data_offsets", ["0", "8"]))),
    "offsets_disagree_with_shape": Case(_with_header(_set("shape", [3]))),
    "tensors_overlap": Case(_with_header(_overlap)),
    "gap_between_tensors": Case(_gap),
    "trailing_bytes": Case(_trailing),
    "metadata_not_strings": Case(_with_header(lambda h: h.update({"__metadata__": {"a": 1}}))),
    "truncated_data": Case(_truncated),
    "fifo_instead_of_file": Case(_fifo),
    "directory_instead_of_file": Case(_directory),
    "no_weights": Case(_no_weights),
    "pickle_refused": Case(_pickle),
    "pickle_runs_code": Case(_pickle, args=("--allow-pickle",)),
    "index_parent_path": Case(_index(_escape_parent)),
    "index_absolute_path": Case(_index(lambda c, m: {n: "/etc/hostname" for n in m})),
    "index_symlink_escape": Case(_index(_escape_symlink)),
    "index_not_json": Case(_index(lambda c, m: "{ not json")),
    "index_weight_map_list": Case(_index(lambda c, m: json.dumps({"weight_map": list(m)}))),
    "index_missing_shard": Case(_index(lambda c, m: {**m, "extra.weight": "model-9.safetensors"})),
    "index_tensor_not_in_shard": Case(_index(lambda c, m: {**m, "ghost.weight": sorted(m.values())[0]})),
    "index_shard_not_string": Case(_index(lambda c, m: {n: 5 for n in m})),
    "tensor_shape_mismatch": Case(_reshaped, culprit="model.layers.0.mlp.up_proj.weight"),
    "tensor_missing": Case(_missing_tensor, culprit="model.layers.1.self_attn.q_proj.weight"),
    "nan_in_weights": Case(_nonfinite(float("nan")), culprit="model.layers.1.mlp.down_proj.weight"),
    "inf_in_weights": Case(_nonfinite(float("inf")), culprit="model.layers.1.mlp.down_proj.weight"),
    "config_not_json": Case(_config("{ this is not json")),
    "config_not_object": Case(_config("[1, 2]")),
    # checkpoints that contradict themselves (issue 15, item 6)
    "config_counts_fewer_layers": Case(_layer_count(1), culprit="bad/config_counts_fewer_layers/config.json"),
    "config_counts_more_layers": Case(_layer_count(3), culprit="bad/config_counts_more_layers/config.json"),
    "same_tensor_in_two_files": Case(_same_tensor_twice, culprit="model-extra.safetensors"),
    "float8_without_dtype": Case(_float8, culprit="bad/float8_without_dtype/model.safetensors"),
    "safetensors_link_to_device": Case(_device_link),
}


def _recipe_bytes(content: bytes) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        path.write_bytes(content)
    return build


def _recipe_folder(path: Path) -> None:
    path.mkdir()


def _recipe_fifo(path: Path) -> None:
    os.mkfifo(path)


def _recipe_device(path: Path) -> None:
    os.symlink("/dev/zero", path)


def _recipe_huge_template(path: Path) -> None:
    """A valid recipe whose inline chat_template makes it 17 MiB, over the 16 MiB recipe limit."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write("merge_method: linear\nmodels: [{model: models/base, parameters: {weight: 1}}]\n"
                     "chat_template: '{{ bos_token }}")
        handle.write("x" * (17 * 2**20))
        handle.write("'\n")


@dataclass(frozen=True)
class RecipeCase:
    """A recipe file that is itself the problem: its path (under DEST), builder and culprit."""

    path: str
    build: Callable[[Path], None]
    culprit: str


RECIPE_CASES: dict[str, RecipeCase] = {
    "not_utf8": RecipeCase("recipes/not_utf8.yaml",
                           _recipe_bytes(b"merge_method: linear\nmodels: [\xff\xfe]\n"), "not_utf8.yaml"),
    "recipe_is_folder": RecipeCase("recipes/recipe_is_folder.yaml", _recipe_folder, "is a folder"),
    "recipe_is_fifo": RecipeCase("recipes/recipe_is_fifo.yaml", _recipe_fifo, "FIFO"),
    "recipe_is_dev_zero": RecipeCase("recipes/recipe_is_dev_zero.yaml", _recipe_device,
                                     "character device"),
    "recipe_17_mib_chat_template": RecipeCase("recipes/recipe_17_mib.yaml", _recipe_huge_template,
                                              "FUSEKIT_MAX_RECIPE_BYTES"),
    "recipe_under_a_file": RecipeCase("recipes/not_utf8.yaml/recipe.yaml", lambda path: None,
                                      "recipe file not found"),
    "recipe_missing": RecipeCase("recipes/no_such_recipe.yaml", lambda path: None, "no_such_recipe.yaml"),
}


def build(dest: Path) -> dict[str, dict[str, Any]]:
    """Build the tree under ``dest``; return case name → {recipe, culprit, args}."""
    sys.path.insert(0, str(ROOT))
    from fusekit.demo import build_demo_models

    dest.mkdir(parents=True, exist_ok=True)
    models = build_demo_models(dest / "models", hidden_size=32, num_layers=2, vocab_size=64,
                               num_attention_heads=4, num_key_value_heads=2, with_tokenizer=False)
    (dest / "recipes").mkdir(exist_ok=True)
    manifest: dict[str, dict[str, Any]] = {}
    for name, case in CASES.items():
        folder = dest / "bad" / name
        folder.mkdir(parents=True)
        case.build(models["base"], folder)
        recipe = dest / "recipes" / f"{name}.yaml"
        recipe.write_text("merge_method: linear\nmodels:\n  - model: models/base\n"
                          f"    parameters: {{weight: 0.5}}\n  - model: bad/{name}\n"
                          "    parameters: {weight: 0.5}\n", encoding="utf-8")
        manifest[name] = {"recipe": f"recipes/{name}.yaml", "culprit": case.culprit or f"bad/{name}",
                          "args": list(case.args)}
    for name, recipe_case in RECIPE_CASES.items():
        recipe_case.build(dest / recipe_case.path)
        manifest[f"recipe_{name}"] = {"recipe": recipe_case.path, "culprit": recipe_case.culprit,
                                      "args": []}
    for text_case in sorted(TEXT_CASES.glob("*.yaml")):
        shutil.copy(text_case, dest / "recipes" / text_case.name)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to create (must not exist)")
    args = parser.parse_args()
    if args.dest.exists():
        parser.error(f"{args.dest} exists; choose a new folder")
    manifest = build(args.dest)
    (args.dest / "cases.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(manifest)} checkpoint cases in {args.dest}; text cases: "
          f"{len(list(TEXT_CASES.glob('*.yaml')))} in {TEXT_CASES}")


if __name__ == "__main__":
    main()
