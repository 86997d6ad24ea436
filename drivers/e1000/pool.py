"""Packet buffers for forwarding without a copy: ixy's mempool, in Python.

One DMA allocation cut into ``BUFFER_SIZE`` buffers, lent and taken back in
O(1) per batch (a stack of addresses, taken and given back by the slice). Two NICs opened into one DMA domain
(``bus.open(lan, share_domain_with=wan)``) draw their receive buffers from
one pool: a buffer one NIC received into goes out on the other's transmit
ring as it is, and comes back to the pool when that transmit is done.
"""

from __future__ import annotations

from harness.access import Device

from .driver import BUFFER_SIZE


class PacketPool:
    """``count`` buffers of ``BUFFER_SIZE`` bytes from ``device``'s DMA domain."""

    def __init__(self, device: Device, count: int) -> None:
        self.device = device
        self.count = count
        self.memory = device.dma_alloc(count * BUFFER_SIZE)
        self._free = [self.memory.phys + i * BUFFER_SIZE for i in range(count)]

    @property
    def available(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """Up to ``count`` free buffers' addresses (fewer when fewer are free), now the
        caller's: one slice, whatever the count."""
        free = self._free
        if count >= len(free):
            taken, self._free = free, []
            return taken
        taken = free[len(free) - count:]
        del free[len(free) - count:]
        return taken

    def give(self, addresses: list[int]) -> None:
        """Buffers back, as :meth:`take` lent them."""
        self._free += addresses

    def take_all(self) -> list[int]:
        """Every free buffer's address, now the caller's (a loop of another kind lends them;
        ``give`` gives them back)."""
        return self.take(len(self._free))

    def view(self, phys: int, length: int) -> memoryview:
        """The buffer at ``phys``'s first ``length`` bytes, as Python sees them."""
        offset = phys - self.memory.phys
        return self.memory.view[offset:offset + length]

    def close(self) -> None:
        self.device.dma_free(self.memory)
