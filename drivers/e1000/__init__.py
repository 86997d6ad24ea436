"""Intel 82540EM (e1000) network driver."""

from .driver import E1000, E1000Error, Stats, TxRingFull
from .pool import PacketPool

__all__ = ["E1000", "E1000Error", "PacketPool", "Stats", "TxRingFull"]
