"""A machine described as data, and the one function that turns it into QEMU's argv."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..errors import BadInput
from .plugin import MachinePlugin

P = TypeVar("P", bound=MachinePlugin)


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
    # TCG only: QEMU's -icount shift=N. The guest's clock (and TSC) then advances 2**N ns per
    # guest instruction, so a TSC difference counts instructions, whatever the host's load.
    icount_shift: int | None = None
    qemu: str = "qemu-system-x86_64"
    # QEMU's guest RAM and TCG's code buffer in transparent huge pages (QEMU's own choice); off
    # for a boot that faults in much fresh memory on a host whose balloon takes it back (linux.py)
    huge_pages: bool = True
    options: list[Option] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    plugins: list[MachinePlugin] = field(default_factory=list)   # transports: proxy, qtest

    def plugin(self, kind: type[P]) -> P:
        """The spec's plugin of that kind (``spec.plugin(ProxyPlugin).iommu = False``)."""
        for p in self.plugins:
            if isinstance(p, kind):
                return p
        raise LookupError(f"this machine has no {kind.__name__}")

    def copy_plugins(self) -> list[MachinePlugin]:
        """Fresh copies for one machine, which keeps its servers and sockets in them."""
        return [copy.copy(p) for p in self.plugins]

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
        ``-drive`` properties of its image, e.g. ``{"file": path, "format": "raw"}``), NSIDs 1, 2, ...
        With ``ioeventfd="on"`` the I/O queues' doorbells become QEMU ioeventfds once the
        driver configures shadow doorbells, and a driver opened with ``ioeventfds=True``
        rings them itself, without the guest (harness.machine.ioeventfd): queued I/O goes
        faster, one command at a time slower (docs/drivers.md has the figures)."""
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
    tag: str = "\0hwharness"         # what the machine's private socket names start with

    def address(self, name: str) -> str:
        """A private abstract socket of this machine, for a plugin's ``name``."""
        return f"{self.tag}-{name}"


def abstract(name: str) -> dict[str, object]:
    """A socket chardev's properties for an abstract socket name (one that starts with NUL)."""
    return {"path": name.lstrip("\0"), "abstract": True}


def build_argv(spec: MachineSpec, accel: str, ends: Endpoints, plugins: list[MachinePlugin] | None = None) -> list[str]:
    """The QEMU command line for ``spec``: the only place one is built. ``plugins``: the
    machine's own copies of the spec's (the spec's when not given)."""
    plugins = spec.plugins if plugins is None else plugins
    argv = [spec.qemu, "-machine", spec.machine, "-accel", accel, "-m", f"{spec.memory_mb}M",
            "-smp", str(spec.cpus), "-nodefaults", "-display", "none", "-vga", "none", "-no-reboot",
            "-no-user-config"]
    if spec.icount_shift is not None:
        if accel != "tcg":
            raise BadInput(f"-icount (counting guest instructions) is TCG's alone; this machine runs under {accel}")
        argv += ["-icount", f"shift={spec.icount_shift}"]
    runtime = [
        Option("chardev", "socket", {"id": "hwh-qmp", **abstract(ends.qmp), "server": True, "wait": False}),
        Option("mon", "", {"chardev": "hwh-qmp", "mode": "control"}),
        Option("chardev", "socket", {"id": "hwh-serial", **abstract(ends.serial)}),
        Option("serial", "chardev:hwh-serial"),
    ]
    for plugin in plugins:
        runtime += plugin.options(ends, accel)
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
    for plugin in plugins:
        argv += plugin.args()
    return argv + spec.extra_args
