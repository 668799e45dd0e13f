"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `timing`)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, in seconds: for kernels, the run least disturbed by other work."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
