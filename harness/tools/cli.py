"""``hwharness``: boot the proxy, run the demo, run benchmarks.

What a person reads goes to stdout through ``say``; everything else is
logging (``-v`` shows it). A command that fails says so in one line on
stderr, ``hwharness: error: ...``, and exits 2 when the input was unusable
(:class:`~harness.errors.BadInput`, checked before any machine boots where
it can be), 1 when a check or a device failed; ``--debug`` or
``HWHARNESS_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import closing
from pathlib import Path

from .. import tracing
from ..access import Batch, IrqMode
from .bench.stats import latencies_us, pct
from ..errors import DmaFault, BadInput, HarnessError
from ..machine.input import move_mouse, type_keys, untypeable
from drivers.ps2 import open_i8042
from ..machine import Option, RuntimeFile, random_mac
from ..proxy import ProxyMachine, proxy_spec
from ..proxy.machine import IOMMU_ENV
from ..proxy import raw
from ..processes import serve

log = logging.getLogger("hwharness")

E1000 = dict(vendor=0x8086, device=0x100E)
DEBUGCON_PORT = 0xE9


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class CheckFailed(HarnessError):
    """A command's own check failed (the bytes received differ from those sent, say): exit 1."""


# ---- input, checked before a machine boots ----

def readable_file(path: str, what: str) -> Path:
    """``path`` if it names a regular file this process can read; BadInput naming it otherwise."""
    file = Path(path)
    if not file.exists():
        raise BadInput(f"{what} {path}: no such file")
    if file.is_dir():
        raise BadInput(f"{what} {path}: is a directory, not a file")
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise BadInput(f"{what} {path}: cannot be read ({exc.strerror})") from exc
    return file


def disk_image(path: str) -> Path:
    """A readable, non-empty image file (QEMU would attach an empty one as a disk of no sectors)."""
    image = readable_file(path, "image")
    if image.stat().st_size == 0:
        raise BadInput(f"image {path}: is empty (0 bytes); a disk image holds at least one 512-byte sector")
    return image


def writable_output(path: str, option: str) -> None:
    """Refuse an output path that cannot be written, before the work that would fill it."""
    target = Path(path)
    if target.is_dir():
        raise BadInput(f"{option} {path}: is a directory; give a file name")
    parent = target.resolve().parent
    while not parent.exists():                      # write_json makes the missing directories
        parent = parent.parent
    try:                                            # the only sure test (root, read-only mounts, /proc)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise BadInput(f"{option} {path}: cannot write in {parent} ({exc.strerror})") from exc


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path a command was given (--json, --plot, --pcap, --trace) can be written."""
    for option in ("json", "plot", "pcap", "trace"):
        if getattr(args, option, None):
            writable_output(getattr(args, option), f"--{option}")


def typeable_text(text: str) -> str:
    """``text`` if every character has a key on the US layout; BadInput listing the ones that do not."""
    missing = untypeable(text)
    if missing:
        listed = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing)
        raise BadInput(f"--type: no key on the US keyboard layout for {listed}; ASCII letters, digits, "
                       f"punctuation, space, tab, newline and backspace can be typed")
    if not text:
        raise BadInput("--type: no text to type")
    return text


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text!r}")
    return value


def device_table(pm: ProxyMachine) -> None:
    say(f"{'BDF':8} {'ID':10} {'class':7} BARs")
    for f in pm.bus.functions:
        bars = ", ".join(f"{b.index}:{'io' if b.is_io else 'mem'} {b.base:#x}+{b.size:#x}" for b in f.bars)
        say(f"{f.bdf:8} {f.vendor:04x}:{f.device:04x}  {f.class_code:02x}{f.subclass:02x}{f.prog_if:02x}  {bars}")


def console_machine(args: argparse.Namespace, name: str):  # type: ignore[no-untyped-def]
    """A machine for ``boot``/``run``: ``--kernel``/``--initrd``/``--append``, or the Linux guest
    ``make images`` built; with the regex its shell prompt matches."""
    import re
    from ..machine.linux import linux
    from ..machine import Machine, MachineSpec
    if args.kernel:
        readable_file(args.kernel, "--kernel")
        if args.initrd:
            readable_file(args.initrd, "--initrd")
        spec = MachineSpec(kernel=Path(args.kernel), initrd=Path(args.initrd) if args.initrd else None,
                           append=args.append or "console=ttyS0", memory_mb=args.memory, accel=args.accel)
        return Machine(spec, name=name), args.prompt
    image = linux()
    spec = image.spec(accel=args.accel, memory_mb=args.memory, append=args.append or "")
    return Machine(spec, name=name), re.escape(image.prompt)


def cmd_console(args: argparse.Namespace) -> int:
    machine, _ = console_machine(args, "boot")
    with machine as m:
        say(f"serial console of {m.spec.kernel} under {m.accel}; Ctrl-] leaves (files in {m.workdir})")
        m.console.interact()
    say("")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    words = args.guest_command[1:] if args.guest_command[:1] == ["--"] else args.guest_command
    command = " ".join(words)
    if not command:
        raise BadInput("nothing to run: hwharness run [--kernel K ...] -- COMMAND")
    machine, prompt = console_machine(args, "run")
    with machine as m:
        m.console.expect([prompt], args.timeout)
        output, status = m.console.run(command, timeout=args.timeout)
    sys.stdout.write(output + ("\n" if output else ""))
    return status


def cmd_boot(args: argparse.Namespace) -> int:
    if not (args.proxy or args.serve):
        return cmd_console(args)
    spec = proxy_spec(accel=args.accel)
    spec.netdev("user", "net0", restrict=True)
    spec.device("e1000", netdev="net0", mac=random_mac())
    with ProxyMachine(spec, name="boot", keep_artifacts=True) as pm:
        say(f"proxy guest up under {pm.machine.accel}; QMP on the abstract socket "
            f"@{pm.machine.endpoints.qmp.lstrip(chr(0))}; files in {pm.machine.workdir}")
        device_table(pm)
        if args.serve:
            control = serve(pm)
            say(f"{len(pm.admin.slots)} driver slots; from another process: "
                f"bus = harness.attach({control.address!r})")
        say("Ctrl-C to stop.")
        try:
            signal.pause()
        except KeyboardInterrupt:
            say("stopping")
    return 0


def _bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


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


def cmd_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hwharness-demo-") as scratch:
        return demo(args.accel, make_demo_image(Path(scratch)))


def demo_refused_dma(pm: ProxyMachine, failed: list[str]) -> None:
    """Program the edu device to copy 64 bytes over the proxy's device table, and show
    what the IOMMU made of it."""
    import drivers.edu as edu
    table = pm.bus.window.field("window_phys") + pm.abi.offsetof("proxy_shared", "devices")
    if not pm.bus.iommu:
        say("the IOMMU is off (--no-iommu): the write would land; skipped")
        return
    with pm.bus.open(pm.bus.find(vendor=edu.VENDOR, device=edu.DEVICE)) as dev:
        dev.enable_dma()
        before = bytes(pm.bus.window.mem[table - pm.bus.window.field("window_phys"):][:64])
        edu.dma(dev, edu.BUFFER, table, 64, to_ram=True)
        try:
            dev.bar(0).read32(edu.IDENTIFICATION)
        except DmaFault as exc:
            say(f"refused by the IOMMU; the driver's next request raised DmaFault: {exc.fault}")
        else:
            failed.append("a DMA outside the device's domain")
            say("NOT refused")
        after = bytes(pm.bus.window.mem[table - pm.bus.window.field("window_phys"):][:64])
        say(f"the device table is {'unchanged' if after == before else 'CHANGED'}")
        if after != before:
            failed.append("the proxy's device table")


def demo(accel: str, image: Path) -> int:
    failed: list[str] = []                      # the demo's own checks that did not hold
    mac = random_mac()
    spec = proxy_spec(accel=accel)
    spec.netdev("user", "net0")   # the guest only ever talks to the user network's own gateway
    spec.device("e1000", netdev="net0", mac=mac, mitigation=False)
    debugcon = spec.chardev_file("debugcon")
    spec.device("isa-debugcon", iobase=DEBUGCON_PORT, chardev="debugcon")
    printer = spec.chardev_file("printer")
    spec.device("isa-parallel", chardev="printer", iobase=0x378, irq=7)
    spec.drive(file=str(image), format="raw", id="disk0", snapshot=True, **{"if": "none"})
    spec.device("ide-hd", drive="disk0", bus="ide.0")
    spec.nvme([{"file": str(image), "format": "raw", "snapshot": True}])
    spec.device("edu", dma_mask=0xFFFFFFFF)         # a DMA engine, to show what a device may not reach
    t0 = time.monotonic()
    with ProxyMachine(spec, name="demo") as pm:
        say(f"== booted the proxy guest under {pm.machine.accel} in {time.monotonic() - t0:.2f} s "
            f"(guest TSC {pm.bus.tsc_hz / 1e6:.0f} MHz)")
        device_table(pm)

        say("\n== e1000: receive address registers read through MMIO")
        with pm.bus.open(pm.bus.find(**E1000)) as nic:
            ral, rah = nic.bar(0).read32(0x5400), nic.bar(0).read32(0x5404)
            read_mac = ":".join(f"{b:02x}" for b in struct.pack("<IH", ral, rah & 0xFFFF))
            say(f"RAL0={ral:#010x} RAH0={rah:#010x} -> {read_mac} (command line said {mac}: "
                f"{'match' if read_mac == mac else 'MISMATCH'})")
            if read_mac != mac:
                failed.append("the e1000's MAC address")

        say("\n== DMA confinement: a device told to write into the proxy's device table")
        demo_refused_dma(pm, failed)

        say("\n== port I/O: a line to the isa-debugcon at 0xe9, and the CMOS clock")
        port = pm.bus.ports(DEBUGCON_PORT, 1)
        for byte in b"hello from a Python driver\n":
            port.write8(0, byte)
        port.channel.close()
        pm.machine.qmp("query-status")
        say(f"debugcon file now holds: {pm.machine.path(debugcon).read_bytes()!r}")
        cmos = pm.bus.ports(0x70, 2)
        batch = Batch(cmos.channel)
        batch.write(cmos, 0, 1, 0x0A)
        batch.poll(cmos, 1, 1, 0x80, 0, timeout=1.0)
        regs = {}
        for name, reg in (("h", 4), ("m", 2), ("s", 0)):
            batch.write(cmos, 0, 1, reg)
            regs[name] = batch.read(cmos, 1, 1)
        batch.run()
        cmos.channel.close()
        h, m, s = (_bcd(batch.results[regs[k]]) for k in "hms")
        say(f"CMOS RTC {h:02d}:{m:02d}:{s:02d} in one batch of {len(batch.accesses)} accesses; "
            f"host clock says {datetime.datetime.utcnow():%H:%M:%S} UTC")

        say("\n== round-trip latency (proxied inb of the debugcon port)")
        port = pm.bus.ports(DEBUGCON_PORT, 1)
        lat = latencies_us(lambda: port.read8(0), 5000, budget_s=3)
        repeats = 100_000 if pm.machine.accel == "tcg" else 1000
        t0_ns = time.perf_counter_ns()
        raw.repeat_read(port.channel, port.space, DEBUGCON_PORT, 1, repeats)
        native_us = (time.perf_counter_ns() - t0_ns) / repeats / 1000
        port.channel.close()
        say(f"{len(lat)} reads: p50 {pct(lat, .5):.2f} us, p99 {pct(lat, .99):.2f} us; the guest's own inb "
            f"costs {native_us:.3f} us (a loop of them in the guest, timed on the host)")
        say("(`make bench` compares against the qtest transport and writes JSON)")

        say("\n== interrupt latency: e1000 ICS -> proxy handler -> Python (1000 interrupts each)")
        from .bench import latency
        for mode in ("spin", "sleep"):
            r = latency.summary(latency.measure(pm, 1000, mode))
            say(f"{mode:5} mode: end to end p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us; "
                f"trigger -> guest handler p50 {r['guest_entry_p50_us']:.2f} us; "
                f"user-level overhead {r['end_to_end_over_guest_entry']:.1f}x")
        say("(`hwharness latency --plot PNG` for the full picture)")

        say("\n== PS/2: a sentence typed through QMP, decoded by the Python keyboard driver")
        controller, keyboard, mouse = open_i8042(pm.bus)
        sentence = "The quick brown fox jumps over the lazy dog: 1234567890!"
        decoded = type_and_decode(pm, keyboard, list(sentence), idle=0.5)
        say(f"typed:   {sentence}")
        say(f"decoded: {escape_controls(decoded)} ({'match' if decoded == sentence else 'MISMATCH'})")
        if decoded != sentence:
            failed.append("the typed sentence")
        move_mouse(pm.machine, dx=40, dy=-25, buttons=["left"], wheel=3)
        events = list(mouse.events(0.5))
        say(f"mouse: {len(events)} packets, dx {sum(e.dx for e in events)}, dy {sum(e.dy for e in events)}, "
            f"wheel {sum(e.wheel for e in events)}, left pressed: {any(e.left for e in events)} "
            f"(injected 40, -25, 3, yes; IntelliMouse id {mouse.device_id})")
        controller.ports.channel.close()

        say("\n== parallel port: a short file printed through the Python driver")
        page = b"hwharness test page\n" + bytes(range(32, 127)) + b"\n"
        received, acks = send_to_printer(pm, printer, page)
        say(f"sent {len(page)} bytes, the printer chardev got {len(received)} "
            f"({'identical' if received == page else 'DIFFERENT'}), {acks} ACK interrupts")
        if received != page:
            failed.append("the printed page")

        say("\n== e1000: DHCP, ARP and ICMP through QEMU's user-mode network, by the Python driver")
        ping_report(pm, 3)

        say("\n== AHCI: the disk identified and its FAT filesystem listed through the Python driver")
        from drivers.ahci import Ahci
        from ..devices.fat import DriverFatFS
        hba = Ahci.open(pm.bus)
        disk = hba.disks()[0]
        identity = disk.identify()
        say(f"port {disk.index}: {identity.model}, serial {identity.serial}, firmware {identity.firmware}, "
            f"{identity.sectors * 512 // (1 << 20)} MiB, NCQ depth {identity.queue_depth}")
        fat = DriverFatFS(disk, read_only=True)
        for entry in fat.scandir("/", namespaces=["details"]):
            say(f"  {'<DIR>' if entry.is_dir else entry.size:>8}  {entry.name}")
        say(f"  /hello.txt: {fat.readbytes('/hello.txt').decode().strip()!r}")
        fat.close()
        hba.close()

        say("\n== NVMe: the namespace identified and its FAT filesystem listed through the Python driver")
        from drivers.nvme import Nvme
        nvme = Nvme.open(pm.bus)
        ns = nvme.namespaces()[0]
        ident = ns.identify()
        say(f"namespace {ns.nsid}: {ident.model}, serial {ident.serial}, firmware {ident.firmware}, "
            f"{ns.size // (1 << 20)} MiB in {ns.sector_size}-byte blocks, {len(nvme.queues)} I/O queue pair(s), "
            f"largest transfer {nvme.identity.max_transfer // 1024} KiB")
        fat = DriverFatFS(ns, read_only=True)
        for entry in fat.scandir("/", namespaces=["details"]):
            say(f"  {'<DIR>' if entry.is_dir else entry.size:>8}  {entry.name}")
        fat.close()
        nvme.close()

        say("\n== the AHCI driver in a process of its own: killed with SIGKILL, and back")
        failed += supervised_disk(pm)

        say("\n== a guest CPU exception becomes a readable crash report")
        try:
            pm.admin.crash("INVALID_OPCODE")
        except HarnessError as crash:
            say(str(crash))
    if failed:
        raise CheckFailed(f"the demo's checks failed for {', '.join(failed)}")
    return 0


def supervised_disk(pm: ProxyMachine) -> list[str]:
    """The disk served by a supervised driver process to a client here; the driver killed
    between two reads; the client's second read waits for the restarted one. Failed checks."""
    from drivers.ahci.driver import DEVICE, VENDOR
    from .bench.restart import disk_listener
    from ..services.block import BlockClient
    from ..processes.supervisor import Supervisor
    listener, address = disk_listener()
    with listener, Supervisor(pm) as sup:
        driver = sup.run("harness.services.disk:disk_driver", pm.bus.find(vendor=VENDOR, device=DEVICE),
                         sockets={"listener": listener})
        driver.wait_serving(60)
        say(f"driver process {driver.pid} serves the disk from driver slot {driver.slot}")
        with BlockClient(address) as client:
            before = client.read(0, 1)
            victim = driver.pid
            os.kill(victim, signal.SIGKILL)
            after = client.read(0, 1)           # sent to a dead driver, answered by the next one
            driver.wait_serving(60, after=1)
            restart = driver.restarts[0]
            say(f"killed process {victim}; process {driver.pid} serves again, {restart.ms:.0f} ms after it was "
                f"{restart.cause}")
            say(f"the client reconnected {client.reconnects} time(s) and read sector 0 again: "
                f"{'the same' if after == before else 'DIFFERENT'} (boot signature {after[510:512].hex()})")
    return [] if after == before and after[510:512] == b"\x55\xaa" else ["the supervised disk"]


def escape_controls(text: str) -> str:
    """Printable as it is; Enter, Backspace, Tab, Escape as backslash escapes, so it stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def keyboard_machine(accel: str) -> ProxyMachine:
    return ProxyMachine(proxy_spec(accel=accel), name="keyboard")


def type_and_decode(pm: ProxyMachine, keyboard, tokens: list[str], idle: float = 1.0) -> str:  # type: ignore[no-untyped-def]
    """Inject ``tokens`` through QMP while the driver reads; what the driver decoded.
    If typing failed, its error is raised here rather than lost in the thread."""
    failed: list[BaseException] = []

    def typist_run() -> None:
        try:
            type_keys(pm.machine, tokens, released=lambda: keyboard.releases)
        except BaseException as exc:
            failed.append(exc)
    typist = threading.Thread(target=typist_run)
    typist.start()
    try:
        decoded = keyboard.read_text(idle=idle)
    finally:
        typist.join()
    if failed:
        raise failed[0]
    return str(decoded)


def cmd_keyboard(args: argparse.Namespace) -> int:
    typeable_text(args.type)
    with keyboard_machine(args.accel) as pm:
        _, keyboard, _ = open_i8042(pm.bus)
        say(f"decoded: {escape_controls(type_and_decode(pm, keyboard, list(args.type)))}")
    return 0


def parport_machine(accel: str):  # type: ignore[no-untyped-def]
    spec = proxy_spec(accel=accel)
    printer = spec.chardev_file("printer")
    spec.device("isa-parallel", chardev="printer", iobase=0x378, irq=7)
    return ProxyMachine(spec, name="parport"), printer


def send_to_printer(pm: ProxyMachine, printer, data: bytes) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """Send ``data`` through the driver; what reached the chardev and the ACK interrupts counted."""
    from drivers.parport import ISA_IRQ, ParallelPort
    ports = pm.bus.ports(0x378, 3)
    irq = ports.channel.interrupt(IrqMode.ISA, isa_irqs=(ISA_IRQ,))
    port = ParallelPort(ports, irq)
    port.reset()
    port.send(data)
    pm.machine.qmp("query-status")              # a QMP round trip: QEMU has written the chardev
    acks = irq.count
    ports.channel.close()
    return pm.machine.path(printer).read_bytes(), acks


def cmd_parport(args: argparse.Namespace) -> int:
    data = readable_file(args.send, "--send").read_bytes()
    machine, printer = parport_machine(args.accel)
    with machine as pm:
        received, acks = send_to_printer(pm, printer, data)
    say(f"sent {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}")
    say(f"received {len(received)} bytes sha256 {hashlib.sha256(received).hexdigest()}")
    log.info("%d ACK interrupts", acks)
    if received != data:
        raise CheckFailed(f"the printer chardev received {len(received)} bytes that differ from the "
                          f"{len(data)} sent")
    return 0


def net_machine(accel: str, name: str = "net"):  # type: ignore[no-untyped-def]
    """A proxy machine whose e1000 sits on QEMU's user-mode network, its traffic dumped to a pcap."""
    spec = proxy_spec(accel=accel)
    spec.netdev("user", "net0")
    spec.device("e1000", netdev="net0", mac=random_mac())
    pcap = RuntimeFile("net0.pcap")
    spec.options.append(Option("object", "filter-dump", {"id": "dump0", "netdev": "net0", "file": pcap}))
    return ProxyMachine(spec, name=name), pcap


def ping_report(pm: ProxyMachine, count: int) -> None:
    from drivers.e1000 import E1000
    from ..services.netstack import Host
    nic = E1000.open(pm.bus)
    try:
        host = Host(nic)
        lease = host.dhcp()
        say(f"lease: {lease.address}")
        say(f"netmask {lease.netmask}, dns {lease.dns}, {lease.seconds} s from {lease.server}")
        say(f"gateway: {lease.router} at {host.resolve(lease.router).hex(':')}")
        for seq in range(count):
            say(f"echo reply from {lease.router}: seq={seq} time={host.ping(lease.router, seq) * 1000:.3f} ms")
    finally:
        nic.close()


def cmd_net(args: argparse.Namespace) -> int:
    machine, pcap = net_machine(args.accel)
    with machine as pm:
        ping_report(pm, args.count)
        if args.pcap:
            Path(args.pcap).write_bytes(pm.machine.path(pcap).read_bytes())
            say(f"pcap: {args.pcap}")
    return 0


def disk_machine(accel: str, image: Path, snapshot: bool = False, name: str = "disk",
                 bus: str = "ahci") -> ProxyMachine:
    """A proxy machine with ``image`` on the first port of q35's built-in AHCI controller, or
    as namespace 1 of an NVMe controller (``bus="nvme"``).
    With ``snapshot`` writes go to a throwaway overlay (QEMU's ide-hd refuses read-only drives)."""
    disk_image(str(image))
    spec = proxy_spec(accel=accel)
    if bus == "nvme":
        spec.nvme([{"file": str(image.resolve()), "format": "raw", "snapshot": snapshot}])
    else:
        spec.drive(file=str(image.resolve()), format="raw", id="disk0", snapshot=snapshot, **{"if": "none"})
        spec.device("ide-hd", drive="disk0", bus="ide.0")
    return ProxyMachine(spec, name=name)


def check_fat_path(image: Path, path: str, command: str) -> None:
    """Read the image's FAT on the host and check ``path`` on it, before a machine boots."""
    from ..devices.fat import DriverFatFS
    with closing(DriverFatFS.open_image(str(image))) as fat:
        if not fat.exists(path):
            raise BadInput(f"{image}: there is no {path} on this FAT filesystem "
                           f"(`hwharness disk ls {image}` lists what is)")
        if command == "cat" and fat.isdir(path):
            raise BadInput(f"{image}: {path} is a directory (`hwharness disk ls {image} {path}` lists it)")


def open_disk(pm: ProxyMachine, bus: str, image: Path):  # type: ignore[no-untyped-def]
    """The controller and its first disk (an AHCI port or an NVMe namespace): the same block API."""
    if bus == "nvme":
        from drivers.nvme import Nvme
        controller = Nvme.open(pm.bus)
    else:
        from drivers.ahci import Ahci
        controller = Ahci.open(pm.bus)
    try:
        if not controller.disks():
            raise HarnessError(f"the {bus} controller found no disk (QEMU was given {image})")
        return controller, controller.disks()[0]
    except BaseException:
        controller.close()
        raise


def cmd_disk(args: argparse.Namespace) -> int:
    import fs.errors
    from ..devices.fat import DriverFatFS
    image = disk_image(args.image)
    if args.disk_command != "identify":
        check_fat_path(image, args.dir if args.disk_command == "ls" else args.path, args.disk_command)
    with disk_machine(args.accel, image, snapshot=True, bus=args.bus) as pm:
        hba, disk = open_disk(pm, args.bus, image)
        try:
            identity = disk.identify()
            if args.disk_command == "identify":
                say(f"model: {identity.model}")
                say(f"serial: {identity.serial}")
                say(f"firmware: {identity.firmware}")
                say(f"capacity: {identity.sectors} sectors of {disk.sector_size} bytes ({disk.size} bytes)")
                if args.bus == "nvme":
                    say(f"namespace {identity.nsid} of {identity.controller.namespaces}, largest transfer "
                        f"{identity.controller.max_transfer} bytes, deallocate: {identity.controller.dsm}")
                else:
                    say(f"lba48: {identity.lba48}, ncq: {identity.ncq} (queue depth {identity.queue_depth})")
                return 0
            fat = DriverFatFS(disk, read_only=True, name=str(image))
            try:
                if args.disk_command == "ls":
                    entries = ([fat.getinfo(args.dir, namespaces=["details"])] if fat.isfile(args.dir)
                               else fat.scandir(args.dir, namespaces=["details"]))
                    for entry in entries:
                        kind = "<DIR>" if entry.is_dir else f"{entry.size:>10}"
                        say(f"{kind:>10}  {entry.name}")
                else:
                    sys.stdout.buffer.write(fat.readbytes(args.path))
                    sys.stdout.flush()
            except fs.errors.ResourceError as exc:     # what the host saw and the driver did not
                raise BadInput(f"{image}: {exc}") from exc
            finally:
                fat.close()
        finally:
            hba.close()
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from .bench import latency
    count = latency.QUICK_COUNT if args.quick else args.count
    result, samples = latency.run(args.accel, args.mode, count, args.plot, progress=sys.stderr.isatty())
    r = result["results"]
    say(f"interrupt latency: {r['count']} e1000 interrupts, {result['accel']}, {args.mode} mode")
    say(latency.table(samples))
    say(f"\nend to end / guest entry (the user-level overhead): {r['end_to_end_over_guest_entry']:.1f}x")
    write_json(result, args.json)
    if args.plot:
        say(f"plot: {args.plot}")
    return 0


def write_json(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", path)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name == "boot":
        return cmd_bench_boot(args)
    from .bench import ahci, e1000, nvme, restart, roundtrip
    benches = {"roundtrip": roundtrip.run, "e1000": e1000.run, "e1000-itr": e1000.itr_sweep, "ahci": ahci.run,
               "nvme": nvme.run, "restart": restart.run}
    extra: dict[str, object] = {"peer": args.peer} if args.peer else {}
    if args.hang:
        if args.name != "restart":
            raise BadInput(f"--hang is for bench restart, not {args.name}")
        extra["hang"] = True
    if args.peer and args.name not in ("ahci", "e1000"):
        raise BadInput(f"--peer {args.peer} is for bench ahci and bench e1000, not {args.name}")
    result = benches[args.name](args.accel, quick=args.quick, **extra)
    say(json.dumps({k: v for k, v in result.items() if k != "per_round"}, indent=2))
    write_json(result, args.json)
    return 0


def cmd_bench_boot(args: argparse.Namespace) -> int:
    from .bench import boot
    result = boot.run(args.accel, count=args.count or 10)
    say(json.dumps({k: v for k, v in result.items() if k != "boots_s"}, indent=2))
    write_json(result, args.json)
    return 0


def add_kernel_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--kernel", metavar="K", help="kernel to boot (default: the Linux guest `make images` built)")
    p.add_argument("--initrd", metavar="I", help="initial ramdisk for --kernel")
    p.add_argument("--append", metavar="ARGS", help="kernel command line (added to the Linux guest's own)")
    p.add_argument("--memory", type=int, default=256, metavar="MB", help="guest memory (default 256)")
    p.add_argument("--prompt", default=r"[#$] ", metavar="REGEX",
                   help="what --kernel's shell prompt matches (default '[#$] ')")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hwharness", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_accel(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                       help="auto (the default): kvm only where it is hardware-backed, else tcg")
        p.add_argument("--no-iommu", action="store_true",
                       help="no VT-d: devices' DMA is not confined to their domains (for comparison)")
        return p

    boot_p = add_kernel_args(with_accel(sub.add_parser(
        "boot", help="boot a kernel (default: the Linux guest) with the terminal on its serial console")))
    boot_p.add_argument("--proxy", action="store_true",
                        help="boot the proxy guest instead, print the device table, wait for Ctrl-C")
    boot_p.add_argument("--serve", action="store_true",
                        help="the proxy guest, and let other processes attach to its driver slots")
    run_p = add_kernel_args(with_accel(sub.add_parser(
        "run", help="boot, run COMMAND at the guest's shell, print its output, exit with its status")))
    run_p.add_argument("--timeout", type=float, default=300.0, help="seconds for the boot and for COMMAND")
    run_p.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    with_accel(sub.add_parser("demo", help="boot, drive the devices, print what happened"))
    bench = with_accel(sub.add_parser("bench", help="run a benchmark and write JSON"))
    bench.add_argument("name", choices=("roundtrip", "e1000", "e1000-itr", "ahci", "nvme", "boot", "restart"))
    bench.add_argument("--hang", action="store_true",
                       help="restart: stop the driver (SIGSTOP, a hang) instead of killing it")
    bench.add_argument("--count", type=positive_int, help="boot: how many boots (default 10)")
    bench.add_argument("--json", metavar="PATH", help="write the result here too")
    bench.add_argument("--peer", choices=("linux",),
                       help="also measure Linux's own driver in the same machine (the Linux guest of `make images`)")
    bench.add_argument("--quick", action="store_true",
                       help="a second or two of each workload: checks that the bench works, measures little")
    net = sub.add_parser("net", help="the e1000 driver against QEMU's user-mode network")
    net_sub = net.add_subparsers(dest="net_command", required=True)
    ping = with_accel(net_sub.add_parser("ping", help="DHCP lease, ARP for the gateway, ICMP echo"))
    ping.add_argument("--count", type=positive_int, default=4)
    ping.add_argument("--pcap", metavar="PATH", help="keep QEMU's filter-dump of the traffic here")
    disk = sub.add_parser("disk", help="a FAT image on the AHCI or NVMe controller, through the Python driver")
    disk_sub = disk.add_subparsers(dest="disk_command", required=True)
    ls = with_accel(disk_sub.add_parser("ls", help="list a directory"))
    ls.add_argument("image")
    ls.add_argument("dir", nargs="?", default="/")
    cat = with_accel(disk_sub.add_parser("cat", help="write a file's exact bytes to stdout"))
    cat.add_argument("image")
    cat.add_argument("path")
    ident = with_accel(disk_sub.add_parser("identify", help="IDENTIFY DEVICE (AHCI) or Identify (NVMe)"))
    ident.add_argument("image")
    for p in (ls, cat, ident):
        p.add_argument("--bus", choices=("ahci", "nvme"), default="ahci",
                       help="the image on the AHCI controller (default) or as an NVMe namespace")
    kbd = with_accel(sub.add_parser("keyboard", help="type TEXT through QMP; print what the Python driver decoded"))
    kbd.add_argument("--type", required=True, metavar="TEXT")
    par = with_accel(sub.add_parser("parport", help="send FILE through the Python parallel port driver"))
    par.add_argument("--send", required=True, metavar="FILE")
    lat = with_accel(sub.add_parser("latency", help="interrupt latency of a real device, in stages"))
    lat.add_argument("--mode", choices=("spin", "sleep"), default="spin",
                     help="the host spins on the interrupt, or sleeps until the guest rings")
    lat.add_argument("--count", type=positive_int, default=10000, help="interrupts to time (default 10000)")
    lat.add_argument("--json", metavar="PATH", help="write the figures here")
    lat.add_argument("--quick", action="store_true", help="time 200 interrupts: checks the tool, measures little")
    lat.add_argument("--plot", metavar="PNG", help="write histograms of the stages here")
    add_anywhere_options(parser)
    args = parser.parse_args(argv)
    if getattr(args, "no_iommu", False):
        os.environ[IOMMU_ENV] = "0"                 # every proxy_spec of this command, and its children
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:            # a failure is one line: QMP's own error repeats our MachineError, and
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)     # where a failed machine's files
        logging.getLogger("harness.machine").setLevel(logging.ERROR)  # are kept is for -v
    commands = {"boot": cmd_boot, "run": cmd_run, "demo": cmd_demo, "bench": cmd_bench, "latency": cmd_latency,
                "keyboard": cmd_keyboard, "parport": cmd_parport, "net": cmd_net, "disk": cmd_disk}
    try:
        check_outputs(args)
        if not args.trace:
            return commands[args.command](args)
        with tracing.trace(args.trace) as tracer:
            status = commands[args.command](args)
        sys.stderr.write(f"hwharness: trace of {tracer.written} records in {tracer.path} "
                         f"and {tracing.text_path(tracer.path)} (ui.perfetto.dev opens the JSON)\n")
        return status
    except BaseException as exc:  # the one place a failure becomes what a person reads
        return report(exc, debug=args.debug or os.environ.get("HWHARNESS_DEBUG", "") not in ("", "0"))


# Options of the main parser that may also follow any command: ``hwharness disk ls X --trace T``.
ANYWHERE = (
    (("--debug",), dict(action="store_true", help="show the traceback of an error (also HWHARNESS_DEBUG=1)")),
    (("--trace",), dict(metavar="PATH", help="record every access, batch, poll, interrupt and DMA allocation: "
                                             "Chrome/Perfetto trace JSON at PATH, a text log beside it (.txt)")),
)


def add_anywhere_options(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """ANYWHERE's options on ``parser`` and every command below it. Below the top they
    default to SUPPRESS, so one that is not given leaves the top's value alone."""
    if top:
        for flags, settings in ANYWHERE:
            parser.add_argument(*flags, **settings)  # type: ignore[arg-type]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                for flags, settings in ANYWHERE:
                    command.add_argument(*flags, **settings, default=argparse.SUPPRESS)  # type: ignore[arg-type]
                add_anywhere_options(command, top=False)


def complain(message: str) -> None:
    """The one line on stderr that says why a command failed."""
    sys.stderr.write(f"hwharness: error: {message}\n")
    sys.stderr.flush()


def report(exc: BaseException, debug: bool) -> int:
    """Say why the command failed, in one line, and return the exit status:
    2 for input it could not use, 1 for a failed check or device, 130 for Ctrl-C."""
    if isinstance(exc, SystemExit):
        raise exc
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, KeyboardInterrupt):
        complain("interrupted")
        return 130
    if isinstance(exc, BrokenPipeError):            # `disk cat ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if isinstance(exc, OSError) and exc.filename:
        message = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, (HarnessError, OSError)):
        message = str(exc)
    else:
        message = f"internal error: {type(exc).__name__}: {exc}"
        if not debug:
            message += " (--debug or HWHARNESS_DEBUG=1 shows the traceback)"
    first, _, details = message.partition("\n")
    if details.strip():
        log.info("%s", details)                 # QEMU's output, a crash report's registers
        if not log.isEnabledFor(logging.INFO):
            first += " (-v shows the details)"
    complain(first)
    return 2 if isinstance(exc, BadInput) else 1


if __name__ == "__main__":
    sys.exit(main())
