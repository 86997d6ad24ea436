"""The network interface class: what a protocol stack needs of any NIC driver."""

from __future__ import annotations

from typing import Protocol, Sequence


class Nic(Protocol):
    """Whole Ethernet frames in and out; ``mac`` is the interface's own address."""

    mac: bytes

    def send(self, frames: Sequence[bytes], timeout: float = ...) -> int: ...
    def recv(self, max_frames: int = ..., timeout: float = ...) -> list[bytes]: ...
