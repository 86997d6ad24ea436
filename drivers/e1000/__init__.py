"""Intel 82540EM (e1000) network driver."""

from .driver import E1000, E1000Error, Stats, TxRingFull

__all__ = ["E1000", "E1000Error", "Stats", "TxRingFull"]
