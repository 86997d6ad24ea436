"""The AHCI structures as the driver packs them, read back field by field through their
ctypes declarations (drivers/ahci/regs.py): the packing follows the declaration."""

from __future__ import annotations

import ctypes

from drivers.ahci.regs import (DEVICE_LBA, FIS_TYPE_H2D, H2D_COMMAND, Ata, CommandHeader, H2DFis, Prd,
                               pack_h2d_fis, packer)


def fis(**kwargs: object) -> H2DFis:
    buffer = bytearray(ctypes.sizeof(H2DFis) + 8)
    pack_h2d_fis(memoryview(buffer), 8, **kwargs)  # type: ignore[arg-type]
    return H2DFis.from_buffer_copy(buffer, 8)


def lba_of(f: H2DFis) -> int:
    return sum(getattr(f, f"lba{i}") << 8 * i for i in range(6))


def test_a_dma_command_carries_its_lba_and_count() -> None:
    f = fis(command=Ata.READ_DMA_EXT, lba=0x123456789ABC, count=256)
    assert (f.type, f.flags, f.command, f.device) == (FIS_TYPE_H2D, H2D_COMMAND, Ata.READ_DMA_EXT, DEVICE_LBA)
    assert lba_of(f) == 0x123456789ABC and f.count == 256
    assert (f.features, f.features_exp, f.icc, f.control, f.reserved) == (0, 0, 0, 0, 0)


def test_an_ncq_command_carries_its_count_in_the_features_and_its_tag_in_the_count() -> None:
    f = fis(command=Ata.READ_FPDMA_QUEUED, lba=0xBEEF00, count=0x180, tag=31)
    assert lba_of(f) == 0xBEEF00
    assert (f.features, f.features_exp, f.count) == (0x80, 0x01, 31 << 3)


def test_features_and_device_as_given() -> None:
    f = fis(command=Ata.PACKET, device=0, features=1)
    assert (f.command, f.device, f.features, lba_of(f), f.count) == (Ata.PACKET, 0, 1, 0, 0)


def test_packers_follow_the_declarations() -> None:
    header = packer(CommandHeader, last="ctba")
    assert header.size == CommandHeader.ctba.offset + CommandHeader.ctba.size
    assert packer(CommandHeader).size == ctypes.sizeof(CommandHeader)
    h = CommandHeader.from_buffer_copy(header.pack(0x45, 3, 0x1234, 0x1_2345_6780).ljust(32, b"\0"))
    assert (h.flags, h.prdtl, h.prdbc, h.ctba) == (0x45, 3, 0x1234, 0x1_2345_6780)
    p = Prd.from_buffer_copy(packer(Prd).pack(0xABCD_0000_1000, 0, 4095))
    assert (p.dba, p.dbc) == (0xABCD_0000_1000, 4095)
