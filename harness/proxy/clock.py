"""The guest's TSC mapped onto the host's ``time.perf_counter_ns`` clock.

Each sample is a NOP round trip: the guest stamps it with its TSC, the host
brackets it with its own clock, and the sample is trusted to half the round
trip. Two bursts some time apart give the rate; the tightest sample of each
burst anchors it. So one latency splits into stages on one time line.
"""

from __future__ import annotations

import time
from typing import Protocol


class GuestTime(Protocol):
    def guest_time(self) -> int:
        """The guest's TSC, stamped on a NOP round trip."""


class GuestClock:
    def __init__(self, channel: GuestTime, tsc_hz: int) -> None:
        self.channel = channel
        self.ns_per_tick = 1e9 / tsc_hz         # the guest's PIT calibration until calibrate()
        self.anchor_ns, self.anchor_tsc = self._best_sample()
        self.uncertainty_ns = 0.0

    def _sample(self) -> tuple[float, int, int]:
        t0 = time.perf_counter_ns()
        tsc = self.channel.guest_time()
        t1 = time.perf_counter_ns()
        return (t0 + t1) / 2, tsc, t1 - t0

    def _best_sample(self, n: int = 16) -> tuple[float, int]:
        self._sample()                      # wakes a sleeping guest: its kick would skew the first
        best = min((self._sample() for _ in range(n)), key=lambda s: s[2])
        self.uncertainty_ns = best[2] / 2
        return best[0], best[1]

    def calibrate(self, span: float = 0.2) -> None:
        """Measure the rate over ``span`` seconds (longer is more precise)."""
        ns0, tsc0 = self._best_sample()
        time.sleep(span)
        ns1, tsc1 = self._best_sample()
        self.ns_per_tick = (ns1 - ns0) / (tsc1 - tsc0)
        self.anchor_ns, self.anchor_tsc = ns1, tsc1

    def reanchor(self, samples: int = 4) -> None:
        """Re-take the anchor, keeping the rate: bounds drift over a long run."""
        self.anchor_ns, self.anchor_tsc = self._best_sample(samples)

    def to_host_ns(self, tsc: int) -> float:
        """Where guest TSC ``tsc`` falls on the host's perf_counter_ns time line."""
        return self.anchor_ns + (tsc - self.anchor_tsc) * self.ns_per_tick

    def ticks_to_us(self, ticks: int) -> float:
        return ticks * self.ns_per_tick / 1000
