"""Suite-wide guard: no QEMU process this test process started may outlive the suite."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest


def child_qemus() -> list[int]:
    """PIDs of QEMU processes whose parent is this process."""
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if fields[1] == me and comm.startswith("qemu-system"):
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_qemu_left_behind() -> Iterator[None]:
    yield
    left = child_qemus()
    assert not left, f"QEMU processes outlived the suite: {left}"
