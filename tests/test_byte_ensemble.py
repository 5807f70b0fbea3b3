"""``method: byte`` and ``fusekit score --bytes``: a tokenized model read as a model over bytes.

A tiny byte-level BPE tokenizer (a few merges over a small alphabet, so texts have many
tokenizations) and a random Llama with peaked distributions; the exact byte-level marginal is
computed in the test by enumerating every tokenization covering the text, with full forward passes
in float64 and no KV cache.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli

from fusekit.ensemble.bytes import EOS, ByteBeam, score_bytes
from fusekit.ensemble.engine import Ensemble, load_members
from fusekit.ensemble.members import logit_width, token_vocab
from fusekit.ensemble.recipe import parse_ensemble_recipe
from fusekit.ensemble.scoring import score_ensemble
from fusekit.errors import FusekitError
from fusekit.lm import LoadedLM, load_lm, score_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = "abab abba baab aab bba ab ba aa bb the cat sat on the mat, a bat ate a rat. " * 8
TEXT = "abba aab"


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``a``: the model; ``b``: the same weights with the tokenizer's merges in reverse order."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bytes")
    a = root / "a"
    _tokenizer(a)
    vocab = len(AutoTokenizer.from_pretrained(a))
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, initializer_range=0.4)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(a)
    b = root / "b"
    shutil.copytree(a, b)
    spec = json.loads((a / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    (b / "tokenizer.json").write_text(json.dumps(spec))
    c = root / "c"
    shutil.copytree(a, c)
    _train(c)
    return {"a": a, "b": b, "c": c}


def _train(folder: Path) -> None:
    """``c``: a copy trained on the corpus until its greedy continuations follow it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor(tok(CORPUS, add_special_tokens=False)["input_ids"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        x = torch.stack([ids[i:i + 32] for i in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)


def _beam(lm: LoadedLM, beam: int, context: int | None = None) -> ByteBeam:
    assert lm.tokenizer is not None
    return ByteBeam(lm, token_vocab(lm.tokenizer, logit_width(lm)), beam=beam, context=context)


def _exact_nll(lm: LoadedLM, text: str) -> float:
    """``-ln`` of the total probability of every token sequence covering ``text`` (the last token may
    run past its end), each token's probability renormalised over text tokens and EOS; float64."""
    assert lm.tokenizer is not None
    vocab = token_vocab(lm.tokenizer, logit_width(lm))
    data = text.encode()
    allowed = [i for i, p in enumerate(vocab.pieces) if p] + [vocab.eos_id]
    model = lm.model.double()

    def probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        out = torch.zeros_like(p)
        out[allowed] = p[allowed]
        return out / out.sum()

    def total(ids: list[int], pos: int) -> float:
        p, rest, mass = probs(ids), data[pos:], 0.0
        for v, piece in enumerate(vocab.pieces):
            if piece and piece.startswith(rest):  # covers the end of the text
                mass += float(p[v])
            elif piece and rest.startswith(piece):
                mass += float(p[v]) * total([*ids, v], pos + len(piece))
        return mass

    try:
        assert vocab.start_id is not None
        return -math.log(total([vocab.start_id], 0))
    finally:
        lm.model.float()


@pytest.mark.parametrize("context", [None, 6])
def test_byte_distribution_sums_to_one_and_reads_the_text(models: dict[str, Path],
                                                          context: int | None) -> None:
    stream = _beam(load_lm(models["a"]), beam=2, context=context)  # 6: tokenizations slide past their window
    for byte in (TEXT + " the cat sat on the mat\u00e9").encode():
        dist = stream.distribution()
        assert dist.shape == (EOS + 1,)
        assert bool((dist >= 0).all()) and abs(float(dist.sum()) - 1.0) < 1e-12
        assert float(dist[byte]) > 0
        stream.advance(byte)
        assert all(len(h.ids) <= (context or 64) for h in stream.hyps)
    assert float(stream.distribution()[EOS]) > 0


def test_exact_beam_equals_the_brute_force_marginal(models: dict[str, Path]) -> None:
    lm = load_lm(models["a"])
    exact = _exact_nll(lm, TEXT)
    wide = score_bytes(lm, TEXT, beam=64)
    assert wide.pruned_nats == 0.0
    assert wide.score.nll_nats == pytest.approx(exact, abs=1e-5)
    assert wide.score.n_bytes == len(TEXT.encode())
    # the canonical tokenization is one of the covering ones, so it scores at least as much
    assert score_text(lm, TEXT).nll_nats > exact + 1e-3
    narrow = score_bytes(lm, TEXT, beam=1)
    assert narrow.pruned_nats > 0
    assert abs(narrow.score.nll_nats - exact) <= narrow.pruned_nats + 1e-6


def test_two_tokenizations_of_one_vocabulary_give_the_same_bytes(models: dict[str, Path]) -> None:
    a, b = load_lm(models["a"]), load_lm(models["b"])
    assert a.tokenizer is not None and b.tokenizer is not None
    text = TEXT + " abab"
    ids_a = a.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids_b = b.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids_a != ids_b  # different canonical tokens ...
    assert score_text(a, text).nll_nats != pytest.approx(score_text(b, text).nll_nats, abs=1e-3)
    sa, sb = _beam(a, 64), _beam(b, 64)
    for byte in text.encode():  # ... the same distribution over bytes
        assert torch.allclose(sa.distribution(), sb.distribution(), atol=1e-6, rtol=0)
        sa.advance(byte)
        sb.advance(byte)


def _ensemble(paths: list[Path], extra: str = "") -> Ensemble:
    models = "".join(f"  - model: {p}\n" for p in paths)
    recipe, _ = parse_ensemble_recipe(f"models:\n{models}method: byte\n{extra}")
    return Ensemble(recipe, load_members(recipe))


def test_one_member_byte_ensemble_is_the_model_at_the_byte_level(models: dict[str, Path]) -> None:
    text = TEXT + " the mat"
    alone = score_bytes(load_lm(models["a"]), text, beam=3)
    ens = _ensemble([models["a"]], "parameters: {beam: 3}\n")
    result = score_ensemble(ens, text)
    assert result.ensemble.nll_nats == pytest.approx(alone.score.nll_nats, rel=1e-12)
    assert result.members[0].nll_nats == pytest.approx(alone.score.nll_nats, rel=1e-12)
    assert result.details["beam"] == 3
    pair = score_ensemble(_ensemble([models["a"], models["b"]], "parameters: {beam: 64}\n"), text)
    assert pair.ensemble.nll_nats == pytest.approx(score_bytes(load_lm(models["a"]), text, beam=64)
                                                   .score.nll_nats, abs=1e-5)


def _greedy_tokens(lm: LoadedLM, prompt: str, n: int) -> list[int]:
    assert lm.tokenizer is not None
    ids = [0, *lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(lm.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
    return new


def test_greedy_generation_equals_the_models_greedy_output(models: dict[str, Path]) -> None:
    lm = load_lm(models["c"])
    assert lm.tokenizer is not None
    vocab = token_vocab(lm.tokenizer, logit_width(lm))
    prompt = "the cat sat on"
    tokens = _greedy_tokens(lm, prompt, 8)
    greedy = b"".join(vocab.pieces[t] or b"" for t in tokens)
    assert all(vocab.pieces[t] for t in tokens), "the greedy continuation should be text"
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    canonical = lm.tokenizer(prompt + greedy.decode(), add_special_tokens=False)["input_ids"]
    assert canonical == [*prompt_ids, *tokens], "the greedy tokens must be the canonical tokenization"
    ens = _ensemble([models["c"]], "parameters: {beam: 4}\n")
    answer = ens.generate([prompt], max_new_tokens=len(greedy), temperature=0.0).answers[0]
    assert answer.text.encode() == greedy
    assert answer.new_tokens == len(greedy)
    sampled = _ensemble([models["a"], models["b"]]).generate(
        ["the"], max_new_tokens=40, temperature=2.0, seed=1).answers[0]  # a random model: any byte is likely
    assert "\ufffd" not in sampled.text.rstrip("\ufffd")  # valid UTF-8 except a character cut at the end
    assert not sampled.text.isascii() and sampled.new_tokens == 40  # multi-byte characters were written


def test_byte_errors(models: dict[str, Path]) -> None:
    with pytest.raises(FusekitError, match="beam 0"):
        score_bytes(load_lm(models["a"]), TEXT, beam=0)
    with pytest.raises(FusekitError, match="empty"):
        score_bytes(load_lm(models["a"]), "", beam=1)


def test_cli_score_bytes_and_byte_ensemble(models: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cli = in_process_cli(capsys)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    code, out, _ = cli("score", str(models["a"]), "--text", str(text), "--bytes", "--beam", "64",
                                  "--json", "--quiet")
    assert code == 0
    row = json.loads(out)[0]
    assert row["level"] == "bytes" and row["beam"] == 64 and row["n_bytes"] == len(TEXT)
    assert row["nll_nats"] == pytest.approx(score_bytes(load_lm(models["a"]), TEXT, beam=64).score.nll_nats)
    recipe = tmp_path / "byte.yaml"
    recipe.write_text(f"models:\n  - model: {models['a']}\n  - model: {models['b']}\nmethod: byte\n"
                      "parameters: {beam: 64, gate: 0.9}\n", encoding="utf-8")
    code, out, _ = cli("ensemble", "score", str(recipe), "--text", str(text), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["rows"][0]["nll_nats"] == pytest.approx(row["nll_nats"], abs=1e-5)  # gated or not: same
    assert 0 <= report["details"]["ensembled_share"] <= 1
    code, _, err = cli("score", str(models["a"]), "--text", str(text), "--bytes",
                                  "--context", "8")
    assert code == 2 and "--bytes" in err and "Traceback" not in err
    recipe.write_text(f"models:\n  - model: {models['a']}\nmethod: byte\nparameters: {{beam: 0}}\n")
    code, _, err = cli("ensemble", "score", str(recipe), "--text", str(text))
    assert code == 2 and "parameters.beam" in err
