"""PS/2 decoding and handshakes without QEMU: set 2, US text, packets, resend, resync."""

from __future__ import annotations

import collections

import pytest

from drivers.ps2 import CommandRefused, Controller, Decoder, Keyboard, PacketDecoder, Port
from drivers.ps2.regs import ACK, RESEND, Led, Status
from tests.unit.fakes import FakePorts


def feed(decoder: Decoder, data: bytes) -> list:
    return [e for e in (decoder.feed(b) for b in data) if e is not None]


def test_set2_make_break_shift_and_extended_keys() -> None:
    d = Decoder()
    # Shift down, 'h', shift up, 'i', up arrow, Enter
    events = feed(d, bytes([0x12, 0x33, 0xF0, 0x33, 0xF0, 0x12, 0x43, 0xF0, 0x43,
                            0xE0, 0x75, 0xE0, 0xF0, 0x75, 0x5A, 0xF0, 0x5A]))
    assert [(e.key, e.pressed) for e in events] == [
        ("shift_left", True), ("h", True), ("h", False), ("shift_left", False), ("i", True), ("i", False),
        ("up", True), ("up", False), ("enter", True), ("enter", False)]
    assert "".join(e.text for e in events) == "Hi\x1b[A\n"


def test_caps_lock_inverts_letters_not_digits_and_shift_undoes_it() -> None:
    d = Decoder()
    caps = bytes([0x58, 0xF0, 0x58])
    text = "".join(e.text for e in feed(d, caps + bytes([0x1C, 0xF0, 0x1C, 0x16, 0xF0, 0x16])
                                        + bytes([0x12, 0x1C, 0xF0, 0x1C, 0xF0, 0x12]) + caps
                                        + bytes([0x1C, 0xF0, 0x1C])))
    assert text == "A1aa"
    assert d.leds == Led(0)


def test_an_unknown_scan_code_is_reported_not_fatal() -> None:
    d = Decoder()
    events = feed(d, bytes([0x62, 0x1C]))            # 0x62 is no key in set 2
    assert events[0].key == "unknown" and events[0].code == b"\x62"
    assert events[1].key == "a"
    assert d.unknown == [b"\x62"]


def test_pause_sequence() -> None:
    assert feed(Decoder(), bytes([0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77]))[0].key == "pause"


def test_mouse_packets_with_sign_overflow_and_wheel() -> None:
    p = PacketDecoder(size=4)
    # left button, dx = -3 (sign), dy = +5 on the wire (up) = -5 on screen, wheel -1
    e = [x for x in (p.feed(b, now=0.0) for b in (0x19, 0xFD, 0x05, 0x0F)) if x][0]
    assert (e.dx, e.dy, e.wheel, e.left, e.overflow) == (-3, -5, -1, True, False)
    e = [x for x in (p.feed(b, now=0.0) for b in (0x48, 0xFF, 0x00, 0x00)) if x][0]
    assert e.overflow and e.dx == 255


def test_a_lost_mouse_byte_resynchronises() -> None:
    p = PacketDecoder(size=3)
    events = []
    # a packet that lost its last byte, a pause, then two whole packets
    for t, b in [(0.0, 0x08), (0.0, 0x01), (0.2, 0x08), (0.2, 0x02), (0.2, 0x00),
                 (0.2, 0x09), (0.2, 0x00), (0.2, 0x03)]:
        e = p.feed(b, now=t)
        if e:
            events.append(e)
    assert [(e.dx, e.dy, e.left) for e in events] == [(2, 0, False), (0, -3, True)]
    assert p.dropped == 2
    # a stray byte without the always-one bit can never start a packet
    assert p.feed(0x00, now=1.0) is None and p.dropped == 3


class FakeI8042:
    """Just enough of an 8042 with a keyboard that asks for a resend once per command byte."""

    def __init__(self, resends: int) -> None:
        self.out: collections.deque[int] = collections.deque()
        self.resends_left = resends
        self.received: list[int] = []

    def read(self, port: int) -> int:
        if port == 0x64:
            return Status.OBF if self.out else 0
        return self.out.popleft() if self.out else 0

    def write(self, port: int, value: int) -> None:
        if port == 0x60:
            self.received.append(value)
            if self.resends_left:
                self.resends_left -= 1
                self.out.append(RESEND)
            else:
                self.out.append(ACK)


def test_a_resend_repeats_the_byte_and_then_succeeds() -> None:
    kbd = FakeI8042(resends=2)
    c = Controller(FakePorts(kbd.read, kbd.write).region(0x60, 5))
    Keyboard(c).set_leds(Led.CAPS)
    assert kbd.received == [0xED, 0xED, 0xED, 0x04]
    assert c.resends == 2


def test_endless_resends_are_a_typed_error() -> None:
    kbd = FakeI8042(resends=100)
    c = Controller(FakePorts(kbd.read, kbd.write).region(0x60, 5))
    with pytest.raises(CommandRefused, match="0xed"):
        c.command_device(Port.KBD, 0xED, 0x04)


def test_bytes_that_arrive_during_a_handshake_are_kept_in_order() -> None:
    kbd = FakeI8042(resends=0)
    c = Controller(FakePorts(kbd.read, kbd.write).region(0x60, 5))
    kbd.out.extend([0x1C, 0xF0, 0x1C])               # 'a' typed just before the command
    c.command_device(Port.KBD, 0xF4)
    assert [c.read_byte(Port.KBD, 0.1) for _ in range(3)] == [0x1C, 0xF0, 0x1C]
