"""``fusekit ensemble``: combine functions against float64 references, the invariants the issue
names, cross-vocabulary decoding and scoring, relative tables, cascade, vote/MBR and the CLI."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusekit
from fusekit.demo import build_demo_models
from fusekit.ensemble import combine
from fusekit.ensemble.align.relative import AlignmentMemoryError, RelativeAligner
from fusekit.ensemble.cascade import cascade_step
from fusekit.ensemble.cross_vocab import RelativeMethod
from fusekit.ensemble.engine import Ensemble, load_ensemble, load_members
from fusekit.ensemble.members import TextStream, longest_complete_prefix
from fusekit.ensemble.recipe import parse_ensemble_recipe
from fusekit.ensemble.scoring import score_ensemble
from fusekit.ensemble.vote import chrf, majority, mbr, normalise, token_f1
from fusekit.errors import FusekitError, RecipeError
from fusekit.lm import LoadedLM, load_lm, score_text

# --- tiny trained models: two share the demo byte-level tokenizer, one has its own BPE ----------

PACKAGE = Path(fusekit.__file__).resolve().parent


def corpus(kind: str) -> str:
    """Deterministic ASCII training text: fusekit's own source code or its docstrings' prose."""
    files = sorted((PACKAGE / "recipe").glob("*.py")) + sorted((PACKAGE / "io").glob("*.py"))
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    if kind == "code":
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(('"', "#"))]
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip()[0].isalpha()
                 and ln.strip().endswith((".", ",")) and " " in ln.strip()]
    return "\n".join(lines).encode("ascii", "ignore").decode()[:40_000]


def bpe_tokenizer(folder: Path, text: str, vocab_size: int = 400) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)


def train(folder: Path, text: str, *, steps: int = 12, seed: int = 0) -> None:
    """A few Adam steps of next-token prediction on ``text``; saved back as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    seq, batch = 48, 8
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)


def build_models(root: Path) -> dict[str, Path]:
    """code_a, prose_a (byte tokenizer A), prose_b (BPE tokenizer B); hidden 32, 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    code, prose = corpus("code"), corpus("prose")
    folders = build_demo_models(root / "a", names=("code_a", "prose_a"), hidden_size=32, num_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
    out = {"code_a": folders["code_a"], "prose_a": folders["prose_a"]}
    train(out["code_a"], code, seed=1)
    train(out["prose_a"], prose, seed=2)
    b = root / "prose_b"
    b.mkdir(parents=True, exist_ok=True)
    bpe_tokenizer(b, code + prose)
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(b)
    train(b, prose, seed=3)
    out["prose_b"] = b
    no_tok = root / "no_tokenizer"
    shutil.copytree(out["code_a"], no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tok / name).unlink(missing_ok=True)
    out["no_tokenizer"] = no_tok
    return out


RunCli = Callable[..., subprocess.CompletedProcess[str]]
PROMPTS = ["def merge(", "The recipe", "import os\n"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("ens"))


@pytest.fixture(scope="module")
def heldout() -> str:
    code, prose = corpus("code"), corpus("prose")
    return code[-700:] + "\n" + prose[-500:] + " caf\u00e9 na\u00efve \u2014 \u00fcber\n"


def recipe(models: dict[str, Path], names: list[str], method: str = "prob_avg", extra: str = "",
           weights: list[float] | None = None, cache: Path | None = None) -> str:
    rows = "".join(f"  - model: {models[n]}\n" + (f"    weight: {weights[i]}\n" if weights else "")
                   for i, n in enumerate(names))
    params = f"parameters: {{cache_dir: {cache}}}\n" if cache and "parameters" not in extra else ""
    return f"models:\n{rows}method: {method}\n{params}{extra}"


@functools.cache
def lm_of(folder: Path) -> LoadedLM:
    return load_lm(folder)


def ensemble(text: str) -> Ensemble:
    parsed, source = parse_ensemble_recipe(text, "ens.yaml")
    return load_ensemble(parsed)


def greedy_reference(folder: Path, prompt: str, n: int) -> list[int]:
    """Plain greedy decoding without a KV cache: the whole sequence is run at every step."""
    lm = lm_of(folder)
    assert lm.tokenizer is not None
    ids = [lm.tokenizer.bos_token_id, *lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == lm.tokenizer.eos_token_id:
                break
    return out


def decode(folder: Path, ids: list[int]) -> str:
    lm = lm_of(folder)
    assert lm.tokenizer is not None
    return str(lm.tokenizer.decode(ids, skip_special_tokens=True))


# --- combine functions --------------------------------------------------------------------------

logprob_stacks = st.integers(2, 4).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-8, 8), min_size=n * 5, max_size=n * 5),
    st.lists(st.floats(0.05, 5), min_size=n, max_size=n)))


@settings(max_examples=40, deadline=None)
@given(logprob_stacks)
def test_prob_and_logit_avg_match_float64_reference(data: tuple[list[float], list[float]]) -> None:
    values, raw_w = data
    n = len(raw_w)
    lp = torch.log_softmax(torch.tensor(values, dtype=torch.float64).reshape(n, 5), -1)
    w = torch.tensor(raw_w, dtype=torch.float64) / sum(raw_w)
    ref_prob = torch.log(sum(w[i] * lp[i].exp() for i in range(n)))
    ref_logit = torch.log_softmax(sum(w[i] * lp[i] for i in range(n)), -1)
    assert torch.allclose(combine.prob_avg(lp.float(), w.float()).double(), ref_prob, atol=1e-5)
    assert torch.allclose(combine.logit_avg(lp.float(), w.float()).double(), ref_logit, atol=1e-5)
    self_mix = torch.stack([lp[0], lp[0]])
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(combine.prob_avg(self_mix, half), lp[0], atol=1e-12)
    assert torch.allclose(combine.logit_avg(self_mix, half), lp[0], atol=1e-12)
    shift = torch.arange(n, dtype=torch.float32)[:, None] * 3 - 2  # raw logits: log-probs plus a shift
    for method, ref in (("prob_avg", ref_prob), ("logit_avg", ref_logit)):
        mixed = combine.mix_logits((lp.float() + shift)[:, None], w.float(), method)[0]
        assert torch.allclose(mixed.double(), ref, atol=1e-5)


def test_weights_one_zero_give_the_first_member() -> None:
    """Recipes need weights > 0; the limit [1, 0] is checked on the combine functions directly."""
    lp = torch.log_softmax(torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)), -1)
    w = torch.tensor([1.0, 0.0])
    assert torch.equal(combine.prob_avg(lp, w), lp[0])
    assert torch.allclose(combine.logit_avg(lp, w), lp[0], atol=1e-6)


def test_gate_and_cascade_pick_by_confidence() -> None:
    sure = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]]))
    other = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    gated = combine.gate(sure, other, 0.5)
    assert torch.equal(gated[0], sure[0]) and torch.equal(gated[1], other[1])
    picked, chosen = combine.cascade(torch.stack([sure, other]), 0.5)
    assert chosen.tolist() == [0, 1] and torch.equal(picked[1], other[1])
    calls: list[int] = []

    def member(i: int) -> torch.Tensor:
        calls.append(i)
        return [sure, other][i]

    lazy, who = cascade_step(member, 2, 0.95)
    assert who.tolist() == [1, 1] and calls == [0, 1] and torch.equal(lazy, other)
    calls.clear()
    cascade_step(member, 2, 0.3)
    assert calls == [0]  # nobody unsure: the expensive member never runs


# --- invariants on real checkpoints -------------------------------------------------------------

def test_ensemble_of_a_model_with_itself_is_the_model(models: dict[str, Path], heldout: str) -> None:
    for method in ("prob_avg", "logit_avg"):
        ens = ensemble(recipe(models, ["code_a", "code_a"], method))
        result = ens.generate(PROMPTS, max_new_tokens=12)
        for prompt, answer in zip(PROMPTS, result.answers, strict=True):
            assert answer.text == decode(models["code_a"], greedy_reference(models["code_a"], prompt, 12))
        scored = score_ensemble(ens, heldout, context=64)
        alone = score_text(lm_of(models["code_a"]), heldout, context=64)
        assert scored.ensemble.n_tokens == alone.n_tokens and scored.ensemble.n_bytes == alone.n_bytes
        assert scored.ensemble.nll_nats == pytest.approx(alone.nll_nats, rel=1e-6)
        assert scored.members[0].nll_nats == pytest.approx(alone.nll_nats, rel=1e-9)


def test_a_vanishing_weight_gives_the_first_model(models: dict[str, Path], heldout: str) -> None:
    ens = ensemble(recipe(models, ["code_a", "prose_a"], weights=[1.0, 1e-12]))
    answers = ens.generate(PROMPTS[:2], max_new_tokens=10).answers
    for prompt, answer in zip(PROMPTS[:2], answers, strict=True):
        assert answer.text == decode(models["code_a"], greedy_reference(models["code_a"], prompt, 10))
    alone = score_text(lm_of(models["code_a"]), heldout)
    assert score_ensemble(ens, heldout).ensemble.nll_nats == pytest.approx(alone.nll_nats, rel=1e-6)


def test_union_and_topk_union_with_one_tokenizer_equal_prob_avg(models: dict[str, Path],
                                                                 heldout: str) -> None:
    names = ["code_a", "prose_a"]
    base = ensemble(recipe(models, names, weights=[2, 1]))
    union = ensemble(recipe(models, names, "union", weights=[2, 1]))
    topk = ensemble(recipe(models, names, "topk_union", "parameters: {top_k: 100000}\n", weights=[2, 1]))
    want = [a.text for a in base.generate(PROMPTS, max_new_tokens=10).answers]
    assert [a.text for a in union.generate(PROMPTS, max_new_tokens=10).answers] == want
    assert [a.text for a in topk.generate(PROMPTS, max_new_tokens=10).answers] == want
    assert score_ensemble(union, heldout).ensemble.nll_nats == pytest.approx(
        score_ensemble(base, heldout).ensemble.nll_nats, rel=1e-6)


def test_batched_and_seeded_generation(models: dict[str, Path]) -> None:
    ens = ensemble(recipe(models, ["code_a", "prose_a"], "logit_avg"))
    batched = [a.text for a in ens.generate(PROMPTS, max_new_tokens=8, batch_size=3).answers]
    single = [ens.generate([p], max_new_tokens=8).answers[0].text for p in PROMPTS]
    assert batched == single
    one = ens.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=5).answers
    two = ens.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=5).answers
    other = ens.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=6).answers
    assert [a.text for a in one] == [a.text for a in two] != [a.text for a in other]


def test_prob_avg_decoding_matches_a_float64_reference_without_caches(models: dict[str, Path]) -> None:
    ens = ensemble(recipe(models, ["code_a", "prose_a"], "prob_avg", weights=[1.0, 3.0]))
    got = [a.text for a in ens.generate(PROMPTS, max_new_tokens=6, batch_size=3).answers]
    lms = [lm_of(models["code_a"]), lm_of(models["prose_a"])]
    for prompt, text in zip(PROMPTS, got, strict=True):
        tok = lms[0].tokenizer
        assert tok is not None
        ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
        out: list[int] = []
        with torch.inference_mode():
            for _ in range(6):
                x = torch.tensor([ids + out])
                probs = [torch.softmax(lm.model(input_ids=x).logits[0, -1].double(), -1) for lm in lms]
                out.append(int((0.25 * probs[0] + 0.75 * probs[1]).argmax()))
                if out[-1] == tok.eos_token_id:
                    break
        assert text == decode(models["code_a"], out)


# --- different tokenizers -------------------------------------------------------------------------

def test_text_stream_keeps_cache_consistent_and_spells_the_text(models: dict[str, Path]) -> None:
    member = load_members(parse_ensemble_recipe(recipe(models, ["prose_b"]))[0])[0]
    stream = TextStream(member)
    text = corpus("prose")[:400] + " \u00e9t\u00e9"
    data = text.encode()
    for end in [*range(1, 120, 7), 300, 299, len(data)]:
        prefix = data[:end]
        cut = longest_complete_prefix(prefix)
        assert stream.set_text(prefix[:cut].decode(), prefix[cut:])
        lp = stream.logprobs()
        with torch.inference_mode():
            full = torch.log_softmax(member.lm.model(input_ids=torch.tensor([stream.ids])).logits[0, -1], -1)
        assert torch.allclose(lp, full, atol=1e-4)
        spelled = b"".join(member.vocab.pieces[i] or b"" for i in stream.ids[1:])
        assert spelled == prefix


def test_union_score_matches_a_reference_without_caches(models: dict[str, Path]) -> None:
    text = corpus("prose")[-160:]
    ens = ensemble(recipe(models, ["code_a", "prose_b"], "union", weights=[1, 3]))
    got = score_ensemble(ens, text).ensemble
    a, b = lm_of(models["code_a"]), lm_of(models["prose_b"])
    assert a.tokenizer is not None and b.tokenizer is not None
    ids = a.tokenizer(text, add_special_tokens=False)["input_ids"]
    b_vocab = ens.members[1].vocab
    nll = 0.0
    with torch.inference_mode():
        lp_a = torch.log_softmax(a.model(input_ids=torch.tensor([[1, *ids]])).logits[0].double(), -1)
        offset = 0
        for j, token in enumerate(ids):
            prefix = text.encode()[:offset]
            b_ids = [1, *b.tokenizer(prefix.decode(), add_special_tokens=False)["input_ids"]]
            lp_b = torch.log_softmax(b.model(input_ids=torch.tensor([b_ids])).logits[0, -1].double(), -1)
            piece = ens.members[0].vocab.pieces[token]
            assert piece is not None
            p_b = float(lp_b[b_vocab.by_bytes[piece]].exp()) if piece in b_vocab.by_bytes else 0.0
            nll -= math.log(0.25 * float(lp_a[j, token].exp()) + 0.75 * p_b)
            offset += len(piece)
    # the stream re-tokenises only a tail, so a few positions may see another valid tokenisation
    assert got.nll_nats == pytest.approx(nll, rel=2e-3)


def test_cross_vocabulary_methods_generate_valid_text(models: dict[str, Path], tmp_path: Path,
                                                      heldout: str) -> None:
    for method in ("union", "topk_union", "relative"):
        ens = ensemble(recipe(models, ["code_a", "prose_b"], method, cache=tmp_path / "c"
                              if method == "relative" else None))
        result = ens.generate(["The model \u00e9", "def f("], max_new_tokens=12, temperature=0.7, seed=1)
        assert all(a.new_tokens > 0 and "\ufffd" not in a.text for a in result.answers)
        assert result.forwarded_tokens[1] > 0
        if method != "topk_union":
            score = score_ensemble(ens, heldout[-300:], context=64)
            assert 0 < score.ensemble.bits_per_byte < 12
    assert list((tmp_path / "c").glob("relative-*.safetensors"))


def _aligner(ens: Ensemble) -> RelativeAligner:
    assert isinstance(ens.method_impl, RelativeMethod)
    return ens.method_impl.aligner


def test_relative_tables_maps_cache_and_guard(models: dict[str, Path], tmp_path: Path) -> None:
    names = ["code_a", "prose_b"]
    ens = ensemble(recipe(models, names, "relative", f"parameters: {{cache_dir: {tmp_path}}}\n"))
    aligner = _aligner(ens)
    va, vb = ens.members[0].vocab, ens.members[1].vocab
    anchors = [p for p in dict.fromkeys(va.pieces) if p is not None and p in vb.by_bytes]
    assert aligner.n_anchors == len(anchors)

    def rel(i: int, vocab: object) -> torch.Tensor:  # float64 reference over output embeddings
        emb = ens.members[i].lm.model.get_output_embeddings().weight.double()
        unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return unit @ unit[[vocab.by_bytes[a] for a in anchors]].T  # type: ignore[attr-defined]

    rel_a, rel_b = rel(0, va), rel(1, vb)
    assert aligner.tables[1].dense is not None
    assert torch.allclose(aligner.tables[1].dense.double(), rel_b, atol=1e-5)
    # the map back: anchors (and end-of-sequence) map to themselves, other tokens to their nearest
    # primary tokens by centred relative rows, softmax-weighted
    m = aligner.maps[1]
    for a in anchors[:50]:
        assert int(m.ids[vb.by_bytes[a], 0]) == va.by_bytes[a] and float(m.weights[vb.by_bytes[a], 0]) == 1.0
    assert vb.eos_id is not None and int(m.ids[vb.eos_id, 0]) == va.eos_id
    rest = [t for t, k in enumerate(vb.keys) if isinstance(k, bytes) and k not in va.by_bytes]
    assert rest
    cand = torch.tensor(va.text_ids())
    ca = rel_a[cand] - rel_a[cand].mean(0)
    cb = rel_b[rest] - rel_b[rest].mean(0)
    sims = (cb / cb.norm(dim=-1, keepdim=True)) @ (ca / ca.norm(dim=-1, keepdim=True)).T
    top = sims.topk(aligner.neighbours, dim=-1)
    for row, token in enumerate(rest[:20]):
        assert set(m.ids[token].tolist()) == set(cand[top.indices[row]].tolist())
        want = torch.softmax(top.values[row] / aligner.temperature, -1)
        got = dict(zip(m.ids[token].tolist(), m.weights[token].double().tolist(), strict=True))
        for i, v in zip(cand[top.indices[row]].tolist(), want.tolist(), strict=True):
            assert abs(got[i] - v) < 1e-4
    # aggregate = renormalised Σ w_i p_i M_i (float64 reference); the primary alone is itself
    gen = torch.Generator().manual_seed(1)
    pa = torch.softmax(torch.randn(2, va.width, generator=gen, dtype=torch.float64), -1)
    pb = torch.softmax(torch.randn(2, vb.width, generator=gen, dtype=torch.float64), -1)
    q = 0.3 * pa.clone()
    for t in range(vb.width):
        for j, wt in zip(m.ids[t].tolist(), m.weights[t].double().tolist(), strict=True):
            q[:, j] += 0.7 * pb[:, t] * wt
    q = q / q.sum(-1, keepdim=True)
    got = aligner.aggregate({0: pa.float(), 1: pb.float()}, {0: 0.3, 1: 0.7})
    assert torch.allclose(got.double(), q.log(), atol=1e-4)
    assert torch.allclose(aligner.aggregate({0: pa.float()}, {0: 1.0}).double(), pa.log(), atol=1e-5)
    # refinement steps move the top candidates towards the relative target, keep the rest
    target = aligner.to_relative(1, pb[0].float())
    start = got[0]

    def loss(lp: torch.Tensor) -> float:
        return float(((aligner.to_relative(0, lp.exp()) - target) ** 2).sum())

    moved = aligner.refine(start, target, steps=5, learning_rate=0.5, candidates=64)
    assert loss(moved) < loss(start)
    assert torch.allclose(moved.exp().sum(), torch.tensor(1.0), atol=1e-4)
    off = torch.ones(va.width, dtype=torch.bool)
    off[start.topk(64).indices] = False
    assert torch.allclose(moved[off], start[off])
    assert torch.equal(aligner.refine(start, target, steps=0, learning_rate=0.5, candidates=64), start)
    # cache, memory guard, sparse tables
    files = list(tmp_path.glob("relative-*.safetensors"))
    assert len(files) == 1
    again = _aligner(ensemble(recipe(models, names, "relative", f"parameters: {{cache_dir: {tmp_path}}}\n")))
    assert again.tables[0].dense is not None
    assert torch.equal(again.tables[0].dense, aligner.tables[0].dense)
    assert torch.equal(again.maps[1].ids, m.ids) and torch.equal(again.maps[1].weights, m.weights)
    with pytest.raises(AlignmentMemoryError, match=r"would take .* KB.*max_table_memory"):
        ensemble(recipe(models, names, "relative", "parameters: {max_table_memory: 10KB, cache_dir: "
                        f"{tmp_path}}}\n"))
    sparse = _aligner(ensemble(recipe(models, names, "relative", "parameters: {max_table_memory: 200KB, "
                                      f"sparsify: true, sparse_k: 8, cache_dir: {tmp_path}}}\n")))
    assert sparse.tables[0].values is not None
    assert sparse.tables[0].values.shape[1] == 8
    rows = sparse.tables[0].rows(torch.tensor([5, 9]), sparse.n_anchors)
    assert rows.shape == (2, sparse.n_anchors) and int((rows != 0).sum(-1).max()) <= 8


# --- cascade, gate, vote, mbr -------------------------------------------------------------------

def test_cascade_and_gate_extremes(models: dict[str, Path], heldout: str) -> None:
    names = ["code_a", "prose_a"]
    first = decode(models["code_a"], greedy_reference(models["code_a"], PROMPTS[0], 10))
    last = decode(models["prose_a"], greedy_reference(models["prose_a"], PROMPTS[0], 10))
    cheap = ensemble(recipe(models, names, "cascade", "parameters: {threshold: 1.0e-9}\n"))
    result = cheap.generate(PROMPTS[:1], max_new_tokens=10)
    assert result.answers[0].text == first and result.cascade is not None
    assert result.cascade.escalation_rate == 0 and result.forwarded_tokens[1] == 0
    costly = ensemble(recipe(models, names, "cascade", "parameters: {threshold: 1.0}\n"))
    result = costly.generate(PROMPTS[:1], max_new_tokens=10)
    assert result.answers[0].text == last and result.cascade is not None
    assert result.cascade.escalation_rate == 1
    lm = lm_of(models["code_a"])
    assert lm.tokenizer is not None
    ids = torch.tensor([[1, *lm.tokenizer(heldout, add_special_tokens=False)["input_ids"][:200]]])
    with torch.inference_mode():
        top = torch.softmax(lm.model(input_ids=ids).logits[0], -1).max(-1).values
    threshold = float(top.median())
    middle = ensemble(recipe(models, names, "cascade", f"parameters: {{threshold: {threshold}}}\n"))
    details = score_ensemble(middle, heldout).details
    assert 0 < details["escalation_rate"] < 1
    gated = ensemble(recipe(models, names, "prob_avg", "parameters: {gate: 1.0e-9}\n"))
    assert gated.generate(PROMPTS[:1], max_new_tokens=10).answers[0].text == first
    assert score_ensemble(gated, heldout).ensemble.nll_nats == pytest.approx(
        score_text(lm_of(models["code_a"]), heldout).nll_nats, rel=1e-6)


def test_vote_and_mbr_functions() -> None:
    assert normalise("  The Answer is 42. ") == "the answer is 42"
    assert majority(["42", "41", "42."], [0.2, 0.5, 0.4]) == 0
    assert majority(["42", "41", "42."], [0.2, 0.7, 0.4]) == 1
    assert chrf("abc", "abc") == 1.0 and chrf("abc", "xyz") == 0.0
    # chrF by hand for "ab" vs "abc": 1-grams P=1, R=2/3; 2-grams P=1, R=1/2 → P=1, R=7/12, β=2
    p, r = 1.0, 7 / 12
    assert chrf("ab", "abc") == pytest.approx(5 * p * r / (4 * p + r))
    assert token_f1("the cat sat", "the cat") == pytest.approx(0.8)
    best, expected = mbr(["the cat sat", "the cat sat down", "dogs run"], [1, 1, 1], "token_f1")
    assert best in (0, 1) and expected[2] < expected[0]


def test_vote_and_mbr_generate(models: dict[str, Path]) -> None:
    for method, extra in (("vote", ""), ("mbr", "parameters: {utility: token_f1}\n")):
        ens = ensemble(recipe(models, ["code_a", "prose_a", "prose_b"], method, extra))
        answer = ens.generate(PROMPTS[:1], max_new_tokens=6).answers[0]
        assert answer.candidates is not None and len(answer.candidates) == 3
        assert answer.text in answer.candidates



def test_vote_records_tokens_and_end_of_sequence(models: dict[str, Path]) -> None:
    """A vote answer counts the chosen candidate's tokens (not characters) and is finished only when
    that candidate stopped at end-of-sequence; the reference is the member sampling alone with the
    same seed (one sampler for both)."""
    from fusekit.lm.generate import generate_ids

    lm = lm_of(models["prose_b"])
    assert lm.tokenizer is not None
    ids = [lm.tokenizer.bos_token_id, *lm.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]]

    def sampled(seed: int) -> list[int]:
        return generate_ids(lm, [ids], max_new_tokens=8, temperature=1.0, seed=seed, stop_at_eos=False)[0]

    # a seed whose 8 tokens do not spell 8 characters, so tokens and characters differ
    seed = next(s for s in range(200) if len(decode(models["prose_b"], sampled(s))) != 8)
    free = sampled(seed)
    parsed, _ = parse_ensemble_recipe(recipe(models, ["prose_b"], "vote"), "ens.yaml")
    members = load_members(parsed)
    open_ended = Ensemble(parsed, members).generate(PROMPTS[1:2], max_new_tokens=8, temperature=1.0,
                                                    seed=seed).answers[0]
    assert (open_ended.new_tokens, open_ended.finished) == (8, False)
    assert open_ended.text == decode(models["prose_b"], free)
    stop = free[2]  # make the third token end the sequence
    members[0].vocab = dataclasses.replace(members[0].vocab, eos_id=stop)
    stopped = Ensemble(parsed, members).generate(PROMPTS[1:2], max_new_tokens=8, temperature=1.0,
                                                 seed=seed).answers[0]
    want = free[:free.index(stop) + 1]
    assert (stopped.new_tokens, stopped.finished) == (len(want), True)
    assert stopped.text == decode(models["prose_b"], want)


def test_one_member_ensemble_samples_what_lm_generate_samples(models: dict[str, Path]) -> None:
    """lm.generate's sampler is the reference: a one-member prob_avg ensemble sampled at temperature
    0.9 with seed S gives its texts, batch by batch (seed + first prompt's index per batch)."""
    from fusekit.lm.generate import generate

    prompts = [*PROMPTS, "class Model", "It is"]
    ens = ensemble(recipe(models, ["code_a"], "prob_avg"))
    for seed, batch_size in ((11, 2), (12, 8)):
        got = [a.text for a in ens.generate(prompts, max_new_tokens=12, temperature=0.9, seed=seed,
                                            batch_size=batch_size).answers]
        want = generate(lm_of(models["code_a"]), prompts, max_new_tokens=12, temperature=0.9, seed=seed,
                        batch_size=batch_size)
        assert got == want
        greedy = [a.text for a in ens.generate(prompts, max_new_tokens=12, batch_size=batch_size).answers]
        assert got != greedy  # sampling really happened


def test_method_table_matches_the_recipe_schema() -> None:
    """Every recipe method is one row: its family, typed parameters and whether it has bits per byte."""
    from fusekit.ensemble import recipe as schema
    from fusekit.ensemble.methods import METHODS, method_spec

    assert set(METHODS) == set(schema.METHODS)
    families = {"same": schema.SAME_VOCAB_METHODS, "cross": schema.CROSS_VOCAB_METHODS,
                "answer": schema.ANSWER_METHODS, "byte": schema.BYTE_METHODS}
    for name in schema.METHODS:
        spec = method_spec(name)
        assert spec.name == name and name in families[spec.family]
        assert spec.params is schema.PARAMS[name]
    assert {n for n, spec in METHODS.items() if not spec.distribution} == {"topk_union", "vote", "mbr"}

# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "culprit"), [
    ("models:\n  - model: x\n    weight: 0\n", "models[0].weight"),
    ("models:\n  - model: x\n  - model: y\nprimary: 2\n", "primary must index models (0 to 1)"),
    ("models:\n  - model: x\nmethod: topk_union\nparameters: {topk: 3}\n", "did you mean 'top_k'"),
    ("models:\n  - model: x\nmethod: cascade\n", "cascade needs at least two models"),
    ("models:\n  - model: x\nmethod: vote\nparameters: {samples: 3}\n", "generation.temperature above 0"),
    ("models:\n  - model: x\nmethod: avg\n", "method"),
    ("models:\n  - model: x\nmethod: relative\nparameters: {max_table_memory: lots}\n", "max_table_memory"),
])
def test_recipe_errors(text: str, culprit: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_ensemble_recipe(text, "ens.yaml")
    assert culprit in str(info.value) and str(info.value).startswith("ens.yaml:")
    assert "\n" not in str(info.value)


def test_score_refuses_methods_without_distributions(models: dict[str, Path]) -> None:
    ens = ensemble(recipe(models, ["code_a", "prose_a"], "vote"))
    with pytest.raises(FusekitError, match="no bits per byte"):
        score_ensemble(ens, "some text")


def _refused(capsys: pytest.CaptureFixture[str], args: list[str | Path], *culprits: str) -> None:
    """Run the CLI in this process (imports are paid once); exit 2 and one line naming culprits."""
    from fusekit.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    line = capsys.readouterr().err.strip()
    assert info.value.code == 2, line
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    for culprit in culprits:
        assert culprit in line, line


def test_cli_bad_input(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def write(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text, encoding="utf-8")
        return tmp_path / name

    mixed = write("mixed.yaml", recipe(models, ["code_a", "prose_b"], "prob_avg"))
    _refused(capsys, ["ensemble", "generate", mixed, "--prompt", "x"], "models[1].model", "union or relative")
    no_tok = write("notok.yaml", recipe(models, ["code_a", "no_tokenizer"]))
    _refused(capsys, ["ensemble", "score", no_tok, "--text", write("t.txt", "hello")], "no tokenizer files")
    weights = write("w.yaml", recipe(models, ["code_a", "prose_a"], weights=[1, -1]))
    _refused(capsys, ["ensemble", "check", weights], "w.yaml:", "models[1].weight")
    primary = write("p.yaml", recipe(models, ["code_a"], extra="primary: 1\n"))
    _refused(capsys, ["ensemble", "check", primary], "p.yaml:", "primary")
    big = write("big.yaml", recipe(models, ["code_a", "prose_b"], "relative",
                                   f"parameters: {{max_table_memory: 1KB, cache_dir: {tmp_path}}}\n"))
    _refused(capsys, ["ensemble", "generate", big, "--prompt", "x"], "max_table_memory", "sparsify")
    ok = write("ok.yaml", recipe(models, ["code_a", "prose_a"]))
    _refused(capsys, ["ensemble", "generate", ok, "--prompts", write("empty.jsonl", "\n")], "empty.jsonl",
             "empty")


def test_cli_generate_score_check(models: dict[str, Path], tmp_path: Path, run_cli: RunCli,
                                  heldout: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ens.yaml"
    path.write_text(recipe(models, ["code_a", "prose_b"], "union", "generation: {max_new_tokens: 6}\n"),
                    encoding="utf-8")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    proc = run_cli("ensemble", "generate", path, "--prompts", prompts, "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["new_tokens"] == 6 for r in rows)
    text = tmp_path / "heldout.txt"
    text.write_text(heldout[-200:], encoding="utf-8")
    from fusekit.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["ensemble", "score", str(path), "--text", str(text), "--json"])
    assert info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["rows"]) == 3 and report["bytes"] == len(heldout[-200:].encode())
    with pytest.raises(SystemExit) as info:
        main(["ensemble", "check", str(path), "--json"])
    assert info.value.code == 0
    check = json.loads(capsys.readouterr().out)
    assert check["one_vocabulary"] is False and check["alignment"]["shared_anchors"] > 200
    assert check["members"][1]["vocab_size"] == 400
