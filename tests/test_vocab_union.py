"""Tokenizer surgery (``tokenizer_source: union | base | <model>``, the ``tokenizer:`` block): the
output vocabulary, every model's embedding / LM-head rows permuted and filled as mergekit 0.1.5 does,
checked against float64 references written here, and the written tokenizer loaded with transformers.

Three tiny models (hidden 32, 2 layers) with byte-level tokenizers that differ: ``math`` lacks one of
``base``'s symbols and has an ordinary token of its own, and each adds its own special tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli, load_weights, write_recipe
from safetensors.torch import load_file, save_file

from fusekit.demo import build_demo_models
from fusekit.merging import merge, plan_merge

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return in_process_cli(capsys)

HIDDEN = 32
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
SYMBOLS = [chr(33 + i) for i in range(56)]
MEMBERS = {  # name -> (rows, ordinary tokens after the specials, added tokens in id order)
    "base": (64, SYMBOLS, []),
    "math": (62, [*SYMBOLS[:55], "é"], ["<|im_start|>", "<|math|>"]),
    "code": (63, SYMBOLS, ["<|code|>", "<|im_start|>", "<|im_end|>"]),
}
# mergekit's union: the base's tokens, the others' new ordinary tokens, then their added tokens
UNION = [*SPECIALS, *SYMBOLS, "é", "<|im_start|>", "<|math|>", "<|code|>", "<|im_end|>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def member_vocab(name: str) -> dict[str, int]:
    _, ordinary, added = MEMBERS[name]
    return {token: i for i, token in enumerate([*SPECIALS, *ordinary, *added])}


def added_entry(token_id: int, content: str) -> dict[str, object]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def write_tokenizer(folder: Path, name: str, *, metaspace: bool = False) -> None:
    vocab = member_vocab(name)
    ordinary = {t: i for t, i in vocab.items() if i < len(SPECIALS) + len(MEMBERS[name][1])}
    added = [added_entry(i, t) for t, i in vocab.items() if t in SPECIALS or t not in ordinary]
    scheme = ({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
              if metaspace else {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": True})
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": scheme, "post_processor": None, "decoder": scheme,
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": ordinary, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 128}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def build_member(parent: Path, name: str, seed: int) -> Path:
    rows = MEMBERS[name][0]
    folder = build_demo_models(parent / name, names=(name,), hidden_size=HIDDEN, num_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=rows,
                               with_tokenizer=False, seed=seed)[name]
    write_tokenizer(folder, name)
    return folder


@pytest.fixture(scope="session")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    parent = tmp_path_factory.mktemp("union")
    return {name: build_member(parent, name, seed) for seed, name in enumerate(MEMBERS)}


def stored(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_weights(folder).items()}


def reference_rows(weights: dict[str, dict[str, torch.Tensor]], tensor: str, vocab: list[str], *,
                   base: str | None, size: int | None = None,
                   fills: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Each model's aligned ``tensor`` in float64, written from mergekit's rules."""
    vocabs = {name: member_vocab(name) for name in weights}
    result = {}
    for name in weights:
        rows = torch.zeros(size or len(vocab), HIDDEN, dtype=torch.float64)
        for out_id, token in enumerate(vocab):
            having = [m for m in weights if token in vocabs[m]]
            if fills and token in fills:
                rows[out_id] = fills[token]
            elif token in vocabs[name]:
                rows[out_id] = weights[name][tensor][vocabs[name][token]]
            elif len(having) == 1 or base in having:
                donor = having[0] if len(having) == 1 else base
                rows[out_id] = weights[donor][tensor][vocabs[donor][token]]
            elif having:
                rows[out_id] = sum(weights[m][tensor][vocabs[m][token]] for m in having) / len(having)
        if size and size > len(vocab):
            rows[len(vocab):] = rows[:len(vocab)].mean(dim=0)
        result[name] = rows
    return result


def linear_recipe(members: dict[str, Path], tokenizer: str, *, base: bool = True) -> str:
    weights = {"base": 0.5, "math": 0.3, "code": 0.2}
    entries = "".join(f"  - {{model: {members[n]}, parameters: {{weight: {w}}}}}\n"
                      for n, w in weights.items())
    return ("merge_method: linear\nparameters: {normalize: false}\n"
            + (f"base_model: {members['base']}\n" if base else "") + f"models:\n{entries}{tokenizer}")


def linear_of(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return 0.5 * rows["base"] + 0.3 * rows["math"] + 0.2 * rows["code"]


def check_tokenizer(out: Path, vocab: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert [tokenizer.convert_tokens_to_ids(t) for t in vocab] == list(range(len(vocab)))
    for name in MEMBERS:
        for token in member_vocab(name):
            assert tokenizer.convert_tokens_to_ids(token) == vocab.index(token), (name, token)


def test_union_linear_matches_float64_reference(members: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(members, "tokenizer_source: union\n"))
    merge(recipe, tmp_path / "out", out_shard_size=None)
    out = load_weights(tmp_path / "out")
    weights = {name: stored(folder) for name, folder in members.items()}
    for tensor in (EMBED, HEAD):
        rows = reference_rows(weights, tensor, UNION, base="base")
        assert out[tensor].shape == (len(UNION), HIDDEN)
        torch.testing.assert_close(out[tensor].double(), linear_of(rows), rtol=0, atol=1e-6)
    # spot checks of the rules: the base's row fills a base token math lacks; a token two models
    # add (but not the base) is their mean in the base's row
    assert torch.allclose(rows["math"][59], weights["base"][HEAD][59])
    mean = (weights["math"][HEAD][60] + weights["code"][HEAD][61]) / 2
    assert torch.allclose(rows["base"][UNION.index("<|im_start|>")], mean)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == len(UNION)
    check_tokenizer(tmp_path / "out", UNION)


def test_plan_shows_union_size_and_missing_tokens(members: dict[str, Path], tmp_path: Path,
                                                   cli: Cli) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(members, "tokenizer: {source: union}\n"))
    plan = plan_merge(recipe)
    assert plan.vocab is not None and plan.vocab.vocab.length == len(UNION)
    assert plan.vocab.missing() == {str(members["base"]): 5, str(members["math"]): 3, str(members["code"]): 2}
    code, out, _ = cli("plan", str(recipe))
    assert code == 0 and f"union, {len(UNION)} tokens in {len(UNION)} rows" in out
    assert f"{members['math']} 3" in out


def test_ties_over_union_equals_ties_over_aligned(members: dict[str, Path], tmp_path: Path) -> None:
    """Any method runs on the aligned rows: the same ties merge of checkpoints aligned by hand."""
    weights = {name: stored(folder) for name, folder in members.items()}
    aligned = {}
    for name, folder in members.items():
        target = tmp_path / "aligned" / name
        target.mkdir(parents=True)
        tensors = {k: v.float() for k, v in weights[name].items()}
        for tensor in (EMBED, HEAD):
            tensors[tensor] = reference_rows(weights, tensor, UNION, base="base")[name].float()
        save_file(tensors, target / "model.safetensors")
        config = json.loads((folder / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "vocab_size": len(UNION)}))
        aligned[name] = target
    ties = ("merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.5, weight: 0.5}}\n"
            "models:\n  - model: {math}\n  - model: {code}\n")
    union = write_recipe(tmp_path / "u.yaml", ties.format(**members) + "tokenizer_source: union\n")
    by_hand = write_recipe(tmp_path / "h.yaml", ties.format(**aligned))
    merge(union, tmp_path / "u", out_shard_size=None)
    merge(by_hand, tmp_path / "h", out_shard_size=None)
    ours, theirs = load_weights(tmp_path / "u"), load_weights(tmp_path / "h")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


@pytest.mark.parametrize("source", ["base", "code"])
def test_base_and_model_sources(members: dict[str, Path], tmp_path: Path, source: str) -> None:
    recipe = write_recipe(tmp_path / "r.yaml",
                          linear_recipe(members, f"tokenizer_source: {members.get(source, source)}\n"
                                        if source != "base" else "tokenizer_source: base\n"))
    merge(recipe, tmp_path / "out", out_shard_size=None)
    vocab = [t for t, _ in sorted(member_vocab(source).items(), key=lambda item: item[1])]
    out = load_weights(tmp_path / "out")
    weights = {name: stored(folder) for name, folder in members.items()}
    for tensor in (EMBED, HEAD):
        rows = reference_rows(weights, tensor, vocab, base="base")
        torch.testing.assert_close(out[tensor].double(), linear_of(rows), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(vocab)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert [tokenizer.convert_tokens_to_ids(t) for t in vocab] == list(range(len(vocab)))


def test_tokens_overrides_and_padding(members: dict[str, Path], tmp_path: Path) -> None:
    block = ("tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n  tokens:\n"
             f"    <|im_start|>: {{source: {{kind: model_token, model: {members['math']}, token: '<s>'}}, "
             "force: true}\n"
             "    <|code|>: {source: {kind: zero}}\n"
             f"    <|math|>: {{source: {members['math']}}}\n"
             "    <|new|>: {source: {kind: zero}}\n")
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(members, block, base=False))
    merge(recipe, tmp_path / "out", out_shard_size=None)
    vocab = [*UNION, "<|new|>"]
    out = load_weights(tmp_path / "out")
    weights = {name: stored(folder) for name, folder in members.items()}
    for tensor in (EMBED, HEAD):
        fills = {"<|im_start|>": weights["math"][tensor][1], "<|new|>": torch.zeros(HIDDEN,
                                                                                   dtype=torch.float64)}
        rows = reference_rows(weights, tensor, vocab, base=None, size=80, fills=fills)
        for name in ("base", "math"):  # <|code|>: zeros where the model lacks it, code keeps its own
            rows[name][vocab.index("<|code|>")] = 0
        for name in MEMBERS:
            rows[name][80 - 14:] = rows[name][:len(vocab)].mean(dim=0)
        assert out[tensor].shape == (80, HIDDEN)
        torch.testing.assert_close(out[tensor].double(), linear_of(rows), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 80
    check_tokenizer(tmp_path / "out", vocab)


@pytest.mark.parametrize(("tokenizer", "expected"), [
    ("tokenizer:\n  tokens:\n    <x>: {source: somewhere/else}\n", "somewhere/else"),
    ("tokenizer:\n  tokens:\n    <x>: {source: {kind: model_token, model: MATH, token: '<nope>'}}\n",
     "'<nope>'"),
    ("tokenizer:\n  pad_to_multiple_of: 0\n", "tokenizer.pad_to_multiple_of"),
])
def test_bad_tokens_entries_are_one_line(members: dict[str, Path], tmp_path: Path, cli: Cli,
                                         tokenizer: str, expected: str) -> None:
    text = linear_recipe(members, tokenizer.replace("MATH", str(members["math"])))
    recipe = write_recipe(tmp_path / "r.yaml", text)
    code, _, err = cli("merge", str(recipe), str(tmp_path / "out"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out").exists()


def test_union_of_different_schemes_is_refused(members: dict[str, Path], tmp_path: Path,
                                               cli: Cli) -> None:
    other = build_member(tmp_path, "code", seed=7)
    write_tokenizer(other, "code", metaspace=True)
    text = linear_recipe({**members, "code": other}, "tokenizer_source: union\n")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    code, _, err = cli("merge", str(recipe), str(tmp_path / "out"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "BPE, byte-level" in lines[0] and "BPE, metaspace" in lines[0] and "cannot be combined" in lines[0]
    assert not (tmp_path / "out").exists()


def test_union_merge_imports_no_transformers(members: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(members, "tokenizer_source: union\n"))
    code = ("import sys; from fusekit.cli import main\n"
            "try:\n    main(['merge', sys.argv[1], sys.argv[2], '--quiet'])\n"
            "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
            "assert 'tokenizers' not in sys.modules, 'tokenizers was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, str(recipe), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_file(tmp_path / "out" / "model.safetensors")[EMBED].shape[0] == len(UNION)


def test_row_blocks_equal_the_whole_tensor(members: dict[str, Path], tmp_path: Path) -> None:
    """The executor may read an aligned tensor in row blocks (``--max-memory``): same rows."""
    from fusekit.io.reader import open_reader
    from fusekit.vocab import align_readers

    text = linear_recipe(members, "tokenizer: {source: union, pad_to_multiple_of: 16}\n")
    plan = plan_merge(write_recipe(tmp_path / "r.yaml", text))
    readers = align_readers({ref: open_reader(m) for ref, m in plan.models.items()}, plan.vocab)
    for task in plan.tasks:
        if task.output in (EMBED, HEAD):
            for tensor_input in task.all_inputs:
                reader = readers[tensor_input.model]
                whole = reader.get(tensor_input.name)
                blocks = [reader.get(tensor_input.name, (start, min(80, start + 7)))
                          for start in range(0, 80, 7)]
                assert whole.shape == (80, HIDDEN)
                assert torch.equal(torch.cat(blocks), whole)
                assert torch.equal(whole[66], whole[79])  # padding rows: one mean row
