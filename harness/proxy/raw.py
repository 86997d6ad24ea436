"""Requests on a proxy channel beyond the access interface: the owner's, its benches' and tests'.

A driver's channel is :class:`harness.access.Channel` (reads, writes, polls,
batches, interrupts); drivers import nothing else of the harness
(tests/unit/test_layers.py). What else a proxy channel's ring can carry is
reached through these functions:

- the in-guest loops the benches measure drivers against: :func:`repeat_read`
  (one register or port read ``count`` times, timed by the guest) and
  :func:`native_loop` (guests/proxy/native.c's NIC, disk and NVMe loops);
- any request as the ring holds it, its status returned rather than raised
  (:func:`submit`, with :func:`encode` and :func:`repeat_request` to build
  them), or one raising its typed error (:func:`request`), and whole
  ring entries, garbage included (:func:`submit_entries`): for testing the
  proxy's own checks.

The proxy refuses the native loops to driver slots: they are the owner's.
"""

from __future__ import annotations

from typing import Sequence

from ..access import Access, Channel, Space
from .channel import DEFAULT_TIMEOUT, ProxyChannel


def _proxy(channel: Channel) -> ProxyChannel:
    if not isinstance(channel, ProxyChannel):
        raise TypeError(f"{channel!r} is not a proxy channel")
    return channel


def submit(channel: Channel, requests: Sequence[tuple[int, ...]],
           timeout: float = DEFAULT_TIMEOUT) -> list[tuple[int, int]]:
    """Publish requests (tuples of ``op, width, status, timeout_us, addr, value, mask, expect``)
    as one batch per ring's worth; (status, value) for each, no status turned into an error."""
    return _proxy(channel)._submit(requests, timeout)


def encode(channel: Channel, access: Access) -> tuple[int, ...]:
    """An access as :func:`submit` takes it, to mix with requests beyond the access interface."""
    return _proxy(channel)._encode(access)


def repeat_request(channel: Channel, space: Space, addr: int, width: int, count: int) -> tuple[int, ...]:
    """The request of :func:`repeat_read`, for :func:`submit` to batch with others."""
    abi = _proxy(channel).bus.abi
    op = abi.PROXY_OP_PIO_REPEAT if space is Space.PIO else abi.PROXY_OP_MMIO_REPEAT
    return (op, width, 0, 0, addr, count, 0, 0)


def submit_entries(channel: Channel, entries: Sequence[bytes],
                   timeout: float = DEFAULT_TIMEOUT) -> list[tuple[int, int]]:
    """Publish whole ring entries exactly as given, one batch each; (status, value) for each."""
    return _proxy(channel)._submit_raw(entries, timeout)


def request(channel: Channel, op: int, addr: int, value: int, what: str, mask: int = 0, expect: int = 0) -> int:
    """One request of any operation (``enum proxy_op``); its typed error if it fails."""
    return _proxy(channel)._control(op, addr, value, what, mask, expect)


def repeat_read(channel: Channel, space: Space, addr: int, width: int, count: int) -> int:
    """Have the guest read ``addr`` ``count`` times; returns the guest TSC cycles it took."""
    ch = _proxy(channel)
    (status, value), = ch._submit([repeat_request(ch, space, addr, width, count)])
    if status != ch.bus.abi.PROXY_STATUS_OK:
        ch._raise(f"repeat read {space.value} {addr:#x} x{count}", status, value)
    return value


def native_loop(channel: Channel, op: int, block: int, what: str) -> int:
    """Run the guest's native loop ``op`` (``PROXY_OP_NIC_TX_LOOP``, ``_NIC_RX_LOOP``,
    ``_DISK_READ_LOOP``, ``_NVME_LOOP``) on the channel's device, its parameter block at
    guest-physical ``block`` in the device's DMA domain; returns the guest TSC cycles it took."""
    return _proxy(channel)._control(op, block, 0, what)
