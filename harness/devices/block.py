"""The block device class: the protocol every disk here meets, and a file-like view of any of them."""

from __future__ import annotations

import io
from typing import Protocol

__all__ = ["BlockDevice", "BlockFile"]


class BlockDevice(Protocol):
    """A disk as every block-level user here takes it: an AHCI port, an NVMe namespace, a
    NbdClient (BlockFile makes any of them a file)."""

    sector_size: int
    size: int

    def read(self, lba: int, count: int) -> bytes: ...
    def write(self, lba: int, data: bytes) -> None: ...
    def flush(self) -> None: ...


class BlockFile(io.RawIOBase):
    """Byte-addressed reads and writes over whole sectors; a partial sector is read, merged, written."""

    def __init__(self, device: BlockDevice, writable: bool = True) -> None:
        super().__init__()
        self.device = device
        self.pos = 0
        self._writable = writable

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.device.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        n = min(len(buffer), max(0, self.device.size - self.pos))
        if n == 0:
            return 0
        ss = self.device.sector_size
        first, last = self.pos // ss, (self.pos + n - 1) // ss
        data = self.device.read(first, last - first + 1)
        skip = self.pos - first * ss
        buffer[:n] = data[skip:skip + n]
        self.pos += n
        return n

    def write(self, data) -> int:  # type: ignore[no-untyped-def,override]
        if not self._writable:
            raise io.UnsupportedOperation("this view of the device is read-only")
        data = bytes(data)
        if self.pos + len(data) > self.device.size:
            raise ValueError(f"writing {len(data)} bytes at {self.pos} runs past the end of the device")
        if not data:
            return 0
        ss = self.device.sector_size
        first, last = self.pos // ss, (self.pos + len(data) - 1) // ss
        head = self.pos - first * ss
        if head or (self.pos + len(data)) % ss:
            current = bytearray(self.device.read(first, last - first + 1))
            current[head:head + len(data)] = data
            block = bytes(current)
        else:
            block = data
        self.device.write(first, block)
        self.pos += len(data)
        return len(data)

    def flush(self) -> None:
        if self._writable and not self.closed:
            self.device.flush()
