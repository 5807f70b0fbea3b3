"""The server's counters, rendered as Prometheus text (``GET /metrics``), with no client library.

Series (all prefixed ``fusekit_``):

- ``requests_total{route, status}``: requests answered, by route and HTTP status;
- ``request_duration_seconds{route}``: a latency histogram, from the request's arrival to its last byte;
- ``prompt_tokens_total{model}``, ``completion_tokens_total{model}``: tokens read and generated;
- ``completion_tokens_per_second{model}``: tokens generated over the last :data:`RATE_WINDOW` seconds;
- ``queue_depth{model}``: requests waiting for a batch slot, read from each backend when scraped;
- ``in_flight_requests``: requests being answered now.

Example:
    >>> m = Metrics()
    >>> m.observe_request("/v1/models", 200, 0.002)
    >>> 'fusekit_requests_total{route="/v1/models",status="200"} 1' in m.render({})
    True
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping

__all__ = ["BUCKETS", "Metrics", "RATE_WINDOW"]

BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of the latency histogram's buckets, in seconds (``+Inf`` follows)."""
RATE_WINDOW = 10.0
"""Seconds over which ``completion_tokens_per_second`` is averaged."""


def _labels(**labels: str) -> str:
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


class Metrics:
    """What the server has done so far; safe to update from the event loop's one thread.

    Args:
        clock: the time source (seconds), for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = {}
        self.duration_sum: dict[str, float] = defaultdict(float)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.recent: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.in_flight = 0

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests[(route, status)] += 1
        counts = self.buckets.setdefault(route, [0] * (len(BUCKETS) + 1))
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum[route] += seconds

    def add_tokens(self, model: str, *, prompt: int = 0, completion: int = 0) -> None:
        """Count tokens read (prompt) and generated (completion) for ``model``."""
        self.prompt_tokens[model] += prompt
        self.completion_tokens[model] += completion
        if completion:
            self.recent[model].append((self.clock(), completion))

    def tokens_per_second(self, model: str) -> float:
        """Completion tokens per second for ``model`` over the last :data:`RATE_WINDOW` seconds."""
        window, start = self.recent[model], self.clock() - RATE_WINDOW
        while window and window[0][0] < start:
            window.popleft()
        return sum(n for _, n in window) / RATE_WINDOW

    def render(self, queue_depths: Mapping[str, int]) -> str:
        """The Prometheus text exposition of every series.

        Args:
            queue_depths: each served model's current queue depth.
        """
        lines = ["# HELP fusekit_requests_total Requests answered, by route and HTTP status.",
                 "# TYPE fusekit_requests_total counter"]
        lines += [f"fusekit_requests_total{_labels(route=r, status=str(s))} {n}"
                  for (r, s), n in sorted(self.requests.items())]
        lines += self._histogram()
        models = sorted(set(queue_depths) | set(self.prompt_tokens) | set(self.completion_tokens))
        for name, kind, help_text, value in (
                ("prompt_tokens_total", "counter", "Prompt tokens read.", lambda m: self.prompt_tokens[m]),
                ("completion_tokens_total", "counter", "Completion tokens generated.",
                 lambda m: self.completion_tokens[m]),
                ("completion_tokens_per_second", "gauge",
                 f"Completion tokens per second over the last {RATE_WINDOW:g} s.", self.tokens_per_second),
                ("queue_depth", "gauge", "Requests waiting for a batch slot.",
                 lambda m: queue_depths.get(m, 0))):
            lines += [f"# HELP fusekit_{name} {help_text}", f"# TYPE fusekit_{name} {kind}"]
            lines += [f"fusekit_{name}{_labels(model=m)} {value(m):g}" for m in models]
        lines += ["# HELP fusekit_in_flight_requests Requests being answered now.",
                  "# TYPE fusekit_in_flight_requests gauge", f"fusekit_in_flight_requests {self.in_flight}"]
        return "\n".join(lines) + "\n"

    def _histogram(self) -> list[str]:
        lines = ["# HELP fusekit_request_duration_seconds Time from a request's arrival to its last byte.",
                 "# TYPE fusekit_request_duration_seconds histogram"]
        for route, counts in sorted(self.buckets.items()):
            total = 0
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                total += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f"fusekit_request_duration_seconds_bucket{_labels(route=route, le=le)} {total}")
            seconds = self.duration_sum[route]
            lines.append(f"fusekit_request_duration_seconds_sum{_labels(route=route)} {seconds:g}")
            lines.append(f"fusekit_request_duration_seconds_count{_labels(route=route)} {total}")
        return lines
