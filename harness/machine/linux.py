"""Guest images that ``make images`` builds under ``images/``, found and described for the harness.

``linux()`` is the Linux guest (``images/linux_guest.py`` builds it from Debian's
kernel and busybox-static packages)::

    image = linux()
    with Machine(image.spec(accel="auto")) as m:
        image.wait_ready(m)
        print(m.console.run("uname -r"))

A disk served over NBD (``hwharness serve disk``, or any NBD server) is QEMU's own NBD
client under a virtio-blk disk, the guest's ``/dev/vda``; with ``root=True`` the initramfs
mounts it (ext4, such as ``image.root``, the root image ``make images`` built) and
switches root to it::

    image.spec(disk="nbd+unix:///?socket=/tmp/disk.sock", root=True)
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

from ..errors import BadInput, ImageMissing, MachineError
from .accel import resolve_accel
from .machine import Machine
from .spec import MachineSpec, Option, random_mac

IMAGES = Path(__file__).resolve().parents[2] / "images"
LINUX_DIR = IMAGES / "linux"
# qboot (shipped with Debian's QEMU, found by name in QEMU's data directory) starts a PVH
# kernel a few hundred milliseconds sooner than SeaBIOS under TCG.
QBOOT = Path("qboot.rom")
# The serial console at 115200 baud, the 16550's fastest. QEMU's UART raises the receive
# interrupt for a part-filled FIFO (the 8250 driver sets its trigger at 8 bytes) only after
# four characters' time at the line's rate, so at the kernel's default 9600 baud the tail of
# every line typed at the console waited ~4 ms for it. Console.run("true") p50 6.1 -> 2.2 ms
# (60 runs on each of two machines a side, TCG).
SERIAL_CONSOLE = "console=ttyS0,115200"
# The command line is part of the boot time: `quiet` (a serial console is slow under TCG);
# no crypto self-tests and no speculative-execution mitigations, which cost hundreds of
# milliseconds under TCG and protect nothing in a throwaway test VM.
# ACPI: under TCG a machine goes without it (`acpi=off`) unless it drives a device that
# interrupts through PCI INTx alone (INTX_ONLY_MODULES). acpi_init's AML, the PM timer's check
# and PnP cost ~110 M guest instructions (init at 0.37 -> 0.26 s of -icount virtual time) and
# about a tenth of the boot's wall time. Under qboot only ACPI's _PRT routes INTx (its MP table
# has no PCI entries, there is no $PIR), and the e1000 has no MSI; AHCI and virtio use MSI(-X),
# the console and the keyboard ISA IRQs that the MP table routes. Without ACPI there is no HPET
# or PM timer: the PIT is the clock event (with noapictimer), and nothing calibrates the TSC
# against them, because tsc_early_khz gives its rate (under -icount the PIT calibration is
# exact: virtual time is instructions; a host whose TSC rate is unknown keeps ACPI). The machine
# resets through the keyboard controller. Under KVM ACPI stays.
# no_timer_check: the kernel's check that the PIT ticks through the IO-APIC counts ticks
# in a busy loop; a vCPU starved by a loaded host misses them and the kernel panics
# ("IO-APIC + timer doesn't work!"), seen with eight machines booting on two busy cores.
# initcall_blacklist: initcalls a throwaway test VM does not need that initcall_debug showed
# among the slowest under TCG (~95 ms the SP800-108 KDF's self-test, ~76 ms kprobe tracing's
# setup, of a 2.35 s boot on a loaded 2-core host; 44 ms blktrace's tracer, of 1.4 s).
# ipv6.disable=1: inet6_init registers IPv6 and stops (89 ms of 1.4 s under initcall_debug);
# nothing here speaks IPv6 to the guest.
# Counted in guest instructions (`-icount shift=0,sleep=off`, so the host's load does not
# blur it: ~0.76 s of virtual time to the prompt before these three):
# rodata=off: the kernel leaves its read-only data writable and so skips the W+X check that
# walks every page table of the kernel's address space (CONFIG_DEBUG_WX), ~120 M instructions.
# init_on_alloc=0: pages are not zeroed on every allocation (Debian turns it on), ~60 M of
# the boot (the initramfs unpacked into fresh page cache, page tables, slabs); what must be
# zero the kernel still asks zeroed.
# cubictcp_register, bpf_rstat_kfunc_init: the first initcall that registers BPF kfuncs parses
# and checks the kernel's whole BTF, ~50 M instructions; with the first blacklisted the second
# does it, with both nobody does at boot (TCP falls back to reno; a module with BTF loaded
# later parses it then). init_encrypted: encrypted keys, ~0.3 s of wall time under
# initcall_debug on the loaded host (crypto allocations that wait), which nobody uses here.
# Measured together (5 boots a side, alternated, foreign_cores 1.5): QEMU's CPU per boot
# 1.63 -> 1.49 s (p50).
# The BTF parse moves on to the next initcall that registers BPF kfuncs, a chain of them in
# this kernel: bpf_key_sig_kfuncs_init, kfunc_init, bpf_prog_test_run_init,
# bpf_tcp_ca_kfunc_init (~50 M instructions each time one is left first). Nothing here runs BPF.
# ftrace_check_for_weak_functions: a worker looks up each of ftrace's 40,000 call sites in
# kallsyms to mark the weak ones (~160 M instructions, the worker's and the initcalls it
# holds up); only function tracing reads the marks. tcp_congestion_default: with cubic
# not registered it asks for the tcp_cubic module (a modprobe process at boot, which fails)
# and leaves reno, as without it. blake2s_mod_init: the BLAKE2s self-test alone (the RNG
# calls BLAKE2s directly), ~5 M.
# noreplace-smp: on one CPU the kernel rewrites every LOCK prefix of its code (`text_poke`,
# a page-table switch per site, and under TCG each switch flushes the softmmu TLB): QEMU's
# CPU per boot ~0.12 s; the LOCKs stay, which one CPU does not notice.
# Counted with -icount as above: init started after 0.60 s of virtual time, 0.37 s with these
# (2 boots each); QEMU's CPU per boot 1.48 -> 1.27 s p50 (6 boots a side, alternated, load
# average 7-8 on 2 cores).
# tracer_init_tracefs: tracefs's files for the tracers and for each of the kernel's ~2,000
# trace events, a directory apiece (~39 M instructions, 15 % of the boot to init); the events
# stay registered, only /sys/kernel/tracing is empty. slab_sysfs_init: /sys/kernel/slab, a
# directory per slab cache (~7 M). Nothing here reads either. Init under -icount 0.262 ->
# 0.215 s; `bench compare fb77a06 --only boot --rounds 5`: boot p50 1.29 -> 1.14 s, the
# kernel's phase 1.02 -> 0.86 s (faster in 4 rounds of 5, on a host in a slow spell).
LINUX_APPEND = (f"{SERIAL_CONSOLE} quiet cryptomgr.notests mitigations=off no_timer_check ipv6.disable=1 "
                "rodata=off init_on_alloc=0 noreplace-smp "
                "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace,init_blk_tracer,"
                "cubictcp_register,bpf_rstat_kfunc_init,init_encrypted,"
                "bpf_key_sig_kfuncs_init,kfunc_init,bpf_prog_test_run_init,bpf_tcp_ca_kfunc_init,"
                "ftrace_check_for_weak_functions,tcp_congestion_default,blake2s_mod_init,"
                "tracer_init_tracefs,slab_sysfs_init")
# Under TCG only: no local APIC timer, so the kernel does not calibrate it against the PIT, a
# busy loop of 100 ms (HZ/10) of wall time (QEMU's TCG has no TSC-deadline timer, which would
# skip it, and this kernel has no parameter that gives the period); the HPET ticks instead
# (the PIT, where ACPI is off).
# Measured: QEMU's CPU per boot 1.86 -> 1.74 s (p50 of 5, alternated). Under KVM the APIC
# timer stays, as KVM's guests expect.
LINUX_APPEND_TCG = "noapictimer"
# No transparent huge pages for a booting Linux guest's QEMU (MachineSpec.huge_pages): a boot
# faults in ~160 MiB of fresh RAM (the kernel copied in, its BSS, the initramfs unpacked), and on
# a VM whose balloon takes back free memory (free page reporting, as on this project's
# machines) a huge page faulted in after the host sat idle a few seconds costs ~20x one just
# freed (256 MiB touched: 520-580 ms against 27 ms; 4 KiB pages 140-190 ms either way). `bench
# compare 60b1a6d --only boot --rounds 5`: a boot 5 s after the last QEMU ended 1.46 -> 1.10 s,
# eight boots at once 6.5 -> 5.3 s; back to back the same (1.13 -> 1.09 s, within noise), QEMU's
# start 48 -> 69 ms (4 KiB faults for the kernel copied in). Restores keep them (saved.py).
BOOT_HUGE_PAGES = False
# Drivers of devices that interrupt only through PCI INTx, which only ACPI routes here (above).
INTX_ONLY_MODULES = frozenset({"e1000"})
# Under TCG the guest's TSC is the host's (QEMU's RDTSC reads the host's counter), so its rate
# is known before the guest starts: `tsc_early_khz=` gives it to the kernel, which otherwise
# calibrates against the PIT and, when a loaded host deschedules the vCPU during that, falls
# back to a calibration against the HPET that is slower and sometimes far off (an uptime of
# 12 s after 6.6 s of the host's time; firmware phase 1.28 -> 0.72 s with the rate given, 6
# boots a side at load average 9). Not with -icount, whose TSC counts instructions.
CPUINFO = Path("/proc/cpuinfo")
TSC_KHZ_RANGE = (100_000, 10_000_000)          # what a rate read from the host may be
# How long QEMU's NBD client holds the guest's requests while it reconnects (a driver
# process restarting behind the export) before it fails them: far longer than a restart.
NBD_RECONNECT_DELAY_S = 60
NBD_PORT = 10809                       # the protocol's registered port, an nbd:// URI's default
DISK_NODE = "hwh-disk0"
ROOT_DEVICE = "/dev/vda"               # the first virtio-blk disk


def nbd_server(uri: str) -> dict[str, object]:
    """QEMU's ``-blockdev driver=nbd`` properties for an NBD URI, as :func:`nbd_address`
    reads it, written for QEMU's option syntax."""
    # QEMU's option syntax doubles a comma inside a value
    return {key: value.replace(",", ",,") if isinstance(value, str) else value
            for key, value in nbd_address(uri).items()}


def nbd_address(uri: str) -> dict[str, object]:
    """Where an NBD URI points (the NBD project's URI specification), in the terms of QEMU's
    ``-blockdev driver=nbd``: ``nbd+unix:///[EXPORT]?socket=PATH`` or
    ``nbd://HOST[:PORT]/[EXPORT]``. ValueError for anything else (TLS, ``nbds``, is not supported)."""
    parts = urlsplit(uri)
    export = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.scheme == "nbd+unix":
        socket = parse_qs(parts.query).get("socket", [""])[0]
        if parts.netloc or not socket:
            raise ValueError(f"{uri!r}: an nbd+unix URI is nbd+unix:///[EXPORT]?socket=PATH")
        props: dict[str, object] = {"server.type": "unix", "server.path": socket}
    elif parts.scheme == "nbd":
        if not parts.hostname:
            raise ValueError(f"{uri!r}: an nbd URI is nbd://HOST[:PORT]/[EXPORT]")
        props = {"server.type": "inet", "server.host": parts.hostname, "server.port": parts.port or NBD_PORT}
    else:
        raise ValueError(f"{uri!r} is not an NBD URI (nbd+unix:///?socket=PATH or nbd://HOST:PORT/)")
    if export:
        props["export"] = export
    return props


def nbd_disk(spec: MachineSpec, uri: str, node: str = DISK_NODE) -> MachineSpec:
    """Attach the NBD export at ``uri`` to ``spec`` as a virtio-blk disk, through QEMU's NBD
    client: it reconnects when the server's connection drops and sends again what was not
    answered, so the guest sees a restarting server as a pause. A read-only export is a
    read-only disk."""
    spec.options.append(Option("blockdev", "", {"driver": "nbd", **nbd_server(uri), "node-name": node,
                                                "reconnect-delay": NBD_RECONNECT_DELAY_S,
                                                "auto-read-only": True}))
    return spec.device("virtio-blk-pci", drive=node)


# busybox udhcpc's script: it configures nothing itself. Applies the lease to the interface, the
# first router as the default route, the DNS servers to resolv.conf.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
deconfig) ifconfig "$interface" 0.0.0.0 up ;;
bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    set -- $router; [ -n "$1" ] && route add default gw "$1" dev "$interface"
    : > /etc/resolv.conf; for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "hwh-lease $ip" ;;
esac
"""


@functools.cache
def host_tsc_khz(cpuinfo: Path = CPUINFO) -> int | None:
    """The host's TSC rate in kHz, or None where the host does not say it.

    Where the TSC is constant and nonstop, Linux takes every CPU's delay loop from the TSC
    (loops_per_jiffy = tsc_khz * 1000 / HZ), so the BogoMIPS that /proc/cpuinfo shows
    (loops_per_jiffy * HZ / 500000) is the rate over 500, to 5 kHz: "Calibrating delay loop
    (skipped), value calculated using timer frequency" in the host's log. Every CPU must
    show the same figure."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    mips = set(re.findall(r"^bogomips\s*:\s*([\d.]+)$", text, re.M))
    if not flags or not {"constant_tsc", "nonstop_tsc"} <= set(flags.group(1).split()) or len(mips) != 1:
        return None
    khz = round(float(mips.pop()) * 500)
    return khz if TSC_KHZ_RANGE[0] <= khz <= TSC_KHZ_RANGE[1] else None


def wire_path(wire: str) -> str:
    """``unix:PATH`` -> PATH; ValueError for anything else."""
    kind, _, path = wire.partition(":")
    if kind != "unix" or not path:
        raise BadInput(f"{wire!r} is not unix:PATH")
    return path


def wire_netdev(spec: MachineSpec, id: str, wire: str, server: bool) -> None:
    """A ``-netdev stream`` on ``wire`` (``unix:PATH``): one end listens (``server``), the other
    connects (QEMU 7.2's stream netdev, ``addr.type=unix``: qapi/net.json). The connecting
    end does not fail if nobody listens: QEMU boots the machine with its NIC unplugged
    (the CLI looks for the wire's socket before it boots)."""
    spec.netdev("stream", id, server=server, **{"addr.type": "unix", "addr.path": wire_path(wire)})


def wire_nic(spec: MachineSpec, wire: str) -> MachineSpec:
    """An e1000 on ``wire`` that connects to whoever listens there (the Linux guest's eth0)."""
    wire_netdev(spec, "net0", wire, server=False)
    spec.device("e1000", netdev="net0", mac=random_mac())
    return spec


@dataclass(frozen=True)
class LinuxImage:
    """A built Linux guest: kernel, initramfs and what its manifest says about them."""

    kernel: Path
    initrd: Path                      # without modules where initrd_modules is given
    release: str                      # uname -r
    prompt: str                       # the shell's prompt on the console
    modules: tuple[str, ...]          # modules the guest can load (busybox modprobe loads their deps)
    packages: dict[str, str] = field(default_factory=dict)   # Debian package -> version
    disk_modules: tuple[str, ...] = ()  # what a virtio-blk disk with an ext4 root needs
    root: Path | None = None            # the ext4 root image `make images` built (copy it before writing)
    initrd_modules: Path | None = None  # the initramfs with the modules, for machines that load some

    def spec(self, accel: str = "auto", memory_mb: int = 256, modules: Sequence[str] = (),
             append: str = "", disk: str | None = None, root: bool = False,
             net: str | None = None, icount_shift: int | None = None,
             acpi: bool | None = None, echo: bool = False) -> MachineSpec:
        """A machine that boots this guest to a shell on its serial console.

        ``modules`` are loaded by init before the shell starts (e.g. ``("e1000", "ahci")``);
        ``append`` adds to the kernel command line. ``disk``: an NBD URI, attached as
        ``/dev/vda`` (see :func:`nbd_disk`); ``root``: the initramfs mounts it (ext4) and
        switches root to it before the shell starts. ``net`` (``unix:PATH``): an e1000,
        Linux's eth0, on that wire (``hwharness serve net`` listens there; :meth:`dhcp`
        takes a lease). ``icount_shift``: TCG counts guest instructions (``-icount``), and
        the guest's clock with them. ``acpi``: None boots without ACPI under TCG where nothing
        needs it (see ACPI above; a device you add whose driver has no MSI and is not in
        INTX_ONLY_MODULES needs ``acpi=True``), True and False decide. ``echo``: the console
        echoes what is typed, for a person at it; without, init turns the echo off before the
        shell starts (what programs at the console want: see INIT in images/linux_guest.py).
        """
        if root and not disk:
            raise ValueError("root=True needs the disk to switch to: give disk=URI")
        if disk and not self.disk_modules:
            raise ImageMissing("this Linux guest was built before disks were: rebuild it with `make images`")
        if disk:
            modules = tuple(modules) + tuple(m for m in self.disk_modules if m not in modules)
        if net is not None:
            wire_path(net)
            modules = (*modules, "e1000") if "e1000" not in modules else modules
        unknown = set(modules) - set(self.modules)
        if unknown:
            raise ValueError(f"modules {sorted(unknown)} are not in the initramfs (it has {', '.join(self.modules)})")
        line = LINUX_APPEND
        if resolve_accel(accel) == "tcg":
            line += " " + LINUX_APPEND_TCG
            tsc_khz = host_tsc_khz()
            if tsc_khz and icount_shift is None:
                line += f" tsc_early_khz={tsc_khz}"
            # ACPI's timers are what the TSC calibration falls back on: without it only where
            # the kernel calibrates nothing (the rate given) or exactly (-icount)
            if acpi is None:
                acpi = not (tsc_khz or icount_shift is not None) or bool(INTX_ONLY_MODULES & set(modules))
        if acpi is False:
            line += " acpi=off"
        if modules:
            line += " hwh_modules=" + ",".join(modules)   # init reads it from its environment
        if root:
            line += f" hwh_root={ROOT_DEVICE}"
        if echo:
            line += " hwh_echo=1"
        if append:
            line += " " + append
        initrd = self.initrd_modules if modules and self.initrd_modules else self.initrd
        spec = MachineSpec(kernel=self.kernel, initrd=initrd, append=line, bios=QBOOT,
                           memory_mb=memory_mb, accel=accel, icount_shift=icount_shift,
                           huge_pages=BOOT_HUGE_PAGES)
        if disk:
            nbd_disk(spec, disk)
        return spec if net is None else wire_nic(spec, net)

    def dhcp(self, machine: Machine, interface: str = "eth0", timeout: float = 60.0) -> str:
        """Bring ``interface`` up with busybox's ``udhcpc``; the address leased (the default
        route and resolv.conf are set too). MachineError-family errors from the console."""
        assert machine.console is not None
        script = base64.b64encode(UDHCPC_SCRIPT.encode()).decode()
        machine.console.run(f"echo {script} | base64 -d > /tmp/udhcpc.sh && chmod +x /tmp/udhcpc.sh")
        tries = max(3, int(timeout / 3))
        out, status = machine.console.run(f"udhcpc -i {interface} -n -q -t {tries} -T 3 -s /tmp/udhcpc.sh",
                                          timeout=timeout + 10)
        lease = re.search(r"hwh-lease (\S+)", out)
        if status or not lease:
            raise MachineError(f"udhcpc on {interface} got no lease (status {status}): {out[-300:]}")
        return lease.group(1)

    def wait_ready(self, machine: Machine, timeout: float = 120.0) -> float:
        """Wait for the shell's prompt and for it to answer a command; the seconds that took."""
        assert machine.console is not None
        t0 = time.monotonic()
        machine.console.expect([re.escape(self.prompt)], timeout)
        machine.console.run("true", timeout=max(1.0, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0


def linux(directory: Path = LINUX_DIR) -> LinuxImage:
    """The Linux guest that ``make images`` built; :class:`ImageMissing` says how to build it."""
    manifest = directory / "manifest.json"
    if not manifest.exists():
        raise ImageMissing(f"no Linux guest in {directory}: build it with `make images` "
                           "(it downloads Debian's linux-image-amd64 and busybox-static with apt-get)")
    m = json.loads(manifest.read_text())
    image = LinuxImage(kernel=directory / m["kernel"], initrd=directory / m["initrd"], release=m["release"],
                       prompt=m["prompt"], modules=tuple(m["modules"]), packages=m["packages"],
                       disk_modules=tuple(m.get("disk_modules", ())),
                       root=directory / m["root"] if "root" in m else None,
                       initrd_modules=directory / m["initrd_modules"] if "initrd_modules" in m else None)
    for f in (image.kernel, image.initrd, image.initrd_modules):
        if f is not None and not f.exists():
            raise ImageMissing(f"{f} is missing: rebuild the Linux guest with `make images`")
    return image
