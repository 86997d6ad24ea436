"""Small timing helpers shared by the benchmarks and the demo."""

from __future__ import annotations

import time
from typing import Callable


def latencies_us(fn: Callable[[], object], count: int, budget_s: float) -> list[float]:
    """Time ``fn`` up to ``count`` times or until ``budget_s`` has passed; microseconds, sorted."""
    out = []
    clock = time.perf_counter_ns
    stop = time.monotonic() + budget_s
    for i in range(count):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
        if i % 256 == 0 and time.monotonic() > stop:
            break
    out.sort()
    return out


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]
