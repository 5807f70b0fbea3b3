"""Relative representations (DeePEn-style): align vocabularies through shared anchor tokens.

Every token of member ``i`` is described by the cosine similarity of its embedding (the output
embedding by default, the one the next-token distribution is read from) to the embeddings of the
anchors, the tokens all members spell alike: ``R_i (V_i, A)``. Tokens of two members are close when
their relative rows are (cosine of the rows, each anchor's mean similarity removed first).

Mapping back to the primary's vocabulary is done in closed form by a sparse table per member
(:attr:`RelativeAligner.maps`): an anchor is the same token in every vocabulary and maps to itself;
any other token maps to its ``neighbours`` nearest primary tokens in relative space, weighted by a
softmax of their similarity at ``temperature``. The map is linear, so aggregating the members in
relative space and mapping the aggregate back equals mapping each member back and adding them with
their weights, which is how it is computed: ``q = Σ_i w_i p_i M_i`` (then renormalised over what was
mapped). Optionally ``steps`` exponentiated-gradient steps then move ``q`` on its top candidates
towards ``||q R_p − Σ_i w_i p_i R_i||² → min`` (each step moves log-probabilities by at most
``learning_rate``).

Tables are cached as safetensors; a memory guard refuses (or, with ``sparsify``, keeps the
``sparse_k`` largest similarities per token) relative tables larger than ``max_table_memory``.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fusekit.ensemble.members import TokenVocab
from fusekit.errors import FusekitError


class AlignmentMemoryError(FusekitError):
    """Alignment tables would be larger than the memory budget."""


def relative_table_bytes(vocab_sizes: Sequence[int], n_anchors: int, sparse_k: int | None = None) -> int:
    """Bytes of the relative tables: dense float32 ``V × A``, or sparse (float32 + int64) ``V × k``."""
    if sparse_k is None:
        return sum(v * n_anchors * 4 for v in vocab_sizes)
    return sum(v * min(sparse_k, n_anchors) * 12 for v in vocab_sizes)


def shared_anchors(vocabs: Sequence[TokenVocab], primary: int, limit: int | None) -> list[bytes]:
    """Byte strings every vocabulary has, in the primary's id order (frequent BPE merges first)."""
    shared = set.intersection(*(set(v.by_bytes) for v in vocabs))
    ordered = [p for p in vocabs[primary].pieces if p is not None and p in shared]
    ordered = list(dict.fromkeys(ordered))
    return ordered[:limit] if limit else ordered


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


@dataclass
class _Table:
    dense: torch.Tensor | None = None  # (V, A)
    values: torch.Tensor | None = None  # (V, k)
    indices: torch.Tensor | None = None  # (V, k) anchor index

    def project(self, probs: torch.Tensor, n_anchors: int) -> torch.Tensor:
        """``probs (..., V) @ R → (..., A)``."""
        if self.dense is not None:
            return probs @ self.dense.to(probs.dtype)
        assert self.values is not None and self.indices is not None
        flat = probs.reshape(-1, probs.shape[-1])
        out = torch.zeros(flat.shape[0], n_anchors, dtype=probs.dtype)
        contrib = flat[:, :, None] * self.values[None].to(probs.dtype)  # (N, V, k)
        out.index_add_(1, self.indices.reshape(-1), contrib.reshape(flat.shape[0], -1))
        return out.reshape(*probs.shape[:-1], n_anchors)

    def rows(self, ids: torch.Tensor, n_anchors: int) -> torch.Tensor:
        """Dense relative rows ``(len(ids), A)`` of the tokens ``ids``."""
        if self.dense is not None:
            return self.dense[ids].float()
        assert self.values is not None and self.indices is not None
        out = torch.zeros(len(ids), n_anchors)
        out.scatter_(1, self.indices[ids], self.values[ids].float())
        return out

    def back(self, vec: torch.Tensor) -> torch.Tensor:
        """``R @ vec``: ``(..., A) → (..., V)``."""
        if self.dense is not None:
            return vec @ self.dense.to(vec.dtype).T
        assert self.values is not None and self.indices is not None
        return (vec[..., self.indices] * self.values.to(vec.dtype)).sum(-1)


@dataclass
class _Map:
    ids: torch.Tensor  # (V_member, k) primary token ids
    weights: torch.Tensor  # (V_member, k) float32, each row sums to 1 (or 0: a token mapped nowhere)


class RelativeAligner:
    """Relative tables of every member and the map back to the primary's vocabulary.

    Args:
        vocabs: each member's :class:`TokenVocab`.
        embeddings: each member's input embedding matrix ``(V_i, hidden_i)``.
        primary: index of the member whose vocabulary the result is over.
        max_anchors: use at most this many shared tokens as anchors.
        max_table_bytes: memory budget of all tables together.
        sparsify: over budget, keep ``sparse_k`` similarities per token instead of refusing.
        cache_dir: where tables are cached (None: no cache).
        neighbours: primary tokens a non-anchor token maps back to.
        temperature: softmax temperature over those neighbours' similarities.
    """

    def __init__(self, vocabs: Sequence[TokenVocab], embeddings: Sequence[torch.Tensor], *, primary: int,
                 max_anchors: int | None, max_table_bytes: int, sparsify: bool, sparse_k: int,
                 cache_dir: Path | None, neighbours: int = 4, temperature: float = 0.05) -> None:
        anchors = shared_anchors(vocabs, primary, max_anchors)
        self.neighbours, self.temperature = neighbours, temperature
        if not anchors:
            raise FusekitError("relative: the members' vocabularies share no token spelling; they cannot "
                               "be aligned; use method: vote or mbr")
        self.n_anchors = len(anchors)
        self.primary = primary
        sizes = [e.shape[0] for e in embeddings]
        dense = relative_table_bytes(sizes, self.n_anchors)
        k: int | None = None
        if dense > max_table_bytes:
            sparse = relative_table_bytes(sizes, self.n_anchors, sparse_k)
            what = (f"relative alignment tables would take {_human(dense)} (vocabularies "
                    f"{' + '.join(map(str, sizes))} × {self.n_anchors} anchors, float32)")
            if not sparsify:
                raise AlignmentMemoryError(
                    f"{what}, over parameters.max_table_memory ({_human(max_table_bytes)}); raise it, lower "
                    f"parameters.max_anchors, or set parameters.sparsify: true ({_human(sparse)} "
                    f"with sparse_k {sparse_k})")
            if sparse > max_table_bytes:
                raise AlignmentMemoryError(
                    f"{what}; sparsified with sparse_k {sparse_k} still {_human(sparse)}, over "
                    f"parameters.max_table_memory ({_human(max_table_bytes)}); lower sparse_k or max_anchors")
            k = min(sparse_k, self.n_anchors)
        self.table_bytes = relative_table_bytes(sizes, self.n_anchors, k)
        self.sparse_k = k
        self.tables, self.maps = self._tables(vocabs, embeddings, anchors, k, cache_dir)
        self.width = vocabs[primary].width

    def _tables(self, vocabs: Sequence[TokenVocab], embeddings: Sequence[torch.Tensor], anchors: list[bytes],
                k: int | None, cache_dir: Path | None) -> tuple[list[_Table], list[_Map]]:
        digest = hashlib.sha256(f"relative-v2|{k}|{self.neighbours}|{self.temperature}|".encode()
                                + b"\0".join(anchors))
        for vocab, emb in zip(vocabs, embeddings, strict=True):
            digest.update(vocab.fingerprint.encode())
            digest.update(emb.detach().float().cpu().contiguous().numpy().tobytes())
        path = cache_dir / f"relative-{digest.hexdigest()[:24]}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            try:
                stored = load_file(path)
                n = range(len(vocabs))
                return ([self._from_stored(stored, i) for i in n],
                        [_Map(stored[f"map_ids.{i}"], stored[f"map_weights.{i}"]) for i in n])
            except (OSError, KeyError, RuntimeError):
                pass  # a damaged cache file is rebuilt below
        tables = []
        for vocab, emb in zip(vocabs, embeddings, strict=True):
            e = torch.nn.functional.normalize(emb.detach().float().cpu(), dim=-1)
            anchor_rows = e[torch.tensor([vocab.by_bytes[a] for a in anchors])]
            sims = e @ anchor_rows.T  # (V, A)
            if k is None:
                tables.append(_Table(dense=sims))
            else:
                top = sims.topk(k, dim=-1)
                tables.append(_Table(values=top.values.contiguous(), indices=top.indices.contiguous()))
        maps = [self._map(vocabs, tables, i) for i in range(len(vocabs))]
        if path is not None:
            self._store(path, tables, maps)
        return tables, maps

    def _map(self, vocabs: Sequence[TokenVocab], tables: list[_Table], member: int) -> _Map:
        """The sparse map of member ``member``'s tokens onto the primary's (see the module docstring)."""
        own, target = vocabs[member], vocabs[self.primary]
        width = own.width
        if member == self.primary or own.fingerprint == target.fingerprint:
            ids = torch.arange(width)[:, None].clamp_max(target.width - 1)
            weights = torch.ones(width, 1)
            if own.width > target.width:
                weights[target.width:] = 0
            return _Map(ids, weights)
        k = min(self.neighbours, target.width)
        ids = torch.zeros(width, k, dtype=torch.long)
        weights = torch.zeros(width, k)
        by_key = {key: i for i, key in enumerate(target.keys) if key is not None}
        rest: list[int] = []
        for token, key in enumerate(own.keys):
            if key is None:
                continue  # unused id: its (tiny) mass is dropped and q renormalised
            same = by_key.get(key)
            if same is not None:  # an anchor (or the shared end-of-sequence): itself
                ids[token, 0], weights[token, 0] = same, 1.0
            elif isinstance(key, bytes):
                rest.append(token)
        if rest:
            candidates = torch.tensor(target.text_ids())
            theirs = self._centred(tables[self.primary], candidates)
            mine = self._centred(tables[member], torch.tensor(rest))
            for lo in range(0, len(rest), 512):  # (chunk, V_primary) similarities at a time
                sims = mine[lo:lo + 512] @ theirs.T
                top = sims.topk(min(k, sims.shape[1]), dim=-1)
                rows = torch.tensor(rest[lo:lo + 512])
                ids[rows, :top.indices.shape[1]] = candidates[top.indices]
                weights[rows, :top.indices.shape[1]] = torch.softmax(top.values / self.temperature, dim=-1)
        return _Map(ids, weights)

    def _centred(self, table: _Table, ids: torch.Tensor) -> torch.Tensor:
        rows = table.rows(ids, self.n_anchors)
        return torch.nn.functional.normalize(rows - rows.mean(0, keepdim=True), dim=-1)

    @staticmethod
    def _from_stored(stored: dict[str, torch.Tensor], i: int) -> _Table:
        if f"table.{i}" in stored:
            return _Table(dense=stored[f"table.{i}"])
        return _Table(values=stored[f"values.{i}"], indices=stored[f"indices.{i}"])

    @staticmethod
    def _store(path: Path, tables: list[_Table], maps: list[_Map]) -> None:
        payload: dict[str, torch.Tensor] = {}
        for i, (t, m) in enumerate(zip(tables, maps, strict=True)):
            if t.dense is not None:
                payload[f"table.{i}"] = t.dense
            else:
                assert t.values is not None and t.indices is not None
                payload[f"values.{i}"], payload[f"indices.{i}"] = t.values, t.indices
            payload[f"map_ids.{i}"], payload[f"map_weights.{i}"] = m.ids.contiguous(), m.weights.contiguous()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
            save_file(payload, str(temp))
            os.replace(temp, path)
        except OSError:
            pass  # caching is an optimisation; a read-only cache folder is not an error

    def to_primary(self, member: int, probs: torch.Tensor) -> torch.Tensor:
        """``(..., V_member)`` probabilities → ``(..., V_primary)`` mass through the member's map."""
        m = self.maps[member]
        flat = probs.float().reshape(-1, probs.shape[-1])[:, :m.ids.shape[0]]
        out = torch.zeros(flat.shape[0], self.width, dtype=flat.dtype)
        contrib = flat[:, :, None] * m.weights[None, :flat.shape[1]]
        out.index_add_(1, m.ids[:flat.shape[1]].reshape(-1), contrib.reshape(flat.shape[0], -1))
        return out.reshape(*probs.shape[:-1], self.width)

    def aggregate(self, probs: dict[int, torch.Tensor], weights: dict[int, float], *, steps: int = 0,
                  learning_rate: float = 0.15, candidates: int = 64) -> torch.Tensor:
        """Log-probabilities ``(..., V_primary)`` of the members' ``probs`` (each ``(..., V_i)``)
        aggregated with ``weights`` through the maps, then refined by ``steps`` steps (see module)."""
        q = sum(w * self.to_primary(i, probs[i]) for i, w in weights.items())
        assert isinstance(q, torch.Tensor)
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = torch.log(q)
        if steps == 0:
            return logq
        target = sum(w * self.to_relative(i, probs[i]) for i, w in weights.items())
        assert isinstance(target, torch.Tensor)
        return self.refine(logq, target, steps=steps, learning_rate=learning_rate, candidates=candidates)

    def refine(self, logq: torch.Tensor, target: torch.Tensor, *, steps: int, learning_rate: float,
               candidates: int) -> torch.Tensor:
        """Move ``logq (..., V)`` on its ``candidates`` most likely tokens (the rest keep their
        probabilities) so that its relative representation approaches ``target (..., A)``."""
        if steps <= 0:  # (x − log m) + log m need not round back to x
            return logq
        flat, goal = logq.reshape(-1, logq.shape[-1]), target.reshape(-1, target.shape[-1])
        top = flat.topk(min(candidates, flat.shape[-1]), dim=-1).indices  # (N, C)
        table = self.tables[self.primary]
        rows = table.rows(top.reshape(-1), self.n_anchors).reshape(*top.shape, self.n_anchors)  # (N, C, A)
        p_all = flat.exp()
        sub = flat.gather(-1, top)
        mass = sub.exp().sum(-1, keepdim=True)
        rest = table.project(p_all, self.n_anchors) - torch.einsum("nc,nca->na", sub.exp(), rows)
        local = sub - torch.log(mass)  # distribution within the candidates
        for _ in range(steps):
            p = local.exp() * mass
            err = rest + torch.einsum("nc,nca->na", p, rows) - goal
            grad = torch.einsum("na,nca->nc", err, rows)
            grad = grad - (local.exp() * grad).sum(-1, keepdim=True)
            size = grad.abs().amax(-1, keepdim=True).clamp_min(1e-12)
            local = torch.log_softmax(local - learning_rate * grad / size, dim=-1)
        out = flat.scatter(-1, top, local + torch.log(mass))
        return out.reshape(logq.shape)

    def to_relative(self, member: int, probs: torch.Tensor) -> torch.Tensor:
        """``(..., V_member)`` probabilities → ``(..., A)`` relative representation."""
        return self.tables[member].project(probs.float(), self.n_anchors)
