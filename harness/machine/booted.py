"""A Machine together with the bus a transport builds on it, as one context manager."""

from __future__ import annotations

import abc
from typing import Any, Generic, TypeVar

from ..access import Bus
from .machine import Machine
from .spec import MachineSpec

B = TypeVar("B", bound=Bus)


class BootedMachine(abc.ABC, Generic[B]):
    """``with Sub(spec) as bm: bm.bus ...``: launch, attach the bus, and always tear both down.

    A subclass says how to attach its transport's bus to the running machine.
    """

    def __init__(self, spec: MachineSpec, **machine_args: Any) -> None:
        self.machine = Machine(spec, **machine_args)
        self.bus: B

    @abc.abstractmethod
    def attach(self, machine: Machine) -> B:
        """Build the transport's bus on the launched machine."""

    def __enter__(self) -> "BootedMachine[B]":
        self.machine.launch()
        try:
            self.bus = self.attach(self.machine)
        except BaseException as exc:
            self.machine.failed_by(type(exc))
            self.machine.shutdown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.machine.failed_by(exc_type)
        self.close()

    def close(self) -> None:
        try:
            if hasattr(self, "bus"):
                self.bus.close()
        finally:
            self.machine.shutdown()
