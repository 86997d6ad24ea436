"""Interrupts through the proxy: the guest counts them per channel vector; the host waits on the count."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from ..access import Irq, IrqEvent, IrqMode
from ..errors import InterruptTimeout
from .window import SPIN_SECONDS

if TYPE_CHECKING:
    from .channel import ProxyChannel

TIGHT_LOOKS = 256           # ~15 us of looking at the count before the window's yielding spin

MODES = {IrqMode.INTX: "PROXY_IRQ_INTX", IrqMode.MSI: "PROXY_IRQ_MSI", IrqMode.MSIX: "PROXY_IRQ_MSIX",
         IrqMode.ISA: "PROXY_IRQ_ISA"}


def enable(channel: "ProxyChannel", mode: IrqMode, isa_irqs: Sequence[int] = (), count: int = 1,
           spin: float | None = None) -> list["ProxyIrq"]:
    """Enable the channel's interrupt and return one Irq per vector (``count`` > 1: MSI-X, or
    MSI with multiple messages where the device offers them).

    The vectors are enabled together and disabled together: the proxy drops the
    channel's interrupt when the last of them is closed."""
    abi = channel.bus.abi
    if (mode is IrqMode.ISA) != bool(isa_irqs):
        raise ValueError("ISA IRQ numbers go with IrqMode.ISA, and only with it")
    several = mode is IrqMode.MSIX or (mode is IrqMode.MSI and not count & (count - 1))
    if not 1 <= count <= abi.PROXY_IRQ_VECTORS or (count > 1 and not several):
        raise ValueError(f"a channel takes 1 to {abi.PROXY_IRQ_VECTORS} vectors, several only with MSI-X or "
                         f"(a power of two) MSI, not {count} of {mode.value}")
    value = sum(1 << n for n in set(isa_irqs)) if mode is IrqMode.ISA else count
    channel._control(abi.PROXY_OP_IRQ_ENABLE, abi.consts[MODES[mode]], value, f"enable {count} {mode.value} irq")
    group: list[ProxyIrq] = []
    make = getattr(channel, "irq_class", ProxyIrq)      # a traced channel's record their waits
    group += [make(channel, mode, vector, group, spin) for vector in range(count)]
    return group


class ProxyIrq(Irq):
    """One vector of a channel's interrupt. ``spin`` is how long ``wait`` spins before it
    sleeps on the vector's own doorbell. Made by :func:`enable`."""

    def __init__(self, channel: "ProxyChannel", mode: IrqMode, vector: int, group: list["ProxyIrq"],
                 spin: float | None = None) -> None:
        super().__init__()
        self.channel = channel
        self.mode = mode
        self.vector = vector                # MSI-X table entry; 0 for every other mode
        self._group = group                 # the channel's vectors, enabled and disabled together
        abi = channel.bus.abi
        self._w = channel.bus.window
        slot = channel.index * abi.PROXY_IRQ_VECTORS + vector
        base = self._w.irqs_off + slot * abi.sizeof("proxy_irq")
        self._count_idx = (base + abi.offsetof("proxy_irq", "count")) // 4
        self._masked_idx = (base + abi.offsetof("proxy_irq", "masked")) // 4
        self._line_idx = (base + abi.offsetof("proxy_irq", "line")) // 4
        self._tsc_idx = (base + abi.offsetof("proxy_irq", "tsc")) // 8
        self._seen = self._w.u32[self._count_idx]
        self._doorbell = abi.PROXY_DOORBELL_IRQ_BASE + slot
        self.spin = SPIN_SECONDS if spin is None else spin
        self.closed = False

    @property
    def line(self) -> int:
        """The IOAPIC input (INTx), the ISA IRQ bitmask (ISA), or the guest's IDT vector (MSI, MSI-X)."""
        return self._w.u32[self._line_idx]

    @property
    def masked(self) -> bool:
        """True while the guest holds a level line masked waiting for this channel's ack."""
        return bool(self._w.u32[self._masked_idx])

    @property
    def count(self) -> int:
        """Interrupts the guest has delivered to this vector, seen by wait() or not."""
        return (self._w.u32[self._count_idx] - self._seen + self.delivered) & 0xFFFFFFFF

    def wait(self, timeout: float) -> IrqEvent:
        u32, idx, seen = self._w.u32, self._count_idx, self._seen
        # A waiter that may spin first looks TIGHT_LOOKS times without yielding, as a request's
        # completion does (ProxyChannel._one): the window's spin yields its core every time
        # round, a syscall of 1-3 us here, and the interrupt is often already on its way.
        looks = TIGHT_LOOKS if self.spin > 0 else 0
        while looks and u32[idx] == seen:
            looks -= 1
        if u32[idx] == seen:
            self._w.wait(lambda: u32[idx] != seen, timeout, f"an interrupt on {self.channel!r} vector {self.vector}",
                         self._doorbell, spin=self.spin, on_timeout=InterruptTimeout)
        now = time.perf_counter_ns()
        count = u32[idx]
        tsc = self._w.u64[self._tsc_idx]
        self._seen = count
        return self._count(IrqEvent(count, (count - seen) & 0xFFFFFFFF, tsc, now))

    def ack(self) -> None:
        abi = self.channel.bus.abi
        self.channel._control(abi.PROXY_OP_IRQ_ACK, 0, 0, "ack irq")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if all(irq.closed for irq in self._group) and not self.channel.closed:
            abi = self.channel.bus.abi
            self.channel._control(abi.PROXY_OP_IRQ_DISABLE, 0, 0, "disable irq")
