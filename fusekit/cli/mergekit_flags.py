"""The flags mergekit-yaml users type, accepted by ``fusekit merge`` under a "mergekit compatibility"
help panel.

``--cuda`` is ``--device cuda`` and ``--allow-crimes`` merges models whose architectures differ;
the others ask for something fusekit always does or never needs, so each prints one line on stderr
saying it has no effect and why (:func:`note_needless`).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from fusekit.cli.options import Device
from fusekit.errors import FusekitError

PANEL = "mergekit compatibility"
log = logging.getLogger("fusekit")


def _flag(name: str, help_text: str) -> typer.models.OptionInfo:
    return typer.Option(name, help=help_text, rich_help_panel=PANEL, show_default=False)


CudaOpt = Annotated[bool, _flag("--cuda", "Same as --device cuda.")]
AllowCrimesOpt = Annotated[bool, _flag("--allow-crimes", "Merge models whose model_type or "
                                       "architectures differ (refused otherwise).")]
LazyUnpickleOpt = Annotated[bool, _flag("--lazy-unpickle", "Accepted; no effect (pickled checkpoints "
                                        "load weights-only, with --allow-pickle).")]
TrustRemoteCodeOpt = Annotated[bool, _flag("--trust-remote-code", "Accepted; no effect on merge (no "
                                           "model code runs).")]
LoraMergeCacheOpt = Annotated[str | None, _flag("--lora-merge-cache", "Accepted; no effect (adapters "
                                                "are applied as tensors stream).")]
WriteModelCardOpt = Annotated[bool | None, _flag("--write-model-card/--no-write-model-card",
                                                 "Accepted; no effect (the model card is always "
                                                 "written).")]
LowCpuMemoryOpt = Annotated[bool, _flag("--low-cpu-memory", "Accepted; no effect (memory is bounded "
                                        "by --max-memory).")]
CloneTensorsOpt = Annotated[bool, _flag("--clone-tensors", "Accepted; no effect (every output tensor "
                                        "has its own buffer).")]

NEEDLESS = {  # flag → why it has no effect
    "--lazy-unpickle": "fusekit loads .bin/.pt checkpoints with torch's weights-only loader, memory-"
                       "mapped, and only when --allow-pickle is given",
    "--trust-remote-code": "a merge reads configs and tensors and runs no model code",
    "--lora-merge-cache": "LoRA adapters are applied tensor by tensor as they are read, so no merged "
                          "copy is stored",
    "--write-model-card": "fusekit always writes the model card (README.md), which records the recipe "
                          "and its inputs",
    "--low-cpu-memory": "fusekit streams tensors and bounds memory with --max-memory",
    "--clone-tensors": "fusekit writes every output tensor from its own buffer, so a layer used twice "
                       "is written safely",
}


def cuda_device(device: Device, cuda: bool) -> Device:
    """The device ``--device`` and mergekit's ``--cuda`` ask for together.

    Raises:
        FusekitError: ``--cuda`` with ``--device`` naming something else than cuda or cpu (the default).

    Example:
        >>> cuda_device(Device.cpu, cuda=True).value
        'cuda'
    """
    if not cuda:
        return device
    if device not in (Device.cpu, Device.cuda):
        raise FusekitError(f"--cuda and --device {device.value} disagree; give one of them")
    return Device.cuda


def note_needless(**given: bool | str | None) -> list[str]:
    """Log one line for each needless mergekit flag given (keyword: the flag's name with ``_`` for
    ``-``; given: anything but None and False); return the lines.

    Example:
        >>> note_needless(lazy_unpickle=True, clone_tensors=False)[0].split(":")[0]
        '--lazy-unpickle has no effect'
    """
    unknown = {"--" + name.replace("_", "-") for name in given} - set(NEEDLESS)
    assert not unknown, unknown
    lines = []
    for flag, why in NEEDLESS.items():  # in a fixed order, whatever the caller's
        value = given.get(flag.removeprefix("--").replace("-", "_"))
        if value is not None and value is not False:
            lines.append(f"{flag} has no effect: {why}")
            log.warning("%s", lines[-1])
    return lines
