"""AHCI 1.3.1 registers and structures, and the ATA commands the driver sends.

Names follow the Serial ATA AHCI 1.3.1 specification (sections 3 and 4) and
ATA8-ACS for the commands.
"""

import ctypes
import enum
import struct


class Hba(enum.IntEnum):
    CAP = 0x00          # capabilities
    GHC = 0x04          # global HBA control
    IS = 0x08           # interrupt status, one bit per port
    PI = 0x0C           # ports implemented
    VS = 0x10           # version


class Cap(enum.IntFlag):
    SNCQ = 1 << 30      # native command queuing
    S64A = 1 << 31      # 64-bit addressing


CAP_NCS_SHIFT, CAP_NCS_MASK = 8, 0x1F      # command slots - 1


class Ghc(enum.IntFlag):
    HR = 1 << 0         # HBA reset
    IE = 1 << 1         # interrupts enabled
    AE = 1 << 31        # AHCI enable


PORT_BASE, PORT_STRIDE = 0x100, 0x80


class Px(enum.IntEnum):
    CLB = 0x00          # command list base (1 KiB aligned)
    CLBU = 0x04
    FB = 0x08           # received-FIS base (256 B aligned)
    FBU = 0x0C
    IS = 0x10           # interrupt status
    IE = 0x14           # interrupt enable
    CMD = 0x18          # command and status
    TFD = 0x20          # task file data: status and error
    SIG = 0x24          # device signature
    SSTS = 0x28         # SATA status (DET, SPD, IPM)
    SCTL = 0x2C         # SATA control: DET = 1 holds COMRESET on the link
    SERR = 0x30         # SATA error
    SACT = 0x34         # NCQ: tags outstanding
    CI = 0x38           # command issue: slots outstanding


class PxCmd(enum.IntFlag):
    ST = 1 << 0         # start processing the command list
    SUD = 1 << 1        # spin up
    POD = 1 << 2        # power on
    FRE = 1 << 4        # FIS receive enable
    FR = 1 << 14        # FIS receive running
    CR = 1 << 15        # command list running


class PxIs(enum.IntFlag):
    DHRS = 1 << 0       # D2H register FIS
    PSS = 1 << 1        # PIO setup FIS
    DSS = 1 << 2        # DMA setup FIS
    SDBS = 1 << 3       # set device bits (NCQ completions)
    TFES = 1 << 30      # task file error


PXIS_ERRORS = 0x7DC00000    # bits 22-30 except 25 (AHCI 3.3.5): errors that stop the port


class Tfd(enum.IntFlag):
    ERR = 1 << 0
    DRQ = 1 << 3
    BSY = 1 << 7


SSTS_DET_PRESENT = 3
SIG_ATA, SIG_ATAPI = 0x00000101, 0xEB140101


class Ata(enum.IntEnum):
    READ_DMA_EXT = 0x25
    WRITE_DMA_EXT = 0x35
    READ_FPDMA_QUEUED = 0x60
    WRITE_FPDMA_QUEUED = 0x61
    PACKET = 0xA0
    IDENTIFY_PACKET = 0xA1
    IDENTIFY = 0xEC
    FLUSH_CACHE_EXT = 0xEA


FIS_TYPE_H2D = 0x27
FIS_TYPE_D2H = 0x34         # Register FIS, device to host: the HBA writes it when a command ends
RFIS_D2H = 0x40             # where the received-FIS area holds it (AHCI 4.2.1): type, flags, status, error
FIS_TYPE_SDB = 0xA1         # Set Device Bits FIS: the HBA writes one as queued (NCQ) commands end
RFIS_SDB = 0x58             # where the received-FIS area holds it (AHCI 4.2.1)
DEVICE_LBA = 0x40
SECTOR = 512


class CommandHeader(ctypes.LittleEndianStructure):
    """One slot of the command list (AHCI 4.2.2)."""
    _pack_ = 1
    _fields_ = [
        ("flags", ctypes.c_uint16),     # CFL (FIS length in dwords) 0-4, A 5, W 6, P 7, R 8, B 9, C 10
        ("prdtl", ctypes.c_uint16),     # PRD entries
        ("prdbc", ctypes.c_uint32),     # bytes transferred (written by the HBA)
        ("ctba", ctypes.c_uint64),      # command table base (128 B aligned)
        ("reserved", ctypes.c_uint32 * 4),
    ]


class Prd(ctypes.LittleEndianStructure):
    """A physical region descriptor (AHCI 4.2.3.3)."""
    _pack_ = 1
    _fields_ = [
        ("dba", ctypes.c_uint64),       # data base address
        ("reserved", ctypes.c_uint32),
        ("dbc", ctypes.c_uint32),       # byte count - 1 in bits 0-21; bit 31 interrupt on completion
    ]


class H2DFis(ctypes.LittleEndianStructure):
    """Register host-to-device FIS (SATA 3.3, 10.5.5). NCQ commands (13.6.4) carry the
    sector count in the features bytes and the tag in bits 7:3 of the count."""
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("command", ctypes.c_uint8),
        ("features", ctypes.c_uint8),
        ("lba0", ctypes.c_uint8), ("lba1", ctypes.c_uint8), ("lba2", ctypes.c_uint8),
        ("device", ctypes.c_uint8),
        ("lba3", ctypes.c_uint8), ("lba4", ctypes.c_uint8), ("lba5", ctypes.c_uint8),
        ("features_exp", ctypes.c_uint8),
        ("count", ctypes.c_uint16), ("icc", ctypes.c_uint8), ("control", ctypes.c_uint8),
        ("reserved", ctypes.c_uint32),
    ]


assert ctypes.sizeof(CommandHeader) == 32 and ctypes.sizeof(Prd) == 16 and ctypes.sizeof(H2DFis) == 20

FIS_DWORDS = ctypes.sizeof(H2DFis) // 4     # a command header's CFL
H2D_COMMAND = 0x80          # flags: this FIS updates the command register
HEADER_WRITE = 1 << 6
HEADER_ATAPI = 1 << 5
PACKET_DMA = 0x01           # PACKET's features: the data move by DMA
CMD_TABLE_PRDT = 0x80       # PRDT offset in a command table
CMD_TABLE_ACMD = 0x40       # ATAPI command offset


_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}


def packer(declaration: type[ctypes.Structure], last: str | None = None) -> struct.Struct:
    """The ``struct`` format of a packed little-endian declaration, its fields in order up
    to ``last`` (an array field takes one argument per element): hot paths pack a whole
    structure in one call, and its layout stays the one declared here."""
    codes = []
    for name, ctype in declaration._fields_:
        element, length = (ctype._type_, ctype._length_) if issubclass(ctype, ctypes.Array) else (ctype, 1)
        codes.append(f"{length if length > 1 else ''}{_UNSIGNED[ctypes.sizeof(element)]}")
        if name == last:
            break
    layout = struct.Struct("<" + "".join(codes))
    end = getattr(declaration, last).offset + getattr(declaration, last).size if last else ctypes.sizeof(declaration)
    assert layout.size == end, f"{declaration.__name__} is not packed"
    return layout


_H2D = packer(H2DFis)


def pack_h2d_fis(view: memoryview, offset: int, command: int, lba: int = 0, count: int = 0,
                 device: int = DEVICE_LBA, features: int = 0, tag: int | None = None) -> None:
    """Write a register H2D FIS of ``command`` at ``offset``: a 48-bit ``lba`` and a sector
    ``count``, which an NCQ command (``tag``) carries in the features bytes instead.
    The driver's hot paths call this once per command: one pack, no field by field."""
    if tag is None:
        features_exp = 0
    else:
        features, features_exp, count = count & 0xFF, count >> 8, tag << 3
    # in H2DFis's field order, which _H2D's format follows
    _H2D.pack_into(view, offset, FIS_TYPE_H2D, H2D_COMMAND, command, features,
                   lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, device,
                   lba >> 24 & 0xFF, lba >> 32 & 0xFF, lba >> 40 & 0xFF, features_exp, count, 0, 0, 0)
