"""Scan code set 2 and the US layout.

Set 2 make codes are from the IBM PS/2 keyboard technical reference (the same
table as QEMU's hw/input/ps2.c qcode_to_keycode_set2). A break is the make
code after 0xF0; extended keys are prefixed by 0xE0.
"""

from __future__ import annotations

PREFIX_EXTENDED = 0xE0
PREFIX_BREAK = 0xF0
PREFIX_PAUSE = 0xE1
PAUSE_SEQUENCE = bytes([0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77])

SET2: dict[int, str] = {
    0x1C: "a", 0x32: "b", 0x21: "c", 0x23: "d", 0x24: "e", 0x2B: "f", 0x34: "g", 0x33: "h",
    0x43: "i", 0x3B: "j", 0x42: "k", 0x4B: "l", 0x3A: "m", 0x31: "n", 0x44: "o", 0x4D: "p",
    0x15: "q", 0x2D: "r", 0x1B: "s", 0x2C: "t", 0x3C: "u", 0x2A: "v", 0x1D: "w", 0x22: "x",
    0x35: "y", 0x1A: "z",
    0x45: "0", 0x16: "1", 0x1E: "2", 0x26: "3", 0x25: "4", 0x2E: "5", 0x36: "6", 0x3D: "7",
    0x3E: "8", 0x46: "9",
    0x0E: "grave", 0x4E: "minus", 0x55: "equal", 0x54: "bracket_left", 0x5B: "bracket_right",
    0x5D: "backslash", 0x4C: "semicolon", 0x52: "apostrophe", 0x41: "comma", 0x49: "dot",
    0x4A: "slash",
    0x29: "space", 0x5A: "enter", 0x66: "backspace", 0x0D: "tab", 0x76: "escape",
    0x12: "shift_left", 0x59: "shift_right", 0x14: "ctrl_left", 0x11: "alt_left",
    0x58: "caps_lock", 0x77: "num_lock", 0x7E: "scroll_lock",
    0x05: "f1", 0x06: "f2", 0x04: "f3", 0x0C: "f4", 0x03: "f5", 0x0B: "f6", 0x83: "f7",
    0x0A: "f8", 0x01: "f9", 0x09: "f10", 0x78: "f11", 0x07: "f12",
    0x70: "kp_0", 0x69: "kp_1", 0x72: "kp_2", 0x7A: "kp_3", 0x6B: "kp_4", 0x73: "kp_5",
    0x74: "kp_6", 0x6C: "kp_7", 0x75: "kp_8", 0x7D: "kp_9", 0x71: "kp_dot", 0x79: "kp_add",
    0x7B: "kp_subtract", 0x7C: "kp_multiply",
}

SET2_EXTENDED: dict[int, str] = {
    0x14: "ctrl_right", 0x11: "alt_right", 0x1F: "meta_left", 0x27: "meta_right", 0x2F: "menu",
    0x75: "up", 0x72: "down", 0x6B: "left", 0x74: "right",
    0x70: "insert", 0x71: "delete", 0x6C: "home", 0x69: "end", 0x7D: "page_up", 0x7A: "page_down",
    0x4A: "kp_divide", 0x5A: "kp_enter",
    0x12: "print_prefix", 0x7C: "print",            # PrtSc is E0 12 E0 7C
}

# US layout: key -> (unshifted, shifted)
US: dict[str, tuple[str, str]] = {
    **{c: (c, c.upper()) for c in "abcdefghijklmnopqrstuvwxyz"},
    "1": ("1", "!"), "2": ("2", "@"), "3": ("3", "#"), "4": ("4", "$"), "5": ("5", "%"),
    "6": ("6", "^"), "7": ("7", "&"), "8": ("8", "*"), "9": ("9", "("), "0": ("0", ")"),
    "grave": ("`", "~"), "minus": ("-", "_"), "equal": ("=", "+"), "bracket_left": ("[", "{"),
    "bracket_right": ("]", "}"), "backslash": ("\\", "|"), "semicolon": (";", ":"),
    "apostrophe": ("'", '"'), "comma": (",", "<"), "dot": (".", ">"), "slash": ("/", "?"),
    "space": (" ", " "), "enter": ("\n", "\n"), "tab": ("\t", "\t"), "backspace": ("\b", "\b"),
    "kp_enter": ("\n", "\n"), "kp_divide": ("/", "/"), "kp_multiply": ("*", "*"),
    "kp_subtract": ("-", "-"), "kp_add": ("+", "+"),
}

# Keys that are not text but that a line editor understands: ANSI sequences.
ANSI = {"up": "\x1b[A", "down": "\x1b[B", "right": "\x1b[C", "left": "\x1b[D",
        "home": "\x1b[H", "end": "\x1b[F", "delete": "\x1b[3~", "escape": "\x1b"}

# Keypad digits when Num Lock is on
KEYPAD_NUM = {"kp_0": "0", "kp_1": "1", "kp_2": "2", "kp_3": "3", "kp_4": "4", "kp_5": "5",
              "kp_6": "6", "kp_7": "7", "kp_8": "8", "kp_9": "9", "kp_dot": "."}

SHIFTS = {"shift_left", "shift_right"}
CTRLS = {"ctrl_left", "ctrl_right"}
ALTS = {"alt_left", "alt_right"}
LOCKS = {"caps_lock", "num_lock", "scroll_lock"}
