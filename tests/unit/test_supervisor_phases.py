"""The phases a driver process tells the supervisor (zygote.mark) reach its restart or its
standby even when they come before the zygote's answer names the process: a child tells
"forked" at once, and anyone may read the phases socket (the bench does, after each restart)
before the supervisor has registered the new process."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from harness.processes.supervisor import Driver, Restart, Supervisor


class ForkingZygote:
    """Spawns "processes" (this one's PID) that tell "forked" before spawn() returns, and lets
    someone read the phases meanwhile, as the race allows."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def spawn(self, spec: dict[str, Any], fds: list[int]) -> int:
        pid = os.getpid()
        socket.socket(fileno=os.dup(fds[0])).send(f"{pid} forked {time.monotonic()!r}".encode())
        self.supervisor.collect_phases()        # another thread reads the phases before we answer
        return pid


def supervisor_without_machine() -> Supervisor:
    supervisor = Supervisor.__new__(Supervisor)
    supervisor._phases, supervisor._phases_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    supervisor._phases.setblocking(False)
    supervisor._phases_lock = threading.Lock()
    supervisor._unclaimed = {}
    supervisor.zygote = ForkingZygote(supervisor)  # type: ignore[assignment]
    return supervisor


def test_a_standby_that_told_forked_before_it_was_registered_keeps_that_phase() -> None:
    supervisor = supervisor_without_machine()
    driver = Driver("disk", {"name": "disk"}, {}, restart=True, keep_standby=True)
    supervisor.drivers = [driver]
    supervisor._prepare_standby(driver)
    assert driver.standby is not None
    try:
        assert "forked" in driver.standby.phases
    finally:
        os.close(driver.standby.pidfd)
        driver.standby.go.close()


def test_a_restart_whose_process_told_forked_before_it_was_registered_keeps_that_phase() -> None:
    supervisor = supervisor_without_machine()
    driver = Driver("disk", {"name": "disk"}, {}, restart=True)
    driver.pending = Restart("killed by SIGKILL", time.monotonic())
    supervisor.drivers = [driver]
    supervisor._start(driver)
    try:
        assert driver.pending.pid == os.getpid()
        assert list(driver.pending.phases) == ["spawned", "forked"]
    finally:
        assert driver.pidfd is not None
        os.close(driver.pidfd)
