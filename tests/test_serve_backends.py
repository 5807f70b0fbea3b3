"""``fusekit.serve`` backends and dynamic batching: batched decoding equals ``fusekit.lm.generate``,
seeded sampling ignores batch mates, stop strings, incremental UTF-8 text, cancellation, the bounded
queue, log-probabilities against a float64 reference, and ensemble / router backends against
``Ensemble.generate`` / ``run_router``."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fusekit.demo import build_demo_models
from fusekit.errors import FusekitError
from fusekit.lm import load_lm
from fusekit.lm.generate import generate, prompt_ids
from fusekit.serve.backends import ModelBackend, NoChatTemplate, QueueFull, SamplingParams, load_backend
from fusekit.serve.batcher import Delta, TextCutter, top_p_filter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["def f(x):", "a", "The quick brown fox jumps", "caf\u00e9 \u2014 "]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """prose, c, python: tiny random Llamas sharing the demo byte-level tokenizer."""
    return build_demo_models(tmp_path_factory.mktemp("serve"), names=("prose", "c", "python"), hidden_size=32,
                             num_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def backend(models: dict[str, Path]) -> Iterator[ModelBackend]:
    b = load_backend("python", "model", str(models["python"]), max_batch=8, max_queue=8, batch_wait_ms=50)
    assert isinstance(b, ModelBackend)
    yield b
    asyncio.run(b.close())


async def collect(stream: AsyncIterator[Delta]) -> tuple[str, list[int], list[Delta]]:
    deltas = [d async for d in stream]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


def run_all(backend: Any, prompts: list[str], params: list[SamplingParams],
            threshold: float | None = None) -> list[tuple[str, list[int], list[Delta]]]:
    async def main() -> list[tuple[str, list[int], list[Delta]]]:
        return list(await asyncio.gather(*(collect(backend.stream(p, q, threshold=threshold))
                                           for p, q in zip(prompts, params, strict=True))))
    return asyncio.run(main())


def test_batched_greedy_equals_alone_and_lm_generate(backend: ModelBackend, models: dict[str, Path]) -> None:
    params = [SamplingParams(max_tokens=n) for n in (12, 7, 12, 9)]  # different lengths and prompt sizes
    together = run_all(backend, PROMPTS, params)
    assert backend.worker.largest_batch == len(PROMPTS)  # they really were decoded as one batch
    alone = [run_all(backend, [p], [q])[0] for p, q in zip(PROMPTS, params, strict=True)]
    lm = load_lm(models["python"])
    assert lm.tokenizer is not None
    for (text, ids, deltas), (text1, ids1, _), q, p in zip(together, alone, params, PROMPTS, strict=True):
        reference = generate(lm, [p], max_new_tokens=q.max_tokens)[0]
        assert ids == ids1 and text == text1 == reference
        assert text == lm.tokenizer.decode(ids, skip_special_tokens=True)
        assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
        assert all(len(d.token_ids) == 1 for d in deltas) and len(ids) == q.max_tokens
    assert backend.queue_depth() == 0
    long = run_all(backend, PROMPTS[:2], [SamplingParams(max_tokens=150), SamplingParams(max_tokens=100)])
    for (text, ids, _), p in zip(long, PROMPTS, strict=False):  # past TextCutter's settled points
        assert text == generate(lm, [p], max_new_tokens=len(ids))[0]
        assert text == lm.tokenizer.decode(ids, skip_special_tokens=True)


def test_seeded_sampling_ignores_batch_mates(backend: ModelBackend, models: dict[str, Path]) -> None:
    hot = SamplingParams(max_tokens=10, temperature=1.3, seed=7)
    others = [SamplingParams(max_tokens=10, temperature=0.9, seed=s) for s in (1, 2, 3)]
    mixed = run_all(backend, PROMPTS, [hot, *others])
    alone = run_all(backend, PROMPTS[:1], [hot])[0]
    assert mixed[0][1] == alone[1]
    lm = load_lm(models["python"])
    assert alone[0] == generate(lm, PROMPTS[:1], max_new_tokens=10, temperature=1.3, seed=7)[0]
    other_seed = run_all(backend, PROMPTS[:1], [SamplingParams(max_tokens=10, temperature=1.3, seed=8)])[0]
    assert other_seed[1] != alone[1]


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    scores = probs.log().float()
    assert torch.isfinite(top_p_filter(scores, 1.0, 0.75)).tolist() == [False, True, False, True]
    assert torch.isfinite(top_p_filter(scores, 1.0, 0.85)).tolist() == [False, True, True, True]
    assert torch.isfinite(top_p_filter(scores, 1.0, 0.0)).tolist() == [False, True, False, False]
    # at a higher temperature the distribution flattens and the nucleus grows
    assert int(torch.isfinite(top_p_filter(scores, 10.0, 0.75)).sum()) == 3


def test_top_p_sampling_stays_in_the_nucleus(backend: ModelBackend) -> None:
    text, ids, _ = run_all(backend, ["x"], [SamplingParams(max_tokens=6, temperature=5.0, top_p=1e-6,
                                                           seed=3)])[0]
    greedy = run_all(backend, ["x"], [SamplingParams(max_tokens=6)])[0]
    assert ids == greedy[1]  # a vanishing nucleus is the argmax whatever the temperature


def _ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_text_cutter_never_splits_a_character_and_cuts_at_stop(backend: ModelBackend) -> None:
    tok = backend.lm.tokenizer
    text = "a\u00e9\u20ac\U0001f600b"
    ids = _ids(tok, text)
    assert len(ids) == len(text.encode("utf-8"))  # byte-level: one token per byte
    cutter = TextCutter(tok, ())
    pieces = [cutter.add(i, final=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[:3] == ["a", "", "\u00e9"]
    cutter = TextCutter(tok, ("\U0001f600b",))  # the emoji could start the stop string: held back
    shown = [cutter.add(i) for i in ids]
    assert "".join(shown) == "a\u00e9\u20ac" and cutter.stopped and shown[-1] == ""
    cutter = TextCutter(tok, ("zzz", "b!"))  # "b" could start "b!": held back until the end
    shown = [cutter.add(i, final=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert shown[-1] == "b" and not cutter.stopped


def test_stop_strings_cut_and_end_the_request(backend: ModelBackend) -> None:
    full = run_all(backend, [PROMPTS[2]], [SamplingParams(max_tokens=16)])[0][0]
    stop = full[5:8]
    assert full.find(stop) == 5
    params = SamplingParams(max_tokens=16, stop=("\x00\x01", stop))
    text, ids, deltas = run_all(backend, [PROMPTS[2]], [params])[0]
    assert text == full[:5] and deltas[-1].finish_reason == "stop"
    assert len(ids) < 16  # decoding ended at the stop string, not at max_tokens


def test_logprobs_match_a_float64_reference(backend: ModelBackend) -> None:
    lm = backend.lm
    text, ids, deltas = run_all(backend, [PROMPTS[0]], [SamplingParams(max_tokens=3, logprobs=3)])[0]
    seq = prompt_ids(lm, PROMPTS[0])
    for delta, token in zip(deltas, ids, strict=True):
        assert delta.logprobs is not None
        entry = delta.logprobs[0]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        ref = torch.log_softmax(logits, dim=-1)
        assert entry["logprob"] == pytest.approx(float(ref[token]), abs=1e-4)
        spelled = lm.tokenizer.decode([token])
        vocab_spelling = lm.tokenizer.convert_ids_to_tokens(token)
        assert entry["token"] == (spelled if "\ufffd" not in spelled else vocab_spelling)
        top = sorted(entry["top_logprobs"].values(), reverse=True)
        assert top == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)
        assert top[0] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy: the chosen token is the top
        seq.append(token)


def test_cancelling_frees_the_slot(models: dict[str, Path]) -> None:
    b = load_backend("c", "model", str(models["c"]), max_batch=2, max_queue=4, batch_wait_ms=100)
    assert isinstance(b, ModelBackend)

    async def main() -> None:
        long = b.stream("abc", SamplingParams(max_tokens=240))
        short = asyncio.create_task(collect(b.stream("xyz", SamplingParams(max_tokens=5))))
        await long.__anext__()
        await long.aclose()  # the consumer leaves after one token
        text, ids, _ = await short
        assert len(ids) == 5
        for _ in range(200):
            if b.queue_depth() == 0:
                break
            await asyncio.sleep(0.01)
        assert b.queue_depth() == 0
        assert b.worker.steps < 40  # the long row was dropped, not decoded to 240 tokens
        waiting = asyncio.create_task(collect(b.stream("q", SamplingParams(max_tokens=3))))
        assert len((await waiting)[1]) == 3  # the freed worker serves the next request
        await b.close()

    asyncio.run(main())


def test_queue_full_past_the_limit_and_waiting_cancel(models: dict[str, Path]) -> None:
    b = load_backend("c", "model", str(models["c"]), max_batch=1, max_queue=1, batch_wait_ms=0)

    async def main() -> None:
        running = b.stream("abc", SamplingParams(max_tokens=200))
        await running.__anext__()  # taken by the worker
        waiting = b.stream("def", SamplingParams(max_tokens=3))
        waiting_task = asyncio.create_task(waiting.__anext__())
        for _ in range(100):
            if b.queue_depth() == 2:
                break
            await asyncio.sleep(0.01)
        assert b.queue_depth() == 2
        with pytest.raises(QueueFull) as caught:
            await b.stream("ghi", SamplingParams(max_tokens=3)).__anext__()
        assert caught.value.retry_after >= 1.0
        waiting_task.cancel()  # a waiting request whose client left leaves the queue
        with pytest.raises(asyncio.CancelledError):
            await waiting_task
        assert b.queue_depth() == 1
        await running.aclose()
        await b.close()
        assert b.queue_depth() == 0

    asyncio.run(main())


def test_chat_template_and_errors(models: dict[str, Path], backend: ModelBackend, tmp_path: Path) -> None:
    with pytest.raises(NoChatTemplate, match="has no chat template"):
        backend.chat_prompt([{"role": "user", "content": "hi"}])
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    backend.lm.tokenizer.chat_template = template
    try:
        prompt = backend.chat_prompt([{"role": "user", "content": "hi"}])
        assert prompt == "<s>hi\n" and backend.count_tokens(prompt) == 4  # one BOS, then h, i, newline
    finally:
        backend.lm.tokenizer.chat_template = None
    with pytest.raises(FusekitError, match="max_tokens 0: must be at least 1"):
        run_all(backend, ["a"], [SamplingParams(max_tokens=0)])
    with pytest.raises(FusekitError, match="context of 256"):
        run_all(backend, ["a"], [SamplingParams(max_tokens=300)])
    with pytest.raises(FusekitError, match="kind 'llm' is not one of"):
        load_backend("x", "llm", str(models["c"]))
    with pytest.raises(FusekitError, match="max_batch"):
        load_backend("x", "model", str(models["c"]), max_batch=0)
    with pytest.raises(FusekitError, match=str(tmp_path / "nowhere")):
        load_backend("x", "model", str(tmp_path / "nowhere"))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notice, inside peft
def test_adapter_backend_equals_lm_generate(models: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["prose"], dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    ref = f"{models['prose']}+{tmp_path / 'adapter'}"
    b = load_backend("a", "model", ref)
    assert b.kind == "adapter"
    text = run_all(b, [PROMPTS[0]], [SamplingParams(max_tokens=10)])[0][0]
    assert text == generate(load_lm(ref), [PROMPTS[0]], max_new_tokens=10)[0]
    assert text != generate(load_lm(models["prose"]), [PROMPTS[0]], max_new_tokens=10)[0]  # the adapter acts
    asyncio.run(b.close())


def test_ensemble_backend_equals_ensemble_generate(models: dict[str, Path], tmp_path: Path) -> None:
    from fusekit.ensemble.engine import load_ensemble

    recipe = tmp_path / "ens.yaml"
    recipe.write_text(f"models:\n  - model: {models['prose']}\n  - model: {models['c']}\nmethod: prob_avg\n",
                      encoding="utf-8")
    b = load_backend("ens", "ensemble", str(recipe))
    assert b.kind == "ensemble" and not b.gives_logprobs
    ens = load_ensemble(recipe)
    for params in (SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=0.8, seed=4)):
        expected = ens.generate([PROMPTS[0]], max_new_tokens=8, temperature=params.temperature,
                                seed=params.seed).answers[0].text
        text, _, deltas = run_all(b, [PROMPTS[0]], [params])[0]
        assert text == expected and deltas[-1].finish_reason == "length"
    stop = expected[2:4]
    text, _, deltas = run_all(b, [PROMPTS[0]], [SamplingParams(max_tokens=8, temperature=0.8, seed=4,
                                                              stop=(stop,))])[0]
    assert text == expected[:expected.find(stop)] and deltas[-1].finish_reason == "stop"
    with pytest.raises(FusekitError, match="top_p"):
        run_all(b, ["a"], [SamplingParams(max_tokens=2, top_p=0.5)])
    asyncio.run(b.close())


def test_router_backend_equals_route_run(models: dict[str, Path], tmp_path: Path) -> None:
    from fusekit.route import build_router, run_router

    rows = [{"text": f"def f{i}(x):\n    return x + {i}\n", "label": "python"} for i in range(6)]
    rows += [{"text": f"int g{i}(int x) {{ return x * {i}; }}\n", "label": "c"} for i in range(6)]
    rows += [{"text": f"The river ran {i} miles to the quiet sea.\n", "label": "prose"} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tmp_path / "route.yaml"
    costs = (("prose", 1), ("c", 2), ("python", 4))
    entries = "".join(f"  - model: {models[n]}\n    cost: {c}\n" for n, c in costs)
    recipe.write_text(f"models:\n{entries}data: {data}\nlabels: given\nrouter: knn\nthreshold: 0.5\n",
                      encoding="utf-8")
    build_router(recipe, tmp_path / "router")
    b = load_backend("r", "router", str(tmp_path / "router"))
    assert b.kind == "router"
    for prompt, threshold in (("def h(y):\n    return y", None), ("int k(int z) {", None),
                              ("def h(y):\n    return y", 1.0)):
        ran = run_router(tmp_path / "router", prompt, generate=True, max_new_tokens=6, threshold=threshold)
        text, _, deltas = run_all(b, [prompt], [SamplingParams(max_tokens=6)], threshold=threshold)[0]
        assert deltas[0].model == ran.decision.model.name and text == ran.answer
        assert all(d.model is None for d in deltas[1:])
    assert deltas[0].model == "prose"  # threshold 1 sends everything to the cheapest model
    assert not math.isnan(b.count_tokens("abc"))
    asyncio.run(b.close())
