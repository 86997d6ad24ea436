"""Snapshots of a running machine, to go back to a booted state without a reboot.

QMP's ``snapshot-save``/``snapshot-load`` jobs (QEMU 6.0+) with the VM state in a
qcow2 node in the machine's own directory, created through QMP the first time a
snapshot is taken (no qemu-img needed). Measured back to back on a 2-core TCG
host with the 256 MiB Linux guest (68 MiB of state), from the restore request to
an answered command: median ~180 ms (the load ~75-130 ms, then a first command
slowed by retranslating the code it runs, ~60-100 ms), against ~240 ms for the
alternative, migrating to a file and starting a fresh QEMU with ``-incoming``
(a new process and new QMP and console connections, the same state to read).
Loading in place also keeps the process, its PID and its sockets. Restoring without
reading the RAM at all, into a new process, is :mod:`harness.machine.saved`.

What is restored: CPU, RAM and device state. Disks are not rolled back (only the
state node is part of the snapshot): keep guest writes that must vanish in RAM
(tmpfs), or use ``snapshot=on`` drives and a fresh machine.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import SnapshotError

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

STATE_FILE = "state.qcow2"
STATE_NODE = "hwh-state"
STATE_SIZE = 1 << 30       # a qcow2 keeps VM state beside its (unused) virtual disk; any size works


class Snapshots:
    """Named snapshots of one machine (see the module docstring for how and what)."""

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.names: list[str] = []
        self._node_ready = False
        self._jobs = 0

    def _job(self, command: str, timeout: float, **args: Any) -> None:
        """Run a QMP job to its end; a failed job raises SnapshotError with QEMU's reason."""
        self._jobs += 1
        job_id = f"hwh-{command}-{self._jobs}"
        self.machine.qmp(command, **{"job-id": job_id}, **args)
        deadline = time.monotonic() + timeout
        while True:
            job = next((j for j in self.machine.qmp("query-jobs") if j["id"] == job_id), None)
            if job is None or job["status"] == "concluded":
                break
            if time.monotonic() > deadline:
                self.machine.qmp("job-cancel", id=job_id)
                raise SnapshotError(f"{command} did not finish within {timeout:g} s")
            time.sleep(0.001)
        if job is not None:
            self.machine.qmp("job-dismiss", id=job_id)
            if job.get("error"):
                raise SnapshotError(f"{command} failed: {job['error']}")

    def _state_node(self, timeout: float) -> None:
        if self._node_ready:
            return
        m = self.machine
        unfit = [type(p).__name__ for p in m.plugins if not p.snapshottable]
        if unfit:
            raise SnapshotError(f"a machine with a {', '.join(unfit)} cannot be snapshotted: part of its state "
                                "(shared memory the harness serves) is outside QEMU's")
        assert m.workdir is not None
        path = m.workdir / STATE_FILE
        path.write_bytes(b"")
        m.qmp("blockdev-add", driver="file", **{"node-name": STATE_NODE + "-file"}, filename=str(path))
        self._job("blockdev-create", timeout, options={"driver": "qcow2", "file": STATE_NODE + "-file",
                                                       "size": STATE_SIZE})
        m.qmp("blockdev-add", driver="qcow2", **{"node-name": STATE_NODE}, file=STATE_NODE + "-file")
        self._node_ready = True

    def save(self, name: str, timeout: float = 60.0) -> None:
        """Save the machine's state as ``name`` (replacing an older one of that name)."""
        self.machine.check_alive()
        self._state_node(timeout)
        if name in self.names:
            self._job("snapshot-delete", timeout, tag=name, devices=[STATE_NODE])
            self.names.remove(name)
        t0 = time.monotonic()
        self._job("snapshot-save", timeout, tag=name, vmstate=STATE_NODE, devices=[STATE_NODE])
        self.names.append(name)
        log.info("%s: snapshot %r saved in %.0f ms", self.machine.name, name, (time.monotonic() - t0) * 1e3)

    def load(self, name: str, timeout: float = 60.0) -> None:
        """Put the machine back in the state saved as ``name``, running."""
        if name not in self.names:
            raise SnapshotError(f"no snapshot named {name!r} (taken: {', '.join(self.names) or 'none'})")
        self.machine.check_alive()
        self._job("snapshot-load", timeout, tag=name, vmstate=STATE_NODE, devices=[STATE_NODE])
        # The load keeps the run state from before it: a machine stopped (by a test, a hang) stays stopped.
        if self.machine.qmp("query-status")["status"] != "running":
            self.machine.qmp("cont")
