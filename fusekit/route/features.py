"""Query features: what a router sees of a query.

* ``tfidf``: character n-gram TF-IDF (sublinear term frequency, smoothed idf, unit length); no model.
* ``hidden``: mean-pooled hidden states of one layer of a causal LM loaded with
  :func:`fusekit.lm.load_lm`, standardised with the training set's mean and spread.
* ``embedding``: mean-pooled last hidden states of a local transformers encoder folder (the layout a
  sentence-transformers model is saved in), unit length, then standardised like ``hidden``.

Each featuriser is fitted on the training queries, turns any list of queries into a ``(n, dim)``
float32 tensor, and saves itself as JSON settings plus tensors so the router folder is self-contained.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from fusekit.errors import FusekitError
from fusekit.progress import bar
from fusekit.route.recipe import EmbeddingFeatures, HiddenFeatures, TfidfFeatures

MAX_QUERY_CHARS = 4000
"""tfidf reads at most this many characters of a query (routing needs the gist, not every byte)."""


_TF = torch.tensor([0.0] + [1.0 + math.log(c) for c in range(1, MAX_QUERY_CHARS + 1)])
"""Sublinear term frequency by count: 0 for 0, else ``1 + ln(count)`` (a table: cheaper than a log)."""


class FeatureError(FusekitError, ValueError):
    """The features' model is missing or cannot produce features."""


class Featurizer(Protocol):
    """Turns queries into feature rows; saved inside the router folder."""

    kind: str

    def fit(self, queries: Sequence[str]) -> None: ...

    def transform(self, queries: Sequence[str]) -> torch.Tensor: ...

    def settings(self) -> dict[str, Any]: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...


class Tfidf:
    """Character n-gram TF-IDF with a vocabulary of the ``max_features`` most common n-grams.

    :meth:`transform` counts a query's n-grams with a handful of tensor operations instead of a
    Python loop over every n-gram (routing one query must cost a small fraction of one forward pass):
    every position of the query walks a trie of the vocabulary at once, one character per step
    (:class:`_NgramTrie`). :meth:`grams` is the plain definition the fast path reproduces exactly,
    and the fallback when the trie's table would be too big (vocabularies over huge alphabets).
    """

    kind = "tfidf"

    def __init__(self, ngram_range: tuple[int, int] = (1, 4), max_features: int = 4096,
                 lowercase: bool = True, vocabulary: Sequence[str] = (),
                 idf: torch.Tensor | None = None) -> None:
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.max_features = max_features
        self.lowercase = lowercase
        self.vocabulary = {gram: i for i, gram in enumerate(vocabulary)}
        self.idf = idf if idf is not None else torch.zeros(0)
        self._trie: _NgramTrie | None = None

    def _text(self, text: str) -> str:
        text = text[:MAX_QUERY_CHARS]
        return text.lower()[:MAX_QUERY_CHARS] if self.lowercase else text  # lower() may lengthen it

    def grams(self, text: str) -> Counter[str]:
        """How often each character n-gram occurs in ``text`` (after truncation and lowercasing)."""
        text = self._text(text)
        counts: Counter[str] = Counter()
        low, high = self.ngram_range
        for n in range(low, high + 1):
            counts.update(text[i:i + n] for i in range(len(text) - n + 1))
        return counts

    def fit(self, queries: Sequence[str]) -> None:
        df: Counter[str] = Counter()
        for query in queries:
            df.update(self.grams(query).keys())
        ranked = sorted(df.items(), key=lambda item: (-item[1], item[0]))[:self.max_features]
        self.vocabulary = {gram: i for i, (gram, _) in enumerate(ranked)}
        n = len(queries)
        counts = torch.tensor([count for _, count in ranked], dtype=torch.float64)
        self.idf = (torch.log((1 + n) / (1 + counts)) + 1).to(torch.float32)
        self._trie = None

    def counts(self, query: str) -> torch.Tensor:
        """``(len(vocabulary),)`` int64 count of each vocabulary n-gram in ``query``."""
        if self._trie is None:
            self._trie = _NgramTrie(self.vocabulary, self.ngram_range)
        if self._trie.usable:
            return self._trie.counts(self._text(query))
        out = torch.zeros(len(self.vocabulary), dtype=torch.int64)
        hits = [(self.vocabulary[g], c) for g, c in self.grams(query).items() if g in self.vocabulary]
        if hits:
            out[torch.tensor([h[0] for h in hits])] = torch.tensor([h[1] for h in hits])
        return out

    def transform(self, queries: Sequence[str]) -> torch.Tensor:
        if not queries:
            return torch.zeros(0, len(self.vocabulary))
        counts = torch.stack([self.counts(query) for query in queries])
        return torch.nn.functional.normalize(_TF[counts] * self.idf, dim=1)

    def sparse_rows(self, queries: Sequence[str]) -> torch.Tensor:
        """:meth:`transform` as a sparse COO ``(n, len(vocabulary))`` tensor with unit-length rows,
        built from each query's few hundred n-grams without touching the other columns."""
        rows, columns, values = [], [], []
        for row, query in enumerate(queries):
            dense = self.counts(query)
            column = dense.nonzero().squeeze(1)
            count = dense[column]
            value = _TF[count] * self.idf[column]
            values.append(value / value.norm().clamp_min(1e-12))
            columns.append(column)
            rows.append(torch.full_like(column, row))
        if not queries:
            empty = torch.zeros(0, dtype=torch.int64)
            rows, columns, values = [empty], [empty], [torch.zeros(0)]
        return torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(columns)]), torch.cat(values),
                                       (len(queries), len(self.vocabulary)), is_coalesced=True,
                                       check_invariants=False)

    def settings(self) -> dict[str, Any]:
        ordered = sorted(self.vocabulary, key=self.vocabulary.__getitem__)
        return {"type": "tfidf", "ngram_range": list(self.ngram_range), "max_features": self.max_features,
                "lowercase": self.lowercase, "vocabulary": ordered}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features.idf": self.idf}


class _NgramTrie:
    """The vocabulary's n-grams as a character trie, stored as a dense transition table: row ``s`` (a
    prefix of some vocabulary n-gram; 0 is the empty prefix) and column ``code(c)`` give the state of
    prefix + ``c``, or ``dead`` (absorbing) when no vocabulary n-gram starts that way. Characters the
    vocabulary never uses share one code. Feeding all positions of a text one character per step
    gives, after step n, the state of every n-gram of the text at once."""

    MAX_ENTRIES = 1 << 21  # a bigger table (huge alphabets) falls back to the plain Python counting

    def __init__(self, vocabulary: dict[str, int], ngram_range: tuple[int, int]) -> None:
        self.low, self.high = ngram_range
        self.size = len(vocabulary)
        chars = sorted({ch for gram in vocabulary for ch in gram})
        code = {ch: i + 1 for i, ch in enumerate(chars)}
        self.width = len(chars) + 2  # codes 1..len(chars); len(chars) + 1: any other character
        state = {"": 0}
        for gram in vocabulary:
            for end in range(1, len(gram) + 1):
                state.setdefault(gram[:end], len(state))
        self.dead = len(state)
        self.usable = (self.dead + 1) * self.width <= self.MAX_ENTRIES
        if not self.usable:
            return
        table = torch.full((self.dead + 1, self.width), self.dead, dtype=torch.int64)
        column = torch.full((self.dead + 1,), self.size, dtype=torch.int64)  # size: not counted
        for prefix, index in state.items():
            if prefix:
                table[state[prefix[:-1]], code[prefix[-1]]] = index
            if prefix in vocabulary:
                column[index] = vocabulary[prefix]
        self.table, self.column = table.reshape(-1), column
        top = max((ord(ch) for ch in chars), default=0) + 1
        self.codes = torch.full((top + 1,), len(chars) + 1, dtype=torch.int64)  # code point → code
        for ch, value in code.items():
            self.codes[ord(ch)] = value
        self.top = top  # code points >= top read codes[top], 'any other character'

    def counts(self, text: str) -> torch.Tensor:
        """``(size,)`` int64 count of each vocabulary n-gram in ``text``."""
        return torch.bincount(self.hits(text), minlength=self.size + 1)[:self.size]

    def hits(self, text: str) -> torch.Tensor:
        """The vocabulary column of every n-gram occurrence in ``text`` (``size`` for the others)."""
        if len(text) < self.low or self.size == 0:
            return torch.zeros(0, dtype=torch.int64)
        points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        codes = self.codes[points.clamp_max(self.top)]
        states = codes  # after step 1: state of the 1-gram at each position (row 0 = empty prefix)
        found = []
        for n in range(1, min(self.high, len(text)) + 1):
            states = self.table[codes] if n == 1 else self.table[states[:-1] * self.width + codes[n - 1:]]
            if n >= self.low:
                found.append(states)
        return self.column[torch.cat(found)]


class _Standardised:
    """Shared by the model-based featurisers: raw rows → (rows − mean) / std."""

    mean: torch.Tensor
    std: torch.Tensor

    def _raw(self, queries: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, queries: Sequence[str]) -> None:
        raw = self._raw(queries).double()
        self.mean = raw.mean(0).float()
        self.std = raw.std(0, unbiased=False).clamp_min(1e-6).float() if len(raw) > 1 else \
            torch.ones(raw.shape[1])

    def transform(self, queries: Sequence[str]) -> torch.Tensor:
        return (self._raw(queries) - self.mean) / self.std

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features.mean": self.mean, "features.std": self.std}


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, dim)`` states, ``(batch, seq)`` mask → ``(batch, dim)`` mean over real tokens."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _token_rows(tokenizer: Any, queries: Sequence[str], max_tokens: int) -> list[list[int]]:
    rows = []
    for query in queries:
        ids = [int(i) for i in tokenizer(query, truncation=True, max_length=max_tokens)["input_ids"]]
        rows.append(ids or [int(tokenizer.pad_token_id or 0)])
    return rows


class Hidden(_Standardised):
    """Mean-pooled hidden states of layer ``layer`` of a causal LM (``-1``: the last)."""

    kind = "hidden"

    def __init__(self, model: str, *, layer: int = -1, max_tokens: int = 256, batch_size: int = 16,
                 device: str = "cpu", mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None) -> None:
        self.model, self.layer, self.max_tokens, self.batch_size = model, layer, max_tokens, batch_size
        self.device = device
        self._lm: Any = None
        if mean is not None and std is not None:
            self.mean, self.std = mean, std

    def _load(self) -> Any:
        if self._lm is None:
            from fusekit.lm import load_lm

            try:
                self._lm = load_lm(self.model, device=self.device)
            except FusekitError as exc:
                raise FeatureError(f"features.model: {exc}") from None
            layers = self._lm.model.config.num_hidden_layers
            if not -(layers + 1) <= self.layer <= layers:
                raise FeatureError(f"features.layer: {self.layer} is out of range for '{self.model}', "
                                   f"which has {layers} layers (use -1 for the last, 0 for embeddings)")
        return self._lm

    def _raw(self, queries: Sequence[str]) -> torch.Tensor:
        lm = self._load()
        rows = _token_rows(lm.tokenizer, queries, self.max_tokens)
        out = []
        with torch.inference_mode():
            for start in bar(range(0, len(rows), self.batch_size), unit="batch",
                             desc=f"hidden-state features of {len(rows)} queries"):
                ids, mask = _pad(rows[start:start + self.batch_size], 0)
                result = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                  output_hidden_states=True, use_cache=False)
                states = result.hidden_states[self.layer].float()
                out.append(_mean_pool(states, mask.to(lm.device)).cpu())
        return torch.cat(out)

    def settings(self) -> dict[str, Any]:
        return {"type": "hidden", "model": self.model, "layer": self.layer, "max_tokens": self.max_tokens,
                "batch_size": self.batch_size}


class Embedding(_Standardised):
    """Mean-pooled, unit-length output of a local transformers encoder (e.g. a sentence-transformers
    folder: its root holds the encoder's config.json, weights and tokenizer)."""

    kind = "embedding"

    def __init__(self, model: str, *, max_tokens: int = 256, batch_size: int = 16, device: str = "cpu",
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        self.model, self.max_tokens, self.batch_size, self.device = model, max_tokens, batch_size, device
        self._loaded: tuple[Any, Any, torch.device] | None = None
        if mean is not None and std is not None:
            self.mean, self.std = mean, std

    def _load(self) -> tuple[Any, Any, torch.device]:
        if self._loaded is None:
            from fusekit.device import resolve_device
            from fusekit.io.refs import resolve_model
            from fusekit.lm.load import (
                apply_adapter,
                check_weights,
                import_transformers,
                load_tokenizer,
                tokenizer_folder,
            )

            try:
                resolved = resolve_model(self.model)
                check_weights(resolved)  # config.json and the merge reader's header checks
                tokenizer = load_tokenizer(self.model, tokenizer_folder(resolved))
            except FusekitError as exc:
                raise FeatureError(f"features.model: {exc}") from None
            transformers = import_transformers()
            device = resolve_device(self.device)
            try:
                encoder = transformers.AutoModel.from_pretrained(resolved.folder, local_files_only=True,
                                                                 dtype=torch.float32)
            except (OSError, ValueError, KeyError) as exc:
                raise FeatureError(f"features.model: transformers cannot load the encoder in "
                                   f"{resolved.folder}: {str(exc).splitlines()[0]}") from None
            if resolved.adapter is not None:  # a LoRA adapter on the encoder, merged into it
                try:
                    encoder = apply_adapter(encoder, resolved)
                except FusekitError as exc:
                    raise FeatureError(f"features.model: {exc}") from None
            self._loaded = (encoder.to(device).eval(), tokenizer, device)
        return self._loaded

    def _raw(self, queries: Sequence[str]) -> torch.Tensor:
        encoder, tokenizer, device = self._load()
        rows = _token_rows(tokenizer, queries, self.max_tokens)
        out = []
        with torch.inference_mode():
            for start in bar(range(0, len(rows), self.batch_size), unit="batch",
                             desc=f"embedding features of {len(rows)} queries"):
                ids, mask = _pad(rows[start:start + self.batch_size], int(tokenizer.pad_token_id or 0))
                states = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                pooled = _mean_pool(states.float(), mask.to(device))
                out.append(torch.nn.functional.normalize(pooled, dim=1).cpu())
        return torch.cat(out)

    def settings(self) -> dict[str, Any]:
        return {"type": "embedding", "model": self.model, "max_tokens": self.max_tokens,
                "batch_size": self.batch_size}


def make_featurizer(spec: TfidfFeatures | HiddenFeatures | EmbeddingFeatures, *,
                    device: str = "cpu") -> Featurizer:
    """A fresh, unfitted featuriser for the recipe's ``features``."""
    if isinstance(spec, TfidfFeatures):
        return Tfidf(spec.ngram_range, spec.max_features, spec.lowercase)
    if isinstance(spec, HiddenFeatures):
        return Hidden(spec.model, layer=spec.layer, max_tokens=spec.max_tokens, batch_size=spec.batch_size,
                      device=device)
    if not Path(spec.model).expanduser().exists():
        raise FeatureError(f"features.model: '{spec.model}' does not exist; an embedding model must be a "
                           "local folder (a sentence-transformers or transformers encoder)")
    return Embedding(spec.model, max_tokens=spec.max_tokens, batch_size=spec.batch_size, device=device)


def restore_featurizer(settings: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                       device: str = "cpu") -> Featurizer:
    """The featuriser saved by :meth:`Featurizer.settings` and :meth:`Featurizer.tensors`."""
    kind = settings["type"]
    if kind == "tfidf":
        return Tfidf(tuple(settings["ngram_range"]), settings["max_features"], settings["lowercase"],
                     settings["vocabulary"], tensors["features.idf"])
    mean, std = tensors["features.mean"], tensors["features.std"]
    if kind == "hidden":
        return Hidden(settings["model"], layer=settings["layer"], max_tokens=settings["max_tokens"],
                      batch_size=settings["batch_size"], device=device, mean=mean, std=std)
    if kind == "embedding":
        return Embedding(settings["model"], max_tokens=settings["max_tokens"],
                         batch_size=settings["batch_size"], device=device, mean=mean, std=std)
    raise KeyError(kind)
