"""fusekit.lm.score: bits per byte and perplexity against a float64 reference computed here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusekit.demo import build_demo_models
from fusekit.errors import FusekitError
from fusekit.lm import LoadedLM, TextScore, load_lm, score_text, score_texts, token_logprobs

TEXT = "def area(r):\n    return 3.14159 * r * r  # circle\n"
LONG = "The quick brown fox jumps over the lazy dog; naïve café — 3 × 4 = 12.\n" * 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedLM:
    """A tiny Llama with the built-in byte-level tokenizer (BOS = <s>), float32 on CPU."""
    folder = build_demo_models(tmp_path_factory.mktemp("lm"), names=("base",), hidden_size=32,
                               num_layers=2, num_attention_heads=4, num_key_value_heads=2, seed=3)
    return load_lm(folder["base"])


def _reference_nll(lm: LoadedLM, seq: list[int], targets: range, start_of: dict[int, int]) -> float:
    """Float64 NLL of seq[p] for p in ``targets``, each given seq[start_of[p]:p] as context."""
    model = copy.deepcopy(lm.model).double()
    by_start: dict[int, list[int]] = {}
    for p in targets:
        by_start.setdefault(start_of[p], []).append(p)
    total = 0.0
    for start, positions in by_start.items():  # one causal pass covers every p with this start
        window = torch.tensor([seq[start:max(positions) + 1]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=window).logits[0].double(), dim=-1)
        total -= sum(float(logprobs[p - start - 1, seq[p]]) for p in positions)
    return total


def _ids(lm: LoadedLM, text: str) -> list[int]:
    assert lm.tokenizer is not None
    return [lm.tokenizer.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_score_matches_float64_reference(lm: LoadedLM) -> None:
    seq = _ids(lm, TEXT)
    reference = _reference_nll(lm, seq, range(1, len(seq)), dict.fromkeys(range(len(seq)), 0))
    got = score_text(lm, TEXT)
    assert got.n_bytes == len(TEXT.encode("utf-8"))
    assert got.n_tokens == len(seq) - 1
    assert got.nll_nats == pytest.approx(reference, rel=1e-5)
    assert got.bits_per_byte == pytest.approx(reference / math.log(2) / got.n_bytes, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(reference / (len(seq) - 1)), rel=1e-5)


@pytest.mark.parametrize(("context", "stride"), [(16, 5), (12, 11), (10, 3)])
def test_sliding_window_matches_reference(lm: LoadedLM, context: int, stride: int) -> None:
    """Token p (p >= context) sits in window k = ceil((p - context + 1) / stride), which ends at
    min(context + k * stride, len) and starts context tokens before its end."""
    seq = _ids(lm, LONG)
    n = len(seq)
    start_of = {}
    for p in range(1, n):
        k = 0 if p < context else math.ceil((p - context + 1) / stride)
        start_of[p] = max(0, min(context + k * stride, n) - context)
        assert p - start_of[p] >= (1 if k == 0 else context - stride)  # left context promised
    reference = _reference_nll(lm, seq, range(1, n), start_of)
    got = score_text(lm, LONG, context=context, stride=stride, batch_size=3)
    assert got.n_tokens == n - 1
    assert got.nll_nats == pytest.approx(reference, rel=1e-5)


def test_window_longer_than_text_equals_one_pass(lm: LoadedLM) -> None:
    one_pass = score_text(lm, LONG)
    assert score_text(lm, LONG, context=len(_ids(lm, LONG)), stride=3).nll_nats == pytest.approx(
        one_pass.nll_nats, rel=1e-6)


def test_batch_size_does_not_change_the_score(lm: LoadedLM) -> None:
    scores = [score_text(lm, LONG, context=20, batch_size=b).nll_nats for b in (1, 2, 64)]
    assert scores == pytest.approx([scores[0]] * 3, rel=1e-6)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("ab c\nxé€{}"), min_size=1, max_size=40),
                min_size=1, max_size=4))
def test_batched_texts_equal_each_alone(lm: LoadedLM, texts: list[str]) -> None:
    together = score_texts(lm, texts, context=16, batch_size=4)
    for text, got in zip(texts, together, strict=True):
        alone = score_text(lm, text, context=16, batch_size=1)
        assert (got.n_bytes, got.n_tokens) == (alone.n_bytes, alone.n_tokens) == (
            len(text.encode("utf-8")), len(_ids(lm, text)) - 1)
        assert got.nll_nats == pytest.approx(alone.nll_nats, rel=1e-5)


def test_token_logprobs_ignore_right_padding(lm: LoadedLM) -> None:
    seq = _ids(lm, TEXT)
    alone = token_logprobs(lm, torch.tensor([seq]))
    padded = torch.tensor([seq + [0] * 5, seq[:4] + [0] * (len(seq) + 1)])
    mask = torch.tensor([[1] * len(seq) + [0] * 5, [1] * 4 + [0] * (len(seq) + 1)])
    both = token_logprobs(lm, padded, mask)
    assert alone.shape == (1, len(seq) - 1)
    assert both.shape == (2, len(seq) + 4)
    torch.testing.assert_close(both[0, :len(seq) - 1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1, :3], alone[0, :3], rtol=1e-5, atol=1e-5)


def test_text_score_arithmetic() -> None:
    a, b = TextScore(10, 4, 2.0), TextScore(6, 2, 1.0)
    total = a + b
    assert (total.n_bytes, total.n_tokens, total.nll_nats) == (16, 6, 3.0)
    assert total.bits_per_byte == pytest.approx(3.0 / math.log(2) / 16)
    assert total.perplexity == pytest.approx(math.exp(0.5))


def test_without_bos_the_first_token_costs_a_uniform_guess(lm: LoadedLM) -> None:
    assert lm.tokenizer is not None
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.bos_token = None
    tokenizer.eos_token = None
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    no_bos = LoadedLM(lm.ref, lm.resolved, lm.model, tokenizer, lm.device)
    seq = _ids(lm, TEXT)[1:]
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    reference = math.log(vocab) + _reference_nll(lm, seq, range(1, len(seq)),
                                                 dict.fromkeys(range(len(seq)), 0))
    got = score_text(no_bos, TEXT)
    assert got.n_tokens == len(seq)
    assert got.nll_nats == pytest.approx(reference, rel=1e-5)


def test_bad_input_is_one_line(lm: LoadedLM, tmp_path: Path) -> None:
    with pytest.raises(FusekitError, match="text 1 is empty"):
        score_texts(lm, ["a", ""])
    with pytest.raises(FusekitError, match="at least 2"):
        score_text(lm, TEXT, context=1)
    with pytest.raises(FusekitError, match="at most 256 positions"):
        score_text(lm, TEXT, context=100_000)
    with pytest.raises(FusekitError, match="stride 16"):
        score_text(lm, TEXT, context=16, stride=16)
    without = LoadedLM(lm.ref, lm.resolved, lm.model, None, lm.device)
    with pytest.raises(FusekitError, match="without a tokenizer"):
        score_text(without, TEXT)


PROMPTS = ["def f(", "Hello, world", "x"]


def test_greedy_generation_matches_transformers_and_ignores_batching(lm: LoadedLM) -> None:
    from fusekit.lm.generate import generate, generate_ids, prompt_ids

    ids = [prompt_ids(lm, p) for p in PROMPTS]
    reference = []
    for p in ids:  # transformers' own greedy decoding, one prompt at a time
        mask = torch.ones(1, len(p), dtype=torch.long)
        out = lm.model.generate(input_ids=torch.tensor([p]), attention_mask=mask, do_sample=False,
                                max_new_tokens=12, eos_token_id=None, pad_token_id=0)
        reference.append(out[0, len(p):].tolist())
    assert generate_ids(lm, ids, max_new_tokens=12, stop_at_eos=False) == reference
    texts = generate(lm, PROMPTS, max_new_tokens=12, stop_at_eos=False, batch_size=2)
    assert texts == [generate(lm, [p], max_new_tokens=12, stop_at_eos=False)[0] for p in PROMPTS]
    assert len(texts[0].encode("utf-8")) >= 1


def test_sampling_is_seeded(lm: LoadedLM) -> None:
    from fusekit.lm.generate import generate

    first = generate(lm, PROMPTS, max_new_tokens=10, temperature=1.0, seed=5, stop_at_eos=False)
    assert first == generate(lm, PROMPTS, max_new_tokens=10, temperature=1.0, seed=5, stop_at_eos=False)
    assert first != generate(lm, PROMPTS, max_new_tokens=10, temperature=1.0, seed=6, stop_at_eos=False)


def test_generation_stops_at_eos(lm: LoadedLM) -> None:
    from fusekit.lm.generate import generate_ids, prompt_ids

    assert lm.tokenizer is not None
    ids = [prompt_ids(lm, "abc")]
    free = generate_ids(lm, ids, max_new_tokens=6, stop_at_eos=False)[0]
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(free[1])  # the second token ends it
    stopping = LoadedLM(lm.ref, lm.resolved, lm.model, tokenizer, lm.device)
    assert generate_ids(stopping, ids, max_new_tokens=6)[0] == free[:free.index(free[1]) + 1]
    with pytest.raises(FusekitError, match="must not be negative"):
        generate_ids(lm, ids, max_new_tokens=-1)


def test_sampler_follows_the_seeded_softmax() -> None:
    """The one sampler: argmax at temperature 0; else the draw torch.multinomial makes from
    softmax(float32 scores / T) with the same generator state; -inf tokens are never drawn."""
    from fusekit.lm.decode import sample

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    assert torch.equal(sample(scores, 0.0, None), scores.argmax(-1))
    for temperature in (0.5, 1.0, 2.0):
        got = sample(scores, temperature, torch.Generator().manual_seed(7))
        probs = torch.softmax(scores.float() / temperature, dim=-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7))[:, 0]
        assert torch.equal(got, want)
    masked = scores.clone()
    masked[:, 1:] = float("-inf")
    assert sample(masked, 5.0, torch.Generator().manual_seed(1)).tolist() == [0, 0, 0, 0]
    # many draws of one row: frequencies follow softmax(scores / T) (a 4-sigma band per token)
    row = torch.tensor([[0.0, 1.0, 2.0]])
    draws = torch.cat([sample(row.expand(500, 3), 1.5, torch.Generator().manual_seed(s)) for s in range(8)])
    p = torch.softmax(row[0].double() / 1.5, -1)
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / len(draws)).sqrt())


def test_sampled_generation_matches_a_loop_without_cache(lm: LoadedLM) -> None:
    """generate_ids at temperature 0.8: each step runs the whole sequence (no KV cache, no batch) and
    draws from softmax(logits / 0.8) with one generator seeded with the seed."""
    from fusekit.lm.generate import generate_ids, prompt_ids

    ids = prompt_ids(lm, PROMPTS[1])
    gen = torch.Generator().manual_seed(21)
    want: list[int] = []
    with torch.inference_mode():
        for _ in range(10):
            logits = lm.model(input_ids=torch.tensor([ids + want])).logits[0, -1].float()
            probs = torch.softmax(logits / 0.8, dim=-1)
            want.append(int(torch.multinomial(probs, 1, generator=gen)))
    got = generate_ids(lm, [ids], max_new_tokens=10, temperature=0.8, seed=21, stop_at_eos=False)
    assert got == [want]
    assert got != generate_ids(lm, [ids], max_new_tokens=10, temperature=0.8, seed=22, stop_at_eos=False)
