"""The parallel port driver against QEMU's isa-parallel, its chardev read on the host."""

from __future__ import annotations

import os

import pytest

from drivers.parport import ISA_IRQ, ParallelPort
from harness.access import IrqMode
from harness.errors import AccessDenied
from harness.machine import MachineSpec

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def printer(proxy_machine_factory_module):  # type: ignore[no-untyped-def]
    files = {}

    def configure(spec: MachineSpec) -> None:
        files["out"] = spec.chardev_file("printer")
        spec.device("isa-parallel", chardev="printer", iobase=0x378, irq=ISA_IRQ)

    pm = proxy_machine_factory_module(configure, name="parport")
    return pm, pm.machine.path(files["out"])


def test_64k_arrive_byte_exact_with_an_ack_interrupt_each(printer) -> None:
    pm, out = printer
    ports = pm.bus.ports(0x378, 3)
    try:
        irq = ports.channel.interrupt(IrqMode.ISA, isa_irqs=(ISA_IRQ,))
        port = ParallelPort(ports, irq)
        port.reset()
        lines = port.lines
        assert lines.selected and not lines.busy and not lines.paper_out and not lines.error
        data = os.urandom(64 * 1024)
        before = out.read_bytes()
        assert port.send(data) == len(data)
        pm.machine.qmp("query-status")
        assert out.read_bytes() == before + data
        assert irq.count == len(data), "one acknowledge interrupt per byte"
        # QEMU's model has no input side: with the lines turned around it reads all ones
        assert port.read_data() == 0xFF
    finally:
        ports.channel.close()


def test_a_parallel_port_the_machine_lacks_is_refused_naming_what_it_has(printer) -> None:
    pm, _ = printer
    with pytest.raises(AccessDenied, match=r"0x278-0x27a belong to no legacy device.*isa-parallel at 0x378-0x37a"):
        pm.bus.ports(0x278, 3)                              # LPT2: not built into this machine
