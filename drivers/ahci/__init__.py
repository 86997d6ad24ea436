"""AHCI SATA disks."""

from .blockfile import BlockFile
from .driver import Ahci, DiskError, Identity, Port

__all__ = ["Ahci", "BlockFile", "DiskError", "Identity", "Port"]
