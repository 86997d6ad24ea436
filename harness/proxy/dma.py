"""DMA memory: the part of the shared window after the control area.

The window's pool is carved into one *domain* per opened device (a
``DmaPool`` over a slice), and each domain lends buffers. A buffer's address
is BAR2's guest-physical address plus its offset, so a device DMAs straight
into memory the host has mapped: no copies (QEMU-FACTS: devices can DMA into
BAR2). With the IOMMU on, the proxy maps each domain for its device alone,
identity (IOVA = guest-physical), so a driver programs the same addresses
either way. First fit over a sorted free list, coalescing on free; every
buffer and every domain is zeroed when it is lent; a pool made over memory that holds
zeroes (``zeroed=True``: a domain as lent, a slot window just cleared) writes only what was
lent before, so that a restarted driver's 16 MiB domain costs no writing (and no faulting
in of the cleared window's pages) in the owner, and its buffers none in the driver.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable

from ..access import DmaBuffer, DmaDomain


class DmaPool(DmaDomain):
    """Offsets ``start`` to ``end`` of ``memory`` (guest-physical ``phys_base`` + offset), lent out."""

    def __init__(self, memory: memoryview, phys_base: int, start: int, end: int, zeroed: bool = False) -> None:
        self.size = end - start
        self.base = phys_base + start
        self.observer: Callable[[int, int, bool], None] | None = None    # (phys, size, freed): a trace
        self._memory = memory
        self._phys_base = phys_base
        self._free: list[tuple[int, int]] = [(start, end)]      # (offset, end), sorted, disjoint
        self._used: dict[int, tuple[int, int]] = {}              # phys -> the block it came from
        # From this offset on the memory holds zeroes still: nothing was lent there since it did.
        self._zero_from = start if zeroed else end
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._free)

    def alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"size must be positive and align a power of two (size {size}, align {align})")
        with self._lock:
            for i, (start, end) in enumerate(self._free):
                phys_start = self._phys_base + start
                pad = -phys_start % align
                if start + pad + size <= end:
                    del self._free[i]
                    if start + pad + size < end:
                        self._free.insert(i, (start + pad + size, end))
                    if pad:
                        self._free.insert(i, (start, start + pad))
                    offset = start + pad
                    self._used[self._phys_base + offset] = (offset, offset + size)
                    view = self._memory[offset:offset + size]
                    written = max(0, min(size, self._zero_from - offset))
                    view[:written] = bytes(written)
                    self._zero_from = max(self._zero_from, offset + size)
                    if self.observer:
                        self.observer(self._phys_base + offset, size, False)
                    return DmaBuffer(self._phys_base + offset, view)
        raise MemoryError(f"no {size} contiguous bytes aligned to {align} in {self.size >> 10} KiB of DMA memory "
                          f"at {self.base:#x} ({self.free_bytes} bytes free in all)")

    def free(self, buffer: DmaBuffer) -> None:
        self.free_at(buffer.phys)

    def free_at(self, phys: int) -> None:
        """Give back the buffer that starts at ``phys``."""
        with self._lock:
            block = self._used.pop(phys, None)
            if block is not None and self.observer:
                self.observer(phys, block[1] - block[0], True)
            if block is None:
                raise ValueError(f"{phys:#x} is not a buffer of the DMA memory at {self.base:#x}")
            i = bisect.bisect(self._free, block)
            self._free.insert(i, block)
            merged: list[tuple[int, int]] = []
            for start, end in self._free:
                if merged and merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], end)
                else:
                    merged.append((start, end))
            self._free = merged
