"""PS/2 keyboard and mouse behind the i8042 controller."""

from .controller import CommandRefused, Controller, Port, Ps2Error, Ps2Timeout
from .keyboard import Decoder, KeyEvent, Keyboard
from .mouse import Mouse, MouseEvent, PacketDecoder

__all__ = ["CommandRefused", "Controller", "Decoder", "KeyEvent", "Keyboard", "Mouse", "MouseEvent",
           "PacketDecoder", "Port", "Ps2Error", "Ps2Timeout"]
