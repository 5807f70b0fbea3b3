"""The one folder where fusekit keeps caches (input digests, alignment tables, scores)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder() -> Path:
    """fusekit's cache folder.

    ``$FUSEKIT_CACHE`` when set; else the older ``$FUSEKIT_CACHE_DIR/fusekit``; else
    ``$XDG_CACHE_HOME/fusekit`` or ``~/.cache/fusekit``.

    Returns:
        The folder (it may not exist yet).
    """
    if os.environ.get("FUSEKIT_CACHE"):
        return Path(os.environ["FUSEKIT_CACHE"])
    base = os.environ.get("FUSEKIT_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "fusekit"
