"""The PC parallel port (SPP), IBM PC/AT register layout (QEMU: hw/char/parallel.c).

Several lines are active low on the connector; the register bits below say
what a 1 means in the register, which is what the driver reads and writes.
"""

import enum

class Reg(enum.IntEnum):
    """Offsets from the port base (0x378 for the first port)."""
    DATA = 0
    STATUS = 1
    CONTROL = 2


DATA, STATUS, CONTROL = int(Reg.DATA), int(Reg.STATUS), int(Reg.CONTROL)    # plain ints for the hot path
PORT_COUNT = len(Reg)


class Status(enum.IntFlag):
    NOT_ERROR = 0x08        # 1: no error
    SELECTED = 0x10         # 1: the printer is on line
    PAPER_OUT = 0x20        # 1: out of paper
    NOT_ACK = 0x40          # 0 during the acknowledge pulse
    NOT_BUSY = 0x80         # 1: ready for the next byte


class Control(enum.IntFlag):
    STROBE = 0x01           # 1 drives the strobe line active: the byte is valid
    AUTO_LF = 0x02
    NOT_INIT = 0x04         # 0 resets the printer
    SELECT_IN = 0x08        # 1 selects the printer
    IRQ_ENABLE = 0x10       # interrupt on the acknowledge pulse (IRQ 7 for 0x378)
    DIRECTION = 0x20        # 1: the data lines are inputs (bidirectional ports)


ISA_IRQ = 7                 # of the first port, 0x378
