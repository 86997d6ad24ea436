"""A fake port-I/O transport for driver unit tests: registers are Python callables."""

from __future__ import annotations

import time
from typing import Callable, Sequence

from harness.access import Access, Channel, DmaBuffer, Kind, Region, Space
from harness.errors import DeviceTimeout


class FakePorts(Channel):
    """Port I/O served by ``read(port)`` and ``write(port, value)`` callbacks; polls honour timeouts."""

    def __init__(self, read: Callable[[int], int], write: Callable[[int, int], None]) -> None:
        self._read, self._write = read, write
        self.log: list[Access] = []

    def execute(self, accesses: Sequence[Access]) -> list[int]:
        out = []
        for a in accesses:
            assert a.space is Space.PIO
            self.log.append(a)
            if a.kind is Kind.WRITE:
                self._write(a.addr, a.value)
                out.append(0)
            elif a.kind is Kind.READ:
                out.append(self._read(a.addr))
            else:
                deadline = time.monotonic() + a.timeout
                while True:
                    value = self._read(a.addr)
                    if a.satisfied_by(value):
                        break
                    if time.monotonic() > deadline:
                        raise DeviceTimeout(a, 0, value)
                out.append(value)
        return out

    def region(self, base: int, count: int) -> Region:
        return Region(self, Space.PIO, base, count)


class FakeDma:
    """DMA memory from a bytearray: buffers at made-up physical addresses, page aligned."""

    def __init__(self, size: int = 1 << 20, base: int = 0x1000_0000) -> None:
        self.memory = bytearray(size)
        self.view = memoryview(self.memory)
        self.base = base
        self.next = 0

    def dma_alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        self.next = -(-self.next // align) * align
        start, self.next = self.next, self.next + size
        return DmaBuffer(self.base + start, self.view[start:start + size])

    def dma_free(self, buffer: DmaBuffer) -> None:
        pass

    def read(self, phys: int, size: int) -> bytes:
        return bytes(self.memory[phys - self.base:phys - self.base + size])


class FakeMmio(Channel):
    """MMIO writes served by a ``write(addr, value)`` callback, and polls of ``memory`` (what a
    device wrote, guest-side waits) that time out at once if unsatisfied; every batch is logged."""

    def __init__(self, write: Callable[[int, int], None], memory: FakeDma) -> None:
        self._write, self.memory = write, memory
        self.batches: list[list[Access]] = []

    def execute(self, accesses: Sequence[Access]) -> list[int]:
        self.batches.append(list(accesses))
        out = []
        for a in accesses:
            if a.kind is Kind.POLL and a.space is Space.DMA:
                value = int.from_bytes(self.memory.read(a.addr, a.width), "little")
                if not a.satisfied_by(value):
                    raise DeviceTimeout(a, 0, value)
                out.append(value)
                continue
            assert a.space is Space.MMIO and a.kind is Kind.WRITE
            self._write(a.addr, a.value)
            out.append(0)
        return out
