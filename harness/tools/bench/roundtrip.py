"""``hwharness bench roundtrip``: the cost of one proxied register access, against qtest.

Measured in one run on one machine: a side-effect-free port read (the
isa-debugcon port, whose read returns a constant) and an e1000 STATUS read,
through the proxy and through the qtest transport; batched throughput; the
guest's own cost of the same port read (a tight in-guest loop, timed on the
host around the request that runs it; ``native_call_us`` is that request's
own cost); and the CPU a booted, idle proxy machine uses. The qtest machine
never runs its CPU, so its accelerator does not matter; both are recorded.

The process boundary: the same two reads from a driver process attached to a
driver slot (``python -m harness.tools.bench.roundtrip ADDRESS``), against the same
from the owner, in paired rounds that alternate which goes first.
``attached_over_owner_pio`` is the owner's median latency over the attached
process's: a speed ratio, 1.0 when the boundary costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from ...access import Bus, Kind, Region
from ...machine import MachineSpec
from ...proxy import ProxyMachine, proxy_spec, raw
from ...qtest import QtestMachine, qtest_spec
from . import tracecost
from ...processes import serve
from .stats import latencies_us, pct

log = logging.getLogger(__name__)

DEBUGCON_PORT = 0xE9
E1000 = dict(vendor=0x8086, device=0x100E)
STATUS = 0x0008


def add_devices(spec: MachineSpec) -> None:
    spec.device("e1000", mac="52:54:00:12:34:56")
    spec.chardev("null", "debugcon")
    spec.device("isa-debugcon", iobase=DEBUGCON_PORT, chardev="debugcon")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: Region, bar0: Region, count: int, budget_s: float) -> tuple[list[float], list[float]]:
    port.read8(0)
    bar0.read32(STATUS)      # warm up: translation, first faults
    return (latencies_us(lambda: port.read8(0), count, budget_s),
            latencies_us(lambda: bar0.read32(STATUS), count, budget_s))


def measure_on(bus: Bus, count: int) -> tuple[float, float]:
    """p50s of ``count`` debugcon port reads and e1000 STATUS reads, on grants held just for this."""
    port = bus.ports(DEBUGCON_PORT, 1)
    try:
        with bus.open(bus.find(**E1000)) as nic:
            pio, mmio = measure(port, nic.bar(0), count, budget_s=10)
    finally:
        port.channel.close()
    return pct(pio, 0.5), pct(mmio, 0.5)


def attached_main(address: str) -> None:
    """A driver process's side of the paired rounds: attach, then answer each line
    ``COUNT`` on stdin with the p50s of that many port and MMIO reads, as JSON."""
    from ...processes.attached import attach
    bus = attach(address)
    print(json.dumps({"slot": bus.slot}), flush=True)
    for line in sys.stdin:
        print(json.dumps(measure_on(bus, int(line))), flush=True)
    bus.close()


def process_boundary(pm: ProxyMachine, count: int, rounds: int) -> dict[str, float]:
    """The owner against an attached process, the same reads, in paired rounds that
    alternate which side goes first; each side holds the devices only for its turn."""
    control = serve(pm)
    child = subprocess.Popen([sys.executable, "-m", "harness.tools.bench.roundtrip", control.address],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    owner: list[tuple[float, float]] = []
    attached: list[tuple[float, float]] = []
    try:
        json.loads(child.stdout.readline())
        for r in range(rounds + 1):                     # round 0 warms both up
            for side in (("owner", "attached") if r % 2 else ("attached", "owner")):
                if side == "owner":
                    got = measure_on(pm.bus, count)
                else:
                    child.stdin.write(f"{count}\n")
                    child.stdin.flush()
                    got = tuple(json.loads(child.stdout.readline()))
                if r:
                    (owner if side == "owner" else attached).append(got)
    finally:
        child.stdin.close()
        child.wait(30)
    med = lambda pairs, i: statistics.median(p[i] for p in pairs)  # noqa: E731
    ratios = [o[0] / a[0] for o, a in zip(owner, attached)]
    return {"owner_pio_p50_us": med(owner, 0), "attached_pio_p50_us": med(attached, 0),
            "owner_mmio_p50_us": med(owner, 1), "attached_mmio_p50_us": med(attached, 1),
            "attached_over_owner_pio": med(owner, 0) / med(attached, 0),
            "attached_over_owner_mmio": med(owner, 1) / med(attached, 1),
            "attached_over_owner_pio_spread": max(ratios) / min(ratios)}


def run(accel: str, count: int = 20000, idle_seconds: float = 10.0, quick: bool = False,
        iommu: bool | None = None) -> dict[str, object]:
    if quick:
        count, idle_seconds = 2000, 1.0
    results: dict[str, float] = {}
    spec = proxy_spec(accel=accel, iommu=iommu)
    add_devices(spec)
    with ProxyMachine(spec, name="bench-proxy") as pm:
        accel = pm.machine.accel
        bus = pm.bus
        port = bus.ports(DEBUGCON_PORT, 1)
        nic = bus.open(bus.find(**E1000))
        pio, mmio = measure(port, nic.bar(0), count, budget_s=10)
        log.info("proxy: %d port reads, %d MMIO reads", len(pio), len(mmio))
        results.update(proxy_pio_p50_us=pct(pio, 0.5), proxy_pio_p99_us=pct(pio, 0.99),
                       proxy_mmio_p50_us=pct(mmio, 0.5), proxy_mmio_p99_us=pct(mmio, 0.99))

        ring = pm.abi.PROXY_RING_ENTRIES
        batch = port.channel.prepare([port.access(Kind.READ, 0, 1)] * ring)
        batch.run()
        rounds, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0 or rounds < 2:
            batch.run()
            rounds += 1
        results["batch_ops_per_s"] = rounds * ring / (time.perf_counter() - t0)

        repeats = (100_000 if accel == "tcg" else 2_000) // (10 if quick else 1)
        t0 = time.perf_counter_ns()
        raw.repeat_read(port.channel, port.space, DEBUGCON_PORT, 1, repeats)
        results["native_pio_us"] = (time.perf_counter_ns() - t0) / repeats / 1000
        results["native_call_us"] = pct(latencies_us(port.channel.guest_time, 200, 5), 0.5)
        port.channel.close()
        results.update(tracecost.measure(bus, DEBUGCON_PORT, count // 4, rounds=3 if quick else 5))
        nic.close()
        results.update(process_boundary(pm, count // 4, rounds=2 if quick else 7))

        time.sleep(1.0)                       # let the guest fall asleep
        pid = pm.machine.process.pid
        before, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(idle_seconds)
        results["idle_cpu_percent"] = 100 * (cpu_seconds(pid) - before) / (time.monotonic() - t0)

    qspec = qtest_spec()
    add_devices(qspec)
    with QtestMachine(qspec, name="bench-qtest") as qm:
        qtest_accel = qm.machine.accel
        port = qm.bus.ports(DEBUGCON_PORT, 1)
        nic = qm.bus.open(qm.bus.find(**E1000))
        qpio, qmmio = measure(port, nic.bar(0), min(count, 5000), budget_s=10)
        results.update(qtest_pio_p50_us=pct(qpio, 0.5), qtest_mmio_p50_us=pct(qmmio, 0.5))
    results["qtest_over_proxy_pio"] = results["qtest_pio_p50_us"] / results["proxy_pio_p50_us"]
    results["samples"] = float(len(pio))
    log.debug("mean proxy pio %.2f us", statistics.fmean(pio))
    return {"benchmark": "roundtrip", "accel": {"proxy": accel, "qtest": qtest_accel}, "clock": "host",
            "quick": quick, "results": {k: round(v, 3) for k, v in results.items()}}


if __name__ == "__main__":
    attached_main(sys.argv[1])
