"""Paired rounds: how every Python-against-native bench measures, so that its ratios can be trusted.

- One clock. Both sides are timed on the host, ``perf_counter_ns`` around the
  whole run; for the native side that includes the one request that starts
  the in-guest loop, whose own cost (``native_call_us``) is measured and
  reported beside it. The guest's TSC rate (the proxy's PIT calibration at
  boot) is recorded next to the host's calibration of it, never used.
- The same work. A workload's two sides do the same count of the same
  operations, set up untimed; after every run an independent counter (QEMU's
  own, where there is one: ``query-blockstats``, the NIC's statistics
  registers) must have moved by exactly that count, or the bench fails.
- Order and repetition. One warm-up round, then ``rounds`` rounds; Python
  goes first in even rounds, native in odd ones. A ratio pairs the two runs of
  one round (on two shared cores either side alone swings far more than a
  pair); the result is the median, and ``ratio_spread`` (max/min of the
  per-round ratios) says how far the rounds disagreed.
- Disturbance. The CPU that processes other than this one and its QEMU used
  during each round (``foreign_cores``, from /proc) is recorded: the Python
  side needs two cores at once (itself and the vCPU), the native side one, so
  another job on a two-core machine hurts Python first.
- Where the time went. ``cpu_cores`` gives, for each figure, the cores QEMU's main
  loop, the vCPU, QEMU's other threads and this process used during its runs (their
  CPU time over all rounds by the runs' time, ``timed_s``; :class:`ThreadCpu`). The
  kernel adds a thread's time when it stops or at a tick (4 ms at HZ=250), so a figure
  from a few milliseconds of runs is a tick's worth or nothing. ``kicked_wakes`` counts, per round, the times the proxy
  guest had halted and a kick woke it (its ``kicks``): each a doorbell or tail write that
  found the guest asleep and paid QEMU's main loop and vCPU thread waking, 55-300 us,
  before the device saw it. A figure far below its usual one with many of them came from
  a run whose requests kept finding the guest halted.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from ...errors import HarnessError
from ...proxy import ProxyMachine
from .stats import latencies_us, pct

log = logging.getLogger(__name__)

TSC_AGREEMENT = 0.01        # warn when the guest's PIT-calibrated TSC rate is further off than this

Run = Callable[[], int]         # the timed part of a side: does the work, returns units done


@dataclass
class Workload:
    """One figure, measured on both sides. ``python`` and ``native`` do their untimed
    setup and return the timed run; ``units`` is what each run must complete and
    ``scale`` turns units per second into the figure (1 for operations per second).
    ``counter`` reads an independent running count of units done (checked per run)."""

    key: str
    python: Callable[[], Run]
    native: Callable[[], Run]
    units: int
    scale: float = 1.0
    counter: Callable[[], int] | None = None
    counted_by: str = ""


class WorkMismatch(HarnessError):
    """A side did not do the work it was given: the figure would be meaningless."""


class ThreadCpu:
    """The CPU each part of a run used, from the kernel's own count of each thread's time on
    a core (``/proc/PID/task/TID/schedstat``, nanoseconds): the machines' QEMU main loops
    (where the device models answer DMA and doorbells under TCG), their vCPUs (the proxy,
    or the native loop), QEMU's other threads (the disk backend's workers: io_uring's punt
    threads, the thread pool; a thread that ended during the run goes uncounted), and this
    process (the Python driver, or the host waiting for the native loop). A side's figure
    says how much got done; these say what held it back: a main loop well below a core
    while the work was unfinished waited for its doorbells."""

    ROLES = ("main_loop", "vcpu", "qemu_other", "driver")

    def __init__(self, pms: list[ProxyMachine]) -> None:
        self.machines: list[tuple[int, set[int]]] = [
            (pm.machine.process.pid, {cpu["thread-id"] for cpu in pm.machine.qmp("query-cpus-fast")})
            for pm in pms if pm.machine.process is not None]
        self.windows = [pm.bus.window for pm in pms]

    def kicked_wakes(self) -> int:
        """How often the machines' proxy guests have woken from a halt by the host's kick."""
        return sum(w.field("kicks") for w in self.windows)

    def sample(self) -> dict[tuple[int, int], tuple[str, float]]:
        """Each thread's seconds on a core so far, with its role; this process as one."""
        spent: dict[tuple[int, int], tuple[str, float]] = {(0, 0): ("driver", time.process_time())}
        for pid, vcpus in self.machines:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:                 # a machine that is gone: nothing more to count
                continue
            for tid in tids:
                role = "main_loop" if tid == pid else "vcpu" if tid in vcpus else "qemu_other"
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        spent[pid, tid] = (role, int(f.read().split()[0]) / 1e9)
                except OSError:             # the thread ended meanwhile
                    pass
        return spent

    @classmethod
    def seconds(cls, before: dict[tuple[int, int], tuple[str, float]],
                after: dict[tuple[int, int], tuple[str, float]]) -> dict[str, float]:
        """CPU seconds each role used between two samples."""
        used = dict.fromkeys(cls.ROLES, 0.0)
        for key, (role, spent) in after.items():
            used[role] += spent - before.get(key, (role, 0.0))[1]
        return used


def _timed(workload: Workload, side: str, first_side: bool, cpu: ThreadCpu
           ) -> tuple[float, dict[str, float], int, float]:
    """The side's figure, the CPU seconds each role used meanwhile, the guest's kicked wakes,
    and the run's seconds."""
    run = (workload.python if first_side else workload.native)()
    before = workload.counter() if workload.counter else 0
    spent, kicked = cpu.sample(), cpu.kicked_wakes()
    t0 = time.perf_counter_ns()
    units = run()
    elapsed = time.perf_counter_ns() - t0
    after, kicked = cpu.sample(), cpu.kicked_wakes() - kicked
    if units != workload.units:
        raise WorkMismatch(f"{workload.key}: the {side} side did {units} of {workload.units}")
    if workload.counter:
        counted = workload.counter() - before
        if counted != workload.units:
            raise WorkMismatch(f"{workload.key}: the {side} side claims {units}, "
                               f"{workload.counted_by} counted {counted}")
    return units * workload.scale / (elapsed / 1e9), ThreadCpu.seconds(spent, after), kicked, elapsed / 1e9


def clock_figures(pm: ProxyMachine, channel_calls: Callable[[], object], span: float = 0.5) -> dict[str, float]:
    """The guest TSC rate as the proxy calibrated it at boot and as the host measures it
    now, and the host-timed cost of one request like the one that starts a native loop."""
    clock = pm.bus.clock
    clock.calibrate(span)
    host_hz = 1e9 / clock.ns_per_tick
    boot_hz = float(pm.bus.tsc_hz)
    if abs(boot_hz / host_hz - 1) > TSC_AGREEMENT:
        log.warning("the guest's boot-time TSC rate (%.1f MHz) is %+.1f%% off the host's measurement "
                    "(%.1f MHz); no figure here depends on it", boot_hz / 1e6, 100 * (boot_hz / host_hz - 1),
                    host_hz / 1e6)
    return {"tsc_hz_boot": round(boot_hz), "tsc_hz_host": round(host_hz),
            "native_call_us": round(pct(latencies_us(channel_calls, 200, budget_s=5), 0.5), 3)}


class ForeignLoad:
    """CPU time used by every process but ``own`` (this process and the children it has
    waited for, such as a bench's feeder; its QEMU), in cores."""

    def __init__(self, own: list[int]) -> None:
        self.own = own
        self.hz = os.sysconf("SC_CLK_TCK")
        self._last = self._sample()

    def _sample(self) -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]          # all but idle and iowait
        mine = 0
        for pid in self.own:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                mine += sum(int(x) for x in stat[11:15])     # utime, stime, and its waited-for children's
            except OSError:
                pass
        return time.monotonic(), (busy - mine) / self.hz

    def since_last(self) -> float:
        """Cores used by others since the previous call."""
        (t0, cpu0), (t1, cpu1) = self._last, self._sample()
        self._last = (t1, cpu1)
        return max(0.0, (cpu1 - cpu0) / (t1 - t0)) if t1 > t0 else 0.0


def run_rounds(groups: list[list[Workload]], rounds: int, pms: list[ProxyMachine],
               progress: Callable[[str], None] = log.info, sides: tuple[str, str] = ("python", "native")) -> dict:
    """For each group of workloads in turn: a warm-up round, then ``rounds`` paired rounds
    (a group runs all its rounds before the next starts). The figures, ratios and spread.

    ``sides`` name a workload's two sides (``python`` and ``native``): a figure is keyed
    by the workload, prefixed by its side's name unless that is ``python``; a ratio is
    ``ratio_`` and the workload, the first side over the second. ``pms`` are the machines
    whose CPU is the bench's own."""
    per_round: dict[str, list[float]] = {}
    cpu_seconds: dict[str, dict[str, float]] = {}
    timed: dict[str, float] = {}
    kicked: dict[str, list[int]] = {}
    first = []
    pids = [os.getpid()] + [pm.machine.process.pid for pm in pms if pm.machine.process is not None]
    load = ForeignLoad(pids)
    cpu = ThreadCpu(pms)
    foreign: list[float] = []
    label = {side: "" if side == "python" else f"{side}_" for side in sides}
    for group in groups:
        for round_ in range(rounds + 1):
            order = sides if round_ % 2 == 0 else sides[::-1]
            if round_ and group is groups[0]:
                first.append(order[0])
            load.since_last()
            for w in group:
                measured = {side: _timed(w, side, side == sides[0], cpu) for side in order}
                if round_:                      # round 0 warms both up
                    for side in sides:
                        figure, used, wakes, seconds = measured[side]
                        key = f"{label[side]}{w.key}"
                        per_round.setdefault(key, []).append(figure)
                        kicked.setdefault(key, []).append(wakes)
                        timed[key] = timed.get(key, 0.0) + seconds
                        for role, spent in used.items():
                            by_role = cpu_seconds.setdefault(key, {})
                            by_role[role] = by_role.get(role, 0.0) + spent
                    per_round.setdefault(f"ratio_{w.key}", []).append(measured[sides[0]][0] / measured[sides[1]][0])
            if round_:
                foreign.append(round(load.since_last(), 2))
            progress(f"{group[0].key}...: " + (f"round {round_} of {rounds} done" if round_ else "warm-up done"))
    if max(foreign) > 0.25:
        log.warning("other processes used up to %.1f cores during a round: the figures are disturbed "
                    "(foreign_cores in the JSON)", max(foreign))
    results = {k: round(statistics.median(v), 3) for k, v in per_round.items()}
    spread = {k: round(max(v) / min(v), 3) for k, v in per_round.items() if k.startswith("ratio_")}
    return {"clock": "host", "rounds": rounds, "warmup_rounds": 1, "first": first, "foreign_cores": foreign,
            "results": results, "ratio_spread": spread,
            "cpu_cores": {key: {role: round(spent / timed[key], 2) for role, spent in used.items()}
                          for key, used in cpu_seconds.items()},
            "timed_s": {key: round(seconds, 4) for key, seconds in timed.items()},
            "kicked_wakes": kicked,
            "per_round": {k: [round(x, 4 if k.startswith("ratio_") else 1) for x in v] for k, v in per_round.items()},
            "work": {w.key: {"units_per_run": w.units, "counted_by": w.counted_by or "the side itself"}
                     for group in groups for w in group}}


def add_peer(result: dict, peer: dict) -> None:
    """Put a peer's figures (``peer_<name>_<key>``) beside the bench's, with the ratio of the
    Python driver's figure to each (``ratio_python_over_peer_<name>_<key>``)."""
    results = result["results"]
    for key, value in peer["results"].items():
        results[key] = value
        ours = results.get(key.split("_", 2)[2])
        if ours:
            results[f"ratio_python_over_{key}"] = round(ours / value, 3)
    result["peer"] = {k: v for k, v in peer.items() if k != "results"}
