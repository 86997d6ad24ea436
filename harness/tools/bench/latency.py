"""``hwharness latency``: how long a real device interrupt takes to reach Python, in stages.

Like cyclictest, but the event is a genuine device interrupt: the e1000's
Interrupt Cause Set register (8254x manual, ICS 0x00C8) raises its INTx line,
the proxy's handler records the guest TSC and masks the line, and the host
wakes. Every sample splits on one time line (guest TSC mapped onto the host
clock, re-anchored as the run goes):

- guest entry: the ICS write → the proxy's handler (what an in-kernel driver sees);
- host wake:   the proxy's handler → the host's wait() returning;
- end to end:  the ICS write → the Python handler.

``spin`` mode: the host spins on the interrupt count, the trigger posted
without waiting (a prepared batch, started; its completion is collected after
the interrupt). ``sleep`` mode: it blocks on the ivshmem doorbell, and a
second thread fires the trigger once the waiter is asleep, so the wake-up is
a real one. (Spin mode used to wait for the trigger's own completion and then
find the count already moved: its "host wake" was the rest of the guest's
handler, the request's completion and Python's return from the write, 3 µs
of 5.5, not a wait on the interrupt.)

QEMU's e1000 enforces the 8254x's interrupt throttling floor (about 7,813
interrupts/s, one per 128 µs) unless ``mitigation=off``: the tool turns it off
to measure the path, not the throttle.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

from ...access import Kind
from ...proxy import ProxyMachine, proxy_spec
from .paired import ForeignLoad
from .stats import pct

log = logging.getLogger(__name__)

E1000 = dict(vendor=0x8086, device=0x100E)
ICR, ICS, IMS = 0x00C0, 0x00C8, 0x00D0
ICR_RXT0 = 0x80
SLEEP_ARM_S = 0.0005        # sleep mode: how long the trigger waits for the waiter to block
REANCHOR_EVERY = 200        # samples between clock re-anchorings
QUICK_COUNT = 200


@dataclass
class Samples:
    guest_entry_us: list[float] = field(default_factory=list)
    host_wake_us: list[float] = field(default_factory=list)
    end_to_end_us: list[float] = field(default_factory=list)
    clock_uncertainty_us: float = 0.0       # how far the stages crossing clocks may be off, at worst


def measure(pm: ProxyMachine, count: int, mode: str, progress: bool = False, timeout: float = 10.0) -> Samples:
    """Trigger ``count`` interrupts on the machine's e1000 and time each in three stages."""
    if mode not in ("spin", "sleep"):
        raise ValueError(f"mode is spin or sleep, not {mode!r}")
    bus = pm.bus
    out = Samples()
    with bus.open(bus.find(**E1000)) as nic:
        bar0 = nic.bar(0)
        bar0.write32(IMS, ICR_RXT0)
        irq = nic.irq()
        irq.spin = timeout if mode == "spin" else 0.0
        clock = bus.clock
        clock.calibrate(span=0.2)
        bar = _progress(count, progress)
        armed, fired = threading.Event(), threading.Event()
        trigger_tsc: list[int] = []

        def trigger() -> int:
            bar0.write32(ICS, ICR_RXT0)
            return nic.channel.last_start_tsc

        posted = nic.channel.prepare([bar0.access(Kind.WRITE, ICS, 4, ICR_RXT0)])

        def trigger_later() -> None:        # sleep mode: fire once the waiter is asleep
            for _ in range(count):
                if not armed.wait(timeout):
                    return
                armed.clear()
                time.sleep(SLEEP_ARM_S)
                trigger_tsc.append(trigger())
                fired.set()

        thread = threading.Thread(target=trigger_later, daemon=True) if mode == "sleep" else None
        if thread:
            thread.start()
        try:
            for i in range(count):
                if i % REANCHOR_EVERY == 0:
                    clock.reanchor(8)
                if thread:
                    armed.set()
                    event = irq.wait(timeout)
                    handled = time.perf_counter_ns()     # "the Python handler"
                    if not fired.wait(timeout):
                        raise RuntimeError("the trigger thread stopped")
                    fired.clear()
                    start = trigger_tsc[-1]
                else:
                    posted.start()
                    event = irq.wait(timeout)
                    handled = time.perf_counter_ns()
                    posted.finish()
                    start = nic.channel.last_start_tsc
                out.guest_entry_us.append(clock.ticks_to_us(event.guest_tsc - start))
                out.host_wake_us.append((event.host_ns - clock.to_host_ns(event.guest_tsc)) / 1000)
                out.end_to_end_us.append((handled - clock.to_host_ns(start)) / 1000)
                out.clock_uncertainty_us = max(out.clock_uncertainty_us, clock.uncertainty_at(start) / 1000,
                                               clock.uncertainty_at(event.guest_tsc) / 1000)
                bar0.read32(ICR)                  # deasserts the line
                irq.ack()
                bar.update(1)
        finally:
            armed.set()
            bar.close()
            irq.close()
            if thread:
                thread.join(timeout)
    return out


def _progress(count: int, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm
    return tqdm(total=count, unit="irq", disable=not enabled, file=sys.stderr, leave=False)


def summary(samples: Samples) -> dict[str, float]:
    e2e = sorted(samples.end_to_end_us)
    entry = sorted(samples.guest_entry_us)
    wake = sorted(samples.host_wake_us)
    return {
        "count": len(e2e),
        "p50_us": pct(e2e, 0.5), "p99_us": pct(e2e, 0.99), "p999_us": pct(e2e, 0.999), "max_us": e2e[-1],
        "guest_entry_p50_us": pct(entry, 0.5), "guest_entry_p99_us": pct(entry, 0.99),
        "host_wake_p50_us": pct(wake, 0.5), "host_wake_p99_us": pct(wake, 0.99),
        "end_to_end_over_guest_entry": pct(e2e, 0.5) / pct(entry, 0.5),
        "clock_uncertainty_us": samples.clock_uncertainty_us,
    }


def table(samples: Samples) -> str:
    """A readable table of the three stages and a histogram of end to end."""
    rows = [("trigger -> guest handler", samples.guest_entry_us),
            ("guest handler -> host wake", samples.host_wake_us),
            ("trigger -> Python handler", samples.end_to_end_us)]
    lines = [f"{'stage (us)':28} {'p50':>9} {'p99':>9} {'p99.9':>9} {'max':>9}"]
    for name, values in rows:
        v = sorted(values)
        lines.append(f"{name:28} {pct(v, .5):9.2f} {pct(v, .99):9.2f} {pct(v, .999):9.2f} {v[-1]:9.2f}")
    lines.append("")
    lines.append("end to end, log2 buckets (us):")
    lines += histogram(samples.end_to_end_us)
    return "\n".join(lines)


def histogram(values: Iterable[float], width: int = 50) -> list[str]:
    buckets: dict[int, int] = {}
    for v in values:
        b = 0
        while (1 << b) < v:
            b += 1
        buckets[b] = buckets.get(b, 0) + 1
    most = max(buckets.values())
    return [f"  <= {1 << b:>7} {n:>7} {'#' * max(1, round(width * n / most))}" for b, n in sorted(buckets.items())]


def plot(samples: Samples, path: str, title: str) -> None:
    """Histograms of the three stages, one panel each, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), constrained_layout=True)
    for ax, (name, values) in zip(axes, (("trigger → guest handler", samples.guest_entry_us),
                                          ("guest handler → host wake-up", samples.host_wake_us),
                                          ("trigger → Python handler", samples.end_to_end_us))):
        ax.hist(values, bins=100, log=True)
        ax.axvline(pct(sorted(values), 0.5), color="k", linestyle="--", label="p50")
        ax.set_title(name)
        ax.set_xlabel("µs")
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(accel: str, mode: str, count: int, plot_path: str | None = None, progress: bool = True,
        iommu: bool | None = None) -> tuple[dict, Samples]:
    spec = proxy_spec(accel=accel, iommu=iommu)
    spec.device("e1000", mitigation=False)
    with ProxyMachine(spec, name="latency") as pm:
        qemu = pm.machine.process
        load = ForeignLoad([os.getpid()] + ([qemu.pid] if qemu is not None else []))
        samples = measure(pm, count, mode, progress=progress)
        foreign = load.since_last()
        accel = pm.machine.accel
    result = {"benchmark": "latency", "accel": accel, "mode": mode,
              "results": {k: round(v, 3) for k, v in summary(samples).items()}, "foreign_cores": round(foreign, 2)}
    if plot_path:
        plot(samples, plot_path, f"interrupt latency, {accel}, {mode} mode, {count} interrupts")
    return result, samples
