"""Demo experts: layout, held-out split, router data, determinism, mergeability, specialisation."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from safetensors.torch import load_file

import fusekit
from fusekit.demo import DOMAINS, QUICK, ExpertSet, build_demo_experts, evaluate_experts, load_expert_set
from fusekit.demo.corpora import SOURCES, pick_examples, split_documents
from fusekit.errors import OutputExistsError
from fusekit.lm import load_lm, score_text

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> ExpertSet:
    return build_demo_experts(tmp_path_factory.mktemp("experts") / "out", quick=True, seed=0)


def _lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_manifest_and_folders(experts: ExpertSet) -> None:
    manifest = json.loads((experts.root / "experts.json").read_text(encoding="utf-8"))
    assert [(e["name"], e["domain"], e["tokenizer"], e["path"]) for e in manifest["experts"]] == [
        ("python", "python", "A", "python"), ("c", "c", "A", "c"), ("prose", "prose", "A", "prose"),
        ("prose-b", "prose", "B", "prose-b")]
    assert manifest["base"] == {"name": "base", "tokenizer": "A", "path": "base"}
    assert load_expert_set(experts.root) == experts
    assert experts.base == experts.root / "base"
    folders = {"base": experts.base, **{n: e.path for n, e in experts.experts.items()}}
    configs = {n: json.loads((f / "config.json").read_text()) for n, f in folders.items()}
    tokenizers = {n: (f / "tokenizer.json").read_bytes() for n, f in folders.items()}
    # base, python, c and prose can be merged: one configuration, one tokenizer
    assert configs["base"] == configs["python"] == configs["c"] == configs["prose"]
    assert tokenizers["base"] == tokenizers["python"] == tokenizers["c"] == tokenizers["prose"]
    assert tokenizers["prose"] != tokenizers["prose-b"]
    assert configs["prose-b"]["vocab_size"] != configs["python"]["vocab_size"]
    assert {k: v for k, v in configs["prose-b"].items() if k != "vocab_size"} == {
        k: v for k, v in configs["python"].items() if k != "vocab_size"}
    for expert in experts.experts.values():
        lm = load_lm(expert.path)
        assert lm.tokenizer is not None and lm.tokenizer.bos_token == "<s>"
        assert lm.model.config.vocab_size == len(lm.tokenizer)
        assert (expert.path / "model.safetensors").is_file()


def test_heldout_texts(experts: ExpertSet) -> None:
    texts = {name: path.read_text(encoding="utf-8") for name, path in experts.heldout.items()}
    assert set(texts) == {*DOMAINS, "mixed"}
    for domain in DOMAINS:
        assert QUICK.heldout_bytes // 2 < len(texts[domain]) <= QUICK.heldout_bytes
    assert "def " in texts["python"] and "#" in texts["c"]
    # mixed: equal parts, alternating runs of lines each taken from one domain's held-out text
    share = dict.fromkeys(DOMAINS, 0)
    runs, run = 0, ""
    for line in [*texts["mixed"].splitlines(keepends=True), None]:
        if line is not None and any(run + line in texts[d] for d in DOMAINS):
            run += line
            continue
        owner = next(d for d in DOMAINS if run in texts[d])
        share[owner] += len(run)
        runs += 1
        run = line or ""
    assert runs >= 3
    assert min(share.values()) > 0.5 * max(share.values()), share


def test_router_data(experts: ExpertSet) -> None:
    train, test = _lines(experts.data["train"]), _lines(experts.data["test"])
    for split, rows, count in (("train", train, QUICK.train_examples), ("test", test, QUICK.test_examples)):
        assert all(set(r) == {"text", "domain", "group"} and r["text"].strip() for r in rows)
        # group: the source document, so cross-validation keeps a document's pieces in one fold
        assert all(r["group"].rsplit("/", 1)[0] == f"{r['domain']}/{split}" for r in rows)
        assert len({r["group"] for r in rows}) > len(DOMAINS)
        assert [sum(r["domain"] == d for r in rows) for d in DOMAINS] == [count] * len(DOMAINS)
        assert len({r["text"] for r in rows}) == len(rows)  # no prompt twice
    assert not {r["text"] for r in test} & {r["text"] for r in train}  # held-out documents only


def test_four_groups_are_disjoint() -> None:
    """Training text, held-out text, router-train and router-test prompts come from distinct documents,
    and no router prompt occurs in any expert's training text."""
    corpora = {d: split_documents(SOURCES[d](QUICK.doc_bytes), QUICK, d) for d in DOMAINS}
    groups = ("train", "heldout", "router", "pool")
    for domain, corpus in corpora.items():
        docs = {g: getattr(corpus, g) for g in groups}
        assert all(docs[g] for g in groups), domain
        owners: dict[str, str] = {}
        for group in groups:
            for doc in docs[group]:
                assert owners.setdefault(doc, group) == group, (domain, group, owners[doc])
        assert sum(map(len, docs["train"])) >= QUICK.train_bytes
        assert sum(map(len, docs["router"])) >= QUICK.router_bytes
    # pick_examples drops a piece that occurs in the text it must not overlap, and only such a piece
    line = "a line that is long enough\n"
    assert not pick_examples([line * 4], 3, 20, unseen=line)
    assert pick_examples([line * 4], 3, 20, unseen="other text\n")


def test_router_prompts_never_trained_on(experts: ExpertSet) -> None:
    """No prompt of data/train.jsonl or data/test.jsonl occurs in the text the experts trained on
    (rebuilt from the same sources)."""
    trained = "\n".join(doc for d in DOMAINS
                         for doc in split_documents(SOURCES[d](QUICK.doc_bytes), QUICK, d).train)
    prompts = [r["text"] for name in ("train", "test") for r in _lines(experts.data[name])]
    assert len(prompts) == len(DOMAINS) * (QUICK.train_examples + QUICK.test_examples)
    assert not [p for p in prompts if p in trained]


def test_same_seed_same_bytes_other_seed_other_weights(experts: ExpertSet, tmp_path: Path) -> None:
    again = build_demo_experts(tmp_path / "again", quick=True, seed=0)
    other = build_demo_experts(tmp_path / "other", quick=True, seed=1)
    files = sorted(p.relative_to(experts.root) for p in experts.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for rel in files:
        assert (experts.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    a = load_file(experts.experts["python"].path / "model.safetensors")
    b = load_file(other.experts["python"].path / "model.safetensors")
    assert any(not a[k].equal(b[k]) for k in a)
    mixed = Path("heldout/mixed.txt")
    assert (experts.root / mixed).read_bytes() == (other.root / mixed).read_bytes()


def test_refuses_a_non_empty_output(experts: ExpertSet) -> None:
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_demo_experts(experts.root, quick=True)


def test_same_tokenizer_experts_merge_and_score(experts: ExpertSet, tmp_path: Path) -> None:
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {experts.base}\nmodels:\n"
        f"  - model: {experts.experts['python'].path}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {experts.experts['c'].path}\n    parameters: {{weight: 0.5}}\n"
        "dtype: float32\n", encoding="utf-8")
    fusekit.merge(recipe, tmp_path / "merged")
    result = score_text(load_lm(tmp_path / "merged"), experts.heldout["mixed"].read_text(encoding="utf-8"))
    assert 0 < result.bits_per_byte < 20 and result.n_tokens > 0


def test_a_short_training_already_specialises(tmp_path: Path) -> None:
    """40 steps of the tiny model: each tokenizer-A expert is best of the three on its own domain."""
    built = build_demo_experts(tmp_path / "x", sizes=dataclasses.replace(QUICK, steps=40, batch=8),
                               workers=1)
    table = evaluate_experts(built)
    for domain in DOMAINS:
        best = min(("python", "c", "prose"), key=lambda name: table[name][domain])
        assert best == domain, table


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_experts", ROOT / "scripts/make_demo_experts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_builds_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _script().main([str(tmp_path / "out"), "--quick"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["expert", "python", "c", "prose", "mixed"]
    assert [line.split()[0] for line in out[2:]] == ["python", "c", "prose", "prose-b"]
    assert all(0 < float(x) < 20 for line in out[2:] for x in line.split()[1:])


def test_script_without_transformers_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    module = _script()
    real = importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert module.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'transformers>=4.45'" in err
    assert not (tmp_path / "out").exists()


def test_router_prompts_name_the_first_document_they_come_from() -> None:
    line = "x = 1  # the same line in two files\n"
    documents = ["".join(f"doc{d} line {i}\n" for i in range(40)) + line * 3 for d in range(3)]
    pieces = pick_examples(documents, 8, 40)
    assert 0 < len(pieces) <= 8 and len({p for p, _ in pieces}) == len(pieces)
    for piece, index in pieces:
        assert piece in documents[index]
        assert not any(piece in documents[other] for other in range(index))
