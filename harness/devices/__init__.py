"""Device classes: the contracts a disk or a NIC meets, apart from any one driver.

Drivers implement them (``drivers.ahci``, ``drivers.nvme``, ``drivers.e1000``);
services and tools use them without knowing which driver is behind.
"""

from .block import BlockDevice, BlockFile
from .nic import Nic

__all__ = ["BlockDevice", "BlockFile", "Nic"]
