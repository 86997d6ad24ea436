"""Input injected through QMP (``input-send-event``): key presses from text, mouse motion.

This is the other side of the PS/2 drivers' tests: QEMU's own input layer
makes the keyboard and mouse produce real bytes.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

from .machine import Machine

_UNSHIFTED = {" ": "spc", "\n": "ret", "\b": "backspace", "\t": "tab", "-": "minus", "=": "equal",
              "[": "bracket_left", "]": "bracket_right", "\\": "backslash", ";": "semicolon",
              "'": "apostrophe", "`": "grave_accent", ",": "comma", ".": "dot", "/": "slash"}
_SHIFTED = {"!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9",
            ")": "0", "_": "minus", "+": "equal", "{": "bracket_left", "}": "bracket_right",
            "|": "backslash", ":": "semicolon", '"': "apostrophe", "~": "grave_accent", "<": "comma",
            ">": "dot", "?": "slash"}


def qcode_of(char: str) -> tuple[str, bool]:
    """The QEMU qcode for one character on a US keyboard, and whether it needs shift."""
    if char.isascii() and char.isalpha():
        return char.lower(), char.isupper()
    if char.isascii() and char.isdigit():
        return char, False
    if char in _UNSHIFTED:
        return _UNSHIFTED[char], False
    if char in _SHIFTED:
        return _SHIFTED[char], True
    raise ValueError(f"{char!r} has no key on a US keyboard")


def untypeable(text: str) -> list[str]:
    """The characters of ``text`` that have no key on a US keyboard, each once, in order."""
    missing: list[str] = []
    for char in text:
        if char not in missing:
            try:
                qcode_of(char)
            except ValueError:
                missing.append(char)
    return missing


def _key(qcode: str, down: bool) -> dict[str, object]:
    return {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": qcode}}}


def keystrokes(tokens: Iterable[str]) -> list[list[dict[str, object]]]:
    """Events for each token: a single character is typed (with shift if needed); a longer
    token is a qcode pressed and released (``"up"``, ``"caps_lock"``, ``"backspace"``)."""
    out = []
    for token in tokens:
        if len(token) == 1:
            qcode, shift = qcode_of(token)
        else:
            qcode, shift = token, False
        events = [_key(qcode, True), _key(qcode, False)]
        if shift:
            events = [_key("shift", True), *events, _key("shift", False)]
        out.append(events)
    return out


TYPING_PACE = 0.01     # seconds between keys: a fast typist, and no faster


def type_keys(machine: Machine, tokens: Iterable[str], pace: float = TYPING_PACE,
              released: Callable[[], int] | None = None, patience: float = 30.0) -> None:
    """Press and release every token's keys, in order, one QMP command per token.

    Paced like a person: a PS/2 keyboard holds only 16 bytes (QEMU's
    PS2_QUEUE_SIZE, as the protocol requires) and drops the rest, so keys
    fired faster than the driver drains them would be lost by the keyboard.
    A clock alone is not enough on a loaded machine (a shifted key is nine
    bytes: two of them overflow the queue), so with ``released`` (how many key
    releases the driver has decoded so far) each token first waits until the
    driver has read the last one's, for up to ``patience`` seconds.
    """
    sent = 0
    for events in keystrokes(tokens):
        deadline = time.monotonic() + patience
        while released is not None and released() < sent and time.monotonic() < deadline:
            time.sleep(0.002)
        machine.qmp("input-send-event", events=events)
        sent += sum(1 for e in events if not e["data"]["down"])   # type: ignore[index]
        time.sleep(pace)


def mouse_actions(dx: int = 0, dy: int = 0, buttons: Sequence[str] = (),
                  wheel: int = 0) -> list[list[dict[str, object]]]:
    """QMP event batches for one gesture: motion (dy down) with the buttons pressed, then
    the buttons released, then the wheel (+ toward the user). QEMU reports each batch as
    it stands when the batch ends, so a press and its release must not share one."""
    press = [{"type": "rel", "data": {"axis": axis, "value": v}} for axis, v in (("x", dx), ("y", dy)) if v]
    press += [{"type": "btn", "data": {"down": True, "button": b}} for b in buttons]
    release = [{"type": "btn", "data": {"down": False, "button": b}} for b in buttons]
    step = "wheel-down" if wheel > 0 else "wheel-up"
    turn = [{"type": "btn", "data": {"down": down, "button": step}} for _ in range(abs(wheel))
            for down in (True, False)]
    return [batch for batch in (press, release, turn) if batch]


def move_mouse(machine: Machine, dx: int = 0, dy: int = 0, buttons: Sequence[str] = (), wheel: int = 0,
               pace: float = TYPING_PACE) -> None:
    """One gesture, paced: QEMU's PS/2 mouse also queues only 16 bytes, and a packet
    carries at most 127 counts each way (a bigger move is split across packets)."""
    for events in mouse_actions(dx, dy, buttons, wheel):
        machine.qmp("input-send-event", events=events)
        time.sleep(pace)
