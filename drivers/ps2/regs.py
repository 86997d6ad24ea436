"""i8042 controller and PS/2 device registers, commands and bits.

Names follow the IBM PC/AT technical reference and the common 8042 and PS/2
documentation (the same names QEMU's hw/input/pckbd.c and ps2.c use).
"""

import enum

class Reg(enum.IntEnum):
    """Offsets in the 0x60..0x64 port range."""
    DATA = 0x0      # port 0x60: output/input buffer
    STATUS = 0x4    # port 0x64: status (read), command (write)
    COMMAND = 0x4


DATA, STATUS, COMMAND = int(Reg.DATA), int(Reg.STATUS), int(Reg.COMMAND)    # plain ints for the hot path


class Status(enum.IntFlag):
    OBF = 0x01          # output buffer full: a byte waits at DATA
    IBF = 0x02          # input buffer full: the controller has not taken our last write
    SYS = 0x04          # system flag (self-test passed)
    CMD = 0x08          # last write was a command
    AUX_OBF = 0x20      # the byte at DATA comes from the auxiliary (mouse) port
    TIMEOUT = 0x40
    PARITY = 0x80


class Cmd(enum.IntEnum):
    READ_CONFIG = 0x20
    WRITE_CONFIG = 0x60
    DISABLE_AUX = 0xA7
    ENABLE_AUX = 0xA8
    TEST_AUX = 0xA9         # answers 0x00 when the port is good
    SELF_TEST = 0xAA        # answers 0x55
    TEST_KBD = 0xAB         # answers 0x00 when the port is good
    DISABLE_KBD = 0xAD
    ENABLE_KBD = 0xAE
    WRITE_AUX = 0xD4        # the next DATA byte goes to the mouse


class Config(enum.IntFlag):
    KBD_INT = 0x01          # IRQ 1 when a keyboard byte arrives
    AUX_INT = 0x02          # IRQ 12 when a mouse byte arrives
    SYS = 0x04
    KBD_DISABLED = 0x10
    AUX_DISABLED = 0x20
    XLAT = 0x40             # translate set 2 into set 1


SELF_TEST_OK = 0x55
PORT_TEST_OK = 0x00

# Replies of PS/2 devices
ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA               # basic assurance test passed, after reset
ECHO = 0xEE


class KbdCmd(enum.IntEnum):
    SET_LEDS = 0xED
    ECHO = 0xEE
    SCANCODE_SET = 0xF0     # argument 0 asks which set is in use
    IDENTIFY = 0xF2
    TYPEMATIC = 0xF3        # argument: delay (bits 5-6) and rate (bits 0-4)
    ENABLE = 0xF4
    DISABLE = 0xF5
    RESET = 0xFF


class Led(enum.IntFlag):
    SCROLL = 0x1
    NUM = 0x2
    CAPS = 0x4


class MouseCmd(enum.IntEnum):
    SET_RESOLUTION = 0xE8
    STATUS_REQUEST = 0xE9
    IDENTIFY = 0xF2         # 0x00 plain, 0x03 IntelliMouse (wheel), 0x04 five-button
    SET_SAMPLE_RATE = 0xF3
    ENABLE_REPORTING = 0xF4
    DISABLE_REPORTING = 0xF5
    SET_DEFAULTS = 0xF6
    RESET = 0xFF


MOUSE_ID_PLAIN = 0x00
MOUSE_ID_INTELLIMOUSE = 0x03
INTELLIMOUSE_KNOCK = (200, 100, 80)     # sample rates that unlock the wheel


class Packet(enum.IntFlag):
    """Bits of a mouse packet's first byte."""
    LEFT = 0x01
    RIGHT = 0x02
    MIDDLE = 0x04
    ALWAYS_ONE = 0x08       # how a lost byte is noticed
    X_SIGN = 0x10
    Y_SIGN = 0x20
    X_OVERFLOW = 0x40
    Y_OVERFLOW = 0x80
