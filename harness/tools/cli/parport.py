"""``hwharness parport``: a file sent through the Python parallel port driver to a chardev."""

from __future__ import annotations

import argparse
import hashlib

from drivers.parport import ISA_IRQ, ParallelPort
from ...access import IrqMode
from ...machine import MachineSpec, RuntimeFile
from ...proxy import ProxyMachine, proxy_spec
from .common import CheckFailed, iommu_of, log, readable_file, say

PARPORT_BASE = 0x378


def add_printer(spec: MachineSpec) -> RuntimeFile:
    """An ISA parallel port on ``spec`` (LPT1, IRQ 7) whose printer is a file; that file."""
    printer = spec.chardev_file("printer")
    spec.device("isa-parallel", chardev="printer", iobase=PARPORT_BASE, irq=ISA_IRQ)
    return printer


def send_to_printer(pm: ProxyMachine, printer: RuntimeFile, data: bytes) -> tuple[bytes, int]:
    """Send ``data`` through the driver; what reached the chardev and the ACK interrupts counted."""
    ports = pm.bus.ports(PARPORT_BASE, 3)
    irq = ports.channel.interrupt(IrqMode.ISA, isa_irqs=(ISA_IRQ,))
    port = ParallelPort(ports, irq)
    port.reset()
    port.send(data)
    pm.machine.qmp("query-status")              # a QMP round trip: QEMU has written the chardev
    acks = irq.count
    ports.channel.close()
    return pm.machine.path(printer).read_bytes(), acks


def cmd_parport(args: argparse.Namespace) -> int:
    data = readable_file(args.send, "--send").read_bytes()
    spec = proxy_spec(accel=args.accel, iommu=iommu_of(args))
    printer = add_printer(spec)
    with ProxyMachine(spec, name="parport") as pm:
        received, acks = send_to_printer(pm, printer, data)
    say(f"sent {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}")
    say(f"received {len(received)} bytes sha256 {hashlib.sha256(received).hexdigest()}")
    log.info("%d ACK interrupts", acks)
    if received != data:
        raise CheckFailed(f"the printer chardev received {len(received)} bytes that differ from the "
                          f"{len(data)} sent")
    return 0
