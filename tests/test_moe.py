"""``fusekit moe``: upcycled checkpoints load in transformers, equal the dense model when every
expert is that model, route distinct experts by their prompts, and refuse bad recipes cleanly."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fusekit.cli import main
from fusekit.demo import build_demo_models
from fusekit.moe import plan_moe, run_moe
from fusekit.moe.gates import warn_if_parallel
from fusekit.ops import MergeInputs, get_method, seeded_generator
from fusekit.ops.moe import ExpertNoiseModelParams
from fusekit.ops.registry import NoParams

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PROMPTS = ["def add(a, b): return a + b", "What is 12 times 7?", "Once upon a time"]
CODE = ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)", "import os\nos.getcwd()"]
MATH = ["What is 12 times 7?", "Solve for x: 3x + 5 = 20.", "The derivative of x^2 is 2x."]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama base, code and math models with a tokenizer (2 layers, hidden 32)."""
    return build_demo_models(tmp_path_factory.mktemp("moe"), hidden_size=32, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)


def recipe(path: Path, base: Path, experts: list[tuple[Path, list[str]]], *, extra: str = "",
           shared: str = "") -> Path:
    lines = [f"base_model: {base}", *extra.strip().splitlines(), "experts:"]
    for source, prompts in experts:
        lines.append(f"  - source_model: {source}")
        if prompts:
            lines.append("    positive_prompts:")
            lines += [f"      - {json.dumps(p)}" for p in prompts]
    if shared:
        lines += ["shared_experts:", *shared.strip("\n").splitlines()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(folder: Path) -> torch.nn.Module:
    # float64 runs the experts one by one ("eager"); the grouped kernels take float32 at most.
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float64, output_loading_info=True,
        **({"experts_implementation": "eager"} if "moe" in str(folder) or "out" in folder.name else {}))
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model.eval()


def logits(model: torch.nn.Module, tokenizer: object, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        return model(**ids).logits[0]


# -- the identical-experts invariant ---------------------------------------------------------------

GATE_MODES = ["hidden", "cheap_embed", "random", "uniform_random"]
LAYOUTS = {
    "mixtral": ("experts_per_token: 1", ""),
    "qwen2_moe": ("architecture: qwen2_moe", "  - source_model: {base}\n"),
    "qwen2_moe-share": ("architecture: qwen2_moe\nexperts_per_token: 3",
                        "  - source_model: {base}\n    residual_scale: 0.3\n"),
}


@pytest.fixture(scope="module")
def dense(models: dict[str, Path]) -> torch.nn.Module:
    return load(models["base"])


@pytest.mark.parametrize(("layout", "gate_mode"), [
    *[("mixtral", mode) for mode in GATE_MODES], *[("qwen2_moe-share", mode) for mode in GATE_MODES],
    ("qwen2_moe", "hidden")])
def test_identical_experts_compute_the_dense_model(models: dict[str, Path], dense: torch.nn.Module,
                                                   tmp_path: Path, gate_mode: str, layout: str) -> None:
    base = models["base"]
    extra, shared = LAYOUTS[layout]
    text = recipe(tmp_path / "moe.yaml", base, [(base, [p]) for p in PROMPTS],
                  extra=f"gate_mode: {gate_mode}\n{extra}", shared=shared.format(base=base))
    out = tmp_path / "out"
    run_moe(text, out, allow_identical_experts=True, random_seed=3)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == layout.split("-")[0]
    moe = load(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for prompt in ["Hello there", "x = 1 + 2", PROMPTS[0]]:
        # transformers normalises the top-k routing weights in float32 even in a float64 model,
        # so Σ w = 1 holds to ~1e-7 relative: well above float64 rounding, far below any real gap.
        torch.testing.assert_close(logits(moe, tokenizer, prompt), logits(dense, tokenizer, prompt),
                                   rtol=0, atol=1e-7)
    generated = moe.generate(**tokenizer("def", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 1


# -- routing and gate values -----------------------------------------------------------------------

def _dense_hidden(base: Path, prompts: list[str]) -> torch.Tensor:
    """float64 reference: mean over prompts of each layer's input hidden state at the last token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    states = []
    for prompt in prompts:
        with torch.no_grad():
            out = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
        states.append(torch.stack([h[0, -1] for h in out.hidden_states[:-1]]))
    return torch.stack(states).mean(dim=0)  # (layers, hidden)


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe"])
def test_hidden_gates_route_prompts_to_their_expert(models: dict[str, Path], tmp_path: Path,
                                                    architecture: str) -> None:
    shared = f"  - source_model: {models['base']}\n" if architecture == "qwen2_moe" else ""
    text = recipe(tmp_path / "moe.yaml", models["base"],
                  [(models["code"], CODE), (models["math"], MATH)],
                  extra=f"architecture: {architecture}\nexperts_per_token: 1", shared=shared)
    out = tmp_path / "out"
    run_moe(text, out)
    # The written gates are the normalised float64 references (stored in float32).
    weights = load_file(out / "model.safetensors")
    router = "block_sparse_moe.gate" if architecture == "mixtral" else "mlp.gate"
    for expert, prompts in enumerate([CODE, MATH]):
        reference = _dense_hidden(models["base"], prompts)
        reference = reference / reference.norm(dim=-1, keepdim=True)
        for layer in range(2):
            row = weights[f"model.layers.{layer}.{router}.weight"][expert]
            torch.testing.assert_close(row.double(), reference[layer], rtol=0, atol=1e-5)
    moe = load(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    similar = {0: ["def mul(a, b):\n    return a * b", "for j in range(3):\n    print(j)"],
               1: ["What is 9 times 3?", "Solve for y: 2y + 1 = 9."]}
    for expert, prompts in similar.items():
        for prompt in prompts:
            with torch.no_grad():
                result = moe(**tokenizer(prompt, return_tensors="pt"), output_router_logits=True)
            top1 = [int(layer_logits[-1].argmax()) for layer_logits in result.router_logits]
            assert top1.count(expert) > len(top1) / 2, (prompt, top1)


def test_cheap_embed_gates_are_mean_token_embeddings(models: dict[str, Path], tmp_path: Path) -> None:
    text = recipe(tmp_path / "moe.yaml", models["base"], [(models["code"], CODE), (models["math"], MATH)],
                  extra="gate_mode: cheap_embed")
    (tmp_path / "moe.yaml").write_text(text.read_text() + "    negative_prompts: [\"def f(): pass\"]\n")
    out = tmp_path / "out"
    run_moe(text, out)
    embed = load_file(models["base"] / "model.safetensors")["model.embed_tokens.weight"].double()
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["base"])

    def mean(prompts: list[str]) -> torch.Tensor:
        return torch.stack([embed[tokenizer(p)["input_ids"]].mean(dim=0) for p in prompts]).mean(dim=0)

    weights = load_file(out / "model.safetensors")
    expected = [mean(CODE), mean(MATH) - mean(["def f(): pass"])]
    for layer in range(2):
        gate = weights[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double()
        for row, vector in zip(gate, expected, strict=True):
            torch.testing.assert_close(row, vector / vector.norm(), rtol=0, atol=1e-6)


def test_random_gates_follow_the_seed(models: dict[str, Path], tmp_path: Path) -> None:
    experts = [(models["code"], []), (models["math"], []), (models["base"], [])]
    gates = {}
    for mode, seed in [("random", 1), ("random", 1), ("random", 2), ("uniform_random", 1)]:
        text = recipe(tmp_path / "moe.yaml", models["base"], experts, extra=f"gate_mode: {mode}")
        out = tmp_path / f"out-{mode}-{seed}"
        run_moe(text, out, random_seed=seed, overwrite=True)
        gates[(mode, seed)] = (out / "model.safetensors").read_bytes()
        card = (out / "README.md").read_text()
        assert f"--random-seed {seed}" in card
    assert gates[("random", 1)] == gates[("random", 1)]
    weights = load_file(tmp_path / "out-random-1" / "model.safetensors")
    other = load_file(tmp_path / "out-random-2" / "model.safetensors")
    uniform = load_file(tmp_path / "out-uniform_random-1" / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.gate.weight"
    assert not torch.equal(weights[name], other[name])
    assert weights[name].abs().max() > 1.0  # standard normal draws
    bound = 1 / 32**0.5
    assert uniform[name].abs().max() <= bound and uniform[name].abs().max() > 0.5 * bound
    # the gates are exactly the seeded draws the docs describe
    expected = torch.randn(3, 32, generator=seeded_generator(1, name, 0))
    torch.testing.assert_close(weights[name], expected, rtol=0, atol=0)


def test_near_parallel_gate_rows_warn_once(models: dict[str, Path], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    text = recipe(tmp_path / "moe.yaml", models["base"],
                  [(models["code"], ["Please add these numbers"]),
                   (models["math"], ["please add these numbers"])])
    with caplog.at_level(logging.WARNING, logger="fusekit"):
        run_moe(text, tmp_path / "out")
    warnings = [r for r in caplog.records if "nearly parallel" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    gates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.01]]])
    assert warn_if_parallel(gates) == [1]


# -- expert tensors --------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(noise=st.floats(0.0, 2.0), scale=st.one_of(st.none(), st.floats(-3.0, 3.0)),
       seed=st.integers(0, 2**31 - 1))
def test_expert_noise_matches_its_formula(noise: float, scale: float | None, seed: int) -> None:
    tensor = torch.linspace(-1, 1, 48, dtype=torch.float64).reshape(6, 8)
    params = ExpertNoiseModelParams(noise_scale=noise, scale=scale)
    inputs = MergeInputs(tensors=[tensor], model_params=[params], params=NoParams(), seed=seed,
                         tensor_name="model.layers.0.mlp.experts.1.down_proj.weight")
    result = get_method("expert_noise").kernel(inputs)
    epsilon = torch.randn(6, 8, generator=seeded_generator(seed, inputs.tensor_name, 0),
                          dtype=torch.float32).double()
    expected = (tensor + noise * epsilon) * (1.0 if scale is None else scale)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(result, get_method("expert_noise").kernel(inputs))  # same seed, same bytes


def test_plan_streams_each_expert_tensor_from_its_model(models: dict[str, Path], tmp_path: Path) -> None:
    text = recipe(tmp_path / "moe.yaml", models["base"], [(models["code"], CODE), (models["math"], MATH)])
    (tmp_path / "moe.yaml").write_text(text.read_text() + "    residual_scale: 0.5\n    noise_scale: 0.01\n")
    moe_plan = plan_moe(text)
    tasks = {t.output: t for t in moe_plan.graph.tasks}
    down = tasks["model.layers.1.block_sparse_moe.experts.1.w2.weight"]
    (source,) = down.inputs
    assert (source.model, source.name) == (str(models["math"]), "model.layers.1.mlp.down_proj.weight")
    assert down.method == "expert_noise" and down.shape == source.shape
    assert down.model_params[0].scale == 0.5  # type: ignore[attr-defined]
    w1 = tasks["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert w1.method == "passthrough" and w1.inputs[0].model == str(models["code"])
    assert all(len(t.inputs) == 1 and t.inputs[0].shape == t.shape for t in tasks.values())
    out = tmp_path / "out"
    run_moe(text, out, random_seed=5, max_memory=10**6, out_shard_size=100_000)
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(shard))
    assert set(written) == set(tasks)
    math = load_file(models["math"] / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    noise = written["model.layers.1.block_sparse_moe.experts.1.w2.weight"] / 0.5 - math
    assert 0.005 < float(noise.std()) < 0.02  # noise_scale 0.01, then residual_scale 0.5


def test_output_folder_has_card_config_and_tokenizer(models: dict[str, Path], tmp_path: Path) -> None:
    text = recipe(tmp_path / "moe.yaml", models["base"], [(models["code"], CODE), (models["math"], MATH)])
    out = tmp_path / "out"
    run_moe(text, out)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "- moe" in front and "- merge" in front and "- fusekit" in front
    assert json.dumps(CODE[0]) in card and str(models["math"]) in card and "`hidden`" in card
    assert str(models["base"]) in card
    assert (out / "mergekit_moe_config.yml").read_text() == text.read_text()
    assert (out / "tokenizer.json").read_bytes() == (models["base"] / "tokenizer.json").read_bytes()
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.num_local_experts, config.num_experts_per_tok) == (2, 2)


# -- the CLI ---------------------------------------------------------------------------------------

def cli(*args: object) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_builds_and_plans(models: dict[str, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    text = recipe(tmp_path / "moe.yaml", models["base"], [(models["code"], CODE), (models["math"], MATH)],
                  extra="gate_mode: random")
    assert cli("plan", text, "--format", "json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["architecture"], summary["gate_mode"], summary["layers"]) == ("mixtral", "random", 2)
    assert summary["experts"] == [str(models["code"]), str(models["math"])]
    assert cli("plan", text, "--verbose") == 0
    assert "block_sparse_moe.experts.1.w2.weight" in capsys.readouterr().out
    assert cli("moe", text, tmp_path / "out", "--random-seed", "4", "--format", "json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["random_seed"] == 4 and (tmp_path / "out" / "model.safetensors").is_file()


def _bad(models: dict[str, Path], tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (recipe, text the one-line error must contain)."""
    wide = build_demo_models(tmp / "wide", names=("wide",), hidden_size=32, num_layers=2,
                             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)["wide"]
    mistral = tmp / "mistral"
    shutil.copytree(models["code"], mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    base, code, math = models["base"], models["code"], models["math"]
    good = [(code, CODE), (math, MATH)]
    cases = {
        "shape": (recipe(tmp / "shape.yaml", base, [(code, CODE), (wide, MATH)]),
                  "shape [128, 32] in experts[1]"),
        "model_type": (recipe(tmp / "type.yaml", base, [(code, CODE), (mistral, MATH)]),
                       "experts[1]"),
        "per_token_low": (recipe(tmp / "low.yaml", base, good, extra="experts_per_token: 0"),
                          "experts_per_token: must be between 1 and the number of experts (2)"),
        "per_token_high": (recipe(tmp / "high.yaml", base, good, extra="experts_per_token: 3"),
                           "got 3"),
        "no_prompts": (recipe(tmp / "nop.yaml", base, [(code, CODE), (math, [])]),
                       "experts[1]: gate_mode hidden needs positive_prompts"),
        "no_prompts_cheap": (recipe(tmp / "nopc.yaml", base, [(code, []), (math, MATH)],
                                    extra="gate_mode: cheap_embed"), "gate_mode cheap_embed needs"),
        "same_prompts": (recipe(tmp / "same.yaml", base, [(code, MATH), (math, MATH)]),
                         "every expert has the same prompts"),
        "shared_on_mixtral": (recipe(tmp / "sh.yaml", base, good, extra="architecture: mixtral",
                                     shared=f"  - source_model: {base}\n"),
                              "architecture mixtral has no shared expert"),
        "architecture": (recipe(tmp / "arch.yaml", base, good, extra="architecture: switch"),
                         "valid: mixtral, qwen2_moe, qwen3_moe, deepseek"),
        # mergekit-moe's `qwen` without a shared expert is Qwen3-MoE, which a Llama base cannot become
        "qwen_family_on_llama": (recipe(tmp / "qf.yaml", base, good, extra="architecture: qwen"),
                                 "which qwen3_moe cannot be built from"),
        "shared_on_qwen3": (recipe(tmp / "sq3.yaml", base, good, extra="architecture: qwen3_moe",
                                   shared=f"  - source_model: {base}\n"),
                            "architecture qwen3_moe has no shared expert"),
        "identical": (recipe(tmp / "ident.yaml", base, [(code, CODE), (code, MATH)]),
                      "--allow-identical-experts"),
        "qwen_without_shared": (recipe(tmp / "qws.yaml", base, good, extra="architecture: qwen2_moe"),
                                "qwen2_moe needs one entry in shared_experts"),
        "unknown_key": (recipe(tmp / "key.yaml", base, good, extra="gate_mod: hidden"),
                        "did you mean 'gate_mode'"),
    }
    return cases


def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, (path, expected) in _bad(models, tmp_path).items():
        out = tmp_path / f"out-{name}"
        code = cli("moe", path, out)
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert err.startswith("fusekit: error:") and "\n" not in err, (name, err)
        assert expected in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".out-{name}*")), name


# -- mergekit-moe compatibility: empty prompts, the identical-experts flag, Qwen3-MoE, DeepSeek-MoE -----

def _bos_reference(base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: each layer's input hidden state of the BOS token alone, and its embedding row."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    bos = transformers.AutoTokenizer.from_pretrained(base).bos_token_id
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[bos]]), output_hidden_states=True)
    hidden = torch.stack([h[0, -1] for h in out.hidden_states[:-1]])  # (layers, hidden)
    return hidden, model.get_input_embeddings().weight[bos].detach()


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_empty_prompt_routes_on_the_start_of_text(models: dict[str, Path], tmp_path: Path,
                                                  gate_mode: str) -> None:
    """mergekit-moe feeds BOS + prompt, so `[""]` is the BOS token alone: its hidden state or embedding."""
    text = recipe(tmp_path / "moe.yaml", models["base"], [(models["code"], [""]), (models["math"], MATH)],
                  extra=f"gate_mode: {gate_mode}")
    run_moe(text, tmp_path / "out")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    hidden, embedding = _bos_reference(models["base"])
    for layer in range(2):
        expected = hidden[layer] if gate_mode == "hidden" else embedding
        row = weights[f"model.layers.{layer}.block_sparse_moe.gate.weight"][0].double()
        torch.testing.assert_close(row, expected / expected.norm(), rtol=0, atol=1e-5)


def test_identical_experts_warn_with_mergekits_flag(models: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    base = models["base"]
    text = recipe(tmp_path / "moe.yaml", base, [(base, []), (base, [])], extra="gate_mode: random")
    assert cli("moe", text, tmp_path / "refused") == 2
    assert "--i-understand-this-is-not-useful-without-training" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="fusekit"):
        assert cli("moe", text, tmp_path / "out", "--i-understand-this-is-not-useful-without-training") == 0
    warnings = [r.getMessage() for r in caplog.records if "every expert is the same model" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def qwen3(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Qwen3 dense models (base and one expert) sharing the demo tokenizer."""
    root = tmp_path_factory.mktemp("qwen3")
    folders = {}
    for name, seed in [("base", 0), ("expert", 1)]:
        torch.manual_seed(seed)
        config = transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          vocab_size=260, max_position_embeddings=64, bos_token_id=1,
                                          eos_token_id=2)
        transformers.Qwen3ForCausalLM(config).save_pretrained(root / name)
        for file in [*models["base"].glob("tokenizer*"), *models["base"].glob("special_tokens*")]:
            shutil.copy(file, root / name)
        folders[name] = root / name
    return folders


def test_qwen3_moe_loads_generates_and_holds_each_experts_mlp(qwen3: dict[str, Path], tmp_path: Path) -> None:
    base, expert = qwen3["base"], qwen3["expert"]
    # mergekit-moe's `architecture: qwen` without shared experts on Qwen3 models is Qwen3-MoE
    text = recipe(tmp_path / "moe.yaml", base, [(base, CODE), (expert, MATH)], extra="architecture: qwen")
    out = tmp_path / "out"
    run_moe(text, out)
    config = json.loads((out / "config.json").read_text())
    keys = ("model_type", "num_experts", "moe_intermediate_size")
    assert tuple(config[k] for k in keys) == ("qwen3_moe", 2, 64)
    assert config["norm_topk_prob"] is True and config["mlp_only_layers"] == []
    moe = load(out)
    for index, source in enumerate([base, expert]):
        dense = load_file(source / "model.safetensors")
        for layer in range(2):
            mlp = moe.model.layers[layer].mlp.experts
            parts = {p: dense[f"model.layers.{layer}.mlp.{p}.weight"].double()
                     for p in ("gate_proj", "up_proj", "down_proj")}
            assert torch.equal(mlp.gate_up_proj[index], torch.cat([parts["gate_proj"], parts["up_proj"]]))
            assert torch.equal(mlp.down_proj[index], parts["down_proj"])
    q_norm = load_file(base / "model.safetensors")["model.layers.1.self_attn.q_norm.weight"].double()
    assert torch.equal(moe.model.layers[1].self_attn.q_norm.weight, q_norm)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    generated = moe.generate(**tokenizer("def", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == len(tokenizer("def")["input_ids"]) + 4


def test_qwen3_moe_of_identical_experts_computes_the_dense_model(qwen3: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    base = qwen3["base"]
    text = recipe(tmp_path / "moe.yaml", base, [(base, []), (base, [])], extra="gate_mode: random")
    run_moe(text, tmp_path / "out", allow_identical_experts=True, random_seed=2)
    moe, dense = load(tmp_path / "out"), load(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    for prompt in ["Hello there", CODE[1]]:
        torch.testing.assert_close(logits(moe, tokenizer, prompt), logits(dense, tokenizer, prompt),
                                   rtol=0, atol=1e-7)


def _deepseek_as_qwen2_moe(folder: Path, out: Path) -> Path:
    """Re-express a DeepSeek-MoE checkpoint in Qwen2-MoE, which this transformers runs natively.

    DeepSeek-MoE computes Σ_top-k w_e E_e(x) + S(x) (softmax weights renormalised over the top k,
    shared expert ungated); Qwen2-MoE computes the same sum with sigmoid(g · x) S(x), so a zero gate
    and a doubled shared down_proj give the identical function (a zero shared expert when there is none).
    """
    config = json.loads((folder / "config.json").read_text())
    shared = config["n_shared_experts"] or 0
    weights = load_file(folder / "model.safetensors")
    converted = {name.replace(".mlp.shared_experts.", ".mlp.shared_expert."): tensor
                 for name, tensor in weights.items()}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp."
        for part in ("gate_proj", "up_proj", "down_proj"):
            name, factor = f"{prefix}shared_expert.{part}.weight", 2 if part == "down_proj" else 1
            like = converted[f"{prefix}experts.0.{part}.weight"]
            converted[name] = converted[name] * factor if shared else torch.zeros_like(like)
        converted[f"{prefix}shared_expert_gate.weight"] = torch.zeros(1, config["hidden_size"])
    out.mkdir()
    from safetensors.torch import save_file

    save_file(converted, str(out / "model.safetensors"))
    keep = {k: v for k, v in config.items() if k not in ("auto_map", "n_routed_experts", "n_shared_experts")}
    qwen = {**keep, "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
            "num_experts": config["n_routed_experts"], "decoder_sparse_step": 1, "mlp_only_layers": [],
            "shared_expert_intermediate_size": config["moe_intermediate_size"], "qkv_bias": False}
    (out / "config.json").write_text(json.dumps(qwen))
    for file in folder.glob("tokenizer*"):
        shutil.copy(file, out)
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_deepseek_moe_is_mergekits_layout_and_computes_the_dense_model(
        models: dict[str, Path], dense: torch.nn.Module, tmp_path: Path, shared: bool) -> None:
    base = models["base"]
    share = f"  - source_model: {base}\n    residual_scale: 0.25\n" if shared else ""
    text = recipe(tmp_path / "moe.yaml", base, [(base, CODE), (base, MATH)],
                  extra="architecture: deepseek", shared=share)
    out = tmp_path / "out"
    run_moe(text, out, allow_identical_experts=True)
    config = json.loads((out / "config.json").read_text())
    keys = ("model_type", "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq",
            "scoring_func", "norm_topk_prob", "num_experts_per_tok", "moe_intermediate_size")
    assert {k: config[k] for k in keys} == {
        "model_type": "deepseek", "n_routed_experts": 2, "n_shared_experts": 1 if shared else None,
        "first_k_dense_replace": 0, "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": True,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": json.loads((base / "config.json").read_text())["intermediate_size"]}
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("modeling_deepseek.DeepseekForCausalLM")
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    weights, source = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    routed, kept = (0.75, 0.25) if shared else (1.0, 0.0)
    down = source["model.layers.1.mlp.down_proj.weight"]
    torch.testing.assert_close(weights["model.layers.1.mlp.experts.1.down_proj.weight"], down * routed)
    assert torch.equal(weights["model.layers.0.mlp.experts.0.gate_proj.weight"],
                       source["model.layers.0.mlp.gate_proj.weight"])
    assert ("model.layers.1.mlp.shared_experts.down_proj.weight" in weights) == shared
    if shared:
        torch.testing.assert_close(weights["model.layers.1.mlp.shared_experts.down_proj.weight"], down * kept)
    assert not any("shared_expert_gate" in n or n.endswith("mlp.down_proj.weight") for n in weights)
    moe = load(_deepseek_as_qwen2_moe(out, tmp_path / "qwen"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)  # out's config points to remote code
    for prompt in ["Hello there", CODE[0]]:
        torch.testing.assert_close(logits(moe, tokenizer, prompt), logits(dense, tokenizer, prompt),
                                   rtol=0, atol=1e-7)
