"""Keeping secrets out of everything fusekit prints: messages, log records and tracebacks.

:func:`scrub` replaces every Hugging Face token it can recognise with ``***``: the values of
``HF_TOKEN`` and ``HUGGING_FACE_HUB_TOKEN``, the cached login (when huggingface_hub is loaded), any
``hf_...`` token, the credential after ``Bearer`` and the password in ``scheme://user:password@host``.
The CLI passes its error line, its ``FUSEKIT_DEBUG=1`` traceback and every log record through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable

MASK = "***"
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_SHORTEST_SECRET = 8  # shorter values would mask ordinary words and numbers
_PATTERNS = (
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), MASK),  # Hub tokens: hf_ and 34 letters or digits
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\",;]+"), rf"\g<1>{MASK}"),
    (re.compile(r"(://[^/@\s:]+:)[^/@\s]+@"), rf"\g<1>{MASK}@"),
)


def known_secrets() -> list[str]:
    """The token values fusekit could send: the token variables, and the cached login once
    huggingface_hub is loaded (it is never imported just for this)."""
    found = [os.environ.get(name, "").strip() for name in TOKEN_ENV]
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        with contextlib.suppress(Exception):  # a broken token file must not break an error report
            found.append((hub.get_token() or "").strip())
    return sorted({s for s in found if len(s) >= _SHORTEST_SECRET}, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` with every recognisable token replaced by ``***``.

    Args:
        text: any message, log line or formatted traceback.

    Returns:
        The same text with secrets masked; text without secrets is returned unchanged.

    Example:
        >>> scrub("Authorization: Bearer abc.def-123")
        'Authorization: Bearer ***'
    """
    for secret in known_secrets():
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def format_exception(exc: BaseException) -> str:
    """The full traceback of ``exc`` (with its causes), scrubbed."""
    return scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def scrub_log_records() -> Callable[[], None]:
    """Scrub every log record from now on, whatever logger or handler prints it.

    Returns:
        A function that puts the previous record factory back.
    """
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it would
            return record
        record.msg, record.args = scrub(message), None
        return record

    logging.setLogRecordFactory(factory)
    return lambda: logging.setLogRecordFactory(previous)
