"""AHCI SATA disks."""

from harness.devices.block import BlockFile
from .driver import Ahci, DiskError, Identity, Port

__all__ = ["Ahci", "BlockFile", "DiskError", "Identity", "Port"]
