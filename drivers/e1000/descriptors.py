"""Legacy receive and transmit descriptors (8254x manual 3.2.3 and 3.3.3), declared once."""

import ctypes


class RxDesc(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),      # buffer address
        ("length", ctypes.c_uint16),    # bytes the hardware stored
        ("csum", ctypes.c_uint16),
        ("status", ctypes.c_uint8),     # DD, EOP, ...
        ("errors", ctypes.c_uint8),
        ("special", ctypes.c_uint16),
    ]


class TxDesc(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("length", ctypes.c_uint16),
        ("cso", ctypes.c_uint8),
        ("cmd", ctypes.c_uint8),        # EOP, IFCS, RS
        ("status", ctypes.c_uint8),     # DD once the hardware is done with it
        ("css", ctypes.c_uint8),
        ("special", ctypes.c_uint16),
    ]


assert ctypes.sizeof(RxDesc) == 16 and ctypes.sizeof(TxDesc) == 16

RX_DD, RX_EOP = 0x01, 0x02
TX_EOP, TX_IFCS, TX_RS = 0x01, 0x02, 0x08
TX_DD = 0x01
