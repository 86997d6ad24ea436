"""What tracing costs a register round trip (``bench roundtrip``: ``trace_on_cost``, ``trace_off_cost``).

Paired rounds on one machine, on the same port: in each round a channel is
opened and its reads timed three ways, the order rotating from round to
round: ``plain`` (no trace on), ``traced`` (inside ``harness.trace``) and
``off`` (after that trace has ended: the machinery has been used and turned
off). Each round yields traced/plain and off/plain p50 ratios; the figures
are their medians. Tracing off runs the transport's untouched channel class,
so ``trace_off_cost`` checks that nothing lingers; the comparison with the
code from before tracing existed is the README's (another checkout, the same
command).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Callable

from ... import tracing
from ...access import Bus
from .stats import latencies_us, pct


def p50_of_port_reads(bus: Bus, port: int, count: int) -> float:
    region = bus.ports(port, 1)
    try:
        region.read8(0)                          # warm up
        return pct(latencies_us(lambda: region.read8(0), count, budget_s=10), 0.5)
    finally:
        region.channel.close()


def measure(bus: Bus, port: int, count: int = 5000, rounds: int = 5) -> dict[str, float]:
    """trace_on_cost and trace_off_cost, medians of ``rounds`` paired rounds of ``count`` reads."""
    on, off = [], []
    with tempfile.TemporaryDirectory(prefix="hwharness-tracecost-") as scratch:
        def traced() -> float:
            with tracing.trace(Path(scratch) / "trace.json"):
                return p50_of_port_reads(bus, port, count)

        sides: dict[str, Callable[[], float]] = {
            "plain": lambda: p50_of_port_reads(bus, port, count), "traced": traced,
            "off": lambda: p50_of_port_reads(bus, port, count)}
        order = list(sides)
        for r in range(rounds + 1):               # round 0 warms up and is dropped
            p50 = {}
            for name in order[r % 3:] + order[:r % 3]:
                p50[name] = sides[name]()
            if r:
                on.append(p50["traced"] / p50["plain"])
                off.append(p50["off"] / p50["plain"])
    return {"trace_on_cost": statistics.median(on), "trace_off_cost": statistics.median(off),
            "trace_on_cost_spread": max(on) / min(on), "trace_off_cost_spread": max(off) / min(off)}
