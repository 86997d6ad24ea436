"""The PS/2 keyboard: reset, scan code set 2, decoding into key events and US text, LEDs.

Why set 2 untranslated: set 2 is what every PS/2 keyboard speaks natively;
set 1 only exists behind the 8042's translation, a PC/XT compatibility layer.
The driver turns translation off (Config.XLAT) and decodes the keyboard's own
protocol: 0xE0 for extended keys, 0xF0 before a break code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from .controller import Controller, Port, Ps2Error
from .regs import BAT_OK, KbdCmd, Led
from .scancodes import (ALTS, ANSI, CTRLS, KEYPAD_NUM, LOCKS, PAUSE_SEQUENCE, PREFIX_BREAK, PREFIX_EXTENDED,
                        PREFIX_PAUSE, SET2, SET2_EXTENDED, SHIFTS, US)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyEvent:
    key: str                    # a name from scancodes (e.g. "a", "shift_left", "up"), or "unknown"
    pressed: bool
    code: bytes                 # the raw scan code bytes
    text: str = ""              # what it types, on a press, given modifiers and locks


@dataclass
class Decoder:
    """Set 2 bytes in, KeyEvents out. Pure logic: it never touches the device."""

    shift: set[str] = field(default_factory=set)
    ctrl: set[str] = field(default_factory=set)
    alt: set[str] = field(default_factory=set)
    caps_lock: bool = False
    num_lock: bool = False
    scroll_lock: bool = False
    unknown: list[bytes] = field(default_factory=list)
    _pending: bytearray = field(default_factory=bytearray)

    def feed(self, byte: int) -> KeyEvent | None:
        """One byte; an event when it completes a scan code."""
        p = self._pending
        p.append(byte)
        if p[0] == PREFIX_PAUSE:
            if len(p) < len(PAUSE_SEQUENCE):
                return None
            code = bytes(p)
            p.clear()
            if code == PAUSE_SEQUENCE:
                return KeyEvent("pause", True, code)
            return self._unknown(code)
        if byte in (PREFIX_EXTENDED, PREFIX_BREAK):
            return None
        code = bytes(p)
        p.clear()
        extended = PREFIX_EXTENDED in code[:-1]
        pressed = PREFIX_BREAK not in code[:-1]
        key = (SET2_EXTENDED if extended else SET2).get(code[-1])
        if key is None:
            return self._unknown(code)
        if key == "print_prefix":           # PrtSc is E0 12 E0 7C: the first half is noise
            return None
        return self._event(key, pressed, code)

    def _unknown(self, code: bytes) -> KeyEvent:
        log.warning("unknown scan code %s", code.hex(" "))
        self.unknown.append(code)
        return KeyEvent("unknown", PREFIX_BREAK not in code, code)

    def _event(self, key: str, pressed: bool, code: bytes) -> KeyEvent:
        for group in (SHIFTS, CTRLS, ALTS):
            if key in group:
                held = self.shift if group is SHIFTS else self.ctrl if group is CTRLS else self.alt
                (held.add if pressed else held.discard)(key)
        if key in LOCKS and pressed:
            setattr(self, key, not getattr(self, key))
        return KeyEvent(key, pressed, code, self.text_of(key) if pressed else "")

    def text_of(self, key: str) -> str:
        if self.ctrl or self.alt:
            return ""
        if key in KEYPAD_NUM:
            return KEYPAD_NUM[key] if self.num_lock else ""
        if key in ANSI:
            return ANSI[key]
        pair = US.get(key)
        if pair is None:
            return ""
        shifted = bool(self.shift)
        if key.isalpha() and len(key) == 1:
            shifted ^= self.caps_lock
        return pair[shifted]

    @property
    def leds(self) -> Led:
        return ((Led.CAPS if self.caps_lock else Led(0)) | (Led.NUM if self.num_lock else Led(0))
                | (Led.SCROLL if self.scroll_lock else Led(0)))


class Keyboard:
    """The keyboard on the controller's first port."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.decoder = Decoder()
        self.leds = Led(0)
        self.releases = 0           # key releases decoded so far: how far the driver has read

    def reset(self, timeout: float = 2.0) -> None:
        """Reset and wait for the basic assurance test to pass (0xAA)."""
        self.c.command_device(Port.KBD, KbdCmd.RESET, timeout=timeout)
        bat = self.c.read_byte(Port.KBD, timeout)
        if bat != BAT_OK:
            raise Ps2Error(f"keyboard self-test answered {bat:#04x}, not {BAT_OK:#04x}")

    def identify(self) -> bytes:
        self.c.command_device(Port.KBD, KbdCmd.IDENTIFY)
        return bytes([self.c.read_byte(Port.KBD, 0.5), self.c.read_byte(Port.KBD, 0.5)])

    def scancode_set(self) -> int:
        self.c.command_device(Port.KBD, KbdCmd.SCANCODE_SET, 0)
        return self.c.read_byte(Port.KBD, 0.5)

    def select_set(self, n: int) -> None:
        self.c.command_device(Port.KBD, KbdCmd.SCANCODE_SET, n)

    def set_leds(self, leds: Led) -> None:
        self.c.command_device(Port.KBD, KbdCmd.SET_LEDS, int(leds))
        self.leds = leds

    def set_typematic(self, delay_ms: int = 500, rate_index: int = 0x0B) -> None:
        """Delay 250/500/750/1000 ms; rate index 0 (30 cps) .. 31 (2 cps)."""
        if delay_ms not in (250, 500, 750, 1000) or not 0 <= rate_index <= 31:
            raise ValueError("typematic delay is 250, 500, 750 or 1000 ms; the rate index 0..31")
        self.c.command_device(Port.KBD, KbdCmd.TYPEMATIC, (delay_ms // 250 - 1) << 5 | rate_index)

    def enable(self) -> None:
        self.c.command_device(Port.KBD, KbdCmd.ENABLE)

    def setup(self) -> None:
        """Reset, scan code set 2, LEDs off, scanning on."""
        self.reset()
        self.select_set(2)
        self.set_leds(Led(0))
        self.set_typematic()
        self.enable()

    def events(self, timeout: float) -> Iterator[KeyEvent]:
        """Key events as they arrive, until none has for ``timeout`` seconds.

        Lock keys are followed through: their LEDs change on the press.
        """
        while True:
            byte = self.c.next_byte(Port.KBD, timeout)
            if byte is None:
                return
            event = self.decoder.feed(byte)
            if event is None:
                continue
            if event.key in LOCKS and event.pressed and self.decoder.leds != self.leds:
                self.set_leds(self.decoder.leds)
            self.releases += not event.pressed
            yield event

    def read_text(self, idle: float) -> str:
        """Everything typed until the keyboard has been quiet for ``idle`` seconds."""
        return "".join(e.text for e in self.events(idle))
