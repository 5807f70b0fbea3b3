"""Calibrating a router's threshold on queries alone.

The threshold that sends a share of calls to dearer models depends only on the router's predictions
for the queries it will see, not on which model is best for them, so a file of unlabelled queries
like the expected traffic calibrates it: no model runs, no scores. This is the most faithful
calibration there is when such queries exist (a build without them calibrates on cross-validated
predictions of its training data), and the way to follow traffic that drifts after a build
(``fusekit route calibrate``).
"""

from __future__ import annotations

from pathlib import Path

from fusekit.errors import FusekitError
from fusekit.io.outputs import claim_output
from fusekit.io.writer import atomic_output
from fusekit.route.data import load_examples
from fusekit.route.policy import calibrate
from fusekit.route.router import CONFIG_FILE, Router, load_router, save_router


def read_queries(data: str | Path) -> list[str]:
    """The queries of a JSONL file (``text`` or ``prompt``; labels and completions are not needed)."""
    return [e.query for e in load_examples(data, queries_only=True)]


def calibrate_on_queries(router: Router, queries: list[str], share: float, source: str) -> None:
    """Set ``router``'s threshold so that ``share`` of ``queries`` (read from ``source``) go to models
    dearer than the cheapest, and keep their values so that other shares can be asked for later."""
    router.calibration_tail = router.dear_tail(router.probabilities(queries))
    router.threshold = calibrate(router.calibration_tail, share)
    calibration = dict(router.info.get("calibration", {}))
    calibration.update({"share": share, "data": source, "queries": len(queries),
                        "threshold": router.threshold})
    calibration.pop("heldout_dear_share", None)  # measured at the old threshold
    router.info["calibration"] = calibration


def recalibrate_router(router_dir: str | Path, data: str | Path, share: float,
                       out_dir: str | Path | None = None, *, overwrite: bool = False) -> Router:
    """``fusekit route calibrate``: calibrate a saved router on ``data`` and write it to ``out_dir``
    (default: replace ``router_dir``; either way the folder is swapped in whole, never half written)."""
    router_dir = Path(router_dir)
    router = load_router(router_dir)
    if not router.dear_indices():
        raise FusekitError(f"every model of the router '{router_dir}' has the same cost, so no call goes "
                           "to a dearer model and there is no share to calibrate")
    calibrate_on_queries(router, read_queries(data), share, str(data))
    target = router_dir if out_dir is None else Path(out_dir)
    recipe = router_dir / "route.yaml"
    recipe_text = recipe.read_text(encoding="utf-8") if recipe.is_file() else None
    inputs = [("data", Path(data))] + ([("router", router_dir)] if out_dir is not None else [])
    with claim_output(target, inputs=inputs, overwrite=overwrite or out_dir is None,
                      markers=(CONFIG_FILE,)), \
            atomic_output(target, overwrite=overwrite or out_dir is None) as temp:
        save_router(router, temp, name=target.name, recipe_text=recipe_text)
    return router
