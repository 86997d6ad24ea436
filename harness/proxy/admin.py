"""What only the machine's owner may do, apart from the Bus every driver gets.

``pm.admin`` (a :class:`ProxyAdmin`) holds the control window's admin ring:
it grants devices and ports on a ring of any window (the owner's own, or a
driver slot's), revokes them, takes a driver slot back and publishes it
afresh, and can crash the guest on purpose. ``pm.bus`` (a
:class:`~harness.proxy.bus.ProxyBus`) is what a driver is handed; it asks the
admin for its own grants but offers none of this. The control server
(:mod:`harness.processes.control`) and the supervisor work through the admin.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING

from ..access import PciFunction
from ..errors import AccessDenied, ProxyError
from ..machine import Machine
from ..machine.legacy import grantable, irqs_of
from .clock import GuestClock
from .dma import DmaPool
from .slots import Slot
from .traced import channel_for
from .window import SharedWindow

if TYPE_CHECKING:
    from .bus import ProxyBus
    from .machine import ProxyWindows

DOMAIN_ALIGN = 64 << 10     # where a device's DMA domain starts in its window's pool


class ProxyAdmin:
    """The owner's admin ring (ring 0 of the control window) and the driver slots it lends."""

    def __init__(self, bus: "ProxyBus", machine: Machine, windows: "ProxyWindows") -> None:
        self.bus = bus                      # the owner's own bus: its pool, its channels
        self.machine = machine
        self.abi = bus.abi
        self.window = bus.window
        self.channel = channel_for(bus, 0, "admin")
        self._lock = threading.Lock()       # the admin ring serves the owner and its control server
        self.slots = [Slot(n, handles, SharedWindow(handles, self.abi, machine))
                      for n, handles in enumerate(windows.slots, 1)]

    def request(self, op: int, addr: int, value: int, what: str, mask: int = 0, window: int = 0) -> int:
        """One admin request (``enum proxy_op``) about window ``window``; raises its typed error."""
        with self._lock:
            return self.channel._control(op, addr, value, what, mask, expect=window)

    def guest_time(self) -> int:
        """The guest's TSC, read by a NOP on the admin ring, waited for without the window's
        spin: a clock sample is worth only a short round trip, and on a busy host the spin
        holds the core the vCPU queues for (each sample then took the whole 200 us spin and
        more, 225-450 us, where sleeping at once after the channel's tight looks gave 20-40)."""
        with self._lock:
            spin, self.channel.spin = self.channel.spin, 0.0
            try:
                return self.channel.guest_time()
            finally:
                self.channel.spin = spin

    @functools.cached_property
    def clock(self) -> GuestClock:
        """Guest TSC → host perf_counter_ns, from the admin ring; call ``clock.calibrate()`` to refine."""
        return GuestClock(self, self.bus.tsc_hz)

    def _pool(self, slot: int) -> DmaPool:
        """Window ``slot``'s pool, where its devices' domains are carved from."""
        return self.slots[slot - 1].pool if slot else self.bus.dma

    # ---- grants, in any window ----

    def grant_pci(self, function: PciFunction, dma_size: int | None = None, slot: int = 0) -> tuple[int, int, int]:
        """Open ``function`` on a ring of window ``slot`` (0: the owner's own) with a DMA domain
        of ``dma_size`` bytes from that window's pool; returns (ring, domain base, domain size)."""
        dma_size = self.bus.check_domain_size(function, dma_size)
        pool = self._pool(slot)
        base = 0
        if dma_size:
            try:
                base = pool.alloc(dma_size, DOMAIN_ALIGN).phys
            except MemoryError as exc:
                raise MemoryError(f"{function}: no room for a {dma_size >> 10} KiB DMA domain in the shared "
                                  f"window ({pool.free_bytes >> 10} KiB free); close a device or ask for "
                                  f"less (open(..., dma_size=...))") from exc
        try:
            ring = self.request(self.abi.PROXY_OP_OPEN_PCI, function.devfn, base, f"open {function}",
                                mask=dma_size, window=slot)
        except BaseException:
            if base:
                pool.free_at(base)
            raise
        return ring, base, dma_size

    def grant_pci_sharing(self, function: PciFunction, ring: int, slot: int = 0) -> int:
        """Open ``function`` on a ring of window ``slot`` in the DMA domain of that window's
        ring ``ring`` (the proxy refuses a ring with none): only one holder's devices share.
        Returns its ring; the domain's memory is freed with the last of them (``revoke``)."""
        return self.request(self.abi.PROXY_OP_OPEN_PCI_SHARED, function.devfn, ring,
                            f"open {function} in ring {ring}'s domain", window=slot)

    def grant_ports(self, base: int, count: int, slot: int = 0) -> int:
        """Open those of the ports that belong to the machine's legacy devices on a ring of
        window ``slot`` (the rest of the range stays refused); AccessDenied, saying why, when none does."""
        what = f"open ports {base:#x}+{count}"
        mask, why = grantable(self.machine.spec, base, count, self.abi.reserved_ports(base, count))
        if not mask:
            raise AccessDenied(f"{what}: {why}", self.abi.PROXY_STATUS_DENIED)
        irqs = irqs_of(self.machine.spec, base, count)
        return self.request(self.abi.PROXY_OP_OPEN_ISA, base, count | irqs << 16, what, mask=mask, window=slot)

    def revoke(self, ring: int, domain_base: int = 0, slot: int = 0) -> None:
        """Close a ring's channel (the proxy turns bus mastering off and unmaps its domain),
        then take the domain's memory back: give ``domain_base`` only when no other ring
        shares the domain."""
        if self.window.state == self.abi.PROXY_STATE_READY and self.machine.alive():
            self.request(self.abi.PROXY_OP_CLOSE, ring, 0, f"close ring {ring} of window {slot}", window=slot)
        if domain_base:
            self._pool(slot).free_at(domain_base)

    def revoke_slot(self, slot: int) -> None:
        """Take back everything slot ``slot`` holds: its channels close (no interrupts, no
        bus mastering, domains unmapped and invalidated), and its domains are free."""
        self.request(self.abi.PROXY_OP_SLOT_REVOKE, slot, 0, f"revoke slot {slot}")
        self.slots[slot - 1].reset_pool()

    def renew_slot(self, slot: int) -> None:
        """Clear slot ``slot``'s window and have the proxy publish it afresh, for the next
        driver. Only once nobody maps it any more: the last driver's process has exited."""
        s = self.slots[slot - 1]
        s.clear()
        self.request(self.abi.PROXY_OP_SLOT_READY, slot, 0, f"publish slot {slot}")
        s.window.wait_ready(10.0)

    def crash(self, kind: str = "INVALID_OPCODE") -> None:
        """Make the guest take a real CPU exception (for testing crash reports); raises GuestCrash."""
        self.request(self.abi.PROXY_OP_CRASH, self.abi.consts[f"PROXY_CRASH_{kind}"],
                     self.abi.PROXY_CRASH_MAGIC, f"crash {kind}")
        raise ProxyError(f"crash {kind}", 0)   # not reached: the guest is gone

    def close(self) -> None:
        self.channel.closed = True
        for s in self.slots:
            s.window.release()
