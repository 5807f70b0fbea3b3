"""The one place fusekit's error classes live.

Every user mistake raises a :class:`FusekitError` subclass whose message is one line: the rule that
was broken, the offending value and where it came from, and what to do about it. The CLI prints that
line and exits with :attr:`FusekitError.exit_code` (2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FusekitError(Exception):
    """Base class for errors caused by user input; printed as one line, exit status 2."""

    exit_code = 2


class RecipeError(FusekitError, ValueError):
    """The recipe is malformed, has unknown keys, or holds values a method cannot take."""


class CheckpointNotFoundError(FusekitError, FileNotFoundError):
    """A model reference points at nothing usable (no folder, no file, not in the Hub cache)."""


class CheckpointError(FusekitError, ValueError):
    """A checkpoint file exists but cannot be trusted (truncated, corrupt header, pickle refused)."""


class TensorMismatchError(FusekitError, ValueError):
    """Input tensors cannot be merged: one is missing, or their shapes or layer counts disagree."""


class OutputExistsError(FusekitError, FileExistsError):
    """The output folder already holds files and ``--overwrite`` was not given."""


class OutputWriteError(FusekitError, OSError):
    """Writing the output failed for a reason the user can fix (disk full, permissions)."""


class InterruptedMergeError(FusekitError):
    """The run was stopped by a signal; the partial output has been removed."""

    exit_code = 130


class NonFiniteError(FusekitError, ValueError):
    """A merged tensor (or the input it came from) holds NaN or infinity."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class LockMismatchError(FusekitError):
    """``--locked`` was given and an input differs from what the lock file records."""


class HubError(FusekitError):
    """The Hugging Face Hub refused a request (bad token, no access, no such repository)."""


class OutputPathError(FusekitError, ValueError):
    """The output path would replace or hold an input, the current folder, ``/`` or the home folder."""


class OutputBusyError(OutputExistsError):
    """Another fusekit run is writing the same output right now."""


class HubTimeoutError(HubError, TimeoutError):
    """The Hub stopped answering and the push's deadline (``FUSEKIT_HUB_TIMEOUT``) passed."""


KEPT_PARTIAL_ATTR = "fusekit_kept_partial"


def note_kept_partial(exc: BaseException, folder: object) -> None:
    """Record on an interrupt (or any exception) that the partial output ``folder`` was kept.

    The writer calls this when ``--resume`` keeps its temporary folder, so that the CLI can say
    where it is instead of claiming that nothing was left behind.
    """
    setattr(exc, KEPT_PARTIAL_ATTR, str(folder))


def kept_partial(exc: BaseException | None) -> str | None:
    """The partial folder noted on ``exc`` or on an exception in its cause/context chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        folder = getattr(exc, KEPT_PARTIAL_ATTR, None)
        if folder is not None:
            return str(folder)
        exc = exc.__cause__ or exc.__context__
    return None
