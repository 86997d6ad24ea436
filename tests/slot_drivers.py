"""Drivers for the driver-process tests, run in processes of their own: entries that
``Supervisor.run()`` calls as ``entry(bus, function, **sockets, **kwargs)``, and a
script for a plain attached process (``python -m tests.slot_drivers ADDRESS ...``)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct
import sys
import time
from pathlib import Path

import drivers.edu as edu
from drivers.e1000 import E1000
from drivers.e1000.descriptors import RX_DD, RxDesc
from drivers.e1000.regs import Reg
from harness.access import PciFunction
from harness.errors import DmaFault
from harness.processes.attached import AttachedBus, attach


def report(path: str, **what: object) -> None:
    """Tell the test something, all at once (a rename)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(what))
    tmp.rename(path)


def reader(bus: AttachedBus, function: PciFunction, register: int = 0x8, period: float = 0.002) -> None:
    """Read one register of BAR 0 forever, beating after each read."""
    with bus.open(function) as dev:
        while True:
            dev.bar(0).read32(register)
            bus.beat()
            time.sleep(period)


def keeper(bus: AttachedBus, function: PciFunction, marker: str, out: str) -> None:
    """An edu driver that keeps working: DMA a random page to the device and back, check
    it, and check that a witness buffer (starting with ``marker``) never changes."""
    with bus.open(function) as dev:
        dev.enable_dma()
        witness = dev.dma_alloc(64 << 10)
        witness.view[:] = bytes.fromhex(marker) + random.randbytes(witness.size - len(marker) // 2)
        sealed = hashlib.sha256(witness.view).hexdigest()
        page = dev.dma_alloc(4096)
        report(out, witness=witness.phys, size=witness.size, sha256=sealed, slot=bus.slot)
        size = 2048                                 # a transfer must end before the end of edu's buffer
        while True:
            data = random.randbytes(size)
            page.view[:size] = data
            edu.dma(dev, page.phys, edu.BUFFER, size, to_ram=False)
            bus.beat()
            page.view[:size] = bytes(size)
            edu.dma(dev, edu.BUFFER, page.phys, size, to_ram=True)
            if bytes(page.view[:size]) != data:
                raise AssertionError("an edu round trip came back different")
            if hashlib.sha256(witness.view).hexdigest() != sealed:
                raise AssertionError("the witness buffer changed")
            bus.beat()


def vandal(bus: AttachedBus, function: PciFunction, qemu_port: int, targets: list[int], markers: list[str],
           out: str) -> None:
    """A driver gone bad: look for other slots' secrets in its whole mapping, aim its NIC's
    receive DMA at every target, then overwrite every byte of its window."""
    mapping = bus.handles.memory
    found = [m for m in markers if mapping.find(bytes.fromhex(m)) >= 0]
    nic = E1000(bus, bus.open(function), interrupts=False, rx_entries=8, tx_entries=8)
    domain = nic.dev.channel.domain
    assert domain is not None
    time.sleep(1.1)                                 # QEMU's e1000 receives 1 s after RCTL is written
    nic.regs.write32(Reg.RDT, 0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    frame = nic.mac + b"\x02" * 6 + b"\x88\xb5" + b"\xee" * 46
    rx, slot, faults, landed = nic.rx_ring.view, 0, 0, []
    for addr in targets:
        if domain.base <= addr < domain.base + domain.size:
            continue
        struct.pack_into("<QHHBBH", rx, slot * 16, addr, 0, 0, 0, 0, 0)
        slot = (slot + 1) % 8
        with nic.dev.batch() as b:
            b.write32(nic.regs, Reg.RDT, slot)
            b.read32(nic.regs, Reg.STATUS)
        sender.sendto(frame, ("127.0.0.1", qemu_port))
        deadline = time.monotonic() + 5
        while not rx[((slot - 1) % 8) * 16 + RxDesc.status.offset] & RX_DD:
            if time.monotonic() > deadline:
                raise AssertionError(f"the frame aimed at {addr:#x} never arrived")
        bus.beat()
        for _ in range(1000):                       # the fault interrupt may lag the write-back
            try:
                nic.regs.read32(Reg.STATUS)
            except DmaFault:
                faults += 1
                break
        else:
            landed.append(addr)
    report(out, found=found, faults=faults, landed=landed, aimed=len(targets))
    mapping[:] = random.randbytes(len(mapping))     # every byte of its window, rings and all
    time.sleep(0.5)                                 # and the proxy serves that garbage for a while


def hold(address: str, vendor: int, device: int, register: int) -> None:
    """Attach, open the device, print one BAR 0 register, and hold the device until told to go
    (a line on stdin)."""
    bus = attach(address)
    try:
        dev = bus.open(bus.find(vendor=vendor, device=device))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        bus.close()
        return
    command = dev.config.read16(0x04)
    regs = dev.bar(0)
    print(json.dumps({"slot": bus.slot, "pid": os.getpid(), "command": command, "register": regs.read32(register)}),
          flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            break
        if line.strip() == "work":                  # prove the device still answers
            print(json.dumps({"register": regs.read32(register)}), flush=True)
    dev.close()
    bus.close()


if __name__ == "__main__":
    hold(sys.argv[1], *(int(a, 0) for a in sys.argv[2:5]))
