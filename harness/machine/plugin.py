"""What a transport adds to a machine, as QEMU's own ``python/qemu/machine`` adds qtest.

The machine knows no transport. A plugin in the spec (``spec.plugins``)
contributes its QEMU options, its steps before QEMU starts (servers to
listen on), after (connections to accept) and once QMP answers, its shutdown, and whether
the machine can still be snapshotted; the proxy's ivshmem windows
(:mod:`harness.proxy.machine`) and the qtest socket (:mod:`harness.qtest.machine`)
are plugins. Each Machine works on its own copy of the spec's plugins, so one
spec can boot many machines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .machine import Machine
    from .spec import Endpoints, Option


class MachinePlugin:
    """Override what the transport needs; every step does nothing by default."""

    #: False when the machine's state lives partly outside QEMU (shared memory the harness
    #: serves), so a QMP snapshot would not restore it.
    snapshottable = True

    def options(self, ends: Endpoints, accel: str) -> list[Option]:
        """QEMU options, placed after the machine's own (QMP, serial) and before the spec's
        devices; ``ends.address(name)`` names a private socket. Raise ValueError for an
        accelerator the transport cannot run under."""
        return []

    def args(self) -> list[str]:
        """Plain arguments appended to the command line (``-S``)."""
        return []

    def pre_launch(self, machine: Machine, ends: Endpoints) -> None:
        """Before QEMU starts: listen where QEMU will connect."""

    def post_launch(self, machine: Machine, deadline: float) -> None:
        """QEMU has started: accept its connections by ``deadline`` (``machine.accept``)."""

    def connected(self, machine: Machine, deadline: float) -> None:
        """QMP answers: finish starting by ``deadline`` (a saved state to load, then run)."""

    def shutdown(self, machine: Machine) -> None:
        """QEMU is gone (or never started): release what pre_launch made. Must not raise."""
