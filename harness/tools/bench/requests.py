"""The commands a native disk loop runs: ``struct proxy_disk_request`` (lba, buffer), in the
device's DMA memory, laid out as the guest ELF's ABI says (guests/proxy/abi.h)."""

from __future__ import annotations

from typing import Sequence

from ...access import Device, DmaBuffer
from ...proxy.abi import Abi


class RequestList:
    """Room for ``capacity`` requests in ``device``'s domain; ``fill`` lays a list out."""

    def __init__(self, device: Device, abi: Abi, capacity: int) -> None:
        self.device = device
        self._pack = abi.packer("proxy_disk_request", ["lba", "phys"])
        self._entry = abi.sizeof("proxy_disk_request")
        self.buffer = device.dma_alloc(capacity * self._entry, 64)

    @property
    def phys(self) -> int:
        return self.buffer.phys

    def fill(self, requests: Sequence[tuple[int, DmaBuffer]]) -> None:
        if len(requests) * self._entry > self.buffer.size:
            raise ValueError(f"{len(requests)} requests do not fit the native loop's list")
        for i, (lba, buffer) in enumerate(requests):
            self._pack.pack_into(self.buffer.view, i * self._entry, lba, buffer.phys)

    def free(self) -> None:
        self.device.dma_free(self.buffer)
