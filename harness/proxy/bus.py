"""The proxy transport: a Bus whose channels are rings served by the proxy guest."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

from .. import tracing
from ..access import Bar, Bus, DmaBuffer, PciFunction
from ..errors import AbiError, ProxyError
from ..machine import Machine, MachineSpec
from ..machine.booted import BootedMachine
from .abi import Abi, load_abi
from .channel import ProxyChannel
from .clock import GuestClock
from .dma import DmaPool
from .guest import guest_elf
from .window import SharedWindow

log = logging.getLogger(__name__)

WINDOW_SIZE = 32 << 20


def __getattr__(name: str) -> Any:
    # DEFAULT_ELF, for callers from before the guest was built on first use: built when asked for
    if name == "DEFAULT_ELF":
        return guest_elf()
    raise AttributeError(name)


def boot_image(elf: Path) -> Path:
    """The copy of ``elf`` that QEMU's multiboot loader accepts (see guests/proxy/Makefile)."""
    return elf.with_name(elf.stem + "-boot.elf")


def proxy_spec(elf: Path | None = None, accel: str = "auto", memory_mb: int = 128,
               window_size: int = WINDOW_SIZE) -> MachineSpec:
    """A machine that boots the proxy guest with its shared window; add devices to taste.
    ``elf`` defaults to the guest built from the current sources (see :mod:`.guest`)."""
    elf = elf or guest_elf()
    abi = load_abi(elf)   # fail before booting if the ELF is missing or of another ABI
    if not boot_image(elf).exists():
        raise AbiError(f"{boot_image(elf)} is missing beside {elf}: its build did not finish")
    spec = MachineSpec(kernel=boot_image(elf), accel=accel, memory_mb=memory_mb, ivshmem_size=window_size,
                       ivshmem_vectors=abi.PROXY_DOORBELL_VECTORS)
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
        self.dma = DmaPool(self._dma_view, self.window.field("window_phys"), self.window.field("dma_offset"),
                           self.window.field("window_size"))

    def _new_channel(self, index: int, name: str) -> ProxyChannel:
        """A channel on ring ``index``: one that records, if a trace is on (harness.tracing)."""
        tracer = tracing.active()
        if tracer is None:
            return ProxyChannel(self, index, name)
        from .traced import TracedChannel
        return TracedChannel(self, index, name, tracer)

    def dma_alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        buffer = self.dma.alloc(size, align)
        tracer = tracing.active()
        if tracer is not None:
            tracer.dma(self.admin, buffer.phys, buffer.size)
        return buffer

    def dma_free(self, buffer: DmaBuffer) -> None:
        self.dma.free(buffer)
        tracer = tracing.active()
        if tracer is not None:
            tracer.dma(self.admin, buffer.phys, buffer.size, freed=True)

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

    def open_channel(self, function: PciFunction) -> ProxyChannel:
        index = self._admin(self.abi.PROXY_OP_OPEN_PCI, function.devfn, 0, f"open {function}")
        ch = self._new_channel(index, str(function))
        self._open[index] = ch
        return ch

    def open_ports(self, base: int, count: int) -> ProxyChannel:
        index = self._admin(self.abi.PROXY_OP_OPEN_ISA, base, count, f"open ports {base:#x}+{count}")
        ch = self._new_channel(index, f"ports {base:#x}+{count}")
        self._open[index] = ch
        return ch

    def close_channel(self, ch: ProxyChannel) -> None:
        self._open.pop(ch.index, None)
        if self.window.state == self.abi.PROXY_STATE_READY and self.machine.alive():
            self._admin(self.abi.PROXY_OP_CLOSE, ch.index, 0, f"close {ch!r}")

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
