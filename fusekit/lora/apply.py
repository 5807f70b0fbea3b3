"""A base checkpoint read with a LoRA adapter applied, tensor by tensor, as PEFT's merge does it.

:class:`AdapterReader` serves the base's tensors with each adapted tensor replaced by
``W + scaling · B · A`` (transposed for ``fan_in_fan_out`` bases and for embeddings; DoRA's
magnitude vector rescaling the result), tensors the adapter saves whole (``modules_to_save``,
biases) replacing the base's, and ``lora_bias`` adding B's bias. The arithmetic follows PEFT's
``merge_and_unload`` operation by operation in float32, so the result is the same bits; nothing
merged is ever written to disk, and peft is not imported.

A row block of an adapted tensor is cut from ΔW computed whole (a matrix product over some rows
does not round as the product over all rows does), which is kept until the tensor's last block.
"""

from __future__ import annotations

import threading

import torch

from fusekit.io.reader import CheckpointReader, TensorInfo
from fusekit.io.refs import ResolvedModel
from fusekit.lora.layout import AdapterLayout, LoraModule, adapter_layout


class AdapterReader(CheckpointReader):
    """A :class:`CheckpointReader` of ``model``'s base with ``model.adapter`` applied on read.

    Args:
        model: a resolved reference whose ``adapter`` is set (see :func:`fusekit.io.refs.resolve_model`).

    Example:
        >>> with AdapterReader(resolve_model("base+adapter")) as reader:  # doctest: +SKIP
        ...     q = reader.get("model.layers.0.self_attn.q_proj.weight")
    """

    def __init__(self, model: ResolvedModel) -> None:
        if model.adapter is None:
            raise ValueError("AdapterReader needs a model with an adapter")
        super().__init__(model)
        self._adapter = CheckpointReader(ResolvedModel(model.adapter.ref, model.adapter.folder,
                                                       (model.adapter.weights,)))
        self._layout: AdapterLayout | None = None
        self._kept: tuple[str, torch.Tensor, torch.Tensor | None] | None = None  # (name, ΔW, DoRA factor)
        self._lock = threading.Lock()

    @property
    def infos(self) -> dict[str, TensorInfo]:
        infos = super().infos
        if self._layout is None:
            self._layout = adapter_layout(self.model, infos)[0]
        return infos

    @property
    def layout(self) -> AdapterLayout:
        """How the adapter changes the base (checked against the base's headers)."""
        _ = self.infos
        assert self._layout is not None
        return self._layout

    def get(self, name: str, rows: tuple[int, int] | None = None, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``name`` (or rows ``[start, stop)`` of it) with the adapter applied, in the base's dtype."""
        layout = self.layout
        tensor = self._stored(name, rows, out)
        module = layout.modules.get(name)
        if module is not None:
            with self._lock:
                return self._apply(module, tensor, rows)
        bias = layout.biases.get(name)
        if bias is not None:  # PEFT: bias += lora_B.bias * scaling, in place
            assert bias.bias is not None
            extra = self._adapter.get(bias.bias, rows).float() * bias.scaling
            tensor += extra
        return tensor

    def _stored(self, name: str, rows: tuple[int, int] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor the update is added to: the base's, or the adapter's saved copy replacing it
        (``modules_to_save``, saved biases and embedding base layers load over the base in PEFT)."""
        source = self.layout.replaced.get(name)
        if source is not None:
            return self._adapter.get(source, rows).to(self.info(name).dtype)
        tensor = super().get(name, rows, out=out)
        # A pickle's tensor is the loaded state dict's own: change a copy.
        return tensor.clone() if self.model.is_pickle else tensor

    def _apply(self, module: LoraModule, weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        """``weight`` (rows ``rows`` of the base tensor) with the module's update, as PEFT merges it."""
        delta, factor = self._update(module, weight, rows)
        if rows is not None:
            delta = delta[rows[0]:rows[1]]
            if factor is not None and factor.shape[0] != 1:  # one factor per row
                factor = factor[rows[0]:rows[1]]
            if rows[1] == self.info(module.target).shape[0]:
                self._kept = None
        if factor is not None:  # DoRA: factor · (W + ΔW), cast back
            return (factor * (weight + delta)).to(weight.dtype)
        if module.embedding:  # PEFT: weight += ΔW.to(weight.dtype)
            weight += delta.to(weight.dtype)
        else:  # PEFT: weight += ΔW (computed in float32, rounded once to the weight's dtype)
            weight += delta
        return weight

    def _update(self, module: LoraModule, weight: torch.Tensor,
                rows: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ΔW of the whole tensor and DoRA's factor, kept across a tensor's row blocks."""
        kept = self._kept
        if rows is not None and kept is not None and kept[0] == module.target:
            return kept[1], kept[2]
        delta = self.delta(module)
        factor = None
        if module.magnitude is not None:
            whole = weight if rows is None else self._stored(module.target)
            factor = self._dora_factor(module, delta, whole)
        if rows is not None:
            self._kept = (module.target, delta, factor)
        return delta, factor

    def delta(self, module: LoraModule) -> torch.Tensor:
        """ΔW = (B @ A)[ᵀ] · scaling in float32, in the base tensor's layout (PEFT's get_delta_weight).

        Args:
            module: an adapted module of :attr:`layout`.

        Returns:
            A float32 tensor of the base tensor's shape.
        """
        a = self._adapter.get(module.a).float()  # (r, in); an embedding's: (r, vocab)
        b = self._adapter.get(module.b).float()  # (out, r); an embedding's: (dim, r)
        product = b @ a
        if module.embedding or module.fan_in_fan_out:
            product = product.T
        return product * module.scaling

    def _dora_factor(self, module: LoraModule, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """magnitude / ‖W + ΔW‖ per output (per embedding column), shaped to broadcast over W."""
        assert module.magnitude is not None
        transposed = module.embedding or module.fan_in_fan_out
        # PEFT's get_weight_norm: the norm of each row of transpose(W) + 1 · transpose(ΔW).
        summed = (weight.T + 1 * delta.T) if transposed else (weight + 1 * delta)
        norm = torch.linalg.norm(summed, dim=1).to(summed.dtype)
        factor = self._adapter.get(module.magnitude).float() / norm
        return factor.view(1, -1) if transposed else factor.view(-1, 1)

    def close(self) -> None:
        super().close()
        self._adapter.close()
        self._kept = None

    def __enter__(self) -> AdapterReader:
        return self
