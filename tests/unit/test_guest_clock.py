"""The guest clock's anchors, on a fake host clock: wide round trips never place the time line."""

from __future__ import annotations

import random

import pytest

from harness.proxy import clock as clock_module
from harness.proxy.clock import GuestClock

TICKS_PER_NS = 2.5              # a 2.5 GHz guest TSC
OFFSET = 10**9                  # guest TSC at host time 0


class FakeTime:
    """perf_counter, perf_counter_ns and sleep of a host whose time moves only when told."""

    def __init__(self) -> None:
        self.ns = 0

    def perf_counter_ns(self) -> int:
        return self.ns

    def perf_counter(self) -> float:
        return self.ns / 1e9

    def sleep(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


class Guest:
    """A NOP round trip: ``go`` ns to reach the guest, the stamp, ``back`` ns to return.
    ``script`` gives (go, back) per sample, then ``steady`` for the rest."""

    def __init__(self, host: FakeTime, script: list[tuple[int, int]], steady: tuple[int, int]) -> None:
        self.host, self.script, self.steady = host, list(script), steady

    def guest_time(self) -> int:
        go, back = self.script.pop(0) if self.script else self.steady
        self.host.ns += go
        stamp = OFFSET + round(self.host.ns * TICKS_PER_NS)
        self.host.ns += back
        return stamp


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(clock_module, "time", fake)
    return fake


def error_ns(clock: GuestClock, host: FakeTime) -> float:
    """How far the clock puts "now in the guest" from the host's now."""
    return clock.to_host_ns(OFFSET + round(host.ns * TICKS_PER_NS)) - host.ns


def test_a_wide_burst_goes_on_until_a_sample_is_tight(host: FakeTime) -> None:
    # the first 40 round trips stamp at once and come back 300 us later (a host stuck off-core)
    clock = GuestClock(Guest(host, [(1000, 1000)] * 17 + [(500, 300_000)] * 40, (1000, 1000)), 2_500_000_000)
    clock.reanchor(16)
    assert clock.uncertainty_ns <= 1000
    assert abs(error_ns(clock, host)) <= 1000       # a wide anchor would be 150 us off


def test_a_wide_anchor_never_replaces_a_tight_one_and_the_rate_spans_the_run(host: FakeTime) -> None:
    guest = Guest(host, [], (1000, 1000))
    clock = GuestClock(guest, 2_400_000_000)        # the guest's own rate estimate is 4 % off
    clock.calibrate(0.2)
    assert clock.ns_per_tick == pytest.approx(1 / TICKS_PER_NS, rel=1e-5)
    # a whole burst, past its deadline, comes back wide and early-stamped
    guest.script = [(500, 300_000)] * 10_000
    host.sleep(1.0)
    clock.reanchor(4)
    assert clock.uncertainty_ns <= 1000             # still the tight anchor of before
    assert abs(error_ns(clock, host)) <= 1000
    guest.script = []
    host.sleep(1.0)
    clock.reanchor(4)
    assert clock.ns_per_tick == pytest.approx(1 / TICKS_PER_NS, rel=1e-6)


def test_with_no_tight_sample_at_all_the_tightest_wide_one_serves(host: FakeTime) -> None:
    clock = GuestClock(Guest(host, [], (150_000, 150_000)), 2_500_000_000)
    assert clock.uncertainty_ns == 150_000
    assert abs(error_ns(clock, host)) <= clock.uncertainty_ns


@pytest.mark.parametrize("seed", range(20))
def test_the_mapping_is_never_further_off_than_its_stated_uncertainty(host: FakeTime, seed: int) -> None:
    """Round trips of any width and asymmetry (a busy host's), anchors taken as a run goes:
    every mapped time is within uncertainty_at() of the truth."""
    rng = random.Random(seed)
    widths = [rng.choice([1000, 3000, 50_000, 300_000]) for _ in range(200)]
    guest = Guest(host, [], (1000, 1000))
    guest.script = [(w - (back := rng.randrange(w)), back) for w in widths for _ in range(rng.randrange(1, 40))]
    clock = GuestClock(guest, 2_450_000_000)
    clock.calibrate(0.2)
    for _ in range(30):
        host.sleep(rng.uniform(0, 0.3))
        clock.reanchor(rng.randrange(1, 9))
        for _ in range(5):
            host.sleep(rng.uniform(0, 0.1))
            now_tsc = OFFSET + round(host.ns * TICKS_PER_NS)
            assert abs(clock.to_host_ns(now_tsc) - host.ns) <= clock.uncertainty_at(now_tsc) + 1
