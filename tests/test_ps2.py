"""The PS/2 drivers against QEMU's i8042, keyboard and mouse, with input injected through QMP."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest

from drivers.ps2 import CommandRefused, Controller, Keyboard, Mouse, Port, open_i8042
from drivers.ps2.regs import Led
from harness.machine.input import move_mouse, type_keys
from harness.proxy import ProxyMachine

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def ps2(proxy_machine_factory_module) -> Iterator[tuple[ProxyMachine, Controller, Keyboard, Mouse]]:
    pm = proxy_machine_factory_module(name="ps2")
    controller, keyboard, mouse = open_i8042(pm.bus)
    yield pm, controller, keyboard, mouse
    controller.ports.channel.close()


def while_injecting(inject, read_events) -> list:  # type: ignore[no-untyped-def]
    """Read events while another thread injects input through QMP, then until 1 s of quiet.
    Reading goes on while the injector lives, however slow a loaded machine makes it."""
    injector = threading.Thread(target=inject)
    injector.start()
    events: list = []
    try:
        while injector.is_alive():
            events += read_events(timeout=1.0)
        events += read_events(timeout=1.0)          # what was still on its way
    finally:
        injector.join()
    return events


def typed(pm: ProxyMachine, keyboard: Keyboard, tokens: list[str]) -> list:
    return while_injecting(lambda: type_keys(pm.machine, tokens, released=lambda: keyboard.releases),
                           keyboard.events)


def test_controller_and_devices_identify_themselves(ps2) -> None:
    _, controller, keyboard, mouse = ps2
    assert keyboard.identify() == bytes([0xAB, 0x83])        # an MF2 keyboard
    assert keyboard.scancode_set() == 2
    assert mouse.device_id == 3                              # the IntelliMouse knock worked
    assert not controller.config & 0x40, "translation is off: the driver decodes set 2 itself"


def test_a_sentence_with_every_kind_of_key_decodes_exactly(ps2) -> None:
    pm, _, keyboard, _ = ps2
    tokens = list("Hello, World! It's 09:41 -- [ok] {\"x\": 1+2=3} a_b/c\\d?") + \
        ["ret", "backspace", "up", "down", "left", "right"] + list(" Done.")
    events = typed(pm, keyboard, tokens)
    expected = ("Hello, World! It's 09:41 -- [ok] {\"x\": 1+2=3} a_b/c\\d?\n\b"
                "\x1b[A\x1b[B\x1b[D\x1b[C Done.")
    assert "".join(e.text for e in events) == expected
    presses = [e for e in events if e.pressed]
    releases = [e for e in events if not e.pressed]
    assert len(presses) == len(releases), "every key released"


def test_caps_lock_toggles_its_led_and_the_case(ps2) -> None:
    pm, _, keyboard, _ = ps2
    events = typed(pm, keyboard, ["caps_lock", "a", "B", "1"])
    assert "".join(e.text for e in events) == "Ab1"
    assert keyboard.leds == Led.CAPS, "the driver set the LED and the keyboard acknowledged it"
    events = typed(pm, keyboard, ["caps_lock", "a"])
    assert "".join(e.text for e in events) == "a"
    assert keyboard.leds == Led(0)


def test_an_unknown_scan_code_is_reported_and_typing_goes_on(ps2) -> None:
    pm, _, keyboard, _ = ps2
    events = typed(pm, keyboard, ["henkan", "x"])          # a Japanese key: no US meaning
    assert [e.key for e in events if e.pressed] == ["unknown", "x"]
    assert keyboard.decoder.unknown


def test_commands_are_acknowledged_and_a_refused_one_is_a_typed_error(ps2) -> None:
    _, controller, keyboard, _ = ps2
    keyboard.set_typematic(delay_ms=250, rate_index=0)      # each byte answered 0xFA
    before = controller.resends
    with pytest.raises(CommandRefused):
        controller.command_device(Port.KBD, 0xD0)            # no such command: the keyboard asks again
    assert controller.resends - before >= 3
    keyboard.enable()                                        # and it still works


def test_mouse_motion_buttons_and_wheel_add_up(ps2) -> None:
    pm, _, _, mouse = ps2
    gestures = [(15, -7, ["left"], 0), (-40, 22, [], 2), (120, 0, ["right"], -1), (0, -127, ["middle"], 0),
                (100, 90, [], 1), (-3, 4, ["left", "right"], 0)]
    def hand() -> None:                                     # moves while the driver reads
        for dx, dy, buttons, wheel in gestures:
            move_mouse(pm.machine, dx, dy, buttons, wheel)

    events = while_injecting(hand, mouse.events)
    assert sum(e.dx for e in events) == sum(g[0] for g in gestures)
    assert sum(e.dy for e in events) == sum(g[1] for g in gestures)
    assert sum(e.wheel for e in events) == sum(g[3] for g in gestures)
    assert any(e.left for e in events) and any(e.right for e in events) and any(e.middle for e in events)
    assert not (events[-1].left or events[-1].right or events[-1].middle), "every button released"
    assert mouse.decoder.dropped == 0
