"""``fusekit serve``: the OpenAI-compatible server, driven by the official ``openai`` client.

The first part runs the app over scripted fake backends (fast, exact expectations); the second serves
real tiny models (a merged model, an ensemble recipe, a router folder) and checks that streamed text,
non-streamed text and the ``fusekit ensemble generate`` / ``route run --generate`` answers agree at
temperature 0; the last starts ``fusekit serve`` in a subprocess and stops it with SIGTERM under load.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import FakeBackend, expected_text, http, post_json, running_server, wait_until

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from fusekit.errors import FusekitError  # noqa: E402
from fusekit.serve.choices import StopCutter  # noqa: E402
from fusekit.serve.config import Limits, parse_serve_config, quick_config  # noqa: E402
from fusekit.serve.metrics import Metrics  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def fakes() -> dict[str, FakeBackend]:
    return {"fake": FakeBackend("fake"), "plain": FakeBackend("plain", logprobs=False, chat=False),
            "rt": FakeBackend("rt", "router"), "slow": FakeBackend("slow", delay=0.05, max_queue=2)}


@pytest.fixture(scope="module")
def base_url(fakes: dict[str, FakeBackend]) -> Iterator[str]:
    with running_server(fakes, limits=Limits(max_tokens_limit=64, max_prompt_tokens=50, max_body_bytes=4096),
                        api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=30)


def _stream_text(stream: Any, chat: bool) -> tuple[str, list[Any]]:
    chunks = list(stream)
    pieces = [(c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices]
    return "".join(pieces), chunks


# -- fake backends ----------------------------------------------------------------------------------

def test_completion_streamed_equals_not_streamed(client: Any) -> None:
    full = client.completions.create(model="fake", prompt="def f(", max_tokens=7, temperature=0)
    assert full.choices[0].text == expected_text("def f(", 7)
    assert full.choices[0].finish_reason == "length" and full.object == "text_completion"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (3, 7, 10)
    text, chunks = _stream_text(client.completions.create(model="fake", prompt="def f(", max_tokens=7,
                                                          temperature=0, stream=True), chat=False)
    assert text == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streamed_equals_not_streamed(client: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    full = client.chat.completions.create(model="fake", messages=messages, max_tokens=5, temperature=0)
    prompt = "<system>be brief<user>hi there<assistant>"
    assert full.choices[0].message.content == expected_text(prompt, 5)
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    assert full.usage.completion_tokens == 5 and full.usage.prompt_tokens == 1 + len(prompt.split())
    stream = client.chat.completions.create(model="fake", messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, chunks = _stream_text(stream, chat=True)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


def test_several_prompts_and_choices(client: Any) -> None:
    result = client.completions.create(model="fake", prompt=["ab", "abcd"], n=2, max_tokens=3,
                                       temperature=0.7, seed=5)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.usage.completion_tokens == 12 and result.usage.prompt_tokens == 4
    again = client.completions.create(model="fake", prompt=["ab", "abcd"], n=2, max_tokens=3,
                                      temperature=0.7, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]  # same seed, same text
    greedy = client.completions.create(model="fake", prompt=["ab", "abcd"], max_tokens=3, temperature=0)
    assert [c.text for c in greedy.choices] == [expected_text("ab", 3), expected_text("abcd", 3)]
    streamed = client.completions.create(model="fake", prompt="ab", n=3, max_tokens=4, temperature=0,
                                         stream=True)
    texts = {0: "", 1: "", 2: ""}
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert set(texts.values()) == {expected_text("ab", 4)}


def test_stop_strings_cut_streamed_and_not(client: Any, fakes: dict[str, FakeBackend]) -> None:
    prompt = "xyz"  # 3 -> " delta", " eps", "\n", ...
    full = client.completions.create(model="fake", prompt=prompt, max_tokens=8, temperature=0, stop=["ps\n"])
    assert full.choices[0].text == " delta e" and full.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="fake", prompt=prompt, max_tokens=8, temperature=0, stop="ps\n",
                                       stream=True)
    text, chunks = _stream_text(stream, chat=False)
    assert text == " delta e" and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("stops", "pieces", "out"), [
    (["ab"], ["xa", "b", "c"], "x"), (["abc", "b"], ["a", "bc"], ""), (["abc"], ["xab", "d"], "xabd"),
    (["zz"], ["z", "y", "z"], "zyz"),
    ([], ["a", "b"], "ab"), (["\n\n"], ["a\n", "\n"], "a")])
def test_stop_cutter_holds_back_a_possible_start(stops: list[str], pieces: list[str], out: str) -> None:
    cut, text = StopCutter(stops), ""
    for piece in pieces:
        emitted, stopped = cut.feed(piece)
        text += emitted
        if stopped:
            break
    else:
        text += cut.flush()
    assert text == out


def test_logprobs_in_each_apis_layout(client: Any) -> None:
    full = client.completions.create(model="fake", prompt="ab", max_tokens=3, temperature=0, logprobs=2)
    lp = full.choices[0].logprobs
    assert lp.tokens == [full.choices[0].text[:6], " delta", " eps"] or len(lp.tokens) == 3
    assert lp.token_logprobs == [-1.0] * 3 and [len(t) for t in lp.top_logprobs] == [2, 2, 2]
    assert lp.text_offset == [2, 2 + len(lp.tokens[0]), 2 + len(lp.tokens[0]) + len(lp.tokens[1])]
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 2 and len(content[0].top_logprobs) == 3
    assert content[0].bytes == list(content[0].token.encode())
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="plain", prompt="ab", max_tokens=3, logprobs=1)
    assert "logprobs" in str(info.value)


def test_chat_without_template_is_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "no_chat_template"


def test_router_names_the_model_and_takes_a_threshold(client: Any, base_url: str) -> None:
    raw = client.completions.with_raw_response.create(model="rt", prompt="q", max_tokens=2, temperature=0)
    assert raw.headers["x-fusekit-routed-to"] == "big"
    body = json.loads(raw.text)
    assert body["fusekit"]["routed_to"] == "big" and body["choices"][0]["fusekit"]["routed_to"] == "big"
    high = client.completions.create(model="router-rt-0.9", prompt="q", max_tokens=2, temperature=0)
    assert high.model == "router-rt-0.9" and high.model_extra["fusekit"]["routed_to"] == "small"
    stream = client.chat.completions.with_raw_response.create(
        model="router-rt-0.75", messages=[{"role": "user", "content": "q"}], max_tokens=2, stream=True)
    assert stream.headers["x-fusekit-routed-to"] == "small"
    for name, status in (("router-rt-1.5", 400), ("router-fake-0.5", 404), ("router-rt-x", 404)):
        code, _, body = post_json(f"{base_url}/completions", {"model": name, "prompt": "q"},
                                  {"Authorization": f"Bearer {KEY}"})
        assert code == status, (name, body)


def test_models_health_and_auth(client: Any, base_url: str) -> None:
    assert {m.id for m in client.models.list()} == {"fake", "plain", "rt", "slow"}
    root = base_url[:-3]
    status, _, body = http("GET", f"{root}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer nope"}, "invalid_api_key"),
                          ({"Authorization": "Basic " + KEY}, "missing_api_key")):
        status, _, body = http("GET", f"{base_url}/models", headers=headers)
        assert status == 401 and json.loads(body)["error"]["code"] == code
    wrong = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="fake", prompt="x")
    assert http("GET", f"{root}/metrics")[0] == 401


def test_metrics_count_requests_tokens_and_latency(client: Any, base_url: str) -> None:
    client.completions.create(model="fake", prompt="m", max_tokens=4, temperature=0)
    status, head, body = http("GET", f"{base_url[:-3]}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = body.decode()
    assert status == 200 and head["content-type"].startswith("text/plain")
    assert 'fusekit_requests_total{route="/v1/completions",status="200"}' in text
    assert 'fusekit_requests_total{route="/v1/models",status="401"}' in text
    assert 'fusekit_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"}' in text
    assert 'fusekit_queue_depth{model="slow"} 0' in text
    line = next(x for x in text.splitlines() if x.startswith('fusekit_completion_tokens_total{model="fake"}'))
    assert int(float(line.split()[-1])) >= 4
    assert "fusekit_completion_tokens_per_second" in text


def test_metrics_histogram_and_rate_are_exact() -> None:
    clock = [100.0]
    metrics = Metrics(clock=lambda: clock[0])
    for seconds in (0.004, 0.3, 0.3, 100.0):
        metrics.observe_request("/v1/completions", 200, seconds)
    metrics.add_tokens("m", prompt=3, completion=20)
    clock[0] += 5
    metrics.add_tokens("m", completion=30)
    text = metrics.render({"m": 2})
    assert 'fusekit_request_duration_seconds_bucket{route="/v1/completions",le="0.005"} 1' in text
    assert 'fusekit_request_duration_seconds_bucket{route="/v1/completions",le="0.25"} 1' in text
    assert 'fusekit_request_duration_seconds_bucket{route="/v1/completions",le="0.5"} 3' in text
    assert 'fusekit_request_duration_seconds_bucket{route="/v1/completions",le="60"} 3' in text
    assert 'fusekit_request_duration_seconds_count{route="/v1/completions"} 4' in text
    assert 'fusekit_completion_tokens_per_second{model="m"} 5' in text  # 50 tokens / 10 s
    clock[0] += 6  # the first 20 tokens leave the window
    assert metrics.tokens_per_second("m") == 3.0
    assert 'fusekit_queue_depth{model="m"} 2' in text


def test_full_queue_is_429_with_retry_after(base_url: str, fakes: dict[str, FakeBackend]) -> None:
    results: list[tuple[int, dict[str, str]]] = []

    def one() -> None:
        status, head, _ = post_json(f"{base_url}/completions",
                                    {"model": "slow", "prompt": "p", "max_tokens": 6},
                                    {"Authorization": f"Bearer {KEY}"})
        results.append((status, head))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 429} and 429 in statuses, statuses
    assert all(h.get("retry-after") == "2" for s, h in results if s == 429)


def test_disconnect_cancels_the_generation(base_url: str, fakes: dict[str, FakeBackend]) -> None:
    import httpx

    slow = fakes["slow"]
    before = slow.closed_early
    body = {"model": "slow", "prompt": "p", "max_tokens": 60, "stream": True}
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{base_url}/completions", json=body, headers=auth, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk read; leave
    assert wait_until(lambda: slow.closed_early == before + 1 and slow.active == 0)
    before = slow.closed_early
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
        httpx.post(f"{base_url}/completions", json={**body, "stream": False},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    assert wait_until(lambda: slow.closed_early == before + 1 and slow.active == 0)
    assert slow.tokens < 2 * 60
    metrics = http("GET", f"{base_url[:-3]}/metrics", headers=auth)[2].decode()
    assert 'fusekit_requests_total{route="/v1/completions",status="499"} 1' in metrics  # not a 500


# -- config --------------------------------------------------------------------------------------------

def test_config_errors_name_the_line() -> None:
    with pytest.raises(FusekitError) as info:
        parse_serve_config("models:\n  - {name: a, model: m, router: r}\nlimits: {max_queue: 0}\n"
                           "port: 99999\n", "s.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "3 problems in s.yaml:"
    assert [line.split()[0] for line in lines[1:]] == ["s.yaml:2:5", "s.yaml:3:10", "s.yaml:4:1"]
    assert "exactly one of model, ensemble, router (got model, router)" in lines[1]
    with pytest.raises(FusekitError, match=r"s.yaml:2:6 models\[0\].nmae: unknown key 'nmae'; did you mean"):
        parse_serve_config("models:\n  - {nmae: a, model: m}\n", "s.yaml")
    with pytest.raises(FusekitError, match=r"s.yaml:3:5 models\[1\].name: 'a' is already the name of models"):
        parse_serve_config("models:\n  - {name: a, model: m}\n  - name: a\n    model: n\n", "s.yaml")


def test_quick_start_tells_kinds_apart(tmp_path: Path) -> None:
    router = tmp_path / "my-router"
    router.mkdir()
    (router / "router.json").write_text("{}", encoding="utf-8")
    (tmp_path / "merged").mkdir()
    recipe = tmp_path / "ens.yaml"
    recipe.write_text("method: prob_avg\nmodels:\n  - model: a\n  - model: b\n", encoding="utf-8")
    config = quick_config([str(router), str(tmp_path / "merged"), str(recipe), "org/tiny"], ["r"])
    assert [(m.name, m.kind) for m in config.models] == [("r", "router"), ("merged", "model"),
                                                          ("ens", "ensemble"), ("org/tiny", "model")]
    merge = tmp_path / "m.yaml"
    merge.write_text("merge_method: linear\nmodels: [{model: a}]\n", encoding="utf-8")
    with pytest.raises(FusekitError, match="a merge recipe"):
        quick_config([str(merge)])
    with pytest.raises(FusekitError, match="give --name"):
        quick_config([str(tmp_path / "merged"), str(tmp_path / "merged")])


def test_shipped_demo_config_validates() -> None:
    from fusekit.serve.config import load_serve_config

    config = load_serve_config(Path(__file__).resolve().parent.parent / "configs" / "serve" / "demo.yaml")
    assert {m.kind for m in config.models} == {"model", "ensemble", "router"}
    assert config.host == "127.0.0.1"


# -- real backends: a merged model, an ensemble recipe and a router folder ---------------------------

CHATML = (Path(__file__).resolve().parent.parent / "fusekit" / "chat_templates" / "chatml.jinja")
PY_LINES = [f"def f{i}(x):\n    return x + {i}\n" for i in range(8)]
C_LINES = [f"int f{i}(int x) {{ return x * {i}; }}\n" for i in range(8)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models with a tokenizer; a linear merge of two of them (given a chat template); an ensemble
    recipe over the two; a router over the two built from given labels."""
    import fusekit
    from fusekit.demo import build_demo_models
    from fusekit.route import build_router

    root = tmp_path_factory.mktemp("serve-real")
    models = build_demo_models(root / "models", names=("c", "python"), hidden_size=32, num_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    (root / "merge.yaml").write_text(f"merge_method: linear\ndtype: float32\nmodels:\n"
                                     f"  - model: {models['c']}\n    parameters: {{weight: 0.5}}\n"
                                     f"  - model: {models['python']}\n    parameters: {{weight: 0.5}}\n",
                                     encoding="utf-8")
    fusekit.merge(root / "merge.yaml", root / "merged")
    config_file = root / "merged" / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "chat_template": CHATML.read_text(encoding="utf-8")}),
                           encoding="utf-8")
    (root / "ens.yaml").write_text(f"method: prob_avg\nmodels:\n  - model: {models['c']}\n"
                                   f"  - model: {models['python']}\n", encoding="utf-8")
    rows = [{"text": t, "label": "python"} for t in PY_LINES] + [{"text": t, "label": "c"} for t in C_LINES]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "route.yaml").write_text(f"models:\n  - {{model: {models['c']}, name: c, cost: 1}}\n"
                                     f"  - {{model: {models['python']}, name: python, cost: 2}}\n"
                                     f"data: {root / 'train.jsonl'}\nlabels: given\nrouter: knn\nfolds: 2\n",
                                     encoding="utf-8")
    build_router(root / "route.yaml", root / "router")
    return {"merged": root / "merged", "ens": root / "ens.yaml", "router": root / "router"}


@pytest.fixture(scope="module")
def real_client(artifacts: dict[str, Path]) -> Iterator[Any]:
    from fusekit.serve.config import ServeConfig
    from fusekit.serve.server import close_backends, load_backends

    config = ServeConfig.model_validate({"models": [
        {"name": "merged", "model": str(artifacts["merged"])},
        {"name": "ens", "ensemble": str(artifacts["ens"])},
        {"name": "rt", "router": str(artifacts["router"])},
        {"name": "tiny-queue", "model": str(artifacts["merged"]), "max_batch": 1, "max_queue": 1}]})
    backends = load_backends(config)
    assert {b.kind for b in backends.values()} == {"model", "ensemble", "router"}
    with running_server(backends) as url:
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    import asyncio

    asyncio.run(close_backends(backends))


def _both(client: Any, model: str, prompt: str, tokens: int) -> tuple[str, str, Any]:
    full = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=tokens,
                                                       temperature=0)
    text, _ = _stream_text(client.completions.create(model=model, prompt=prompt, max_tokens=tokens,
                                                     temperature=0, stream=True), chat=False)
    return full.parse().choices[0].text, text, full


def test_real_merged_model_matches_generate(real_client: Any, artifacts: dict[str, Path]) -> None:
    from fusekit.lm import load_lm
    from fusekit.lm.generate import generate

    full, streamed, _ = _both(real_client, "merged", "def add(", 12)
    reference = generate(load_lm(artifacts["merged"]), ["def add("], max_new_tokens=12)[0]
    assert full == streamed == reference and full
    chat = real_client.chat.completions.create(model="merged", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6, temperature=0)
    chunks = real_client.chat.completions.create(model="merged", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, stream=True)
    assert _stream_text(chunks, chat=True)[0] == chat.choices[0].message.content
    assert chat.usage.completion_tokens >= 1


def test_real_ensemble_matches_ensemble_generate(real_client: Any, artifacts: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import in_process_cli

    full, streamed, _ = _both(real_client, "ens", "int main(", 10)
    code, out, err = in_process_cli(capsys)("ensemble", "generate", str(artifacts["ens"]), "--prompt",
                                            "int main(", "--max-new-tokens", "10", "--temperature", "0",
                                            "--json", "--quiet")
    assert code == 0, err
    assert full == streamed == json.loads(out)["answers"][0]["answer"]
    with pytest.raises(openai.BadRequestError):  # an ensemble gives no chat template here, and no logprobs
        real_client.completions.create(model="ens", prompt="x", max_tokens=2, logprobs=1)


def test_real_router_matches_route_run(real_client: Any, artifacts: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import in_process_cli

    prompt = "def g(y):\n    return y"
    full, streamed, raw = _both(real_client, "rt", prompt, 10)
    code, out, err = in_process_cli(capsys)("route", "run", str(artifacts["router"]), "--prompt", prompt,
                                            "--generate", "--max-new-tokens", "10", "--json", "--quiet")
    assert code == 0, err
    record = json.loads(out)
    assert full == streamed == record["answer"]
    assert raw.headers["x-fusekit-routed-to"] == record["model"]
    cheap = real_client.completions.create(model="router-rt-1.0", prompt=prompt, max_tokens=3, temperature=0)
    assert cheap.model_extra["fusekit"]["routed_to"] == "c"  # threshold 1: always the cheapest model


# -- draining: SIGTERM with requests in flight ---------------------------------------------------------

_SERVE_WITH_FAKES = """
import sys
import fusekit.serve.backends as backends
from serve_helpers import FakeBackend

backends.load_backend = lambda name, kind, ref, **kw: FakeBackend(name, delay=float(ref))
sys.argv = ["fusekit", "serve", "0.05", "--name", "slow", "--port", "0", "--grace-seconds", "20"]
from fusekit.cli import main
main()
"""


def test_sigterm_lets_every_accepted_request_finish_then_exits_0() -> None:
    import os
    import re
    import signal
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    env.pop("FUSEKIT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_WITH_FAKES], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
        assert found, line
        url = found[1]
        results: list[tuple[int, Any]] = []

        def one(stream: bool) -> None:
            results.append(post_json(f"{url}/completions", {"model": "slow", "prompt": "p", "max_tokens": 30,
                                                            "temperature": 0, "stream": stream})[::2])

        threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # all four accepted and decoding (each needs 30 × 0.05 s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for thread in threads:
            thread.join(5)
        assert len(results) == 4 and all(status == 200 for status, _ in results), results
        texts = [body["choices"][0]["text"] for _, body in results if isinstance(body, dict)]
        assert texts == [expected_text("p", 30)] * 2  # the two streamed answers are checked below
        streamed = [body.decode() for _, body in results if isinstance(body, bytes)]
        assert len(streamed) == 2 and all(s.rstrip().endswith("data: [DONE]") for s in streamed)
        with pytest.raises(OSError):  # no longer listening
            http("GET", url[:-3] + "/health", timeout=2)
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_draining_server_refuses_new_requests_with_503() -> None:
    from fastapi.testclient import TestClient

    from fusekit.serve.app import create_app

    app = create_app({"fake": FakeBackend("fake")}, limits=Limits())
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"model": "fake", "prompt": "x"}).status_code == 200
        app.state.fusekit.draining = True
        answer = client.post("/v1/completions", json={"model": "fake", "prompt": "x"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        assert client.get("/health").status_code == 503


# -- the command line: every mistake is one line and exit status 2, before any port is bound -------------

def test_cli_mistakes_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from conftest import in_process_cli

    import fusekit.serve.backends as backends

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    monkeypatch.delenv("FUSEKIT_API_KEY", raising=False)
    cli = in_process_cli(capsys)
    Path("bad.yaml").write_text("models:\n  - {name: a, model: m}\nlimits: {max_queue: -1}\n",
                                encoding="utf-8")
    Path("ok.yaml").write_text("models:\n  - {name: a, model: m}\nport: 0\n", encoding="utf-8")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    cases = [(["serve", "bad.yaml"], "bad.yaml:3:10 limits.max_queue"),
             (["serve", "ok.yaml", "--name", "x"], "--name names the models of a quick start"),
             (["serve", "ok.yaml", "--api-key", " "], "--api-key (or FUSEKIT_API_KEY) is empty"),
             (["serve", "./no-such-model"], "cannot serve 'no-such-model'"),
             (["serve", "a", "b", "--name", "x", "--name", "y", "--name", "z"],
              "3 --name options for 2 models"),
             (["serve", "m", "--port", port], f"cannot listen on 127.0.0.1:{port}")]
    monkeypatch.setattr(backends, "load_backend", lambda name, kind, ref, **kw: (
        FakeBackend(name) if ref != "./no-such-model" else
        (_ for _ in ()).throw(FusekitError("./no-such-model: no such model folder"))))
    try:
        for args, message in cases:
            code, out, err = cli(*args)
            assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
            assert message in err and "Traceback" not in err, (args, err)
    finally:
        busy.close()


def test_real_model_past_its_queue_answers_429(real_client: Any) -> None:
    """One request decodes, one waits; the others are refused at once with Retry-After."""
    results: list[Any] = []

    def one() -> None:
        try:
            results.append(real_client.completions.create(model="tiny-queue", prompt="x", max_tokens=40,
                                                          temperature=0).usage.completion_tokens)
        except openai.RateLimitError as exc:
            results.append((429, exc.response.headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    refused = [r for r in results if isinstance(r, tuple)]
    assert len(results) == 5 and 1 <= len(refused) <= 3, results
    assert all(r == 40 for r in results if not isinstance(r, tuple))
    assert all(int(after) >= 1 for _, after in refused)
