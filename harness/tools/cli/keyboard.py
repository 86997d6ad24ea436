"""``hwharness keyboard``: text typed through QMP, as the Python PS/2 keyboard driver decodes it."""

from __future__ import annotations

import argparse
import threading
from typing import Any

from drivers.ps2 import open_i8042
from ...errors import BadInput
from ...machine.input import type_keys, untypeable
from ...proxy import ProxyMachine, proxy_spec
from .common import iommu_of, say


def typeable_text(text: str) -> str:
    """``text`` if every character has a key on the US layout; BadInput listing the ones that do not."""
    missing = untypeable(text)
    if missing:
        listed = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing)
        raise BadInput(f"--type: no key on the US keyboard layout for {listed}; ASCII letters, digits, "
                       f"punctuation, space, tab, newline and backspace can be typed")
    if not text:
        raise BadInput("--type: no text to type")
    return text


def escape_controls(text: str) -> str:
    """Printable as it is; Enter, Backspace, Tab, Escape as backslash escapes, so it stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def type_and_decode(pm: ProxyMachine, keyboard: Any, tokens: list[str], idle: float = 1.0) -> str:
    """Inject ``tokens`` through QMP while the driver reads; what the driver decoded.
    If typing failed, its error is raised here rather than lost in the thread."""
    failed: list[BaseException] = []

    def typist_run() -> None:
        try:
            type_keys(pm.machine, tokens, released=lambda: keyboard.releases)
        except BaseException as exc:
            failed.append(exc)
    typist = threading.Thread(target=typist_run)
    typist.start()
    try:
        decoded = keyboard.read_text(idle=idle)
    finally:
        typist.join()
    if failed:
        raise failed[0]
    return str(decoded)


def cmd_keyboard(args: argparse.Namespace) -> int:
    typeable_text(args.type)
    with ProxyMachine(proxy_spec(accel=args.accel, iommu=iommu_of(args)), name="keyboard") as pm:
        _, keyboard, _ = open_i8042(pm.bus)
        say(f"decoded: {escape_controls(type_and_decode(pm, keyboard, list(args.type)))}")
    return 0
