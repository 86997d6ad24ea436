"""A machine described as data, and the one function that turns it into QEMU's argv."""

from __future__ import annotations

import random
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Option:
    """One ``-name value`` option whose value is ``kind,key=value,...``.

    ``kind`` may be empty (``-netdev`` and ``-chardev`` lead with their backend).
    Values that are :class:`RuntimeFile` become paths in the machine's private
    directory when the machine starts.
    """

    name: str
    kind: str
    props: dict[str, object] = field(default_factory=dict)

    def render(self, workdir: Path) -> list[str]:
        parts = [self.kind] if self.kind else []
        for key, value in self.props.items():
            if isinstance(value, RuntimeFile):
                value = workdir / value.name
            if isinstance(value, bool):
                value = "on" if value else "off"
            parts.append(f"{key}={value}")
        return [f"-{self.name}", ",".join(parts)]


@dataclass(frozen=True)
class RuntimeFile:
    """A file in the machine's private directory, named before the directory exists."""

    name: str


@dataclass
class MachineSpec:
    """What to boot. Everything QEMU is told comes from here (see :func:`build_argv`)."""

    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    bios: Path | None = None         # firmware instead of SeaBIOS (e.g. qboot for a fast Linux boot)
    memory_mb: int = 128
    cpus: int = 1
    machine: str = "q35"
    accel: str = "auto"              # auto | kvm | tcg
    qemu: str = "qemu-system-x86_64"
    options: list[Option] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    ivshmem_size: int | None = None  # a power of two: the machine runs an ivshmem server
    ivshmem_vectors: int = 1         # doorbell vectors (eventfds) each side of it
    slots: int = 0                   # driver slots: more ivshmem windows, one per driver process
    slot_size: int = 32 << 20        # each slot's window, a power of two
    slot_number_at: int | None = None    # where in a slot's window its number goes before boot
    start_stopped: bool = False      # -S: the CPU waits (qtest)
    qtest: bool = False              # a qtest server on a private socket
    guest_elf: Path | None = None    # the kernel's ELF with symbols, when `kernel` is a stripped copy
    iommu: bool = False              # an Intel VT-d (intel-iommu) that translates every device's DMA

    def device(self, driver: str, **props: object) -> "MachineSpec":
        self.options.append(Option("device", driver, props))
        return self

    def netdev(self, backend: str, id: str, **props: object) -> "MachineSpec":
        self.options.append(Option("netdev", backend, {"id": id, **props}))
        return self

    def chardev(self, backend: str, id: str, **props: object) -> "MachineSpec":
        self.options.append(Option("chardev", backend, {"id": id, **props}))
        return self

    def drive(self, **props: object) -> "MachineSpec":
        self.options.append(Option("drive", "", props))
        return self

    def nvme(self, namespaces: list[dict[str, object]], serial: str = "HWH-NVME-1", id: str = "nvme0",
             **props: object) -> "MachineSpec":
        """An NVMe controller with one ``nvme-ns`` per entry of ``namespaces`` (each the
        ``-drive`` properties of its image, e.g. ``{"file": path, "format": "raw"}``), NSIDs 1, 2, ..."""
        self.device("nvme", id=id, serial=serial, **props)
        for nsid, drive in enumerate(namespaces, 1):
            self.drive(id=f"{id}-ns{nsid}", **{"if": "none", **drive})
            self.device("nvme-ns", drive=f"{id}-ns{nsid}", bus=id, nsid=nsid)
        return self

    def chardev_file(self, id: str) -> RuntimeFile:
        """A file-backed chardev named ``id``; returns the file it writes."""
        f = RuntimeFile(f"chardev-{id}.out")
        self.chardev("file", id, path=f)
        return f


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range, different every call."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


@dataclass(frozen=True)
class Endpoints:
    """Where the running machine's sockets and files are (abstract socket names start with NUL)."""

    workdir: Path
    qmp: str
    serial: str                      # the harness listens; QEMU's serial port connects to it
    serial_log: Path                 # where the harness logs what the guest printed
    ivshmem: str | None = None
    qtest: str | None = None
    slots: tuple[str, ...] = ()      # each driver slot's ivshmem server


SLOT_PCI_BASE = 0x18        # driver slot n's ivshmem sits at 00:(0x18 + n - 1).0


def _abstract(name: str) -> dict[str, object]:
    return {"path": name.lstrip("\0"), "abstract": True}


def build_argv(spec: MachineSpec, accel: str, ends: Endpoints, incoming: Path | None = None) -> list[str]:
    """The QEMU command line for ``spec``: the only place one is built.

    ``incoming``: start from a state saved by migration to that file instead of booting.
    """
    if spec.qtest and accel == "kvm":
        raise ValueError("qtest machines run with the CPU stopped under tcg; kvm makes no sense there")
    argv = [spec.qemu, "-machine", spec.machine, "-accel", accel, "-m", f"{spec.memory_mb}M",
            "-smp", str(spec.cpus), "-nodefaults", "-display", "none", "-vga", "none", "-no-reboot",
            "-no-user-config"]
    runtime = [
        Option("chardev", "socket", {"id": "hwh-qmp", **_abstract(ends.qmp), "server": True, "wait": False}),
        Option("mon", "", {"chardev": "hwh-qmp", "mode": "control"}),
        Option("chardev", "socket", {"id": "hwh-serial", **_abstract(ends.serial)}),
        Option("serial", "chardev:hwh-serial"),
    ]
    if ends.ivshmem is not None:
        assert spec.ivshmem_size
        runtime += [
            Option("chardev", "socket", {"id": "hwh-ivshmem", **_abstract(ends.ivshmem)}),
            Option("device", "ivshmem-doorbell", {"chardev": "hwh-ivshmem", "vectors": spec.ivshmem_vectors}),
        ]
    for n, address in enumerate(ends.slots, 1):     # after the control window: QEMU connects in this order
        runtime += [        # at PCI slots of their own, out of the way of devices the spec places
            Option("chardev", "socket", {"id": f"hwh-slot{n}", **_abstract(address)}),
            Option("device", "ivshmem-doorbell", {"chardev": f"hwh-slot{n}", "vectors": spec.ivshmem_vectors,
                                                  "addr": f"{SLOT_PCI_BASE + n - 1:#x}"}),
        ]
    if ends.qtest is not None:
        # QEMU 7.2 looks the qtest chardev up by the fixed id "qtest" (qtest_server_init).
        runtime += [
            Option("chardev", "socket", {"id": "qtest", **_abstract(ends.qtest)}),
            Option("qtest", "chardev:qtest"),
        ]
    if spec.iommu:
        runtime.append(Option("device", "intel-iommu", {}))
    for opt in runtime + spec.options:
        argv += opt.render(ends.workdir)
    if spec.bios:
        argv += ["-bios", str(spec.bios)]
    if spec.kernel:
        argv += ["-kernel", str(spec.kernel)]
    if spec.initrd:
        argv += ["-initrd", str(spec.initrd)]
    if spec.append:
        argv += ["-append", spec.append]
    if spec.start_stopped or spec.qtest:
        argv.append("-S")
    if incoming is not None:
        # QEMU reads the state, then waits stopped for `cont`. exec:cat keeps the path out of
        # QEMU's own file: URI parsing (7.2 has none) and streams it as migration expects.
        argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    return argv + spec.extra_args
