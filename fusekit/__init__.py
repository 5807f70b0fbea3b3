"""fusekit: merge, ensemble and route large language models from one recipe format.

The library works without the CLI::

    import fusekit
    result = fusekit.merge("recipe.yaml", "./merged")
    plan = fusekit.plan_merge("recipe.yaml")  # headers and configs only, no weights

The entry points are imported on first use, so ``import fusekit`` (and ``fusekit --version``)
loads neither torch nor any model library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fusekit.version import __version__

if TYPE_CHECKING:
    from fusekit.merging import MergeResult, merge, plan_merge

__all__ = ["MergeResult", "__version__", "merge", "plan_merge"]
_LAZY = {"MergeResult", "merge", "plan_merge"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fusekit import merging

        return getattr(merging, name)
    raise AttributeError(f"module 'fusekit' has no attribute '{name}'")
