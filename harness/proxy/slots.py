"""Driver slots as the machine's owner sees them.

A slot is an ivshmem window of its own (its own memfd and eventfds, served
by the harness) that the owner lends to one driver process at a time
(:mod:`.control`). The proxy serves the rings in it, and the DMA domains of
the devices opened into it lie in its pool, so a driver process holding only
this window cannot reach another slot, the control window or the proxy.
"""

from __future__ import annotations

import mmap

from .ivshmem import IvshmemServer
from .dma import DmaPool
from .window import SharedWindow


class Slot:
    """Slot ``n``: its window (the owner maps every slot) and the pool its domains come from."""

    def __init__(self, n: int, handles: IvshmemServer, window: SharedWindow) -> None:
        self.n = n
        self.handles = handles
        self.window = window
        # Read once, at boot, before any driver could write the window: later its control
        # page says whatever the last driver wrote there.
        self.phys, self.dma_offset, self.size = (window.field(f) for f in ("window_phys", "dma_offset", "window_size"))
        self.pool = self._fresh_pool()

    def _fresh_pool(self, zeroed: bool = False) -> DmaPool:
        return DmaPool(memoryview(self.window.mem), self.phys, self.dma_offset, self.size, zeroed)

    @property
    def heartbeat(self) -> int:
        """What the slot's driver has counted so far (0 until it beats)."""
        return int(self.window.u64[self.window.heartbeat_idx])

    def reset_pool(self) -> None:
        """Every domain free (once the proxy has unmapped them)."""
        self.pool = self._fresh_pool()

    def clear(self) -> None:
        """Every byte of the window back to zero. Dropping the pages (a hole punched in the
        memfd) is instant and gives their memory back; QEMU's and any other mapping see
        zeroes from then on."""
        self.handles.memory.madvise(mmap.MADV_REMOVE)
        self.pool = self._fresh_pool(zeroed=True)     # nothing is lent from a window being cleared

    def __repr__(self) -> str:
        return f"<Slot {self.n}>"
