"""The proxy transport: a Bus whose channels are rings served by the proxy guest."""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any, Sequence

from .. import tracing
from ..access import Bar, Bus, PciFunction
from ..errors import AccessDenied, ProxyError
from ..machine import Machine
from ..machine.legacy import grantable, irqs_of
from .abi import Abi
from .channel import ProxyChannel
from .clock import GuestClock
from .dma import DmaPool
from .slots import Slot
from .window import SharedWindow

if TYPE_CHECKING:
    from .machine import ProxyWindows

log = logging.getLogger(__name__)

DOMAIN_SIZE = 4 << 20       # each opened device's DMA memory unless it asks for another size
DOMAIN_ALIGN = 64 << 10


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

    def _opened(self, index: int, name: str, domain_base: int = 0, domain_size: int = 0) -> ProxyChannel:
        """The channel the proxy granted on ring ``index``, lending from its domain (if any)."""
        domain = None
        if domain_size:
            start = domain_base - self._window_phys
            domain = DmaPool(self._dma_view, self._window_phys, start, start + domain_size)
        ch = self._new_channel(index, name, domain)
        self._open[index] = ch
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
    """The machine owner's bus: the control window, its admin channel, and the grants of
    every window (its own channels, and those of the driver slots it lends out)."""

    def __init__(self, machine: Machine, windows: ProxyWindows, abi: Abi, ready_timeout: float = 60.0) -> None:
        assert windows.control is not None, "the machine has not started"
        self.machine = machine
        super().__init__(SharedWindow(windows.control, abi, machine), ready_timeout)
        self.admin = self._new_channel(0, "admin")
        self._admin_lock = threading.Lock()     # the admin ring serves the owner and its slot server
        # The pool, carved into one domain per opened device.
        self.dma = DmaPool(self._dma_view, self._window_phys, self.window.field("dma_offset"),
                           self.window.field("window_size"))
        self.slots = [Slot(n, handles, SharedWindow(handles, abi, machine))
                      for n, handles in enumerate(windows.slots, 1)]
        self.owned: dict[int, int] = {}         # our own channels' rings -> the devfn each holds

    @functools.cached_property
    def clock(self) -> GuestClock:
        """Guest TSC → host perf_counter_ns, from the admin channel; call ``clock.calibrate()`` to refine."""
        return GuestClock(_Locked(self.admin, self._admin_lock), self.tsc_hz)

    def _admin(self, op: int, addr: int, value: int, what: str, mask: int = 0, window: int = 0) -> int:
        with self._admin_lock:
            return self.admin.control(op, addr, value, what, mask, expect=window)

    @property
    def spurious_irqs(self) -> int:
        """Interrupts the guest took that no channel owned, plus LAPIC and 8259 spurious ones."""
        return int(self.window.field("spurious_irqs"))

    # ---- grants, in any window ----

    def grant_pci(self, function: PciFunction, dma_size: int | None = None, slot: int = 0) -> tuple[int, int, int]:
        """Open ``function`` on a ring of window ``slot`` (0: our own) with a DMA domain of
        ``dma_size`` bytes from that window's pool; returns (ring, domain base, domain size)."""
        dma_size = self.check_domain_size(function, dma_size)
        pool = self.slots[slot - 1].pool if slot else self.dma
        base = 0
        if dma_size:
            try:
                base = pool.alloc(dma_size, DOMAIN_ALIGN).phys
            except MemoryError as exc:
                raise MemoryError(f"{function}: no room for a {dma_size >> 10} KiB DMA domain in the shared "
                                  f"window ({pool.free_bytes >> 10} KiB free); close a device or ask for "
                                  f"less (open(..., dma_size=...))") from exc
        try:
            ring = self._admin(self.abi.PROXY_OP_OPEN_PCI, function.devfn, base, f"open {function}",
                               mask=dma_size, window=slot)
        except BaseException:
            if base:
                pool.free_at(base)
            raise
        return ring, base, dma_size

    def grant_ports(self, base: int, count: int, slot: int = 0) -> int:
        """Open those of the ports that belong to the machine's legacy devices on a ring of
        window ``slot`` (the rest of the range stays refused); AccessDenied, saying why, when none does."""
        what = f"open ports {base:#x}+{count}"
        mask, why = grantable(self.machine.spec, base, count, self.abi.reserved_ports(base, count))
        if not mask:
            raise AccessDenied(f"{what}: {why}", self.abi.PROXY_STATUS_DENIED)
        irqs = irqs_of(self.machine.spec, base, count)
        return self._admin(self.abi.PROXY_OP_OPEN_ISA, base, count | irqs << 16, what, mask=mask, window=slot)

    def revoke(self, ring: int, domain_base: int = 0, slot: int = 0) -> None:
        """Close a ring's channel (the proxy turns bus mastering off and unmaps its domain),
        then take the domain's memory back."""
        if self.window.state == self.abi.PROXY_STATE_READY and self.machine.alive():
            self._admin(self.abi.PROXY_OP_CLOSE, ring, 0, f"close ring {ring} of window {slot}", window=slot)
        if domain_base:
            (self.slots[slot - 1].pool if slot else self.dma).free_at(domain_base)

    def revoke_slot(self, slot: int) -> None:
        """Take back everything slot ``slot`` holds: its channels close (no interrupts, no
        bus mastering, domains unmapped and invalidated), and its domains are free."""
        self._admin(self.abi.PROXY_OP_SLOT_REVOKE, slot, 0, f"revoke slot {slot}")
        self.slots[slot - 1].reset_pool()

    def renew_slot(self, slot: int) -> None:
        """Clear slot ``slot``'s window and have the proxy publish it afresh, for the next
        driver. Only once nobody maps it any more: the last driver's process has exited."""
        s = self.slots[slot - 1]
        s.clear()
        self._admin(self.abi.PROXY_OP_SLOT_READY, slot, 0, f"publish slot {slot}")
        s.window.wait_ready(10.0)

    # ---- our own channels ----

    def open_channel(self, function: PciFunction, dma_size: int | None = None) -> ProxyChannel:
        """A channel to ``function`` with a DMA domain of ``dma_size`` bytes (default
        ``DOMAIN_SIZE``; 0: the device may not DMA at all)."""
        ring, base, size = self.grant_pci(function, dma_size)
        self.owned[ring] = function.devfn
        return self._opened(ring, str(function), base, size)

    def open_ports(self, base: int, count: int) -> ProxyChannel:
        return self._opened(self.grant_ports(base, count), f"ports {base:#x}+{count}")

    def close_channel(self, ch: ProxyChannel) -> None:
        self._open.pop(ch.index, None)
        self.owned.pop(ch.index, None)
        self.revoke(ch.index, ch.domain.base if isinstance(ch.domain, DmaPool) else 0)

    def crash(self, kind: str = "INVALID_OPCODE") -> None:
        """Make the guest take a real CPU exception (for testing crash reports); raises GuestCrash."""
        self._admin(self.abi.PROXY_OP_CRASH, self.abi.consts[f"PROXY_CRASH_{kind}"],
                    self.abi.PROXY_CRASH_MAGIC, f"crash {kind}")
        raise ProxyError(f"crash {kind}", 0)   # not reached: the guest is gone

    def close(self) -> None:
        super().close()
        self.admin.closed = True
        for s in self.slots:
            s.window.release()


class _Locked:
    """The admin channel's NOPs for the clock, taken under the lock the slot server shares."""

    def __init__(self, channel: ProxyChannel, lock: threading.Lock) -> None:
        self.channel, self.lock = channel, lock

    def guest_time(self) -> int:
        with self.lock:
            return self.channel.guest_time()
