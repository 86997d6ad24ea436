"""Machines restored ahead of the tests that take them: never shared, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.errors import MachineError
from harness.machine.machine import WORKDIR_PREFIX
from harness.machine.saved import RestoredAhead

pytestmark = pytest.mark.qemu

MARK = "/tmp/restore-ahead-mark"
seen_pids: set[int] = set()        # QEMUs that earlier tests of this worker were given


@pytest.mark.parametrize("turn", range(3))
def test_each_test_gets_a_machine_no_test_had_before(linux_machine, turn) -> None:
    """Tests in a row (those of one xdist worker) each see a QEMU of their own, without the
    file the test before wrote."""
    pid = linux_machine.process.pid
    assert pid not in seen_pids
    seen_pids.add(pid)
    out, status = linux_machine.console.run(f"cat {MARK}")
    assert status == 1 and "No such file" in out, "a machine handed out before"
    assert linux_machine.console.run(f"echo {turn} > {MARK}") == ("", 0)


def qemus_named(part: str) -> list[int]:
    """PIDs of the processes whose command line contains ``part``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and part.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:            # gone meanwhile
            continue
    return pids


def test_a_pool_hands_each_machine_out_once_and_leaves_nothing(linux_saved, tmp_path) -> None:
    name = f"ahead{os.getpid()}"
    ahead = RestoredAhead(linux_saved, lambda m: m.console.run("true"), size=2, name=name, artifacts_root=tmp_path)
    try:
        first = ahead.take()
        first.console.run(f"echo first > {MARK}")
        second = ahead.take()
        try:
            assert first.process.pid != second.process.pid
            assert first.qmp("query-status")["status"] == second.qmp("query-status")["status"] == "running"
            out, status = second.console.run(f"cat {MARK}")
            assert status == 1 and "No such file" in out
        finally:
            first.shutdown()
            second.shutdown()
        assert len(qemus_named(f"{WORKDIR_PREFIX}{os.getpid()}-{name}")) >= 1, "the pool restores the next ones"
    finally:
        ahead.close()
    assert qemus_named(f"{WORKDIR_PREFIX}{os.getpid()}-{name}") == [], "a machine nobody took still runs"
    assert list(tmp_path.iterdir()) == [], "a machine's directory was left behind"
    with pytest.raises(MachineError, match="closed"):
        ahead.take()
