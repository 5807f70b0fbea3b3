"""What to install for an optional part of fusekit, said in a way that works.

fusekit is not on a package index, so ``pip install 'fusekit[lm]'`` finds nothing. An install hint
names the extra's own packages, which pip can always fetch, and the extra itself for a checkout of
fusekit. :data:`EXTRAS` repeats ``[project.optional-dependencies]`` of ``pyproject.toml`` (a test
keeps the two equal), so that a hint works without fusekit's metadata installed.

Example:
    >>> install_hint("plot").split(" (")[0]
    "pip install 'matplotlib>=3.7'"
"""

from __future__ import annotations

__all__ = ["EXTRAS", "install_hint"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "lm": ("transformers>=4.45",),
    "lora": ("peft>=0.13", "transformers>=4.45"),
    "plot": ("matplotlib>=3.7",),
    "tune": ("cma>=3.3", "ray>=2.9", "transformers>=4.45"),
    "serve": ("fastapi>=0.110", "uvicorn>=0.29", "transformers>=4.45"),
}


def install_hint(extra: str) -> str:
    """The command that installs the packages of one of fusekit's extras.

    Args:
        extra: The extra's name in ``pyproject.toml``: ``lm``, ``lora``, ``plot``, ``tune`` or ``serve``.

    Returns:
        ``pip install`` with the extra's requirements quoted for a POSIX shell, then how to install
        the extra from a fusekit checkout.

    Raises:
        KeyError: ``extra`` is not one of :data:`EXTRAS` (a bug in the caller, not a user mistake).
    """
    packages = " ".join(f"'{requirement}'" for requirement in EXTRAS[extra])
    return (f"pip install {packages} (fusekit's '{extra}' extra; in a fusekit checkout: "
            f"pip install -e '.[{extra}]')")
