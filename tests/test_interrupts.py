"""Interrupts through the proxy against real QEMU devices: INTx, MSI, ISA, sharing, masking."""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Iterator

import pytest

import drivers.edu as edu
from harness.access import IrqEvent, IrqMode
from harness.errors import AccessDenied, InterruptTimeout, ProxyFault
from harness.machine import MachineSpec
from harness.proxy import ProxyMachine

pytestmark = pytest.mark.qemu

E1000 = dict(vendor=0x8086, device=0x100E)
ICR, ICS, IMS = 0x00C0, 0x00C8, 0x00D0              # 8254x interrupt cause read/set, mask set
ICR_RXT0 = 0x80
EDU = dict(vendor=edu.VENDOR, device=edu.DEVICE)
EDU_IRQ_STATUS, EDU_IRQ_RAISE, EDU_IRQ_ACK = edu.IRQ_STATUS, edu.IRQ_RAISE, edu.IRQ_ACK


def _devices(spec: MachineSpec) -> None:
    # Slots chosen for their INTx routing on q35 (PIRQ = (slot + pin) % 4 + 4):
    # e1000 at 2 -> GSI 22; edu at 4 -> GSI 20; edu at 3 and 7 share GSI 23.
    spec.device("e1000", addr="2", mitigation=False)
    for slot in (3, 4, 7):
        spec.device("edu", addr=str(slot))
    spec.device("e1000e", addr="5")                 # 82574: MSI-X


@pytest.fixture(scope="module")
def irq_machine(proxy_machine_factory_module) -> ProxyMachine:
    return proxy_machine_factory_module(_devices, name="irq")


@pytest.fixture
def nic(irq_machine: ProxyMachine) -> Iterator:
    with irq_machine.bus.open(irq_machine.bus.find(**E1000)) as dev:
        dev.bar(0).write32(IMS, ICR_RXT0)
        yield dev
        dev.bar(0).read32(ICR)


def _edu(pm: ProxyMachine, slot: int):
    return pm.bus.open(next(f for f in pm.bus.find_all(**EDU) if f.dev == slot))


def _quiet(irq) -> bool:
    """No interrupt arrived that wait() has not seen. QEMU asserts these devices' lines
    (and the IOAPIC redelivers) within the register write that causes it, and the proxy
    serves requests with interrupts enabled: under TCG, once a round trip after the last
    such write has completed, any interrupt it caused has been counted. (Under KVM the
    injection may lag the round trip: this can then miss a late interrupt, never invent one.)"""
    irq.channel.guest_time()
    return irq.count == irq.delivered


def test_device_interrupt_reaches_a_python_handler_with_its_guest_timestamp(irq_machine, nic) -> None:
    irq = nic.irq()
    seen: list[IrqEvent] = []
    irq.on(seen.append)
    try:
        assert irq.line == 22
        nic.bar(0).write32(ICS, ICR_RXT0)
        triggered = nic.channel.last_start_tsc
        event = irq.dispatch(timeout=10)
        after = nic.channel.guest_time()
        assert seen == [event]
        assert event.new == 1 and irq.delivered == 1
        assert triggered < event.guest_tsc < after
        assert nic.bar(0).read32(ICR) & ICR_RXT0
    finally:
        irq.ack()
        irq.close()


def test_level_line_waits_for_ack_and_fires_again_while_asserted(irq_machine, nic) -> None:
    irq = nic.irq()
    try:
        nic.bar(0).write32(ICS, ICR_RXT0)
        first = irq.wait(10)
        assert irq.masked
        assert _quiet(irq), "a masked level line was delivered again before ack()"
        irq.ack()                                    # the NIC still asserts: it comes straight back
        second = irq.wait(10)
        assert second.count == first.count + 1 and second.new == 1
        assert nic.bar(0).read32(ICR) == ICR_RXT0    # reading ICR deasserts the line
        irq.ack()
        assert _quiet(irq), "a deasserted line kept interrupting"
        assert irq.delivered == 2 and irq.missed == 0
    finally:
        irq.close()


def test_msi_delivery_and_a_slow_driver_shows_in_the_counters(irq_machine) -> None:
    with _edu(irq_machine, 4) as edu:
        irq = edu.irq(IrqMode.MSI)
        assert irq.line >= 128, "an MSI vector, not an IOAPIC input"
        for _ in range(3):                           # three MSIs before the driver looks
            edu.bar(0).write32(EDU_IRQ_RAISE, 1)
        edu.channel.guest_time()                     # each MSI was taken during its own write
        assert irq.count == 3
        event = irq.wait(10)
        assert event.new == 3
        assert irq.delivered == 3 and irq.missed == 2
        edu.bar(0).write32(EDU_IRQ_ACK, 1)
        irq.ack()                                    # harmless for MSI
        assert _quiet(irq)


E1000E = dict(vendor=0x8086, device=0x10D3)
IVAR, IVAR_OTHER_VALID = 0x00E4, 1 << 19            # 82574 IVAR: "other" causes -> MSI-X vector 0
ICR_OTHER, ICR_LSC = 1 << 24, 1 << 2


def test_msix_delivery_and_the_table_is_the_proxys(irq_machine) -> None:
    with irq_machine.bus.open(irq_machine.bus.find(**E1000E)) as nic:
        irq = nic.irq(IrqMode.MSIX)
        assert irq.line >= 128
        nic.bar(0).write32(IVAR, IVAR_OTHER_VALID)
        nic.bar(0).write32(IMS, ICR_OTHER | ICR_LSC)
        nic.bar(0).write32(ICS, ICR_OTHER | ICR_LSC)
        assert irq.wait(10).new == 1
        cap = next(offset for cap_id, offset in nic.function.caps if cap_id == 0x11)
        table = nic.config.read32(cap + 4)
        with pytest.raises(AccessDenied):           # aiming an MSI is aiming a DMA write
            nic.bar(table & 7).write32((table & ~7) + 0, 0xFEE00000)
        nic.bar(0).read32(ICR)
        # QEMU 7.2's e1000e aborts if its MSI-X throttling timer (armed by that
        # interrupt, zero delay) fires after MSI-X is off: let it fire first. It is
        # due at once and QEMU's main loop runs due timers every iteration; the
        # second of two QMP commands is answered in a later iteration than the first.
        for _ in range(2):
            irq_machine.machine.qmp("query-status")
        irq.close()


ICR_RXQ0, ICR_TXQ0 = 1 << 20, 1 << 22                # 82574 causes routed by IVAR to MSI-X vectors
IVAR_VALID = 0x8                                    # each IVAR field: vector in bits 0-2, then valid


def test_msix_vectors_arrive_on_their_own_counters(irq_machine) -> None:
    with irq_machine.bus.open(irq_machine.bus.find(**E1000E)) as nic:
        with pytest.raises(ValueError):
            nic.irqs(IrqMode.INTX, 2)               # several vectors are MSI-X's, or MSI's
        with pytest.raises(ProxyFault):
            nic.irqs(IrqMode.MSI, 2)                # where the device offers them: the 82574 has one
        irqs = nic.irqs(IrqMode.MSIX, 3)
        try:
            assert len({irq.line for irq in irqs}) == 3
            # RXQ0 -> vector 1, TXQ0 -> vector 2, other causes -> vector 0
            nic.bar(0).write32(IVAR, (1 | IVAR_VALID) | (2 | IVAR_VALID) << 8 | IVAR_VALID << 16)
            nic.bar(0).write32(IMS, ICR_RXQ0 | ICR_TXQ0 | ICR_OTHER)
            for cause, vector in ((ICR_TXQ0, 2), (ICR_RXQ0, 1), (ICR_TXQ0, 2), (ICR_OTHER, 0)):
                before = [irq.count for irq in irqs]
                nic.bar(0).write32(ICS, cause)
                assert irqs[vector].wait(10).new == 1
                nic.bar(0).write32(ICR, 0xFFFFFFFF)  # under MSI-X a read leaves ICR; a cause still set never fires again
                nic.channel.guest_time()            # anything the write caused has been counted
                assert [irq.count - b for irq, b in zip(irqs, before)] == [int(v == vector) for v in range(3)]
            cap = next(offset for cap_id, offset in nic.function.caps if cap_id == 0x11)
            table = nic.config.read32(cap + 4)
            for entry in range(3):                  # every entry stays the proxy's
                with pytest.raises(AccessDenied):
                    nic.bar(table & 7).write32((table & ~7) + 16 * entry + 8, 0x30)
            for _ in range(2):                      # e1000e's throttling timer first (see above)
                irq_machine.machine.qmp("query-status")
            irqs[0].close()
            assert irqs[1].count == 1 and not irqs[1].closed
        finally:
            for irq in irqs:
                irq.close()
        again = nic.irq(IrqMode.MSIX)               # the last close gave the interrupt back
        again.close()


def test_shared_line_reaches_both_and_unmasks_only_after_both_ack(irq_machine) -> None:
    with _edu(irq_machine, 3) as a, _edu(irq_machine, 7) as b:
        irq_a, irq_b = a.irq(), b.irq()
        assert irq_a.line == irq_b.line == 23
        a.bar(0).write32(EDU_IRQ_RAISE, 1)
        assert irq_a.wait(10).new == 1
        assert irq_b.wait(10).new == 1               # b's driver sees it too, and must say "not mine"
        assert b.bar(0).read32(EDU_IRQ_STATUS) == 0
        a.bar(0).write32(EDU_IRQ_ACK, 1)
        irq_a.ack()
        a.bar(0).write32(EDU_IRQ_RAISE, 1)           # asserted again, but b has not acked
        assert irq_a.masked is False and irq_b.masked
        assert _quiet(irq_a) and _quiet(irq_b), "the line was unmasked before every channel acked"
        irq_b.ack()                                  # now it is unmasked, and a still asserts
        assert irq_a.wait(10).new == 1
        assert irq_b.wait(10).new == 1
        a.bar(0).write32(EDU_IRQ_ACK, 1)
        irq_a.ack()
        irq_b.ack()
        assert _quiet(irq_a) and _quiet(irq_b)


def test_timeout_is_clean_and_a_channel_that_never_acks_wedges_nobody(irq_machine, nic) -> None:
    with _edu(irq_machine, 4) as stubborn:
        never = stubborn.irq()
        assert never.line == 20
        with pytest.raises(InterruptTimeout):
            never.wait(0.1)
        stubborn.bar(0).write32(EDU_IRQ_RAISE, 1)
        never.wait(10)                               # ... and never acked, never quieted
        irq = nic.irq()
        try:
            for _ in range(3):
                nic.bar(0).write32(ICS, ICR_RXT0)
                irq.wait(10)
                nic.bar(0).read32(ICR)
                irq.ack()
            assert irq.delivered == 3
        finally:
            irq.close()
        stubborn.bar(0).write32(EDU_IRQ_ACK, 1)
    # closing the stubborn channel detached it: the line is usable again
    with _edu(irq_machine, 4) as again:
        irq = again.irq()
        again.bar(0).write32(EDU_IRQ_RAISE, 1)
        irq.wait(10)
        again.bar(0).write32(EDU_IRQ_ACK, 1)
        irq.ack()
        assert _quiet(irq)


def test_isa_keyboard_irq1_from_a_qmp_key_press(irq_machine) -> None:
    kbd = irq_machine.bus.ports(0x60, 5)             # i8042 data 0x60, status/command 0x64
    try:
        irq = kbd.channel.interrupt(IrqMode.ISA, isa_irqs=(1, 12))
        assert irq.line == (1 << 1) | (1 << 12)
        while kbd.read8(4) & 1:                      # drain anything the firmware left
            kbd.read8(0)
        kbd.write8(4, 0x20)                          # read the controller configuration byte
        kbd.poll(4, 1, 1, 1, timeout=1.0)
        config = kbd.read8(0)
        kbd.write8(4, 0x60)                          # write it back with the keyboard IRQ enabled
        kbd.poll(4, 1, 2, 0, timeout=1.0)
        kbd.write8(0, config | 0x01)
        irq_machine.machine.qmp("send-key", keys=[{"type": "qcode", "data": "a"}])
        irq.wait(10)
        assert kbd.read8(4) & 1
        codes = [kbd.read8(0)]
        assert codes[0] in (0x1E, 0x1C), f"make code of 'a' (set 1 or set 2), got {codes[0]:#x}"
    finally:
        kbd.channel.close()


def test_guest_clock_maps_onto_the_host_clock(irq_machine) -> None:
    clock = irq_machine.bus.clock
    clock.calibrate(span=0.2)
    margin = 5e6 + 2 * clock.uncertainty_ns           # generous: this checks the mapping, not speed
    for _ in range(5):
        before = time.perf_counter_ns()
        tsc = irq_machine.admin.guest_time()
        after = time.perf_counter_ns()
        assert before - margin <= clock.to_host_ns(tsc) <= after + margin


XHCI = dict(vendor=0x1033, device=0x0194)           # nec-usb-xhci: MSI with 16 messages when MSI-X is off
XHCI_RTSOFF, XHCI_USBCMD_INTE, XHCI_IMAN_IE, XHCI_ERDP_EHB = 0x18, 1 << 2, 1 << 1, 1 << 3


def test_multiple_message_msi_vectors_arrive_on_their_own_counters(proxy_machine_factory) -> None:
    """xHCI 5.5.2: an interrupter whose Event Ring Dequeue Pointer is written one TRB short of
    where the controller stands has events pending, and raises its interrupt: message v."""
    pm = proxy_machine_factory(lambda spec: spec.device("nec-usb-xhci", msix=False, addr="6"), name="irq-xhci")
    with pm.bus.open(pm.bus.find(**XHCI)) as xhci:
        with pytest.raises(ValueError):
            xhci.irqs(IrqMode.MSI, 3)                   # messages come in powers of two
        irqs = xhci.irqs(IrqMode.MSI, 4)
        rings = []
        try:
            lines = [irq.line for irq in irqs]
            assert lines == list(range(lines[0], lines[0] + 4)) and lines[0] % 4 == 0
            cap = next(offset for cap_id, offset in xhci.function.caps if cap_id == 0x05)
            assert xhci.config.read16(cap + 2) >> 4 & 7 == 2, "Multiple Message Enable: 4"
            xhci.enable_dma()
            regs = xhci.bar(0)
            operational, runtime = regs.read8(0), regs.read32(XHCI_RTSOFF) & ~0x1F
            regs.write32(operational, regs.read32(operational) | XHCI_USBCMD_INTE)
            interrupter = [runtime + 0x20 + 32 * v for v in range(4)]
            for base in interrupter:                    # one 16-TRB event ring segment each (xHCI 6.5)
                ring, table = xhci.dma_alloc(16 * 16, 64), xhci.dma_alloc(64, 64)
                struct.pack_into("<QI", table.view, 0, ring.phys, 16)
                rings += [ring, table]
                regs.write32(base + 0x08, 1)                                # ERSTSZ
                regs.write32(base + 0x10, table.phys & 0xFFFFFFFF)          # ERSTBA; the high half
                regs.write32(base + 0x14, table.phys >> 32)                 # makes the controller read it
                regs.write32(base + 0x00, XHCI_IMAN_IE)
            for v in (2, 0, 3, 1):
                xhci.channel.guest_time()
                before = [irq.count for irq in irqs]
                ring = rings[2 * v]
                regs.write32(interrupter[v] + 0x1C, ring.phys >> 32)
                regs.write32(interrupter[v] + 0x18, (ring.phys + 16) & 0xFFFFFFFF | XHCI_ERDP_EHB)
                assert irqs[v].wait(10).new == 1
                xhci.channel.guest_time()
                assert [irq.count - b for irq, b in zip(irqs, before)] == [int(k == v) for k in range(4)]
        finally:
            for irq in irqs:
                irq.close()
            for buffer in rings:
                xhci.dma_free(buffer)


BURST = 32


def _drain(fd: int) -> int:
    """The eventfd's count of doorbell rings since it was last read (the kernel's own count)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_a_burst_of_interrupts_rings_a_sleeping_host_once(irq_machine) -> None:
    """The host announces it sleeps on the vector's doorbell; BURST MSIs follow before it
    looks. The guest rings once (the kernel's eventfd counts QEMU's writes: BURST without
    coalescing), and every interrupt is still counted."""
    with _edu(irq_machine, 4) as edu:
        irq = edu.irq(IrqMode.MSI)
        window = irq._w
        flag, fd = window.host_sleeping_off + irq._doorbell, window.ivshmem.host_fds[irq._doorbell]
        _drain(fd)
        window.mem[flag] = 1                        # what wait() does before it blocks
        try:
            with edu.batch() as b:
                for _ in range(BURST):
                    b.write32(edu.bar(0), EDU_IRQ_RAISE, 1)
            edu.channel.guest_time()                # each MSI was taken during its own write
            assert _drain(fd) == 1
            assert window.mem[flag] == 0            # the ring took the flag down
            assert irq.wait(10).new == BURST
        finally:
            window.mem[flag] = 0
            edu.bar(0).write32(EDU_IRQ_ACK, 1)
            irq.close()


def test_a_sleeping_waiter_handles_every_interrupt_of_a_burst(irq_machine) -> None:
    """A thread that sleeps at once (no spin) on the vector sees all of a burst: the rings
    it was not sent still show in the count it reads when it wakes."""
    with _edu(irq_machine, 4) as edu:
        irq = edu.irq(IrqMode.MSI)
        irq.spin = 0.0
        events: list[IrqEvent] = []
        failed: list[BaseException] = []

        def waiter() -> None:
            try:
                while sum(e.new for e in events) < 3 * BURST:
                    events.append(irq.wait(10))
            except BaseException as exc:            # seen by the test, not lost in the thread
                failed.append(exc)

        thread = threading.Thread(target=waiter)
        thread.start()
        try:
            for _ in range(3):
                with edu.batch() as b:
                    for _ in range(BURST):
                        b.write32(edu.bar(0), EDU_IRQ_RAISE, 1)
        finally:
            thread.join(30)
            edu.bar(0).write32(EDU_IRQ_ACK, 1)
            irq.close()
        assert not failed and not thread.is_alive()
        assert sum(e.new for e in events) == irq.delivered == 3 * BURST
        assert irq.missed == 3 * BURST - len(events)
