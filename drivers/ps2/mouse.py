"""The PS/2 mouse: reset, the IntelliMouse wheel knock, stream mode, packet decoding."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

from .controller import Controller, Port, Ps2Error
from .regs import BAT_OK, INTELLIMOUSE_KNOCK, MOUSE_ID_INTELLIMOUSE, MouseCmd, Packet

log = logging.getLogger(__name__)

PACKET_GAP = 0.05       # a packet's bytes come together; after a longer gap, start afresh


@dataclass(frozen=True)
class MouseEvent:
    """One packet. dx right, dy down (screen convention; PS/2 itself counts y upward);
    wheel positive toward the user."""

    dx: int
    dy: int
    wheel: int
    left: bool
    right: bool
    middle: bool
    overflow: bool


def _signed9(low: int, sign: bool) -> int:
    return low - 256 if sign else low


@dataclass
class PacketDecoder:
    """Bytes in, MouseEvents out; resynchronises after a lost or stray byte."""

    size: int = 3                   # 4 with the IntelliMouse wheel
    dropped: int = 0                # bytes thrown away while resynchronising
    _buf: bytearray = field(default_factory=bytearray)
    _last: float = 0.0

    def feed(self, byte: int, now: float | None = None) -> MouseEvent | None:
        now = time.monotonic() if now is None else now
        if self._buf and now - self._last > PACKET_GAP:
            self._drop(len(self._buf))      # the rest of that packet never came
        self._last = now
        if not self._buf and not byte & Packet.ALWAYS_ONE:
            self._drop(1)                   # cannot be a first byte
            return None
        self._buf.append(byte)
        if len(self._buf) < self.size:
            return None
        b = bytes(self._buf)
        self._buf.clear()
        flags = Packet(b[0])
        wheel = 0
        if self.size == 4:
            z = b[3] & 0x0F
            wheel = z - 16 if z & 0x08 else z
        return MouseEvent(
            dx=_signed9(b[1], bool(flags & Packet.X_SIGN)),
            dy=-_signed9(b[2], bool(flags & Packet.Y_SIGN)),
            wheel=wheel,
            left=bool(flags & Packet.LEFT), right=bool(flags & Packet.RIGHT),
            middle=bool(flags & Packet.MIDDLE),
            overflow=bool(flags & (Packet.X_OVERFLOW | Packet.Y_OVERFLOW)))

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._buf.clear()
        log.debug("mouse: resynchronising, %d byte(s) dropped", n)


class Mouse:
    """The mouse on the controller's auxiliary port."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.decoder = PacketDecoder()
        self.device_id = 0

    def reset(self, timeout: float = 2.0) -> None:
        self.c.command_device(Port.AUX, MouseCmd.RESET, timeout=timeout)
        bat = self.c.read_byte(Port.AUX, timeout)
        if bat != BAT_OK:
            raise Ps2Error(f"mouse self-test answered {bat:#04x}, not {BAT_OK:#04x}")
        self.device_id = self.c.read_byte(Port.AUX, timeout)

    def identify(self) -> int:
        self.c.command_device(Port.AUX, MouseCmd.IDENTIFY)
        self.device_id = self.c.read_byte(Port.AUX, 0.5)
        return self.device_id

    def set_sample_rate(self, rate: int) -> None:
        self.c.command_device(Port.AUX, MouseCmd.SET_SAMPLE_RATE, rate)

    def enable_wheel(self) -> bool:
        """The IntelliMouse knock: sample rates 200, 100, 80, then ID 3 means a wheel."""
        for rate in INTELLIMOUSE_KNOCK:
            self.set_sample_rate(rate)
        has_wheel = self.identify() == MOUSE_ID_INTELLIMOUSE
        self.decoder.size = 4 if has_wheel else 3
        return has_wheel

    def setup(self) -> None:
        """Reset, wheel if there is one, sample rate 100, streaming on."""
        self.reset()
        self.enable_wheel()
        self.set_sample_rate(100)
        self.c.command_device(Port.AUX, MouseCmd.ENABLE_REPORTING)

    def events(self, timeout: float) -> Iterator[MouseEvent]:
        """Packets as they arrive, until none has for ``timeout`` seconds."""
        while True:
            byte = self.c.next_byte(Port.AUX, timeout)
            if byte is None:
                return
            event = self.decoder.feed(byte)
            if event is not None:
                yield event
