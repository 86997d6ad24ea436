"""The proxy transport: a Bus whose channels are rings served by the proxy guest."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from .. import tracing
from ..access import Bar, Bus, PciFunction
from ..errors import AbiError, AccessDenied, ProxyError
from ..machine import Machine, MachineSpec
from ..machine.booted import BootedMachine
from ..machine.legacy import grantable
from .abi import Abi, load_abi
from .channel import ProxyChannel
from .clock import GuestClock
from .dma import DmaPool
from .guest import guest_elf
from .window import SharedWindow

log = logging.getLogger(__name__)

IOMMU_ENV = "HWHARNESS_IOMMU"      # "0": machines without the IOMMU, by default (the CLI's --no-iommu)
WINDOW_SIZE = 64 << 20
DOMAIN_SIZE = 4 << 20       # each opened device's DMA memory unless it asks for another size
DOMAIN_ALIGN = 64 << 10


def __getattr__(name: str) -> Any:
    # DEFAULT_ELF, for callers from before the guest was built on first use: built when asked for
    if name == "DEFAULT_ELF":
        return guest_elf()
    raise AttributeError(name)


def boot_image(elf: Path) -> Path:
    """The copy of ``elf`` that QEMU's multiboot loader accepts (see guests/proxy/Makefile)."""
    return elf.with_name(elf.stem + "-boot.elf")


def proxy_spec(elf: Path | None = None, accel: str = "auto", memory_mb: int = 128,
               window_size: int = WINDOW_SIZE, iommu: bool | None = None) -> MachineSpec:
    """A machine that boots the proxy guest with its shared window; add devices to taste.
    ``elf`` defaults to the guest built from the current sources (see :mod:`.guest`).

    With ``iommu`` (the default, unless the environment has HWHARNESS_IOMMU=0) the machine
    has an Intel VT-d, and the proxy confines every device's DMA to that device's own
    domain; without, DMA is not confined."""
    elf = elf or guest_elf()
    if iommu is None:
        iommu = os.environ.get(IOMMU_ENV, "1") != "0"
    abi = load_abi(elf)   # fail before booting if the ELF is missing or of another ABI
    if not boot_image(elf).exists():
        raise AbiError(f"{boot_image(elf)} is missing beside {elf}: its build did not finish")
    spec = MachineSpec(kernel=boot_image(elf), accel=accel, memory_mb=memory_mb, ivshmem_size=window_size,
                       ivshmem_vectors=abi.PROXY_DOORBELL_VECTORS, iommu=iommu)
    spec.guest_elf = elf
    return spec


class ProxyBus(Bus):
    """PCI functions as the proxy enumerated them, and channels through it."""

    def __init__(self, machine: Machine, abi: Abi, ready_timeout: float = 60.0) -> None:
        self.machine = machine
        self.abi = abi
        self.window = SharedWindow(machine, abi)
        self.window.wait_ready(ready_timeout)
        self.admin = self._new_channel(0, "admin")
        self._functions = tuple(self._read_device_table())
        self.tsc_hz = self.window.field("tsc_hz")
        self._open: dict[int, ProxyChannel] = {}
        self._dma_view = memoryview(self.window.mem)
        self._window_phys = self.window.field("window_phys")
        # The pool, carved into one domain per opened device.
        self.dma = DmaPool(self._dma_view, self._window_phys, self.window.field("dma_offset"),
                           self.window.field("window_size"))
        self.iommu = bool(self.window.field("iommu"))

    def _new_channel(self, index: int, name: str, domain: DmaPool | None = None) -> ProxyChannel:
        """A channel on ring ``index``: one that records, if a trace is on (harness.tracing)."""
        tracer = tracing.active()
        if tracer is None:
            return ProxyChannel(self, index, name, domain)
        from .traced import TracedChannel
        ch = TracedChannel(self, index, name, tracer, domain)
        if domain is not None:
            domain.observer = lambda phys, size, freed: tracer.dma(ch, phys, size, freed=freed)
        return ch

    def _read_device_table(self) -> list[PciFunction]:
        n = self.window.field("ndevices")
        entry = self.abi.struct("proxy_pci_device")
        base = self.abi.offsetof("proxy_shared", "devices")
        out = []
        for i in range(min(n, self.abi.PROXY_MAX_DEVICES)):
            d: dict[str, Any] = self.abi.decode(entry, self.window.mem, base + i * entry.size)
            bars = tuple(Bar(j, b["base"], b["size"], bool(b["is_io"]), bool(b["is_64"]), bool(b["prefetchable"]))
                         for j, b in enumerate(d["bars"]) if b["size"])
            caps = tuple((c["id"], c["offset"]) for c in d["caps"][:d["ncaps"]])
            out.append(PciFunction(d["bus"], d["dev"], d["fn"], d["vendor"], d["device"], d["class_code"],
                                   d["subclass"], d["prog_if"], d["revision"], d["irq_line"], d["irq_pin"],
                                   bars, caps))
        return out

    @property
    def functions(self) -> Sequence[PciFunction]:
        return self._functions

    def _admin(self, op: int, addr: int, value: int, what: str) -> int:
        return self.admin.control(op, addr, value, what)

    @property
    def spurious_irqs(self) -> int:
        """Interrupts the guest took that no channel owned, plus LAPIC and 8259 spurious ones."""
        return int(self.window.field("spurious_irqs"))

    @functools.cached_property
    def clock(self) -> GuestClock:
        """Guest TSC → host perf_counter_ns, from the admin channel; call ``clock.calibrate()`` to refine."""
        return GuestClock(self.admin, self.tsc_hz)

    def open_channel(self, function: PciFunction, dma_size: int | None = None) -> ProxyChannel:
        """A channel to ``function`` with a DMA domain of ``dma_size`` bytes (default
        ``DOMAIN_SIZE``; 0: the device may not DMA at all)."""
        dma_size = DOMAIN_SIZE if dma_size is None else dma_size
        limit = self.abi.PROXY_DOMAIN_MAX
        if not 0 <= dma_size <= limit or dma_size % self.abi.PROXY_DOMAIN_ALIGN:
            raise ValueError(f"{function}: a DMA domain is whole 4 KiB pages, at most {limit >> 20} MiB, "
                             f"not {dma_size} bytes")
        domain = None
        if dma_size:
            try:
                piece = self.dma.alloc(dma_size, DOMAIN_ALIGN)
            except MemoryError as exc:
                raise MemoryError(f"{function}: no room for a {dma_size >> 10} KiB DMA domain in the shared "
                                  f"window ({self.dma.free_bytes >> 10} KiB free); close a device or ask for "
                                  f"less (open(..., dma_size=...))") from exc
            start = piece.phys - self._window_phys
            domain = DmaPool(self._dma_view, self._window_phys, start, start + dma_size)
        try:
            index = self.admin.control(self.abi.PROXY_OP_OPEN_PCI, function.devfn,
                                       domain.base if domain else 0, f"open {function}", mask=dma_size)
        except BaseException:
            if domain:
                self.dma.free_at(domain.base)
            raise
        ch = self._new_channel(index, str(function), domain)
        self._open[index] = ch
        return ch

    def open_ports(self, base: int, count: int) -> ProxyChannel:
        """A channel granted those of the ports that belong to the machine's legacy devices
        (the rest of the range stays refused); AccessDenied, saying why, when none does."""
        what = f"open ports {base:#x}+{count}"
        mask, why = grantable(self.machine.spec, base, count, self.abi.reserved_ports(base, count))
        if not mask:
            raise AccessDenied(f"{what}: {why}", self.abi.PROXY_STATUS_DENIED)
        index = self.admin.control(self.abi.PROXY_OP_OPEN_ISA, base, count, what, mask=mask)
        ch = self._new_channel(index, f"ports {base:#x}+{count}")
        self._open[index] = ch
        return ch

    def close_channel(self, ch: ProxyChannel) -> None:
        """Revoke the channel (the proxy turns bus mastering off and unmaps its domain), then
        take the domain's memory back."""
        self._open.pop(ch.index, None)
        if self.window.state == self.abi.PROXY_STATE_READY and self.machine.alive():
            self._admin(self.abi.PROXY_OP_CLOSE, ch.index, 0, f"close {ch!r}")
        if isinstance(ch.domain, DmaPool):
            self.dma.free_at(ch.domain.base)

    def crash(self, kind: str = "INVALID_OPCODE") -> None:
        """Make the guest take a real CPU exception (for testing crash reports); raises GuestCrash."""
        self._admin(self.abi.PROXY_OP_CRASH, self.abi.consts[f"PROXY_CRASH_{kind}"],
                    self.abi.PROXY_CRASH_MAGIC, f"crash {kind}")
        raise ProxyError(f"crash {kind}", 0)   # not reached: the guest is gone

    def close(self) -> None:
        for ch in list(self._open.values()):
            try:
                ch.close()
            except Exception as exc:    # a crashed or dead guest cannot take its grants back
                log.debug("closing %r: %s", ch, exc)
        self.admin.closed = True
        self._dma_view.release()
        self.window.release()


class ProxyMachine(BootedMachine[ProxyBus]):
    """A booted proxy guest: ``with ProxyMachine(spec) as pm: pm.bus.find(...)``."""

    def __init__(self, spec: MachineSpec, **machine_args: Any) -> None:
        assert spec.guest_elf is not None and spec.ivshmem_size, "use proxy_spec() to build the spec"
        self.abi = load_abi(spec.guest_elf)
        super().__init__(spec, **machine_args)

    def attach(self, machine: Machine) -> ProxyBus:
        return ProxyBus(machine, self.abi)

    def __enter__(self) -> "ProxyMachine":
        super().__enter__()
        return self
