"""Interrupts through the proxy: the guest counts them per channel; the host waits on the count."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from ..access import Irq, IrqEvent, IrqMode
from ..errors import InterruptTimeout
from .window import SPIN_SECONDS

if TYPE_CHECKING:
    from .channel import ProxyChannel

MODES = {IrqMode.INTX: "PROXY_IRQ_INTX", IrqMode.MSI: "PROXY_IRQ_MSI", IrqMode.MSIX: "PROXY_IRQ_MSIX",
         IrqMode.ISA: "PROXY_IRQ_ISA"}


class ProxyIrq(Irq):
    """One channel's interrupt. ``spin`` is how long ``wait`` spins before it sleeps on the doorbell."""

    def __init__(self, channel: "ProxyChannel", mode: IrqMode, isa_irqs: Sequence[int] = (),
                 spin: float | None = None) -> None:
        super().__init__()
        self.channel = channel
        self.mode = mode
        abi = channel.bus.abi
        self._w = channel.bus.window
        base = abi.offsetof("proxy_shared", "irqs") + channel.index * abi.sizeof("proxy_irq")
        self._count_idx = (base + abi.offsetof("proxy_irq", "count")) // 4
        self._masked_idx = (base + abi.offsetof("proxy_irq", "masked")) // 4
        self._line_idx = (base + abi.offsetof("proxy_irq", "line")) // 4
        self._tsc_idx = (base + abi.offsetof("proxy_irq", "tsc")) // 8
        self._seen = self._w.u32[self._count_idx]
        self._vector = abi.PROXY_DOORBELL_IRQ_BASE + channel.index
        self.spin = SPIN_SECONDS if spin is None else spin
        if (mode is IrqMode.ISA) != bool(isa_irqs):
            raise ValueError("ISA IRQ numbers go with IrqMode.ISA, and only with it")
        mask = sum(1 << n for n in set(isa_irqs))
        channel.control(abi.PROXY_OP_IRQ_ENABLE, abi.consts[MODES[mode]], mask, f"enable {mode.value} irq")
        self.closed = False

    @property
    def line(self) -> int:
        """The IOAPIC input (INTx), the ISA IRQ bitmask (ISA), or the vector (MSI, MSI-X)."""
        return self._w.u32[self._line_idx]

    @property
    def masked(self) -> bool:
        """True while the guest holds a level line masked waiting for this channel's ack."""
        return bool(self._w.u32[self._masked_idx])

    @property
    def count(self) -> int:
        """Interrupts the guest has delivered to this channel, seen by wait() or not."""
        return (self._w.u32[self._count_idx] - self._seen + self.delivered) & 0xFFFFFFFF

    def wait(self, timeout: float) -> IrqEvent:
        u32, idx, seen = self._w.u32, self._count_idx, self._seen
        if u32[idx] == seen:
            self._w.wait(lambda: u32[idx] != seen, timeout, f"an interrupt on {self.channel!r}",
                         self._vector, spin=self.spin, on_timeout=InterruptTimeout)
        now = time.perf_counter_ns()
        count = u32[idx]
        tsc = self._w.u64[self._tsc_idx]
        self._seen = count
        return self._count(IrqEvent(count, (count - seen) & 0xFFFFFFFF, tsc, now))

    def ack(self) -> None:
        abi = self.channel.bus.abi
        self.channel.control(abi.PROXY_OP_IRQ_ACK, 0, 0, "ack irq")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.channel.closed:
            abi = self.channel.bus.abi
            self.channel.control(abi.PROXY_OP_IRQ_DISABLE, 0, 0, "disable irq")
