"""``hwharness bench boot``: how fast the Linux guest boots, by phase; restores; eight at once.

Every figure runs from a moment the host sees to another, on the host's monotonic
clock, except the kernel's own start, which is derived: init prints the kernel's
uptime (``/proc/uptime``) as its first line, and under TCG the guest's clock runs
with the host's, so "host time of that line minus the uptime in it" is when the
kernel started. Phases of one boot:

- ``qemu_start``: exec of QEMU to its QMP monitor answering (the machine is built, the CPU runs);
- ``firmware``: from there to the kernel's clock starting (qboot, copying the kernel and
  initramfs in, and the kernel's earliest setup, which runs before its clock does);
- ``kernel_to_first_line``: the kernel's start to the first byte on the console;
- ``first_line_to_init``: to init's first line (zero when ``quiet`` keeps the kernel silent);
- ``init_to_prompt``: init's work (mounts, modules) and the shell's first prompt;
- ``prompt_to_answer``: a command typed at that prompt until its answer came back.

``boot_s`` is exec to answer: the sum. ``qemu_cpu_s`` is the CPU time QEMU had used by
then: on a host shared with other jobs the wall-clock figures stretch with the load
(``host_load_before``), the work done much less. ``init_icount_s`` does not stretch at all
(TCG only): one more boot under ``-icount shift=0``, where the guest's clock advances one
nanosecond per instruction, and the kernel's timestamp on its "Run /init" line, so billions
of guest instructions from the kernel's clock starting to init (to the thousand that the
timestamp resolves): what a cut to the kernel's command line saves, whatever else the host
runs.

``after_idle`` are boots that each start after ``idle_s`` without a QEMU running, as a
person's ``hwharness boot`` or a CI job's first machine does: on a VM whose balloon takes
back free memory (free page reporting), memory faulted in after a few idle seconds costs far
more than memory just freed, which back-to-back boots reuse (see ``no_huge_pages_for_children``
in :mod:`harness.machine.machine`).

Restores (what the ``linux_machine`` fixture does before every test): ``restore_*`` are a
new QEMU restored from a saved boot (:mod:`harness.machine.saved`), from the request to an
answered command, ``restore_running_*`` the part until the machine ran; ``restore_parallelN``
is N restored from one saved boot at once; ``restore_in_place_*`` are ``snapshot-load`` into
a running machine (``Machine.restore``), the way the fixture restored before.
``restore_ahead_wait_*`` is not a restore's cost but what a test waits for when the
machine is restored ahead (:class:`~harness.machine.saved.RestoredAhead`, what the fixture
does): from asking for the machine to having it, its prompt already answered, while each
"test" before it kept its own machine busy with commands for ``restore_ahead_test_ms``.
Phases of a restore (``restore_phases_p50_ms``):

- ``before_exec``: the request to QEMU's exec (the machine's directory, disk overlays);
- ``qemu_start``: exec to QMP answering (QEMU builds the machine, its console connects);
- ``state_load``: the saved device state read in, to the machine running;
- ``first_answer``: a command typed until its answer came back; under TCG mostly the
  translation of every guest instruction the command runs, which a new QEMU has not seen.

``restore_standby_*`` are the same restores with a QEMU standing by
(:meth:`~harness.machine.saved.SavedMachine.stand_by`: started and built before the
request, as Firecracker's process is before its snapshot-load request); their phases
(``restore_standby_phases_p50_ms``): ``connect`` (the request to QMP answering: the console
and QMP connected, and whatever of QEMU's start was still running), ``state_load``,
``stand_up`` (the next QEMU started: its directory, its exec), ``first_answer``. The next
QEMU builds itself while the restored guest answers its first command.

The proxy machine (``proxy_phases_p50_ms``): ``before_exec``; ``windows_and_serial``: exec
until QEMU has taken its ivshmem windows (it waits for each handshake while it builds the
machine) and its console; ``qmp``; ``guest``: QMP answering until the proxy guest says it is
ready (firmware, its PCI scan, the IOMMU) and the bus is attached.

``foreign_cores`` is the CPU other processes used during each part, in cores: on a 2-core
host anything near 1 means every wall-clock figure of that part is stretched.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...errors import MachineError
from ...machine.linux import LinuxImage, linux
from ...machine import Machine
from ...machine.saved import RestoredAhead, SavedMachine, save_booted
from ...proxy import ProxyMachine, proxy_spec
from .paired import ForeignLoad
from .roundtrip import cpu_seconds
from .stats import pct

log = logging.getLogger(__name__)

INIT_LINE = re.compile(r"hwh-linux: init at ([\d.]+) s")
RUN_INIT_LINE = re.compile(r"^\[\s*([\d.]+)\] Run /init as init process", re.M)
PHASES = ("qemu_start", "firmware", "kernel_to_first_line", "first_line_to_init", "init_to_prompt",
          "prompt_to_answer")
RESTORE_PHASES = ("before_exec", "qemu_start", "state_load", "first_answer")
STANDBY_PHASES = ("connect", "state_load", "stand_up", "first_answer")
PROXY_PHASES = ("before_exec", "windows_and_serial", "qmp", "guest")
SNAPSHOT = "bench-ready"


def one_boot(image: LinuxImage, accel: str, workdir: Path, timeout: float = 120.0) -> tuple[Machine, dict[str, float]]:
    """Boot once and time each phase; the machine is returned running (the caller shuts it down)."""
    m = Machine(image.spec(accel=accel), name="bench-boot", artifacts_root=workdir)
    m.launch()
    try:
        qmp_at = m.launch_at["ready"]
        assert m.console is not None
        found = m.console.expect([INIT_LINE], timeout)
        init_at = time.monotonic()
        kernel_at = init_at - float(found.match.group(1))
        first_at = m.console.first_output_at or init_at
        m.console.expect([re.escape(image.prompt)], timeout)
        prompt_at = time.monotonic()
        m.console.run("true", timeout)
        answer_at = time.monotonic()
        assert m.process is not None
        cpu = cpu_seconds(m.process.pid)
    except BaseException:
        m.failed = True
        m.shutdown()
        raise
    exec_at = m.launch_at["exec"]
    phases = {"qemu_start": qmp_at - exec_at, "firmware": kernel_at - qmp_at,
              "kernel_to_first_line": first_at - kernel_at, "first_line_to_init": init_at - first_at,
              "init_to_prompt": prompt_at - init_at, "prompt_to_answer": answer_at - prompt_at,
              "boot": answer_at - exec_at, "qemu_cpu": cpu}
    return m, phases


def init_icount(image: LinuxImage, workdir: Path, timeout: float = 120.0) -> float:
    """The kernel's timestamp on its "Run /init" line in a boot under ``-icount shift=0`` (TCG):
    virtual seconds, one nanosecond per guest instruction."""
    spec = image.spec(accel="tcg", icount_shift=0)
    with Machine(spec, name="bench-icount", artifacts_root=workdir) as m:
        assert m.console is not None
        image.wait_ready(m, timeout)
        log, _ = m.console.run("dmesg", timeout)
    found = RUN_INIT_LINE.search(log)
    if found is None:
        raise MachineError(f"the kernel's log has no line that it runs init: {log[-300:]!r}")
    return float(found.group(1))


def restores_in_place(m: Machine, count: int) -> list[float]:
    """Seconds from each in-place restore (``snapshot-load``) to an answered command, sorted."""
    assert m.console is not None
    m.snapshot(SNAPSHOT)
    out = []
    for i in range(count):
        m.console.run(f"echo {i} > /tmp/state")          # something the restore has to undo
        t0 = time.monotonic()
        m.restore(SNAPSHOT)
        m.console.run("true")
        out.append(time.monotonic() - t0)
    return sorted(out)


def saved_restores(saved: SavedMachine, workdir: Path, count: int, standby: bool = False) -> list[dict[str, float]]:
    """Each restore from the saved machine (a new QEMU) to an answered command, by phase
    (``RESTORE_PHASES``, or ``STANDBY_PHASES`` where a QEMU stood by: ``standby``), seconds,
    and ``total``."""
    out = []
    if standby:
        saved.stand_by(name="bench-restore", artifacts_root=workdir)
    try:
        for i in range(count):
            t0 = time.monotonic()
            m = saved.restore(name="bench-restore", artifacts_root=workdir)
            returned_at = time.monotonic()
            try:
                assert m.console is not None
                m.console.run("true")
                answer_at = time.monotonic()
                at = m.launch_at
                phases = ({"connect": at["qmp"] - t0, "stand_up": returned_at - at["ready"]} if standby else
                          {"before_exec": at["exec"] - t0, "qemu_start": at["qmp"] - at["exec"]})
                out.append({**phases, "state_load": at["ready"] - at["qmp"], "first_answer": answer_at - returned_at,
                            "running": at["ready"] - t0, "total": answer_at - t0})
                m.console.run(f"echo {i} > /tmp/state")      # what the next restore must not see
            except BaseException:
                m.failed = True
                raise
            finally:
                m.shutdown()
    finally:
        saved.stand_down()
    return out


def restores_ahead(saved: SavedMachine, workdir: Path, count: int, test_s: float) -> list[float]:
    """Seconds each of ``count`` "tests" in a row waited for a machine restored ahead (a pool
    of one, prompt answered), each test then running commands on its machine for ``test_s``."""
    waits = []

    def answered(m: Machine) -> None:
        assert m.console is not None
        m.console.run("true")

    with RestoredAhead(saved, answered, name="bench-ahead", artifacts_root=workdir) as ahead:
        for i in range(count):
            t0 = time.monotonic()
            m = ahead.take()
            took = time.monotonic()
            waits.append(took - t0)
            try:
                assert m.console is not None
                while time.monotonic() - took < test_s:
                    m.console.run(f"echo {i} > /tmp/state")
            except BaseException:
                m.failed = True
                raise
            finally:
                m.shutdown()
    return sorted(waits)


def parallel_restores(saved: SavedMachine, workdir: Path, count: int, timeout: float = 120.0) -> float:
    """Seconds from the request until ``count`` machines restored from one saved machine at
    once (:meth:`~harness.machine.saved.SavedMachine.restore_many`) have all answered a
    command, each asked from a thread of its own so that they answer side by side."""
    def answered(m: Machine) -> None:
        assert m.console is not None
        m.console.run("true", timeout)

    t0 = time.monotonic()
    machines = saved.restore_many(count, name="bench-rpar", artifacts_root=workdir)
    try:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(answered, machines))       # raises what a thread raised
        return time.monotonic() - t0
    finally:
        for m in machines:
            m.shutdown()


def parallel(image: LinuxImage, accel: str, workdir: Path, count: int, timeout: float = 300.0) -> float:
    """Seconds from the first QEMU's exec until ``count`` machines booted together all answered.

    Launched one after another from this thread (QEMU dies with the thread that started it),
    then waited for together: they boot side by side on however many cores there are.
    """
    machines: list[Machine] = []
    try:
        t0 = time.monotonic()
        for i in range(count):
            m = Machine(image.spec(accel=accel), name=f"bench-par{i}", artifacts_root=workdir)
            machines.append(m)
            m.launch()
        for m in machines:
            image.wait_ready(m, timeout)
        return time.monotonic() - t0
    finally:
        for m in machines:
            m.shutdown()


def proxy_boots(accel: str, count: int, iommu: bool | None = None) -> list[dict[str, float]]:
    """Each proxy machine from its creation to its bus being ready, by phase (``PROXY_PHASES``,
    seconds) and ``total``."""
    out = []
    for _ in range(count):
        t0 = time.monotonic()
        with ProxyMachine(proxy_spec(accel=accel, iommu=iommu), name="bench-proxy") as pm:
            ready_at = time.monotonic()
            at = pm.machine.launch_at
            out.append({"before_exec": at["exec"] - t0, "windows_and_serial": at["serial"] - at["exec"],
                        "qmp": at["qmp"] - at["serial"], "guest": ready_at - at["qmp"], "total": ready_at - t0})
    return out


def p50_ms(rows: list[dict[str, float]], phases: tuple[str, ...]) -> dict[str, float]:
    return {p: round(statistics.median(r[p] for r in rows) * 1e3, 1) for p in phases}


def boots_after_idle(image: LinuxImage, accel: str, workdir: Path, count: int, idle_s: float) -> list[dict[str, float]]:
    """``count`` boots, each after ``idle_s`` with no QEMU of ours running; their phases."""
    out = []
    for _ in range(count):
        time.sleep(idle_s)
        m, phases = one_boot(image, accel, workdir)
        m.shutdown()
        out.append(phases)
    return out


def run(accel: str = "auto", count: int = 10, restore_count: int = 20, parallel_count: int = 8,
        iommu: bool | None = None, ahead_test_s: float = 0.2, idle_count: int = 3,
        idle_s: float = 5.0) -> dict[str, Any]:
    """Boot the Linux guest ``count`` times and measure the rest; the figures as a dict for JSON."""
    image = linux()
    boots: list[dict[str, float]] = []
    load_before = os.getloadavg()
    foreign = ForeignLoad([os.getpid()])       # the QEMUs are this process's reaped children
    foreign_cores: dict[str, float] = {}
    # Each machine removes its own directory unless it failed; a failed one's stays for reading.
    workdir = Path(tempfile.gettempdir())
    resolved = accel
    in_place_s: list[float] = []
    for i in range(count):
        m, phases = one_boot(image, accel, workdir)
        resolved = m.accel
        try:
            if i == count - 1:
                in_place_s = restores_in_place(m, restore_count)
        except BaseException:
            m.failed = True
            raise
        finally:
            m.shutdown()
        boots.append(phases)
        log.info("boot %d: %.2f s", i, phases["boot"])
    foreign_cores["boots"] = foreign.since_last()
    idle_boots = boots_after_idle(image, accel, workdir, idle_count, idle_s)
    foreign_cores["boots_after_idle"] = foreign.since_last()
    init_icount_s = init_icount(image, workdir) if resolved == "tcg" else None
    foreign.since_last()
    with save_booted(image.spec(accel=accel), image.wait_ready, name="bench-saved",
                     artifacts_root=workdir) as saved:
        foreign.since_last()
        restores = saved_restores(saved, workdir, restore_count)
        foreign_cores["restores"] = foreign.since_last()
        standby = saved_restores(saved, workdir, restore_count, standby=True)
        foreign_cores["restores_standby"] = foreign.since_last()
        ahead_waits = restores_ahead(saved, workdir, restore_count, ahead_test_s)
        foreign_cores["restores_ahead"] = foreign.since_last()
        parallel_restore_s = parallel_restores(saved, workdir, parallel_count)
        foreign_cores["restores_parallel"] = foreign.since_last()
    foreign.since_last()
    parallel_s = parallel(image, accel, workdir, parallel_count)
    foreign_cores["boots_parallel"] = foreign.since_last()
    proxies = proxy_boots(accel, count, iommu)
    foreign_cores["proxy"] = foreign.since_last()
    total = sorted(b["boot"] for b in boots)
    restore_s = sorted(r["total"] for r in restores)
    standby_s = sorted(r["total"] for r in standby)
    return {
        "bench": "boot",
        "accel": resolved,
        "kernel": image.release,
        "packages": image.packages,
        "memory_mb": 256,
        "count": count,
        "boot_p50_s": pct(total, 0.5),
        "boot_p99_s": pct(total, 0.99),
        "phases_p50_s": {p: statistics.median(b[p] for b in boots) for p in PHASES},
        "qemu_cpu_p50_s": statistics.median(b["qemu_cpu"] for b in boots),
        "init_icount_s": init_icount_s,
        "after_idle": {"idle_s": idle_s, "count": idle_count,
                       "boot_p50_s": statistics.median(b["boot"] for b in idle_boots),
                       "qemu_start_p50_s": statistics.median(b["qemu_start"] for b in idle_boots),
                       "qemu_cpu_p50_s": statistics.median(b["qemu_cpu"] for b in idle_boots)},
        "boots_s": boots,
        "restore_count": restore_count,
        "restore_p50_ms": pct(restore_s, 0.5) * 1e3,
        "restore_p99_ms": pct(restore_s, 0.99) * 1e3,
        "restore_running_p50_ms": pct(sorted(r["running"] for r in restores), 0.5) * 1e3,
        "restore_phases_p50_ms": p50_ms(restores, RESTORE_PHASES),
        "restore_standby_p50_ms": pct(standby_s, 0.5) * 1e3,
        "restore_standby_p99_ms": pct(standby_s, 0.99) * 1e3,
        "restore_standby_phases_p50_ms": p50_ms(standby, STANDBY_PHASES),
        "restore_ahead_wait_p50_ms": pct(ahead_waits, 0.5) * 1e3,
        "restore_ahead_wait_p99_ms": pct(ahead_waits, 0.99) * 1e3,
        "restore_ahead_test_ms": ahead_test_s * 1e3,
        "restore_in_place_p50_ms": pct(in_place_s, 0.5) * 1e3,
        "restore_in_place_p99_ms": pct(in_place_s, 0.99) * 1e3,
        "parallel_count": parallel_count,
        f"parallel{parallel_count}_s": parallel_s,
        f"restore_parallel{parallel_count}_s": parallel_restore_s,
        "proxy_boot_p50_ms": pct(sorted(p["total"] for p in proxies), 0.5) * 1e3,
        "proxy_phases_p50_ms": p50_ms(proxies, PROXY_PHASES),
        "foreign_cores": {k: round(v, 2) for k, v in foreign_cores.items()},
        "host_load_before": load_before,
        "host_cpus": os.cpu_count(),
    }
