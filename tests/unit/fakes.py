"""A fake port-I/O transport for driver unit tests: registers are Python callables."""

from __future__ import annotations

import time
from typing import Callable, Sequence

from harness.access import Access, Channel, Kind, Region, Space
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
