"""The guest's TSC mapped onto the host's ``time.perf_counter_ns`` clock.

Each sample is a NOP round trip: the guest stamps it with its TSC, the host
brackets it with its own clock, and the sample is trusted to half the round
trip. A burst of samples gives an anchor (its tightest sample); the latest
tight anchor places the guest's time line, and the rate is measured between
the first tight anchor and the latest. So one latency splits into stages on
one time line.

Only tight anchors count. On a busy two-core host whole bursts go wide: for
tens of milliseconds every round trip took 220-700 µs (the host's spin held
one core while the vCPU thread queued behind another process on the other,
until the spin gave up and slept). An anchor that wide put the guest's stamps
up to 200 µs off, and a rate from two of them 0.1 % off (200 µs more after
0.2 s): `hwharness latency` reported negative host wake-ups. So a burst goes
on until a sample is within reach of the tightest this clock has seen (or
BURST_DEADLINE_S passes), a wide anchor never replaces a tight one, and the
rate's baseline grows with the run.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol

TIGHT_FACTOR = 2.0          # an anchor within this many times the tightest round trip seen
TIGHT_SLACK_NS = 1000       # (plus this) is tight
BURST_DEADLINE_S = 0.5      # a burst stops waiting for a tight sample after this long


class GuestTime(Protocol):
    def guest_time(self) -> int:
        """The guest's TSC, stamped on a NOP round trip."""


class Anchor(NamedTuple):
    host_ns: float              # the middle of the round trip on the host's clock
    tsc: int                    # the guest's stamp
    round_trip_ns: int          # twice the uncertainty


class GuestClock:
    def __init__(self, channel: GuestTime, tsc_hz: int) -> None:
        self.channel = channel
        self.ns_per_tick = 1e9 / tsc_hz         # the guest's PIT calibration until two tight anchors
        self.tightest_ns = float("inf")         # the narrowest round trip seen: what "tight" means here
        self.rate_error = float("inf")          # bound on ns_per_tick's relative error (the PIT's: unknown)
        self._anchors: list[Anchor] = []
        self.reanchor(16)

    @property
    def uncertainty_ns(self) -> float:
        """How far the current anchor may be off: half its round trip."""
        return self._anchor.round_trip_ns / 2

    def uncertainty_at(self, tsc: int) -> float:
        """How far ``to_host_ns(tsc)`` may be off: the anchor's own, plus the rate's over the distance."""
        return self.uncertainty_ns + self.rate_error * abs(tsc - self._anchor.tsc) * self.ns_per_tick

    def _sample(self) -> Anchor:
        t0 = time.perf_counter_ns()
        tsc = self.channel.guest_time()
        t1 = time.perf_counter_ns()
        return Anchor((t0 + t1) / 2, tsc, t1 - t0)

    def _tight(self, anchor: Anchor) -> bool:
        return anchor.round_trip_ns <= TIGHT_FACTOR * self.tightest_ns + TIGHT_SLACK_NS

    def _burst(self, n: int) -> Anchor:
        """The tightest of at least ``n`` samples, going on until one is tight (or the deadline)."""
        self._sample()                      # wakes a sleeping guest: its kick would skew the first
        deadline = time.perf_counter() + BURST_DEADLINE_S
        best = min((self._sample() for _ in range(n)), key=lambda a: a.round_trip_ns)
        while not self._tight(best) and time.perf_counter() < deadline:
            best = min(best, self._sample(), key=lambda a: a.round_trip_ns)
        self.tightest_ns = min(self.tightest_ns, best.round_trip_ns)
        return best

    def reanchor(self, samples: int = 4) -> None:
        """Take an anchor: the latest tight one places the time line, and the rate is refined
        over the span since the first tight one. Bounds drift over a long run."""
        self._anchors.append(self._burst(samples))
        tight = [a for a in self._anchors if self._tight(a)]
        first, self._anchor = tight[0], tight[-1]
        span = self._anchor.host_ns - first.host_ns
        error = (first.round_trip_ns + self._anchor.round_trip_ns) / 2 / span if span > 0 else float("inf")
        if error < self.rate_error:         # a longer or tighter baseline than the last rate's
            self.ns_per_tick = span / (self._anchor.tsc - first.tsc)
            self.rate_error = error

    def calibrate(self, span: float = 0.2) -> None:
        """Measure the rate over at least ``span`` seconds (longer is more precise)."""
        self.reanchor(16)
        time.sleep(span)
        self.reanchor(16)

    @property
    def anchor_ns(self) -> float:
        return self._anchor.host_ns

    @property
    def anchor_tsc(self) -> int:
        return self._anchor.tsc

    def to_host_ns(self, tsc: int) -> float:
        """Where guest TSC ``tsc`` falls on the host's perf_counter_ns time line."""
        return self._anchor.host_ns + (tsc - self._anchor.tsc) * self.ns_per_tick

    def ticks_to_us(self, ticks: int) -> float:
        return ticks * self.ns_per_tick / 1000
