"""Packet buffers for forwarding without a copy: ixy's mempool, in Python.

One DMA allocation cut into ``BUFFER_SIZE`` buffers, lent and taken back in
O(1) (a stack of addresses). Two NICs opened into one DMA domain
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

    def get(self) -> int | None:
        """A free buffer's address, or None when every buffer is lent."""
        return self._free.pop() if self._free else None

    def put(self, phys: int) -> None:
        self._free.append(phys)

    def take_all(self) -> list[int]:
        """Every free buffer's address, now the caller's (a loop of another kind lends them;
        ``put`` gives them back)."""
        free, self._free = self._free, []
        return free

    def view(self, phys: int, length: int) -> memoryview:
        """The buffer at ``phys``'s first ``length`` bytes, as Python sees them."""
        offset = phys - self.memory.phys
        return self.memory.view[offset:offset + length]

    def close(self) -> None:
        self.device.dma_free(self.memory)
