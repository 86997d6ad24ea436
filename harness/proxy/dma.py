"""The DMA pool: the part of the shared window after the control area, lent out in buffers.

A buffer's guest-physical address is BAR2's address plus its offset, so a
device DMAs straight into memory the host has mapped: no copies, no
translation (QEMU-FACTS: devices can DMA into BAR2). First fit over a sorted
free list, coalescing on free; every buffer is zeroed when it is lent.
"""

from __future__ import annotations

import bisect
import threading

from ..access import DmaBuffer


class DmaPool:
    def __init__(self, memory: memoryview, phys_base: int, start: int, end: int) -> None:
        self._memory = memory
        self._phys_base = phys_base
        self._free: list[tuple[int, int]] = [(start, end)]      # (offset, end), sorted, disjoint
        self._used: dict[int, tuple[int, int]] = {}              # phys -> the block it came from
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
                    view[:] = bytes(size)
                    return DmaBuffer(self._phys_base + offset, view)
        raise MemoryError(f"the DMA pool has no {size} contiguous bytes aligned to {align} "
                          f"({self.free_bytes} bytes free in all)")

    def free(self, buffer: DmaBuffer) -> None:
        with self._lock:
            block = self._used.pop(buffer.phys, None)
            if block is None:
                raise ValueError(f"{buffer.phys:#x} is not a buffer of this pool")
            i = bisect.bisect(self._free, block)
            self._free.insert(i, block)
            merged: list[tuple[int, int]] = []
            for start, end in self._free:
                if merged and merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], end)
                else:
                    merged.append((start, end))
            self._free = merged
