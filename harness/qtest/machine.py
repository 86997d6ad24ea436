"""A stopped machine with a qtest server: the qtest socket as a machine plugin."""

from __future__ import annotations

import socket
from typing import Any

from ..machine import Machine, MachineSpec
from ..machine.booted import BootedMachine
from ..machine.machine import accept_once, listen
from ..machine.plugin import MachinePlugin
from ..machine.spec import Endpoints, Option, abstract
from .bus import QtestBus


class QtestSocket(MachinePlugin):
    """QEMU's qtest server on a private socket, the CPU stopped (``-S``) under tcg."""

    def __init__(self) -> None:
        self.socket: socket.socket | None = None
        self._listener: socket.socket | None = None

    def options(self, ends: Endpoints, accel: str) -> list[Option]:
        if accel == "kvm":
            raise ValueError("qtest machines run with the CPU stopped under tcg; kvm makes no sense there")
        # QEMU 7.2 looks the qtest chardev up by the fixed id "qtest" (qtest_server_init).
        return [Option("chardev", "socket", {"id": "qtest", **abstract(ends.address("qtest"))}),
                Option("qtest", "chardev:qtest")]

    def args(self) -> list[str]:
        return ["-S"]

    def pre_launch(self, machine: Machine, ends: Endpoints) -> None:
        self._listener = listen(ends.address("qtest"))

    def post_launch(self, machine: Machine, deadline: float) -> None:
        def accept(timeout: float) -> socket.socket:
            assert self._listener is not None
            sock = accept_once(self._listener, timeout)
            self._listener = None
            return sock
        self.socket = machine.accept(accept, deadline, "the qtest connection")

    def shutdown(self, machine: Machine) -> None:
        for s in (self._listener, self.socket):
            if s is not None:
                s.close()
        self._listener = self.socket = None


def qtest_spec(memory_mb: int = 128) -> MachineSpec:
    """A machine for the qtest transport (tcg, CPU stopped, qtest socket); add devices to taste."""
    spec = MachineSpec(accel="tcg", memory_mb=memory_mb)
    spec.plugins.append(QtestSocket())
    return spec


class QtestMachine(BootedMachine[QtestBus]):
    """A stopped machine driven over qtest: ``with QtestMachine(qtest_spec()) as qm: qm.bus.find(...)``."""

    def __init__(self, spec: MachineSpec, **machine_args: Any) -> None:
        if not any(isinstance(p, QtestSocket) for p in spec.plugins):
            raise ValueError("the qtest transport needs a spec with a qtest socket: use qtest_spec()")
        if spec.accel != "tcg":
            raise ValueError(f"qtest machines run under tcg, not {spec.accel!r}: use qtest_spec()")
        super().__init__(spec, **machine_args)

    def attach(self, machine: Machine) -> QtestBus:
        return QtestBus(machine, machine.plugin(QtestSocket).socket)

    def __enter__(self) -> "QtestMachine":
        super().__enter__()
        return self
