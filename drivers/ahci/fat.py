"""A FAT filesystem on a driver's block device, through pyfatfs (a well-kept FAT library)."""

from __future__ import annotations

import datetime

from fs.base import FS
from pyfatfs.PyFat import PyFat
from pyfatfs.PyFatFS import PyFatFS

from .blockfile import BlockDevice, BlockFile


class DriverFatFS(PyFatFS):
    """PyFatFS over a BlockFile instead of a host file: every sector goes through the driver."""

    def __init__(self, device: BlockDevice, read_only: bool = False) -> None:
        FS.__init__(self)                   # PyFatFS.__init__ insists on a path; the rest is the same
        self.preserve_case = True
        self.fs = PyFat(lazy_load=True)
        self.fs.is_read_only = read_only
        self.fs.set_fp(BlockFile(device))
        self.tz = datetime.datetime.now(datetime.timezone.utc).astimezone().tzinfo
