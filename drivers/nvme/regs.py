"""NVMe registers, commands and queue entries, as the NVM Express Base Specification 1.4 names them.

Sections: 3.1 controller registers, 4.2 submission queue entry, 4.3 PRPs,
4.6 completion queue entry and status field, 5 admin commands, 6 NVM commands.
"""

from __future__ import annotations

import ctypes
import enum
import struct


class Reg(enum.IntEnum):
    """Controller registers (3.1), offsets in BAR0."""
    CAP = 0x00          # capabilities, 64 bits
    VS = 0x08           # version
    INTMS = 0x0C        # interrupt mask set (INTx and MSI only)
    INTMC = 0x10        # interrupt mask clear
    CC = 0x14           # controller configuration
    CSTS = 0x1C         # controller status
    AQA = 0x24          # admin queue attributes: sizes - 1
    ASQ = 0x28          # admin submission queue base, 64 bits
    ACQ = 0x30          # admin completion queue base, 64 bits


DOORBELL_BASE = 0x1000  # SQ y tail at BASE + 2y * stride, CQ y head at BASE + (2y + 1) * stride (3.1.24)


def sq_tail_doorbell(y: int, stride: int) -> int: return DOORBELL_BASE + 2 * y * stride        # SQyTDBL
def cq_head_doorbell(y: int, stride: int) -> int: return DOORBELL_BASE + (2 * y + 1) * stride  # CQyHDBL


def cap_mqes(cap: int) -> int: return (cap & 0xFFFF) + 1          # largest queue, entries (3.1.1)
def cap_timeout(cap: int) -> float: return ((cap >> 24) & 0xFF) * 0.5  # worst time to (un)ready, seconds
def cap_dstrd(cap: int) -> int: return 4 << ((cap >> 32) & 0xF)      # doorbell stride, bytes
def cap_mpsmin(cap: int) -> int: return 4096 << ((cap >> 48) & 0xF)  # smallest memory page


class Cc(enum.IntFlag):
    """Controller configuration (3.1.5)."""
    EN = 1 << 0
    SHN_NORMAL = 1 << 14        # shutdown notification: normal


CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20        # log2 of queue entry sizes: 6 (64 B) and 4 (16 B)


class Csts(enum.IntFlag):
    """Controller status (3.1.6)."""
    RDY = 1 << 0
    CFS = 1 << 1                # controller fatal status
    SHST_MASK = 3 << 2
    SHST_COMPLETE = 2 << 2


class Admin(enum.IntEnum):
    """Admin command opcodes (5, figure 139)."""
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    DOORBELL_BUFFER_CONFIG = 0x7C


class Nvm(enum.IntEnum):
    """NVM command set opcodes (6, figure 346)."""
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    DATASET_MANAGEMENT = 0x09


class Cns(enum.IntEnum):
    """Identify's controller or namespace structure (5.15.1)."""
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02


FEATURE_NUMBER_OF_QUEUES = 0x07     # Set Features (5.21.1.7)
FEATURE_INTERRUPT_COALESCING = 0x08     # Set/Get Features (5.21.1.8): TIME 15:8 (100 us), THR 7:0 (0's based)
ONCS_DSM = 1 << 2                   # Identify Controller ONCS: Dataset Management supported
OACS_DBBUF = 1 << 8                 # Identify Controller OACS: Doorbell Buffer Config supported (5.8, NVMe 1.3)
DSM_DEALLOCATE = 1 << 2             # Dataset Management cdw11 (6.7)
CQ_PC, CQ_IEN = 1 << 0, 1 << 1      # Create I/O CQ cdw11: physically contiguous, interrupts on (5.3)
SQ_PC = 1 << 0                      # Create I/O SQ cdw11 (5.4)

# Status code types and the codes this driver names (4.6.1.2)
SCT_GENERIC, SCT_COMMAND_SPECIFIC, SCT_MEDIA = 0, 1, 2
STATUS_NAMES = {
    (0, 0x01): "Invalid Command Opcode", (0, 0x02): "Invalid Field in Command",
    (0, 0x04): "Data Transfer Error", (0, 0x06): "Internal Error", (0, 0x07): "Command Abort Requested",
    (0, 0x0B): "Invalid Namespace or Format", (0, 0x80): "LBA Out of Range",
    (0, 0x81): "Capacity Exceeded", (0, 0x82): "Namespace Not Ready",
    (1, 0x01): "Invalid Queue Identifier", (1, 0x02): "Invalid Queue Size",
    (1, 0x08): "Invalid Interrupt Vector", (1, 0x0E): "Feature Not Changeable",
    (2, 0x80): "Write Fault", (2, 0x81): "Unrecovered Read Error", (2, 0x86): "Access Denied",
}
LBA_OUT_OF_RANGE = (SCT_GENERIC, 0x80)
UNRECOVERED_READ_ERROR = (SCT_MEDIA, 0x81)


class SubmissionEntry(ctypes.LittleEndianStructure):
    """A submission queue entry (4.2, figure 105)."""
    _pack_ = 1
    _fields_ = [
        ("opcode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),      # FUSE 0-1, PSDT 6-7 (0: PRPs)
        ("cid", ctypes.c_uint16),       # command identifier, unique in its queue while in flight
        ("nsid", ctypes.c_uint32),
        ("cdw2", ctypes.c_uint32), ("cdw3", ctypes.c_uint32),
        ("mptr", ctypes.c_uint64),      # metadata pointer
        ("prp1", ctypes.c_uint64),      # data pointer: PRP entry 1
        ("prp2", ctypes.c_uint64),      # PRP entry 2, or a PRP list's address
        ("cdw10", ctypes.c_uint32), ("cdw11", ctypes.c_uint32), ("cdw12", ctypes.c_uint32),
        ("cdw13", ctypes.c_uint32), ("cdw14", ctypes.c_uint32), ("cdw15", ctypes.c_uint32),
    ]


class CompletionEntry(ctypes.LittleEndianStructure):
    """A completion queue entry (4.6, figure 121)."""
    _pack_ = 1
    _fields_ = [
        ("result", ctypes.c_uint32),    # command specific (dword 0)
        ("reserved", ctypes.c_uint32),
        ("sq_head", ctypes.c_uint16),   # how far the controller has fetched the submission queue
        ("sq_id", ctypes.c_uint16),
        ("cid", ctypes.c_uint16),
        ("status", ctypes.c_uint16),    # P 0 (phase), SC 1-8, SCT 9-11, CRD 12-13, M 14, DNR 15
    ]


class DsmRange(ctypes.LittleEndianStructure):
    """One Dataset Management range (6.7, figure 364)."""
    _pack_ = 1
    _fields_ = [("attributes", ctypes.c_uint32), ("blocks", ctypes.c_uint32), ("slba", ctypes.c_uint64)]


assert ctypes.sizeof(SubmissionEntry) == 64 and ctypes.sizeof(CompletionEntry) == 16
assert ctypes.sizeof(DsmRange) == 16

# The hot path packs with struct; the layouts are the declarations above.
SQE = struct.Struct("<BBHIIIQQQIIIIII")
CQE = struct.Struct("<IIHHHH")
DSM_RANGE = struct.Struct("<IIQ")
assert SQE.size == ctypes.sizeof(SubmissionEntry) and CQE.size == ctypes.sizeof(CompletionEntry)
assert DSM_RANGE.size == ctypes.sizeof(DsmRange)
CQE_STATUS_WORD = CompletionEntry.status.offset // 2     # the phase bit's 16-bit word in an entry
CQE_WORDS = ctypes.sizeof(CompletionEntry) // 2
SQE_SIZE_LOG2, CQE_SIZE_LOG2 = 6, 4

# Identify Controller (5.15.2.1, figure 251) and Namespace (figure 249): byte offsets used
ID_CTRL_SN, ID_CTRL_MN, ID_CTRL_FR = slice(4, 24), slice(24, 64), slice(64, 72)
ID_CTRL_MDTS, ID_CTRL_OACS, ID_CTRL_NN, ID_CTRL_ONCS, ID_CTRL_VWC = 77, 256, 516, 520, 525
ID_NS = struct.Struct("<QQQBBBB")       # NSZE, NCAP, NUSE, NSFEAT, NLBAF, FLBAS, MC
ID_NS_LBAF = 128                        # LBA formats, 4 bytes each: MS 0-15, LBADS 16-23, RP 24-25
PAGE = 4096
