"""Small drivers for the driver-process tests: entries Supervisor.run() and the
zygote's children call as ``entry(bus, function, **sockets, **kwargs)``."""

from __future__ import annotations

import time

from harness.proxy.attached import AttachedBus
from harness.access import PciFunction


def reader(bus: AttachedBus, function: PciFunction, register: int = 0x8, period: float = 0.002) -> None:
    """Read one register of BAR 0 forever, beating after each read."""
    with bus.open(function) as dev:
        while True:
            dev.bar(0).read32(register)
            bus.beat()
            time.sleep(period)
