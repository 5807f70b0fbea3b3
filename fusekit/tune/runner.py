"""Where a search's candidates run: in this process, or as Ray tasks on a local or remote cluster.

One worker and no cluster address run every candidate here, one after the other, without importing
Ray. Otherwise each candidate is a Ray task (one CPU, or one GPU with ``device="cuda"``): a local
Ray instance of ``workers`` CPUs is started, or ``address`` (``auto``, ``host:port``,
``ray://host:port``) is joined. Tasks receive recipes, which name their inputs by path or Hub id, never
tensors, so every worker reads the models from the shared path or its own Hub cache.

:meth:`Runner.map` keeps the order of its items, and a candidate's score does not depend on which
worker computed it, so a search gives the same result with any number of workers.

Example:
    >>> runner = make_runner(2)  # doctest: +SKIP
    >>> runner.map(abs, [-1, -2])  # doctest: +SKIP
    [1, 2]
    >>> runner.close()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fusekit.errors import FusekitError

__all__ = ["LocalRunner", "RayRunner", "Runner", "check_address", "make_runner"]

CONNECT_TIMEOUT_S = 3.0
"""How long a cluster address may take to accept a TCP connection before it counts as unreachable."""
_DEFAULT_PORTS = {"ray": 10001, "gcs": 6379}


class Runner(Protocol):
    """Runs a function over items, possibly in parallel; results come back in the items' order."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, computed wherever the runner computes."""

    def close(self) -> None:
        """Release the workers (a local Ray instance this runner started is shut down)."""


class LocalRunner:
    """Every call in this process, in order: one worker and no cluster."""

    workers = 1

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Call ``fn`` on each item here; see :meth:`Runner.map`."""
        return [fn(item) for item in items]

    def close(self) -> None:
        """Nothing to release."""


_KEPT: dict[str, Callable[[Any], Any]] = {}  # in a Ray worker: the function of the current map, by token


def _run_task(token: str, fn: Callable[[Any], Any], item: Any, threads: int) -> tuple[bool, Any]:
    """The body of one Ray task: ``fn(item)`` with ``threads`` torch threads; a user mistake comes
    back as ``(False, its one line)`` so that the driver raises it as one line too.

    The worker keeps the first copy of ``fn`` it receives under ``token`` and calls that one for every
    later task of the same function, so what ``fn`` keeps between calls (an evaluator's loaded model
    and its cache) lives as long as the worker."""
    import torch

    if token not in _KEPT:
        _KEPT.clear()
        _KEPT[token] = fn
    fn = _KEPT[token]
    torch.set_num_threads(threads)
    try:
        return True, fn(item)
    except FusekitError as exc:
        return False, str(exc)


class RayRunner:
    """Candidates as Ray tasks; see the module docstring.

    Args:
        workers: CPUs of the local Ray instance (and candidates run at once); with ``address``, the
            number of tasks is not limited here (the cluster schedules them).
        address: a cluster to join instead of starting a local instance.
        device: ``cuda`` gives each task one GPU.
    """

    def __init__(self, workers: int, *, address: str | None = None, device: str = "cpu") -> None:
        ray = _import_ray()
        self.workers = workers
        self._ray = ray
        self._gpus = 1 if device == "cuda" else 0
        self._threads = max(1, _cores() // max(1, workers))
        self._started = not ray.is_initialized()
        if self._started:
            _init(ray, workers, address)
        self._task = ray.remote(_run_task)
        self._shipped: tuple[Callable[[Any], Any], str, Any] | None = None  # (fn, token, object ref)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Run ``fn`` on each item as a Ray task; see :meth:`Runner.map`.

        Raises:
            FusekitError: the first item (in order) whose call raised a user mistake.
        """
        if not items:
            return []
        if self._shipped is None or self._shipped[0] is not fn:
            import uuid

            self._shipped = (fn, uuid.uuid4().hex, self._ray.put(fn))
        _, token, shipped = self._shipped
        task = self._task.options(num_cpus=1, num_gpus=self._gpus)
        refs = [task.remote(token, shipped, item, self._threads) for item in items]
        results = []
        for ok, value in self._ray.get(refs):
            if not ok:
                raise FusekitError(value)
            results.append(value)
        return results

    def close(self) -> None:
        """Shut down the local Ray instance this runner started (a joined cluster keeps running)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        from fusekit.extras import install_hint

        raise FusekitError(f"--workers above 1 and --ray-address run candidates on Ray; "
                           f"{install_hint('tune')}") from None
    return ray


def _init(ray: Any, workers: int, address: str | None) -> None:
    """Start a local Ray instance, or join ``address`` after checking that it answers."""
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
             "configure_logging": True}
    if address is None:
        ray.init(num_cpus=workers, num_gpus=None, **quiet)
        return
    check_address(address)
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FusekitError(f"--ray-address '{address}': could not join the Ray cluster ({first}); "
                           "check that it is running (ray status) and the address") from None


def check_address(address: str) -> None:
    """Refuse a cluster address that does not accept a TCP connection within a few seconds.

    ``host:port`` is the cluster's GCS port (6379 by default), ``ray://host:port`` its client server
    (10001 by default); ``auto`` is resolved by Ray itself (``RAY_ADDRESS`` or a cluster started on
    this machine) and checked the same way when ``RAY_ADDRESS`` names one.

    Raises:
        FusekitError: one line naming the address and what to check.
    """
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if not target or target == "auto":
        return
    scheme, _, rest = target.rpartition("://")
    host, colon, port_text = rest.rpartition(":")
    if not colon:
        host, port_text = rest, str(_DEFAULT_PORTS["ray" if scheme == "ray" else "gcs"])
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FusekitError(f"--ray-address '{address}': expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port_text)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise FusekitError(f"--ray-address '{address}': cannot reach {host}:{port_text} ({reason}); "
                           "start the cluster (ray start --head) or fix the address") from None


def make_runner(workers: int, *, address: str | None = None, device: str = "cpu") -> Runner:
    """The runner for ``workers`` and ``address``: in-process for one worker and no address, else Ray.

    Args:
        workers: candidates evaluated at once (>= 1).
        address: ``auto``, ``host:port`` or ``ray://host:port`` of a Ray cluster to join.
        device: ``cpu`` or ``cuda`` (one GPU per Ray task).

    Returns:
        A :class:`Runner`; call :meth:`Runner.close` when done.

    Raises:
        FusekitError: Ray is not installed, or the cluster cannot be reached (one line, in seconds).
    """
    if workers < 1:
        raise FusekitError(f"--workers must be at least 1, got {workers}")
    if workers == 1 and address is None:
        return LocalRunner()
    return RayRunner(workers, address=address, device=device)
