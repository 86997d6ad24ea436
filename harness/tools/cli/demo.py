"""``hwharness demo``: the proxy guest with one of each device, each driven from Python.

The demo is a list of steps (``STEPS``). A step does one thing on the machine and returns
a :class:`Check`: what it saw, a printed line each, and what of it is not what should
happen. The demo runs the steps in order, prints each, and fails (exit 1) naming every
check that did not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import drivers.edu as edu
from drivers.ahci import Ahci
from drivers.ahci.driver import DEVICE as AHCI_DEVICE, VENDOR as AHCI_VENDOR
from drivers.e1000.driver import DEVICE as E1000_DEVICE, VENDOR as E1000_VENDOR
from drivers.nvme import Nvme
from drivers.ps2 import open_i8042
from ...access import Batch
from ...devices.fat import DriverFatFS
from ...errors import DmaFault, HarnessError
from ...machine import Machine, RuntimeFile, random_mac
from ...machine.accel import why_linux_does_not_boot
from ...machine.input import move_mouse
from ...machine.linux import linux
from ...processes.supervisor import Supervisor
from ...proxy import ProxyMachine, proxy_spec, raw
from ...services.bridge import BridgeService, bridge_spec
from ...services.nbd import NbdClient
from ..bench import forward, latency
from ..bench.restart import disk_listener
from ..bench.serve import KillPlan, linux_through_kills
from ..bench.stats import latencies_us, pct
from .common import CheckFailed, device_table, iommu_of, say
from .keyboard import escape_controls, type_and_decode
from .net import ping_report
from .parport import add_printer, send_to_printer

DEBUGCON_PORT = 0xE9


@dataclass
class DemoMachine:
    """The booted machine, and what the steps check it against."""
    pm: ProxyMachine
    mac: str                    # the e1000's MAC address, as QEMU's command line gave it
    debugcon: RuntimeFile       # what the isa-debugcon at DEBUGCON_PORT wrote
    printer: RuntimeFile        # what the parallel port's printer received


@dataclass
class Check:
    """What a step saw (a line each) and what of it did not hold, each named for the failure."""
    saw: list[str]
    failed: tuple[str, ...] = ()


def unless(holds: bool, what: str) -> tuple[str, ...]:
    """``what`` as a failed check, unless it holds."""
    return () if holds else (what,)


@dataclass(frozen=True)
class Step:
    title: str | None                   # the heading printed before it; None: under the one before
    run: Callable[[DemoMachine], Check]


def cmd_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hwharness-demo-") as scratch:
        return demo(args.accel, make_demo_image(Path(scratch)), iommu_of(args))


def make_demo_image(directory: Path) -> Path:
    """A 16 MiB FAT16 image made by mkfs.fat and filled by mtools, as a user's own would be."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/sbin", "/usr/sbin"])
    for tool, package in (("mkfs.fat", "dosfstools"), ("mcopy", "mtools"), ("mmd", "mtools")):
        if shutil.which(tool, path=search) is None:
            raise HarnessError(f"{tool} is not installed, and the demo makes its disk with it: "
                               f"apt-get install {package}")
    image, hello, readme = directory / "demo.img", directory / "hello.txt", directory / "readme.txt"
    hello.write_text("Hello from a FAT filesystem made by mkfs.fat\n")
    readme.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(200)))
    env = dict(os.environ, PATH=search)
    for command in (["mkfs.fat", "-C", "-F", "16", "-n", "HWHARNESS", str(image), "16384"],
                    ["mcopy", "-i", str(image), str(hello), "::/"], ["mmd", "-i", str(image), "::/docs"],
                    ["mcopy", "-i", str(image), str(readme), "::/docs/"]):
        subprocess.run(command, check=True, capture_output=True, env=env)
    return image


def demo(accel: str, image: Path, iommu: bool | None = None) -> int:
    mac = random_mac()
    spec = proxy_spec(accel=accel, iommu=iommu)
    spec.netdev("user", "net0")   # the guest only ever talks to the user network's own gateway
    spec.device("e1000", netdev="net0", mac=mac, mitigation=False)
    debugcon = spec.chardev_file("debugcon")
    spec.device("isa-debugcon", iobase=DEBUGCON_PORT, chardev="debugcon")
    printer = add_printer(spec)
    spec.drive(file=str(image), format="raw", id="disk0", snapshot=True, **{"if": "none"})
    spec.device("ide-hd", drive="disk0", bus="ide.0")
    spec.nvme([{"file": str(image), "format": "raw", "snapshot": True}])
    spec.device("edu", dma_mask=0xFFFFFFFF)         # a DMA engine, to show what a device may not reach
    t0 = time.monotonic()
    failed: list[str] = []
    with ProxyMachine(spec, name="demo") as pm:
        say(f"== booted the proxy guest under {pm.machine.accel} in {time.monotonic() - t0:.2f} s "
            f"(guest TSC {pm.bus.tsc_hz / 1e6:.0f} MHz)")
        device_table(pm)
        dm = DemoMachine(pm, mac, debugcon, printer)
        for step in STEPS:
            if step.title:
                say(f"\n== {step.title}")
            check = step.run(dm)
            for line in check.saw:
                say(line)
            failed += check.failed
    if failed:
        raise CheckFailed(f"the demo's checks failed for {', '.join(failed)}")
    return 0


# ---- the steps ----

def read_mac(dm: DemoMachine) -> Check:
    with dm.pm.bus.open(dm.pm.bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE)) as nic:
        ral, rah = nic.bar(0).read32(0x5400), nic.bar(0).read32(0x5404)
    read = ":".join(f"{b:02x}" for b in struct.pack("<IH", ral, rah & 0xFFFF))
    return Check([f"RAL0={ral:#010x} RAH0={rah:#010x} -> {read} (command line said {dm.mac}: "
                  f"{'match' if read == dm.mac else 'MISMATCH'})"], unless(read == dm.mac, "the e1000's MAC address"))


def refused_dma(dm: DemoMachine) -> Check:
    """Program the edu device to copy 64 bytes over the proxy's device table, and show
    what the IOMMU made of it."""
    if not dm.pm.bus.iommu:
        return Check(["the IOMMU is off (--no-iommu): the write would land; skipped"])
    table = dm.pm.bus.window_phys + dm.pm.abi.offsetof("proxy_shared", "devices")
    with dm.pm.bus.open(dm.pm.bus.find(vendor=edu.VENDOR, device=edu.DEVICE)) as dev:
        dev.enable_dma()
        before = guest_memory(dm.pm, table, 64)
        edu.dma(dev, edu.BUFFER, table, 64, to_ram=True)
        try:
            dev.bar(0).read32(edu.IDENTIFICATION)
        except DmaFault as exc:
            saw, refused = [f"refused by the IOMMU; the driver's next request raised DmaFault: {exc.fault}"], True
        else:
            saw, refused = ["NOT refused"], False
        unchanged = guest_memory(dm.pm, table, 64) == before
    saw.append(f"the device table is {'unchanged' if unchanged else 'CHANGED'}")
    return Check(saw, unless(refused, "a DMA outside the device's domain")
                 + unless(unchanged, "the proxy's device table"))


def guest_memory(pm: ProxyMachine, address: int, size: int) -> bytes:
    """Guest memory as QEMU holds it (QMP pmemsave), not as the proxy's window shows it."""
    assert pm.machine.workdir is not None
    out = pm.machine.workdir / "pmemsave.bin"
    pm.machine.qmp("pmemsave", val=address, size=size, filename=str(out))
    return out.read_bytes()


def debugcon_line(dm: DemoMachine) -> Check:
    port = dm.pm.bus.ports(DEBUGCON_PORT, 1)
    for byte in b"hello from a Python driver\n":
        port.write8(0, byte)
    port.channel.close()
    dm.pm.machine.qmp("query-status")            # a QMP round trip: QEMU has written the chardev
    return Check([f"debugcon file now holds: {dm.pm.machine.path(dm.debugcon).read_bytes()!r}"])


def cmos_clock(dm: DemoMachine) -> Check:
    """The RTC's time, read in one batch: wait out an update, then hours, minutes, seconds."""
    cmos = dm.pm.bus.ports(0x70, 2)
    batch = Batch(cmos.channel)
    batch.write(cmos, 0, 1, 0x0A)
    batch.poll(cmos, 1, 1, 0x80, 0, timeout=1.0)
    regs = {}
    for name, reg in (("h", 4), ("m", 2), ("s", 0)):
        batch.write(cmos, 0, 1, reg)
        regs[name] = batch.read(cmos, 1, 1)
    batch.run()
    cmos.channel.close()
    h, m, s = (bcd(batch.results[regs[k]]) for k in "hms")
    return Check([f"CMOS RTC {h:02d}:{m:02d}:{s:02d} in one batch of {len(batch.accesses)} accesses; "
                  f"host clock says {datetime.datetime.utcnow():%H:%M:%S} UTC"])


def bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def round_trip(dm: DemoMachine) -> Check:
    port = dm.pm.bus.ports(DEBUGCON_PORT, 1)
    lat = latencies_us(lambda: port.read8(0), 5000, budget_s=3)
    repeats = 100_000 if dm.pm.machine.accel == "tcg" else 1000
    t0_ns = time.perf_counter_ns()
    raw.repeat_read(port.channel, port.space, DEBUGCON_PORT, 1, repeats)
    native_us = (time.perf_counter_ns() - t0_ns) / repeats / 1000
    port.channel.close()
    return Check([f"{len(lat)} reads: p50 {pct(lat, .5):.2f} us, p99 {pct(lat, .99):.2f} us; the guest's own inb "
                  f"costs {native_us:.3f} us (a loop of them in the guest, timed on the host)",
                  "(`make bench` compares against the qtest transport and writes JSON)"])


def interrupt_latency(dm: DemoMachine) -> Check:
    saw = []
    for mode in ("spin", "sleep"):
        r = latency.summary(latency.measure(dm.pm, 1000, mode))
        saw.append(f"{mode:5} mode: end to end p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us; "
                   f"trigger -> guest handler p50 {r['guest_entry_p50_us']:.2f} us; "
                   f"user-level overhead {r['end_to_end_over_guest_entry']:.1f}x")
    return Check(saw + ["(`hwharness latency --plot PNG` for the full picture)"])


def keyboard_and_mouse(dm: DemoMachine) -> Check:
    """A sentence typed and a mouse moved through QMP, as the Python PS/2 drivers decode them."""
    controller, keyboard, mouse = open_i8042(dm.pm.bus)
    sentence = "The quick brown fox jumps over the lazy dog: 1234567890!"
    decoded = type_and_decode(dm.pm, keyboard, list(sentence), idle=0.5)
    move_mouse(dm.pm.machine, dx=40, dy=-25, buttons=["left"], wheel=3)
    events = list(mouse.events(0.5))
    controller.ports.channel.close()
    return Check([f"typed:   {sentence}",
                  f"decoded: {escape_controls(decoded)} ({'match' if decoded == sentence else 'MISMATCH'})",
                  f"mouse: {len(events)} packets, dx {sum(e.dx for e in events)}, dy {sum(e.dy for e in events)}, "
                  f"wheel {sum(e.wheel for e in events)}, left pressed: {any(e.left for e in events)} "
                  f"(injected 40, -25, 3, yes; IntelliMouse id {mouse.device_id})"],
                 unless(decoded == sentence, "the typed sentence"))


def printed_page(dm: DemoMachine) -> Check:
    page = b"hwharness test page\n" + bytes(range(32, 127)) + b"\n"
    received, acks = send_to_printer(dm.pm, dm.printer, page)
    return Check([f"sent {len(page)} bytes, the printer chardev got {len(received)} "
                  f"({'identical' if received == page else 'DIFFERENT'}), {acks} ACK interrupts"],
                 unless(received == page, "the printed page"))


def ping(dm: DemoMachine) -> Check:
    return Check(list(ping_report(dm.pm, 3)))


def ahci_disk(dm: DemoMachine) -> Check:
    hba = Ahci.open(dm.pm.bus)
    disk = hba.disks()[0]
    identity = disk.identify()
    saw = [f"port {disk.index}: {identity.model}, serial {identity.serial}, firmware {identity.firmware}, "
           f"{identity.sectors * 512 // (1 << 20)} MiB, NCQ depth {identity.queue_depth}"]
    fat = DriverFatFS(disk, read_only=True)
    saw += root_listing(fat)
    saw.append(f"  /hello.txt: {fat.readbytes('/hello.txt').decode().strip()!r}")
    fat.close()
    hba.close()
    return Check(saw)


def nvme_disk(dm: DemoMachine) -> Check:
    nvme = Nvme.open(dm.pm.bus)
    ns = nvme.namespaces()[0]
    ident = ns.identify()
    saw = [f"namespace {ns.nsid}: {ident.model}, serial {ident.serial}, firmware {ident.firmware}, "
           f"{ns.size // (1 << 20)} MiB in {ns.sector_size}-byte blocks, {len(nvme.queues)} I/O queue pair(s), "
           f"largest transfer {nvme.identity.max_transfer // 1024} KiB"]
    fat = DriverFatFS(ns, read_only=True)
    saw += root_listing(fat)
    fat.close()
    nvme.close()
    return Check(saw)


def root_listing(fat: DriverFatFS) -> list[str]:
    return [f"  {'<DIR>' if entry.is_dir else entry.size:>8}  {entry.name}"
            for entry in fat.scandir("/", namespaces=["details"])]


def supervised_disk(dm: DemoMachine) -> Check:
    """The disk served by a supervised driver process to a client here; the driver killed
    between two reads; the client's second read waits for the restarted one."""
    listener, address = disk_listener()
    with listener, Supervisor(dm.pm) as sup:
        driver = sup.run("harness.services.disk:disk_driver", dm.pm.bus.find(vendor=AHCI_VENDOR, device=AHCI_DEVICE),
                         sockets={"listener": listener})
        driver.wait_serving(60)
        saw = [f"driver process {driver.pid} serves the disk from driver slot {driver.slot}"]
        with NbdClient(address) as client:
            before = client.read(0, 1)
            victim = driver.pid
            os.kill(victim, signal.SIGKILL)
            after = client.read(0, 1)           # sent to a dead driver, answered by the next one
            driver.wait_serving(60, after=1)
            restart = driver.restarts[0]
            saw += [f"killed process {victim}; process {driver.pid} serves again, {restart.ms:.0f} ms after it "
                    f"was {restart.cause}",
                    f"the client reconnected {client.reconnects} time(s) and read sector 0 again: "
                    f"{'the same' if after == before else 'DIFFERENT'} (boot signature {after[510:512].hex()})"]
    return Check(saw, unless(after == before and after[510:512] == b"\x55\xaa", "the supervised disk"))


def linux_online(dm: DemoMachine) -> Check:
    """A Linux machine whose only network is the Python bridge (``hwharness serve net``'s):
    a lease, a file from a host HTTP server on loopback through 10.0.2.2, and the bridge
    SIGKILLed once during the download."""
    accel = dm.pm.machine.accel
    why_not = why_linux_does_not_boot(accel)
    if why_not:
        return Check([f"skipped: {why_not}; the Linux guest takes minutes to boot here (see the README)"])
    guest, size = linux(), 16 << 20
    with tempfile.TemporaryDirectory(prefix="hwh-wire-") as workdir, \
            forward.http_files({"demo.bin": size}) as (port, sums), contextlib.ExitStack() as stack:
        wire = f"unix:{workdir}/wire"       # a Unix socket's path is short: not under the machine's workdir
        pm = stack.enter_context(ProxyMachine(bridge_spec(proxy_spec(accel=accel, iommu=dm.pm.bus.iommu), wire),
                                              name="demo-bridge"))
        service = stack.enter_context(BridgeService(pm, wire))
        service.driver.wait_serving(60)
        first = service.pid
        m = stack.enter_context(Machine(guest.spec(accel=accel, net=wire), name="demo-online"))
        guest.wait_ready(m)
        address = guest.dhcp(m)
        got = forward.download_through_kills(service, m, port, "demo.bin", size, [signal.SIGKILL])
        restart = got.restarts[0]
        saw = [f"bridge driver pid {first} forwards between the user network and {wire}",
               f"Linux on the wire: udhcpc leased {address} through it",
               f"wget http://10.0.2.2:{port}/demo.bin ({size >> 20} MiB); the bridge killed half way: "
               f"{restart['cause']}, pid {service.pid} forwarding {restart['ms']:.0f} ms after the kill",
               f"the download completed, sha256 {'right' if got.sha256 == sums['demo.bin'] else 'WRONG'}; "
               f"the longest stall it saw: {got.longest_stall_ms:.0f} ms",
               "counters: " + ", ".join(f"{k} {v}" for k, v in service.counters().items() if v)]
    return Check(saw, unless(got.sha256 == sums["demo.bin"], "the download through the killed bridge"))


def linux_on_served_root(dm: DemoMachine) -> Check:
    """``serve disk`` then ``boot --root``: Linux whose root filesystem is the AHCI driver's NBD
    export (another proxy machine, the root image of `make images`); the driver SIGKILLed once
    while Linux writes; the file's sha256 after a power-off and a reboot, and fsck."""
    accel = dm.pm.machine.accel
    why_not = why_linux_does_not_boot(accel)
    if why_not:
        return Check([f"skipped: {why_not}; the README lists this case as unsupported"])
    plan = KillPlan(files=2, file_kib=4096, batch=1, kill_after=(1,))
    report, fsck, elapsed = linux_through_kills(accel, plan, random.Random(), name="demo-root")
    restart = report.restarts[0]
    saw = [report.lines[0], f"Linux booted with root=/dev/vda on that export, wrote /data/f1 and /data/f2 "
           f"({plan.file_kib // 1024} MiB each, sync after each)",
           report.lines[1] if len(report.lines) > 1 else "the driver was not restarted",
           f"  Linux's requests stalled {restart['stall_ms']:.0f} ms; its kernel log has "
           f"{len(report.io_errors)} I/O errors",
           *(f"after a power-off and reboot: {name} sha256 {report.read_back.get(name, 'missing')[:16]}... "
             f"{'as written' if report.read_back.get(name) == digest else 'NOT AS WRITTEN'}"
             for name, digest in sorted(report.written.items())),
           f"fsck.ext4 -fn on the image: {'clean' if fsck is None else fsck.strip().splitlines()[-1]} "
           f"({elapsed:.1f} s in all)"]
    return Check(saw, unless(not report.problems() and fsck is None, "Linux on a served root"))


def crash_report(dm: DemoMachine) -> Check:
    saw = []
    try:
        dm.pm.admin.crash("INVALID_OPCODE")
    except HarnessError as crash:           # GuestCrash, with what the guest's CPU saw
        saw.append(str(crash))
    return Check(saw)


STEPS = [
    Step("e1000: receive address registers read through MMIO", read_mac),
    Step("DMA confinement: a device told to write into the proxy's device table", refused_dma),
    Step("port I/O: a line to the isa-debugcon at 0xe9, and the CMOS clock", debugcon_line),
    Step(None, cmos_clock),
    Step("round-trip latency (proxied inb of the debugcon port)", round_trip),
    Step("interrupt latency: e1000 ICS -> proxy handler -> Python (1000 interrupts each)", interrupt_latency),
    Step("PS/2: a sentence typed through QMP, decoded by the Python keyboard driver", keyboard_and_mouse),
    Step("parallel port: a short file printed through the Python driver", printed_page),
    Step("e1000: DHCP, ARP and ICMP through QEMU's user-mode network, by the Python driver", ping),
    Step("AHCI: the disk identified and its FAT filesystem listed through the Python driver", ahci_disk),
    Step("NVMe: the namespace identified and its FAT filesystem listed through the Python driver", nvme_disk),
    Step("the AHCI driver in a process of its own: killed with SIGKILL, and back", supervised_disk),
    Step("a Linux machine online through the Python bridge, the bridge killed during a download", linux_online),
    Step("a guest CPU exception becomes a readable crash report", crash_report),
    Step("Linux with its root on the AHCI driver's NBD export; the driver killed while Linux writes",
         linux_on_served_root),
]
