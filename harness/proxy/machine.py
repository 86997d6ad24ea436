"""A machine that boots the proxy guest: its shared windows as a machine plugin.

The control window and each driver slot's window are ivshmem-doorbell devices
whose server the harness plays (:mod:`.ivshmem`); :class:`ProxyWindows` puts
them on the command line, serves them while QEMU runs and closes them after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AbiError, MachineError
from ..machine import Machine, MachineSpec
from ..machine.booted import BootedMachine
from ..machine.linux import QBOOT
from ..machine.plugin import MachinePlugin
from ..machine.spec import Endpoints, Option, abstract
from .abi import Abi, load_abi
from .admin import ProxyAdmin
from .bus import ProxyBus
from .guest import guest_elf
from .ivshmem import IvshmemServer

if TYPE_CHECKING:
    from typing import Protocol

    class Closeable(Protocol):
        def close(self) -> None: ...

log = logging.getLogger(__name__)

IOMMU_ENV = "HWHARNESS_IOMMU"      # "0": machines without the IOMMU, by default
WINDOW_SIZE = 64 << 20
DRIVER_SLOTS = 4            # driver slots a proxy machine has unless asked otherwise
SLOT_SIZE = 32 << 20        # each slot's window: room for a 16 MiB domain and more
SLOT_PCI_BASE = 0x18        # driver slot n's window sits at 00:(0x18 + n - 1).0
# q35 without what the proxy never uses (SMM, the VMware port, the HPET): QEMU builds less,
# and each memory map it rebuilds while the guest assigns BARs and turns the IOMMU on has
# fewer regions and address spaces (no SMM one). QEMU's CPU until ready 97 -> 84 ms p50
# under TCG (20 boots each, alternated, foreign_cores 1.75). No PCI function changes.
PROXY_MACHINE = "q35,smm=off,vmport=off,hpet=off"
# The proxy's vCPU spins when idle, by design (it answers a request in a microsecond), yet on a
# machine of two cores that spin must never hold a core that QEMU's main loop (which emulates
# the devices) or the driver wants. At nice 0 it did: the main loop, woken on the vCPU's core
# by the vCPU's own doorbell write, waited there for the spin to end, and one NVMe read in
# seven at QD1 took 250 us instead of 25. At a lower priority the kernel hands the core over
# as soon as either wakes. Only the vCPU: the main loop keeps its priority.
VCPU_NICE = int(os.environ.get("HWHARNESS_VCPU_NICE", "10"))


def boot_image(elf: Path) -> Path:
    """The copy of ``elf`` that QEMU's multiboot loader accepts (see guests/proxy/Makefile)."""
    return elf.with_name(elf.stem + "-boot.elf")


class ProxyWindows(MachinePlugin):
    """The proxy's shared windows: the control window and ``slots`` driver slots, each an
    ivshmem-doorbell with ``vectors`` doorbells each way; and the VT-d when ``iommu``."""

    snapshottable = False       # the windows' memory and the harness's side of them are outside QEMU

    def __init__(self, abi: Abi, window_size: int, slots: int, iommu: bool) -> None:
        if not 0 <= slots <= abi.PROXY_MAX_SLOTS:
            raise ValueError(f"a machine has 0 to {abi.PROXY_MAX_SLOTS} driver slots, not {slots}")
        self.abi = abi
        self.window_size = window_size
        self.vectors = abi.PROXY_DOORBELL_VECTORS
        self.slot_count = slots
        self.iommu = iommu
        self.control: IvshmemServer | None = None
        self.slots: list[IvshmemServer] = []       # slot n is slots[n - 1]

    def options(self, ends: Endpoints, accel: str) -> list[Option]:
        opts = [Option("chardev", "socket", {"id": "hwh-ivshmem", **abstract(ends.address("ivshmem"))}),
                Option("device", "ivshmem-doorbell", {"chardev": "hwh-ivshmem", "vectors": self.vectors})]
        for n in range(1, self.slot_count + 1):     # after the control window: QEMU connects in this order
            opts += [       # at PCI slots of their own, out of the way of devices the spec places
                Option("chardev", "socket", {"id": f"hwh-slot{n}", **abstract(ends.address(f"slot{n}"))}),
                Option("device", "ivshmem-doorbell", {"chardev": f"hwh-slot{n}", "vectors": self.vectors,
                                                      "addr": f"{SLOT_PCI_BASE + n - 1:#x}"}),
            ]
        if self.iommu:
            opts.append(Option("device", "intel-iommu", {}))
        return opts

    def pre_launch(self, machine: Machine, ends: Endpoints) -> None:
        self.control = IvshmemServer(self.window_size, vectors=self.vectors)
        self.control.listen(ends.address("ivshmem"))
        number_at = self.abi.offsetof("proxy_shared", "slot")
        for n in range(1, self.slot_count + 1):
            slot = IvshmemServer(SLOT_SIZE, vectors=self.vectors, name=f"hwharness-slot{n}")
            struct.pack_into("<I", slot.memory, number_at, n)   # how the proxy tells the windows apart
            slot.listen(ends.address(f"slot{n}"))
            self.slots.append(slot)

    def post_launch(self, machine: Machine, deadline: float) -> None:
        assert self.control is not None
        machine.accept(self.control.accept, deadline, "the ivshmem connection")
        for n, slot in enumerate(self.slots, 1):
            machine.accept(slot.accept, deadline, f"slot {n}'s ivshmem connection")

    def connected(self, machine: Machine, deadline: float) -> None:
        """The vCPU threads at VCPU_NICE (a thread of our own child: no privilege needed)."""
        for cpu in machine.qmp("query-cpus-fast"):
            try:
                os.setpriority(os.PRIO_PROCESS, cpu["thread-id"], VCPU_NICE)
            except ProcessLookupError:
                pass                # QEMU is exiting: whoever waits on it will say so

    def shutdown(self, machine: Machine) -> None:
        for server in ([self.control] if self.control else []) + self.slots:
            server.close()
        self.control, self.slots = None, []


def proxy_spec(elf: Path | None = None, accel: str = "auto", memory_mb: int = 128,
               window_size: int = WINDOW_SIZE, iommu: bool | None = None, slots: int = DRIVER_SLOTS,
               bios: Path | None = QBOOT) -> MachineSpec:
    """A machine that boots the proxy guest with its shared window; add devices to taste.
    ``elf`` defaults to the guest built from the current sources (see :mod:`.guest`).

    With ``iommu`` (the default, unless the environment has HWHARNESS_IOMMU=0) the machine
    has an Intel VT-d, and the proxy confines every device's DMA to that device's own
    domain; without, DMA is not confined.

    ``slots``: driver slots, each a window of its own (``SLOT_SIZE``) that one driver
    process may attach to (:mod:`harness.processes.control`).

    ``bios``: the firmware, qboot by default: it starts the guest sooner than QEMU's default
    SeaBIOS (``bios=None``) and assigns no PCI BARs, which the proxy then assigns itself
    (guests/proxy/pci.c)."""
    elf = elf or guest_elf()
    if iommu is None:
        iommu = os.environ.get(IOMMU_ENV, "1") != "0"
    abi = load_abi(elf)   # fail before booting if the ELF is missing or of another ABI
    if not boot_image(elf).exists():
        raise AbiError(f"{boot_image(elf)} is missing beside {elf}: its build did not finish")
    spec = MachineSpec(kernel=boot_image(elf), machine=PROXY_MACHINE, accel=accel, memory_mb=memory_mb, bios=bios)
    spec.plugins.append(ProxyWindows(abi, window_size, slots, iommu))
    return spec


class ProxyMachine(BootedMachine[ProxyBus]):
    """A booted proxy guest: ``with ProxyMachine(spec) as pm: pm.bus.find(...)``. ``pm.bus`` is
    what drivers get; ``pm.admin`` (:class:`~harness.proxy.admin.ProxyAdmin`) what only the owner does."""

    def __init__(self, spec: MachineSpec, **machine_args: Any) -> None:
        try:
            windows = spec.plugin(ProxyWindows)
        except LookupError:
            raise ValueError("a proxy machine needs the proxy's windows: use proxy_spec() to build the spec") from None
        self.abi = windows.abi
        self.elf = windows.abi.path         # the guest's ELF, with its symbols
        self.services: list[Closeable] = []     # stopped before the machine (a control server)
        super().__init__(spec, **machine_args)

    def attach(self, machine: Machine) -> ProxyBus:
        bus = ProxyBus(machine, machine.plugin(ProxyWindows), self.abi)
        self.admin: ProxyAdmin = bus._admin     # the owner's alone: drivers get the bus
        return bus

    def __enter__(self) -> "ProxyMachine":
        super().__enter__()
        return self

    def close(self) -> None:
        while self.services:
            self.services.pop().close()
        super().close()


def on_fastest_aio(stack: contextlib.ExitStack, name: str,
                   spec_for: Callable[[str], MachineSpec]) -> tuple[ProxyMachine, str]:
    """The machine ``spec_for(aio)`` describes, started (on ``stack``) with its disks on
    QEMU's io_uring backend where QEMU has one: its thread pool, the fallback, wakes a
    worker thread for every request, which fights the vCPU for a small host's cores and
    swings paired benches' figures twofold from run to run. Returns the machine and the
    backend it got. Any other failure to start (a locked image, a bad option) is raised
    as it comes, not retried."""
    for aio in ("io_uring", "threads"):
        try:
            return stack.enter_context(ProxyMachine(spec_for(aio), name=name)), aio
        except MachineError as exc:
            # QEMU 7.2: "aio=io_uring was specified, but is not supported in this build",
            # or "failed to init linux io_uring ring" where the kernel refuses one
            if aio == "threads" or "io_uring" not in str(exc):
                raise
            log.warning("QEMU refused aio=io_uring (%s); the disk uses its thread pool",
                                                str(exc).splitlines()[0])
    raise AssertionError("unreachable")
