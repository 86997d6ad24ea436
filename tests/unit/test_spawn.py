"""How the harness starts QEMU, without QEMU: a child that dies with its parent, with no huge pages."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.machine.machine import popen_dying_with_parent

if "THP_enabled:" not in Path("/proc/self/status").read_text():
    pytest.skip("this kernel does not show THP_enabled in /proc/PID/status", allow_module_level=True)

# a child that says when it runs its own code (exec done), then waits
CHILD = [sys.executable, "-c", "print('up', flush=True); import time; time.sleep(60)"]


def thp_enabled(pid: int | str) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return status.split("THP_enabled:")[1].split()[0]


def spawned_thp(out: Path, huge_pages: bool = False) -> str:
    """Spawn CHILD, wait until it runs, and return its THP_enabled; it is killed after."""
    with open(out, "wb") as sink:
        child = popen_dying_with_parent(CHILD, sink, huge_pages)
    try:
        deadline = time.monotonic() + 30
        while b"up" not in out.read_bytes():
            assert child.poll() is None and time.monotonic() < deadline, "the child did not start"
            time.sleep(0.01)
        return thp_enabled(child.pid)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_a_child_without_huge_pages_gets_none_and_this_process_keeps_its_own(tmp_path: Path) -> None:
    mine = thp_enabled("self")
    assert spawned_thp(tmp_path / "out") == "0", "QEMU's guest RAM and code buffer get no transparent huge pages"
    assert thp_enabled("self") == mine, "the harness's own process keeps its setting"
    assert spawned_thp(tmp_path / "out2", huge_pages=True) == mine, "QEMU's default where the spec keeps them"


def test_concurrent_spawns_all_get_the_setting(tmp_path: Path) -> None:
    # each thread waits for its own child: a child dies with the thread that spawned it
    seen: list[str] = []
    threads = [threading.Thread(target=lambda i=i: seen.append(spawned_thp(tmp_path / f"out{i}"))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["0"] * 6
