"""The PC parallel port."""

from .parport import Lines, ParallelPort, ParportError, ParportTimeout
from .regs import ISA_IRQ

__all__ = ["ISA_IRQ", "Lines", "ParallelPort", "ParportError", "ParportTimeout"]
