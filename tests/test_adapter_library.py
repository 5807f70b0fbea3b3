"""One shared base for LoRA adapter members (:mod:`fusekit.lm.library`) and ensembles over it.

Adapters are made in the test with PEFT (non-zero ``lora_B``) over the tiny tokenizer models; the
reference for each member is ``load_lm`` of the same reference, which merges the adapter into its own
copy of the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli, write_recipe
from peft_helpers import make_peft_adapter
from safetensors.torch import load_file, save_file

from fusekit.ensemble.engine import load_ensemble
from fusekit.ensemble.scoring import score_ensemble
from fusekit.errors import FusekitError
from fusekit.io.refs import resolve_model
from fusekit.lm import load_lm, score_text
from fusekit.lm.generate import generate_ids, prompt_ids
from fusekit.lm.library import AdapterView, load_members, share_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "def add(a, b):\n    return a + b  # sum\n\nint main(void) { return 0; }\n"
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 11, 2], [1, 40, 41, 3, 8, 60, 61, 62]])


@dataclass(frozen=True)
class Library:
    base: Path
    other_base: Path  # a full model of the same shapes, different weights
    a: Path  # adapters whose configs name ``base``
    b: Path
    foreign: Path  # an adapter over ``other_base``




@pytest.fixture(scope="module")
def library(tokenizer_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Library:
    root = tmp_path_factory.mktemp("adapter-library")
    base, other = tokenizer_models["base"], tokenizer_models["math"]
    return Library(base, other,
                   make_peft_adapter(base, root / "a", seed=1, targets=["q_proj", "v_proj", "down_proj"]),
                   make_peft_adapter(base, root / "b", seed=2, targets=["k_proj", "o_proj", "up_proj"]),
                   make_peft_adapter(other, root / "foreign", seed=3, targets=["q_proj"]))


def _logits(model: object, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.double()  # type: ignore[operator]


def test_each_member_equals_load_lm_and_the_base_is_held_once(library: Library) -> None:
    refs = [str(library.a), f"{library.base}+{library.b}", str(library.base), str(library.other_base),
            str(library.a)]
    lms = load_members(refs)
    views = [lm.model for lm in lms]
    assert [isinstance(v, AdapterView) for v in views] == [True, True, True, False, True]
    for ref, lm in zip(refs, lms, strict=True):
        assert lm.ref == ref and lm.tokenizer is not None
        torch.testing.assert_close(_logits(lm.model), _logits(load_lm(ref).model), rtol=0, atol=1e-5)
    # The adapters change the output, so switching between them is seen (called in a mixed order).
    outs = [_logits(lms[i].model) for i in (2, 0, 1, 4, 2)]
    assert (outs[1] - outs[0]).abs().max() > 1e-3 and (outs[2] - outs[1]).abs().max() > 1e-3
    torch.testing.assert_close(outs[1], outs[3], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[4], rtol=0, atol=0)
    # One copy of the base: every view reads the same base tensors, and they count one base's worth.
    shared = {id(v.shared) for v in views if isinstance(v, AdapterView)}
    base_ptrs = [{p.data_ptr() for n, p in v.named_parameters() if "lora_" not in n}
                 for v in views if isinstance(v, AdapterView)]
    alone = load_lm(library.base).model
    assert len(shared) == 1 and all(ptrs == base_ptrs[0] for ptrs in base_ptrs)
    assert len(base_ptrs[0]) == len(list(alone.parameters()))
    first = views[0]
    assert isinstance(first, AdapterView)
    lora = {n for n, _ in first.named_parameters() if "lora_" in n}
    assert any(".member0." in n for n in lora) and any(".member1." in n for n in lora)
    assert not any(".member2." in n for n in lora)  # the repeated adapter is loaded once


def test_share_groups_auto_true_false(library: Library) -> None:
    a, b, foreign, base = (resolve_model(str(p)) for p in (library.a, library.b, library.foreign,
                                                           library.base))
    assert share_groups([a]) == []  # one adapter alone loads merged
    assert share_groups([a], share=True) == [[0]]
    assert share_groups([a, base, foreign]) == [[0, 1]]
    assert share_groups([a, foreign, b]) == [[0, 2]]
    assert share_groups([a, b], share=False) == []
    with pytest.raises(FusekitError, match="different bases") as caught:
        share_groups([a, foreign, b], share=True)
    message = str(caught.value)
    assert "\n" not in message and str(library.base) in message and str(library.other_base) in message


def _recipe(folder: Path, models: list[str], *, shared: bool | None, method: str = "prob_avg") -> Path:
    lines = ["models:", *(f"  - model: {m}" for m in models), f"method: {method}"]
    if shared is not None:
        lines.append(f"shared_base: {str(shared).lower()}")
    return write_recipe(folder / "ens.yaml", "\n".join(lines) + "\n")


def test_ensemble_of_one_adapter_equals_the_adapter_alone(library: Library, tmp_path: Path) -> None:
    ens = load_ensemble(_recipe(tmp_path, [str(library.a)], shared=True))
    assert isinstance(ens.members[0].lm.model, AdapterView)
    alone = load_lm(library.a)
    prompt = "def add("
    expected = generate_ids(alone, [prompt_ids(alone, prompt)], max_new_tokens=12, stop_at_eos=False)[0]
    answer = ens.generate([prompt], max_new_tokens=12, temperature=0.0).answers[0]
    assert answer.text == alone.tokenizer.decode(expected)  # type: ignore[union-attr]
    ours = score_ensemble(ens, TEXT).ensemble
    theirs = score_text(alone, TEXT)
    assert ours.n_tokens == theirs.n_tokens
    assert ours.bits_per_byte == pytest.approx(theirs.bits_per_byte, abs=1e-5)


@pytest.mark.parametrize("method", ["prob_avg", "byte"])
def test_shared_ensemble_equals_merged_members(library: Library, tmp_path: Path, method: str) -> None:
    models = [str(library.a), str(library.b), str(library.base), str(library.other_base)]
    shared = load_ensemble(_recipe(tmp_path, models, shared=None, method=method))
    merged = load_ensemble(_recipe(tmp_path, models, shared=False, method=method))
    assert sum(isinstance(m.lm.model, AdapterView) for m in shared.members) == 3
    assert not any(isinstance(m.lm.model, AdapterView) for m in merged.members)
    prompts = ["def add(", "int main"]
    ours = [a.text for a in shared.generate(prompts, max_new_tokens=8, temperature=0.0).answers]
    assert ours == [a.text for a in merged.generate(prompts, max_new_tokens=8, temperature=0.0).answers]
    assert score_ensemble(shared, TEXT).ensemble.bits_per_byte == pytest.approx(
        score_ensemble(merged, TEXT).ensemble.bits_per_byte, abs=1e-5)


def test_shared_base_true_over_different_bases_exits_2(library: Library, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, [str(library.a), str(library.foreign)], shared=True)
    code, out, err = in_process_cli(capsys)("ensemble", "generate", str(recipe), "--prompt", "def f(")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "shared_base" in lines[0]
    assert str(library.base) in lines[0] and str(library.other_base) in lines[0]


def test_an_adapter_that_does_not_fit_the_shared_base_is_one_line(library: Library, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((library.b / "adapter_config.json").read_text())
    tensors = load_file(library.b / "adapter_model.safetensors")
    name = next(n for n in tensors if "lora_A" in n)
    tensors[name] = tensors[name][:, :-3].contiguous()  # wrong input width
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(FusekitError, match="broken") as caught:
        load_members([str(library.a), str(broken)])
    assert "\n" not in str(caught.value) and "shape" in str(caught.value)

