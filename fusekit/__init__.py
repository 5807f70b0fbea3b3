"""fusekit: merge, ensemble and route large language models from one recipe format.

The library works without the CLI::

    import fusekit
    result = fusekit.merge("recipe.yaml", "./merged")
"""

__version__ = "0.1.0"

from fusekit.merging import MergeResult, merge, plan  # noqa: E402

__all__ = ["MergeResult", "__version__", "merge", "plan"]
