"""``hwharness``: boot the proxy, run the demo, run benchmarks.

What a person reads goes to stdout through ``say``; everything else is
logging (``-v`` shows it).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import signal
import struct
import sys
import threading
import time
from pathlib import Path

from .access import Batch, IrqMode
from .bench.stats import latencies_us, pct
from .errors import HarnessError
from .input import move_mouse, type_keys
from drivers.ps2 import open_i8042
from .machine import Option, RuntimeFile, random_mac
from .proxy import ProxyMachine, proxy_spec

log = logging.getLogger("hwharness")

E1000 = dict(vendor=0x8086, device=0x100E)
DEBUGCON_PORT = 0xE9


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def device_table(pm: ProxyMachine) -> None:
    say(f"{'BDF':8} {'ID':10} {'class':7} BARs")
    for f in pm.bus.functions:
        bars = ", ".join(f"{b.index}:{'io' if b.is_io else 'mem'} {b.base:#x}+{b.size:#x}" for b in f.bars)
        say(f"{f.bdf:8} {f.vendor:04x}:{f.device:04x}  {f.class_code:02x}{f.subclass:02x}{f.prog_if:02x}  {bars}")


def console_machine(args: argparse.Namespace, name: str):  # type: ignore[no-untyped-def]
    """A machine for ``boot``/``run``: ``--kernel``/``--initrd``/``--append``, or the Linux guest
    ``make images`` built; with the regex its shell prompt matches."""
    import re
    from .images import linux
    from .machine import Machine, MachineSpec
    if args.kernel:
        for f in (args.kernel, args.initrd):
            if f and not Path(f).is_file():
                raise HarnessError(f"no such file: {f}")
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
        raise HarnessError("nothing to run: hwharness run [--kernel K ...] -- COMMAND")
    machine, prompt = console_machine(args, "run")
    with machine as m:
        m.console.expect([prompt], args.timeout)
        output, status = m.console.run(command, timeout=args.timeout)
    sys.stdout.write(output + ("\n" if output else ""))
    return status


def cmd_boot(args: argparse.Namespace) -> int:
    if not args.proxy:
        return cmd_console(args)
    spec = proxy_spec(accel=args.accel)
    spec.netdev("user", "net0", restrict=True)
    spec.device("e1000", netdev="net0", mac=random_mac())
    with ProxyMachine(spec, name="boot", keep_artifacts=True) as pm:
        say(f"proxy guest up under {pm.machine.accel}; QMP on the abstract socket "
            f"@{pm.machine.endpoints.qmp.lstrip(chr(0))}; files in {pm.machine.workdir}")
        device_table(pm)
        say("Ctrl-C to stop.")
        try:
            signal.pause()
        except KeyboardInterrupt:
            say("stopping")
    return 0


def _bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def cmd_demo(args: argparse.Namespace) -> int:
    mac = random_mac()
    spec = proxy_spec(accel=args.accel)
    spec.netdev("user", "net0")   # the guest only ever talks to the user network's own gateway
    spec.device("e1000", netdev="net0", mac=mac, mitigation=False)
    debugcon = spec.chardev_file("debugcon")
    spec.device("isa-debugcon", iobase=DEBUGCON_PORT, chardev="debugcon")
    printer = spec.chardev_file("printer")
    spec.device("isa-parallel", chardev="printer", iobase=0x378, irq=7)
    image = Path(__file__).resolve().parents[1] / "images" / "fat16.img"
    spec.drive(file=str(image), format="raw", id="disk0", snapshot=True, **{"if": "none"})
    spec.device("ide-hd", drive="disk0", bus="ide.0")
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
        cycles = port.channel.repeat_read(port.space, DEBUGCON_PORT, 1, 1000)
        port.channel.close()
        say(f"{len(lat)} reads: p50 {pct(lat, .5):.2f} us, p99 {pct(lat, .99):.2f} us; the guest's own inb "
            f"costs {cycles / pm.bus.tsc_hz / 1000 * 1e6:.3f} us")
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

        say("\n== e1000: DHCP, ARP and ICMP through QEMU's user-mode network, by the Python driver")
        ping_report(pm, 3)

        say("\n== AHCI: the disk identified and its FAT filesystem listed through the Python driver")
        from drivers.ahci import Ahci
        from drivers.ahci.fat import DriverFatFS
        hba = Ahci.open(pm.bus)
        disk = hba.disks()[0]
        identity = disk.identify()
        say(f"port {disk.index}: {identity.model}, serial {identity.serial}, firmware {identity.firmware}, "
            f"{identity.sectors * 512 // (1 << 20)} MiB, NCQ depth {identity.queue_depth}")
        fat = DriverFatFS(disk, read_only=True)
        for entry in fat.scandir("/", namespaces=["details"]):
            say(f"  {'<DIR>' if entry.is_dir else entry.size:>8}  {entry.name}")
        say(f"  /HELLO.TXT: {fat.readbytes('/HELLO.TXT').decode().strip()!r}")
        fat.close()
        hba.close()

        say("\n== a guest CPU exception becomes a readable crash report")
        try:
            pm.bus.crash("INVALID_OPCODE")
        except HarnessError as crash:
            say(str(crash))
    return 0


def escape_controls(text: str) -> str:
    """Printable as it is; Enter, Backspace, Tab, Escape as backslash escapes, so it stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def keyboard_machine(accel: str) -> ProxyMachine:
    return ProxyMachine(proxy_spec(accel=accel), name="keyboard")


def type_and_decode(pm: ProxyMachine, keyboard, tokens: list[str], idle: float = 1.0) -> str:  # type: ignore[no-untyped-def]
    """Inject ``tokens`` through QMP while the driver reads; what the driver decoded."""
    typist = threading.Thread(target=type_keys, args=(pm.machine, tokens))
    typist.start()
    try:
        return keyboard.read_text(idle=idle)
    finally:
        typist.join()


def cmd_keyboard(args: argparse.Namespace) -> int:
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
    data = Path(args.send).read_bytes()
    machine, printer = parport_machine(args.accel)
    with machine as pm:
        received, acks = send_to_printer(pm, printer, data)
    say(f"sent {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}")
    say(f"received {len(received)} bytes sha256 {hashlib.sha256(received).hexdigest()}")
    log.info("%d ACK interrupts", acks)
    return 0 if received == data else 1


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
    from .netstack import Host
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


def disk_machine(accel: str, image: Path, snapshot: bool = False, name: str = "disk") -> ProxyMachine:
    """A proxy machine with ``image`` on the first port of q35's built-in AHCI controller.
    With ``snapshot`` writes go to a throwaway overlay (QEMU's ide-hd refuses read-only drives)."""
    if not image.is_file():
        raise FileNotFoundError(f"no disk image at {image}")
    spec = proxy_spec(accel=accel)
    spec.drive(file=str(image.resolve()), format="raw", id="disk0", snapshot=snapshot, **{"if": "none"})
    spec.device("ide-hd", drive="disk0", bus="ide.0")
    return ProxyMachine(spec, name=name)


def cmd_disk(args: argparse.Namespace) -> int:
    from drivers.ahci import Ahci
    from drivers.ahci.fat import DriverFatFS
    with disk_machine(args.accel, Path(args.image), snapshot=True) as pm:
        hba = Ahci.open(pm.bus)
        try:
            disk = hba.disks()[0]
            identity = disk.identify()
            if args.disk_command == "identify":
                say(f"model: {identity.model}")
                say(f"serial: {identity.serial}")
                say(f"firmware: {identity.firmware}")
                say(f"capacity: {identity.sectors} sectors of 512 bytes ({identity.sectors * 512} bytes)")
                say(f"lba48: {identity.lba48}, ncq: {identity.ncq} (queue depth {identity.queue_depth})")
                return 0
            fat = DriverFatFS(disk, read_only=True)
            try:
                if args.disk_command == "ls":
                    for entry in fat.scandir(args.dir, namespaces=["details"]):
                        kind = "<DIR>" if entry.is_dir else f"{entry.size:>10}"
                        say(f"{kind:>10}  {entry.name}")
                else:
                    sys.stdout.buffer.write(fat.readbytes(args.path))
                    sys.stdout.flush()
            finally:
                fat.close()
        finally:
            hba.close()
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from .bench import latency
    result, samples = latency.run(args.accel, args.mode, args.count, args.plot, progress=sys.stderr.isatty())
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
    from .bench import ahci, e1000, roundtrip
    benches = {"roundtrip": roundtrip.run, "e1000": e1000.run, "e1000-itr": e1000.itr_sweep, "ahci": ahci.run}
    result = benches[args.name](args.accel)
    say(json.dumps(result, indent=2))
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
        return p

    boot_p = add_kernel_args(with_accel(sub.add_parser(
        "boot", help="boot a kernel (default: the Linux guest) with the terminal on its serial console")))
    boot_p.add_argument("--proxy", action="store_true",
                        help="boot the proxy guest instead, print the device table, wait for Ctrl-C")
    run_p = add_kernel_args(with_accel(sub.add_parser(
        "run", help="boot, run COMMAND at the guest's shell, print its output, exit with its status")))
    run_p.add_argument("--timeout", type=float, default=300.0, help="seconds for the boot and for COMMAND")
    run_p.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    with_accel(sub.add_parser("demo", help="boot, drive the devices, print what happened"))
    bench = with_accel(sub.add_parser("bench", help="run a benchmark and write JSON"))
    bench.add_argument("name", choices=("roundtrip", "e1000", "e1000-itr", "ahci", "boot"))
    bench.add_argument("--count", type=int, help="boot: how many boots (default 10)")
    bench.add_argument("--json", metavar="PATH", help="write the result here too")
    net = sub.add_parser("net", help="the e1000 driver against QEMU's user-mode network")
    net_sub = net.add_subparsers(dest="net_command", required=True)
    ping = with_accel(net_sub.add_parser("ping", help="DHCP lease, ARP for the gateway, ICMP echo"))
    ping.add_argument("--count", type=int, default=4)
    ping.add_argument("--pcap", metavar="PATH", help="keep QEMU's filter-dump of the traffic here")
    disk = sub.add_parser("disk", help="a FAT image on the AHCI controller, through the Python driver")
    disk_sub = disk.add_subparsers(dest="disk_command", required=True)
    ls = with_accel(disk_sub.add_parser("ls", help="list a directory"))
    ls.add_argument("image")
    ls.add_argument("dir", nargs="?", default="/")
    cat = with_accel(disk_sub.add_parser("cat", help="write a file's exact bytes to stdout"))
    cat.add_argument("image")
    cat.add_argument("path")
    ident = with_accel(disk_sub.add_parser("identify", help="IDENTIFY DEVICE"))
    ident.add_argument("image")
    kbd = with_accel(sub.add_parser("keyboard", help="type TEXT through QMP; print what the Python driver decoded"))
    kbd.add_argument("--type", required=True, metavar="TEXT")
    par = with_accel(sub.add_parser("parport", help="send FILE through the Python parallel port driver"))
    par.add_argument("--send", required=True, metavar="FILE")
    lat = with_accel(sub.add_parser("latency", help="interrupt latency of a real device, in stages"))
    lat.add_argument("--mode", choices=("spin", "sleep"), default="spin",
                     help="the host spins on the interrupt, or sleeps until the guest rings")
    lat.add_argument("--count", type=int, default=10000, help="interrupts to time (default 10000)")
    lat.add_argument("--json", metavar="PATH", help="write the figures here")
    lat.add_argument("--plot", metavar="PNG", help="write histograms of the stages here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    commands = {"boot": cmd_boot, "run": cmd_run, "demo": cmd_demo, "bench": cmd_bench, "latency": cmd_latency,
                "keyboard": cmd_keyboard, "parport": cmd_parport, "net": cmd_net, "disk": cmd_disk}
    try:
        return commands[args.command](args)
    except HarnessError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
