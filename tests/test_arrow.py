"""``router: arrow``: PEFT's Arrow routing over LoRA adapters of one base, as a router folder that
``route run``, ``route eval`` and ``fusekit score`` use.

Adapters are made in the test with PEFT (non-zero ``lora_B``) over a tiny Llama with a tokenizer. The
references: a single adapter merged by ``load_lm`` (Arrow over one adapter is that adapter), PEFT's
own ``create_arrow_model`` built here (fusekit's model must give the same logits), and the Arrow
weights recomputed in float64 from an exact SVD of each ΔW = B A.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli

from fusekit.errors import RecipeError
from fusekit.route import parse_route_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]
TEXTS = ["def add(a, b):\n    return a + b\n", "int main(void) { return 0; }\n",
         "The quick brown fox jumps over the lazy dog.\n"]


def _make_adapter(base: Path, out: Path, *, seed: int, scale: float = 1.0) -> Path:
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         init_lora_weights=False))
    with torch.no_grad():  # a clear top singular direction: PEFT's 15 power iterations then converge
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
            if "lora_A" in name:
                param[0].mul_(4.0)
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def library(tokenizer_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base, a full model beside it, and four adapters (a, b, c and a general one, g)."""
    root = tmp_path_factory.mktemp("arrow")
    base = tokenizer_models["base"]
    out = {"base": base, "full": tokenizer_models["math"]}
    for index, name in enumerate("abcg"):
        out[name] = _make_adapter(base, root / name, seed=10 + index, scale=1.0 + index)
    return out


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return in_process_cli(capsys)


def _recipe(path: Path, lib: dict[str, Path], names: str, router: str) -> Path:
    models = "\n".join(f"  - {{model: '{lib['base']}+{lib[n]}', name: {n}}}" for n in names)
    path.write_text(f"models:\n{models}\nrouter: {router}\n", encoding="utf-8")
    return path


def _build(cli: Callable[..., tuple[int, str, str]], tmp_path: Path, lib: dict[str, Path], names: str,
           router: str, out: str = "router") -> Path:
    recipe = _recipe(tmp_path / f"{out}.yaml", lib, names, router)
    code, _, err = cli("route", "build", str(recipe), str(tmp_path / out), "--quiet")
    assert code == 0, err
    return tmp_path / out


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.double()


def _ids(lm: object) -> torch.Tensor:
    from fusekit.lm.generate import prompt_ids

    return torch.tensor([prompt_ids(lm, TEXTS[0] + TEXTS[1])])  # type: ignore[arg-type]


def test_arrow_with_one_expert_is_that_expert(cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                                              library: dict[str, Path]) -> None:
    from fusekit.lm import load_lm
    from fusekit.lm.generate import generate
    from fusekit.route.arrow import load_arrow, load_arrow_lm

    folder = _build(cli, tmp_path, library, "a", "{type: arrow, top_k: 1}")
    arrow_lm = load_arrow_lm(load_arrow(folder))
    alone = load_lm(f"{library['base']}+{library['a']}")
    base = load_lm(library["base"])
    ids = _ids(alone)
    ours, theirs = _logits(arrow_lm.model, ids), _logits(alone.model, ids)
    assert (theirs - _logits(base.model, ids)).abs().max() > 1e-2  # the adapter changes the logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    code, out, err = cli("route", "run", str(folder), "--prompt", "def f(", "--generate",
                         "--max-new-tokens", "8", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["model"] == "a" and record["probabilities"] == {"a": 1.0} and record["threshold"] is None
    assert record["answer"] == generate(alone, ["def f("], max_new_tokens=8)[0]
    text = tmp_path / "t.txt"
    text.write_text(TEXTS[0], encoding="utf-8")
    code, out, err = cli("score", str(folder), f"{library['base']}+{library['a']}", "--text", str(text),
                         "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert math.isclose(rows[0]["bits_per_byte"], rows[1]["bits_per_byte"], rel_tol=1e-6)


def _svd_weights(peft_model: torch.nn.Module, ids: torch.Tensor, top_k: int, temperature: float,
                 names: list[str]) -> torch.Tensor:
    """Each adapter's mean Arrow weight over the tokens and layers, in float64, from an exact SVD of
    every adapter's ΔW = B A, on the inputs PEFT's Arrow layers see."""
    layers = [(n, m) for n, m in peft_model.named_modules() if hasattr(m, "lora_arrow")]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0]))
             for n, m in layers]
    _logits(peft_model, ids)
    for hook in hooks:
        hook.remove()
    total = torch.zeros(len(names), dtype=torch.float64)
    for name, module in layers:
        delta = [module.lora_B[a].weight.double() @ module.lora_A[a].weight.double() for a in names]
        protos = torch.stack([torch.linalg.svd(d)[2][0] for d in delta])  # (E, in): top right sing. vectors
        x = inputs[name].reshape(-1, protos.shape[1]).double()
        sim = (x @ protos.T).abs()
        top = sim.topk(top_k, dim=1)
        logits = torch.full_like(sim, -math.inf).scatter(1, top.indices, top.values)
        total += torch.softmax(logits / temperature, dim=1).sum(0)
    return total / total.sum()


@pytest.mark.parametrize("gks", [False, True])
def test_arrow_is_peft_arrow(cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                             library: dict[str, Path], gks: bool) -> None:
    import transformers
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import create_arrow_model

    from fusekit.route.arrow import load_arrow, load_arrow_lm, routing_weights

    general = f"'{library['base']}+{library['g']}'"
    settings = f"use_gks: true, gks_adapters: [{general}]" if gks else "use_gks: false"
    folder = _build(cli, tmp_path, library, "abc", f"{{type: arrow, top_k: 2, router_temperature: 0.2, "
                    f"rng_seed: 3, {settings}}}")
    arrow_lm = load_arrow_lm(load_arrow(folder))
    base = transformers.AutoModelForCausalLM.from_pretrained(library["base"], dtype=torch.float32)
    peft_model = create_arrow_model(base, [str(library[n]) for n in "abc"],
                                    ArrowConfig(top_k=2, router_temperature=0.2, use_gks=gks, rng_seed=3),
                                    general_adapter_paths=[str(library["g"])] if gks else None).eval()
    ids = _ids(arrow_lm)
    assert torch.allclose(_logits(arrow_lm.model, ids), _logits(peft_model, ids), atol=1e-5, rtol=0)
    text = arrow_lm.tokenizer.decode(ids[0, 1:])  # type: ignore[union-attr]
    ours = routing_weights(arrow_lm, [text])[0]
    reference = _svd_weights(peft_model, ids, 2, 0.2, ["task_0", "task_1", "task_2"])
    assert ours.max() - ours.min() > 0.05  # the adapters are told apart
    assert torch.allclose(ours, reference, atol=5e-3, rtol=0)


@pytest.mark.parametrize(("text", "fragment"), [
    ("models: [{model: ./a}, {model: ./b}]\nrouter: {type: arrow, top_k: 3}\n",
     "3 is more than the 2 adapters"),
    ("models: [{model: ./a}, {model: ./b}]\nrouter: {type: arrow}\nlabels: loss\n",
     "'labels' has no effect"),
    ("models: [{model: ./a}, {model: ./b}]\nrouter: {type: arrow, use_gks: true}\n",
     "list them as gks_adapters"),
    ("models: [{model: ./a}, {model: ./b}]\nrouter: knn\n", "'data' (a JSONL file of examples) is required"),
])
def test_bad_arrow_recipes_are_refused_in_one_line(text: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_route_recipe(text, "r.yaml")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_arrow_recipe_needs_no_data() -> None:
    recipe, _ = parse_route_recipe("models: [{model: ./a}, {model: ./b}]\nrouter: arrow\n")
    assert recipe.data is None and recipe.router.type == "arrow" and recipe.router.top_k == 2


def test_arrow_over_a_full_model_exits_2(cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                                         library: dict[str, Path]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  - {{model: '{library['base']}+{library['a']}'}}\n"
                      f"  - {{model: '{library['full']}'}}\nrouter: arrow\n", encoding="utf-8")
    code, out, err = cli("route", "build", str(recipe), str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"models[1] '{library['full']}' is a full model" in err and "LoRA adapters" in err
    assert not (tmp_path / "out").exists()


def test_arrow_build_run_eval_end_to_end(cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                                         library: dict[str, Path]) -> None:
    arrow = _build(cli, tmp_path, library, "abc", "{type: arrow, top_k: 2}", out="arrow")
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t, "label": n}) + "\n" for t, n in zip(TEXTS, "abc", strict=True)]
    data.write_text("".join(lines), encoding="utf-8")
    recipe = _recipe(tmp_path / "knn.yaml", library, "abc", "{type: knn, k: 1}")
    recipe.write_text(recipe.read_text() + f"data: {data}\nlabels: given\nfolds: 0\n", encoding="utf-8")
    code, _, err = cli("route", "build", str(recipe), str(tmp_path / "knn"), "--quiet")
    assert code == 0, err
    _knn_answers_come_from_one_shared_base(cli, tmp_path / "knn", data, library)
    code, out, err = cli("route", "run", str(arrow), "--data", str(data), "--generate",
                         "--max-new-tokens", "4")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3] and all("answer" in r for r in records)
    assert all(math.isclose(sum(r["probabilities"].values()), 1.0) for r in records)
    code, out, err = cli("route", "eval", str(arrow), "--data", str(data), "--compare", str(tmp_path / "knn"),
                         "--json", "--no-cache")
    assert code == 0, err
    report = json.loads(out)
    assert report["router_type"] == "arrow" and report["table"] == [] and report["merge"] is not None
    assert report["oracle"] <= min(report["single"].values()) + 1e-12
    assert set(report["compared"]) == {str(tmp_path / "knn")}
    code, out, err = cli("score", str(arrow), "--text", str(_joined(tmp_path, TEXTS[1])), "--json")
    assert code == 0, err
    code, text_out, _ = cli("route", "eval", str(arrow), "--data", str(_jsonl(tmp_path, TEXTS[1])),
                            "--no-merge", "--json", "--no-cache")
    assert math.isclose(json.loads(text_out)["routed"], json.loads(out)[0]["bits_per_byte"], rel_tol=1e-6)
    code, _, err = cli("route", "calibrate", str(arrow), "--data", str(data), "--share", "0.5")
    assert code == 2 and "is an Arrow router" in err and len(err.strip().splitlines()) == 1


def _joined(tmp_path: Path, text: str) -> Path:
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    return tmp_path / "one.txt"


def _jsonl(tmp_path: Path, text: str) -> Path:
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    return tmp_path / "one.jsonl"


def _knn_answers_come_from_one_shared_base(cli: Callable[..., tuple[int, str, str]], knn: Path, data: Path,
                                           library: dict[str, Path]) -> None:
    """``route run --data --generate`` over adapters loads them once, together, and each answer is the
    routed adapter's own greedy continuation."""
    import fusekit.lm.library as library_module
    from fusekit.lm import load_lm
    from fusekit.lm.generate import generate

    calls: list[int] = []
    original = library_module.load_members

    def counting(refs: list[str], **kwargs: object) -> object:
        calls.append(len(refs))
        return original(refs, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(library_module, "load_members", counting)
        code, out, err = cli("route", "run", str(knn), "--data", str(data), "--generate",
                             "--max-new-tokens", "4")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert calls == [len({r["model"] for r in records})] and calls[0] >= 2
    for record, text in zip(records, TEXTS, strict=True):
        alone = load_lm(f"{library['base']}+{library[record['model']]}")
        assert record["answer"] == generate(alone, [text], max_new_tokens=4)[0]


def test_an_arrow_folder_is_served_like_a_model(cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                                                library: dict[str, Path]) -> None:
    """`fusekit serve` of an Arrow folder: the server's greedy text equals `route run --generate`."""
    import asyncio

    from fusekit.serve.backends import SamplingParams, load_backend

    arrow = _build(cli, tmp_path, library, "abc", "{type: arrow, top_k: 2}", out="arrow")
    code, out, err = cli("route", "run", str(arrow), "--prompt", TEXTS[0][:20], "--generate",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    backend = load_backend("arrow", "router", str(arrow))

    async def served() -> str:
        pieces = [d.text async for d in backend.stream(TEXTS[0][:20], SamplingParams(max_tokens=4))]
        await backend.close()
        return "".join(pieces)

    assert asyncio.run(served()) == json.loads(out)["answer"]
