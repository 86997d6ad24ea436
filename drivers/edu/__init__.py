"""QEMU's ``edu`` device (docs/specs/edu.rst): the simplest DMA engine there is.

It copies between its own 4 KiB buffer, at device address 0x40000, and
memory, 100 ms of virtual time after the command. The harness uses it to
show what a device may and may not reach.
"""

from __future__ import annotations

from harness.access import Device

VENDOR, DEVICE = 0x1234, 0x11E8
IDENTIFICATION = 0x00                   # reads 0x010000ed
IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x24, 0x60, 0x64
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_RUN, DMA_TO_RAM = 0x1, 0x2
BUFFER = 0x40000                        # the device's own memory; a transfer must end before 0x41000
DMA_TIMEOUT = 2.0                       # seconds; the device takes 100 ms of virtual time


def start_dma(device: Device, src: int, dst: int, count: int, to_ram: bool) -> None:
    """Copy ``count`` bytes from ``src`` to ``dst`` (one of them in the device's buffer);
    the copy happens 100 ms of virtual time later."""
    bar = device.bar(0)
    bar.write64(DMA_SRC, src)
    bar.write64(DMA_DST, dst)
    bar.write64(DMA_COUNT, count)
    bar.write32(DMA_CMD, DMA_RUN | (DMA_TO_RAM if to_ram else 0))


def wait_dma(device: Device) -> None:
    """Wait until the device says its copy is done (or was tried)."""
    device.bar(0).poll32(DMA_CMD, DMA_RUN, 0, DMA_TIMEOUT)


def dma(device: Device, src: int, dst: int, count: int, to_ram: bool) -> None:
    """``start_dma``, then ``wait_dma``."""
    start_dma(device, src, dst, count, to_ram)
    wait_dma(device)
