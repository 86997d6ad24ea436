"""The serial console: QEMU writes it to a file; we read it with expect-style waits."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

from ..errors import MachineError


class Console:
    """Expect-style access to a machine's serial log."""

    def __init__(self, path: Path, alive: Callable[[], bool]) -> None:
        self.path = path
        self._alive = alive
        self._consumed = 0      # wait_for() searches after the last match

    def text(self) -> str:
        """Everything the guest has printed so far."""
        try:
            return self.path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until ``pattern`` appears after the previous match; return the match.

        Raises MachineError on timeout or if QEMU exits first, quoting the log.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            text = self.text()
            m = regex.search(text, self._consumed)
            if m:
                self._consumed = m.end()
                return m
            if not self._alive():
                raise MachineError(f"QEMU exited while waiting for {regex.pattern!r} on the console",
                                   output=text)
            if time.monotonic() >= deadline:
                raise MachineError(f"timed out after {timeout:g} s waiting for {regex.pattern!r} "
                                   "on the console", output=text)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
