"""PS/2 keyboard and mouse behind the i8042 controller."""

from harness.access import Bus, IrqMode

from .controller import CommandRefused, Controller, Port, Ps2Error, Ps2Timeout
from .keyboard import Decoder, KeyEvent, Keyboard
from .mouse import Mouse, MouseEvent, PacketDecoder

I8042_PORTS = (0x60, 5)     # data 0x60 .. status/command 0x64
I8042_IRQS = (1, 12)        # keyboard, mouse


def open_i8042(bus: Bus) -> tuple[Controller, Keyboard, Mouse]:
    """The i8042 on its ports with IRQ 1 and 12, initialised; keyboard and mouse set up.
    Close with ``controller.ports.channel.close()``."""
    ports = bus.ports(*I8042_PORTS)
    controller = Controller(ports, ports.channel.interrupt(IrqMode.ISA, isa_irqs=I8042_IRQS))
    controller.initialize()
    keyboard, mouse = Keyboard(controller), Mouse(controller)
    keyboard.setup()
    mouse.setup()
    return controller, keyboard, mouse

__all__ = ["CommandRefused", "Controller", "Decoder", "KeyEvent", "Keyboard", "Mouse", "MouseEvent",
           "PacketDecoder", "Port", "Ps2Error", "Ps2Timeout", "open_i8042"]
