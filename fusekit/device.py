"""The ``--device`` option: one rule for merging, MoE gates, ensembles and routers."""

from __future__ import annotations

import torch

from fusekit.errors import FusekitError


def resolve_device(name: str) -> torch.device:
    """The torch device a ``--device`` value names.

    Args:
        name: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else CPU).

    Returns:
        The device.

    Raises:
        FusekitError: not a device name, or CUDA asked for where there is none.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FusekitError(f"--device '{name}' is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FusekitError("--device cuda was asked for but no CUDA GPU is available; use "
                           "--device cpu or auto")
    return device
