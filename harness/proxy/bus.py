"""The proxy transport: a Bus whose channels are rings served by the proxy guest."""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING, Any, Sequence

from ..access import Bar, Bus, Channel, PciFunction
from ..machine import Machine
from .abi import Abi
from .admin import ProxyAdmin
from .channel import ProxyChannel
from .clock import GuestClock
from .dma import DmaPool
from .traced import channel_for
from .window import SharedWindow

if TYPE_CHECKING:
    from .machine import ProxyWindows

log = logging.getLogger(__name__)

DOMAIN_SIZE = 4 << 20       # each opened device's DMA memory unless it asks for another size


class WindowBus(Bus):
    """What every holder of a window has: the device table the proxy published in it,
    channels on its rings, and DMA domains in its pool. The owner's control window
    (:class:`ProxyBus`) and a driver process's slot (:class:`harness.processes.attached.AttachedBus`)."""

    def __init__(self, window: SharedWindow, ready_timeout: float = 60.0) -> None:
        self.window = window
        self.abi = window.abi
        self.window.wait_ready(ready_timeout)
        self._functions = tuple(self._read_device_table())
        self.tsc_hz = self.window.field("tsc_hz")
        self._open: dict[int, ProxyChannel] = {}
        self._dma_view = memoryview(self.window.mem)
        self._window_phys = self.window.field("window_phys")
        self.iommu = bool(self.window.field("iommu"))

    def _opened(self, index: int, name: str, domain_base: int = 0, domain_size: int = 0) -> ProxyChannel:
        """The channel the proxy granted on ring ``index``, lending from its domain (if any)."""
        domain = None
        if domain_size:
            start = domain_base - self._window_phys
            domain = DmaPool(self._dma_view, self._window_phys, start, start + domain_size,
                             zeroed=True)     # a domain is zeroed when it is lent
        return self._opened_in(index, name, domain)

    def _opened_in(self, index: int, name: str, domain: DmaPool | None) -> ProxyChannel:
        ch = channel_for(self, index, name, domain)
        self._open[index] = ch
        return ch

    def open_channel_sharing(self, function: PciFunction, channel: Channel) -> ProxyChannel:
        if (not isinstance(channel, ProxyChannel) or self._open.get(channel.index) is not channel
                or not isinstance(channel.domain, DmaPool)):
            raise ValueError(f"{function}: {channel} is not an open device of this bus with a DMA domain")
        ring = self._grant_sharing(function, channel.index)
        return self._opened_in(ring, str(function), channel.domain)

    @abc.abstractmethod
    def _grant_sharing(self, function: PciFunction, ring: int) -> int:
        """Have ``function`` opened on a ring of this window, in ring ``ring``'s domain; its ring."""

    def _last_in_domain(self, ch: ProxyChannel) -> bool:
        """Is ``ch`` (already forgotten by ``_open``) the last open channel in its domain?"""
        return not any(other.domain is ch.domain for other in self._open.values())

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

    @property
    def window_phys(self) -> int:
        """The guest-physical address of the window's first byte (its ivshmem BAR2)."""
        return self._window_phys

    def check_domain_size(self, function: object, dma_size: int | None) -> int:
        dma_size = DOMAIN_SIZE if dma_size is None else dma_size
        limit = self.abi.PROXY_DOMAIN_MAX
        if not 0 <= dma_size <= limit or dma_size % self.abi.PROXY_DOMAIN_ALIGN:
            raise ValueError(f"{function}: a DMA domain is whole 4 KiB pages, at most {limit >> 20} MiB, "
                             f"not {dma_size} bytes")
        return dma_size

    def close(self) -> None:
        for ch in list(self._open.values()):
            try:
                ch.close()
            except Exception as exc:    # a crashed or dead guest cannot take its grants back
                log.debug("closing %r: %s", ch, exc)
        self._dma_view.release()
        self.window.release()


class ProxyBus(WindowBus):
    """The machine owner's bus, the one a driver in the owner's process is handed: the control
    window's device table, pool and channels. Its grants come from the owner's admin ring
    (:class:`~harness.proxy.admin.ProxyAdmin`, ``pm.admin``), which this bus keeps to itself."""

    def __init__(self, machine: Machine, windows: ProxyWindows, abi: Abi, ready_timeout: float = 60.0) -> None:
        assert windows.control is not None, "the machine has not started"
        self.machine = machine
        super().__init__(SharedWindow(windows.control, abi, machine), ready_timeout)
        # The pool, carved into one domain per opened device.
        self.dma = DmaPool(self._dma_view, self._window_phys, self.window.field("dma_offset"),
                           self.window.field("window_size"))
        self.owned: dict[int, int] = {}         # our own channels' rings -> the devfn each holds
        self._admin = ProxyAdmin(self, machine, windows)

    @property
    def clock(self) -> GuestClock:
        """Guest TSC → host perf_counter_ns, from the admin ring's NOPs; call ``clock.calibrate()`` to refine."""
        return self._admin.clock

    @property
    def spurious_irqs(self) -> int:
        """Interrupts the guest took that no channel owned, plus LAPIC and 8259 spurious ones."""
        return int(self.window.field("spurious_irqs"))

    def open_channel(self, function: PciFunction, dma_size: int | None = None) -> ProxyChannel:
        """A channel to ``function`` with a DMA domain of ``dma_size`` bytes (default
        ``DOMAIN_SIZE``; 0: the device may not DMA at all)."""
        ring, base, size = self._admin.grant_pci(function, dma_size)
        self.owned[ring] = function.devfn
        return self._opened(ring, str(function), base, size)

    def _grant_sharing(self, function: PciFunction, ring: int) -> int:
        shared = self._admin.grant_pci_sharing(function, ring)
        self.owned[shared] = function.devfn
        return shared

    def open_ports(self, base: int, count: int) -> ProxyChannel:
        return self._opened(self._admin.grant_ports(base, count), f"ports {base:#x}+{count}")

    def close_channel(self, ch: ProxyChannel) -> None:
        if ch is self._admin.channel:           # the admin ring closes with the bus
            return
        self._open.pop(ch.index, None)
        self.owned.pop(ch.index, None)
        last = isinstance(ch.domain, DmaPool) and self._last_in_domain(ch)
        self._admin.revoke(ch.index, ch.domain.base if last else 0)

    def close(self) -> None:
        super().close()
        self._admin.close()
