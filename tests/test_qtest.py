"""The qtest transport against a real QEMU (tcg, CPU stopped).

One machine serves the module: an e1000 with a MAC chosen per run and an
isa-debugcon on port 0xe9 writing to a file. What the transport enumerated
and assigned is checked against QEMU's own view (QMP query-pci); registers
are checked against what QEMU was told on its command line.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from harness.access import Access, Kind, PciFunction, Space
from harness.errors import AccessDenied, BadRequest, DeviceTimeout
from harness.machine import RuntimeFile
from harness.qtest import IO_END, IO_START, MEM_END, MEM_START, QtestMachine, qtest_spec

E1000 = (0x8086, 0x100E)
RAL0, RAH0, STATUS = 0x5400, 0x5404, 0x8
DEBUGCON = 0xE9


@dataclass
class Rig:
    qm: QtestMachine
    mac: bytes
    debugcon_file: RuntimeFile


def _assert_gone(qm: QtestMachine) -> None:
    """The machine's QEMU has exited and been reaped."""
    proc = qm.machine.process
    assert proc is not None
    assert proc.poll() is not None, f"QEMU pid {proc.pid} is still running"
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    mac = bytes([0x52, 0x54, 0x00]) + secrets.token_bytes(3)
    spec = qtest_spec()
    spec.device("e1000", mac=":".join(f"{b:02x}" for b in mac))
    dbg = spec.chardev_file("dbg")
    spec.device("isa-debugcon", iobase=DEBUGCON, chardev="dbg")
    qm = QtestMachine(spec)
    with qm:
        yield Rig(qm, mac, dbg)
    _assert_gone(qm)


def _qmp_functions(qm: QtestMachine) -> dict[tuple[int, int, int], dict[str, Any]]:
    """query-pci flattened through bridges: (bus, slot, function) -> device."""
    out: dict[tuple[int, int, int], dict[str, Any]] = {}

    def walk(devices: list[dict[str, Any]]) -> None:
        for d in devices:
            out[d["bus"], d["slot"], d["function"]] = d
            walk(d.get("pci_bridge", {}).get("devices", []))

    for bus in qm.machine.qmp("query-pci"):
        walk(bus["devices"])
    return out


def _check_against_qmp(qm: QtestMachine) -> None:
    """Every function, id and BAR (size, place, kind) is what QEMU itself reports."""
    ours = {(f.bus, f.dev, f.fn): f for f in qm.bus.functions}
    theirs = _qmp_functions(qm)
    assert sorted(ours) == sorted(theirs)
    for key, f in ours.items():
        d = theirs[key]
        assert (f.vendor, f.device) == (d["id"]["vendor"], d["id"]["device"]), f
        assert f.class_code << 8 | f.subclass == d["class_info"]["class"], f
        assert f.irq_pin == d["irq_pin"], f
        regions = {r["bar"]: r for r in d["regions"] if r["bar"] < 6}    # bar 6 is the ROM: not assigned
        assert sorted(b.index for b in f.bars) == sorted(regions), f
        for b in f.bars:
            r = regions[b.index]
            assert b.size == r["size"], (f, b)
            assert b.base == r["address"], (f, b)     # QEMU reports the address only while decoded
            assert b.is_io == (r["type"] == "io"), (f, b)
            if not b.is_io:
                assert (b.is_64, b.prefetchable) == (r["mem_type_64"], r["prefetch"]), (f, b)


def _e1000(rig: Rig) -> PciFunction:
    return rig.qm.bus.find(*E1000)


# ---- enumeration ----

def test_functions_match_query_pci(rig: Rig) -> None:
    _check_against_qmp(rig.qm)
    f = _e1000(rig)
    assert [(b.index, b.is_io, b.size) for b in f.bars] == [(0, False, 0x20000), (1, True, 0x40)]


def test_bars_are_placed_aligned_and_apart(rig: Rig) -> None:
    bars = [b for f in rig.qm.bus.functions for b in f.bars]
    assert bars, "no BARs at all"
    for b in bars:
        lo, hi = (IO_START, IO_END) if b.is_io else (MEM_START, MEM_END)
        assert lo <= b.base and b.base + b.size <= hi, b
        assert b.base % b.size == 0, b
    spans = sorted((b.is_io, b.base, b.base + b.size) for b in bars)
    for (io1, _, end1), (io2, start2, _) in zip(spans, spans[1:]):
        assert io1 != io2 or end1 <= start2, spans


def test_decoding_enabled_and_caps_read(rig: Rig) -> None:
    with rig.qm.bus.open(_e1000(rig)) as dev:
        assert dev.config.read16(0) == E1000[0]
        assert dev.config.read16(2) == E1000[1]
        assert dev.config.read16(0x04) & 0x7 == 0x7      # I/O, memory, bus master
    sata = rig.qm.bus.find(0x8086, 0x2922)
    assert 0x05 in [cap_id for cap_id, _ in sata.caps]  # ICH9 AHCI has MSI


# ---- registers ----

def test_e1000_mac_in_receive_address_registers(rig: Rig) -> None:
    with rig.qm.bus.open(_e1000(rig)) as dev:
        bar0 = dev.bar(0)
        assert bar0.read32(RAL0) == int.from_bytes(rig.mac[:4], "little")
        assert bar0.read32(RAH0) & 0xFFFF == int.from_bytes(rig.mac[4:6], "little")


def test_debugcon_bytes_reach_the_chardev_file(rig: Rig) -> None:
    payload = b"qtest " + secrets.token_hex(4).encode() + b"\n"
    region = rig.qm.bus.ports(DEBUGCON, 1)
    try:
        for byte in payload:
            region.write8(0, byte)
        assert region.read8(0) == DEBUGCON               # debugcon's read-back value
    finally:
        region.channel.close()
    rig.qm.machine.qmp("query-status")                   # a round trip through QEMU's main loop
    path = rig.qm.machine.path(rig.debugcon_file)
    deadline = time.monotonic() + 5
    while payload not in path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert payload in path.read_bytes()


def test_batch_of_mixed_accesses_returns_results_in_order(rig: Rig) -> None:
    with rig.qm.bus.open(_e1000(rig)) as dev:
        bar0 = dev.bar(0)
        original = bar0.read32(RAL0)
        marker = original ^ 0x5A5A_A5A5
        with dev.batch() as b:
            i_vendor = b.read(dev.config, 0, 2)
            i_status = b.read32(bar0, STATUS)
            i_write = b.write32(bar0, RAL0, marker)
            i_marker = b.read32(bar0, RAL0)
            i_device = b.read(dev.config, 2, 2)
            i_restore = b.write32(bar0, RAL0, original)
            i_original = b.read32(bar0, RAL0)
        r = b.results
        assert len(r) == 7
        assert [r[i_vendor], r[i_device]] == list(E1000)
        assert r[i_status] == bar0.read32(STATUS)
        assert [r[i_write], r[i_restore]] == [0, 0]
        assert r[i_marker] == marker
        assert r[i_original] == original == bar0.read32(RAL0)


def test_poll(rig: Rig) -> None:
    with rig.qm.bus.open(_e1000(rig)) as dev:
        bar0 = dev.bar(0)
        status = bar0.read32(STATUS)
        assert bar0.poll32(STATUS, 0xFFFF_FFFF, status, 0.5) == status
        with pytest.raises(DeviceTimeout) as exc:
            bar0.poll32(STATUS, 0xFFFF_FFFF, status ^ 1, 0.05)
        assert exc.value.last_value == status
        with pytest.raises(BadRequest):       # longer than the proxy allows
            bar0.poll32(STATUS, 0, 0, 5.0)
        assert bar0.poll_change(STATUS, 4, 0xFFFF_FFFF, status ^ 1, 0.5) == status
        with pytest.raises(DeviceTimeout) as exc:
            bar0.poll_change(STATUS, 4, 0xFFFF_FFFF, status, 0.05)
        assert exc.value.last_value == status


# ---- grants ----

def test_mmio_outside_the_devices_bars_is_denied(rig: Rig) -> None:
    f = _e1000(rig)
    bar0 = next(b for b in f.bars if b.index == 0)
    with rig.qm.bus.open(f) as dev:
        for addr in (bar0.base + bar0.size, bar0.base - 4, 0x0, 0xFEE0_0000):
            with pytest.raises(AccessDenied) as exc:
                dev.channel.read(Space.MMIO, addr, 4)
            assert exc.value.status == 0
            assert exc.value.request == Access(Kind.READ, Space.MMIO, addr, 4)
        with pytest.raises(AccessDenied):
            dev.channel.write(Space.MMIO, bar0.base + bar0.size, 4, 0)
        with pytest.raises(AccessDenied):     # a port that is not the device's
            dev.channel.read(Space.PIO, DEBUGCON, 1)
        with pytest.raises(AccessDenied):     # BARs are the bus's to assign
            dev.channel.write(Space.CONFIG, 0x10, 4, 0)
        with pytest.raises(AccessDenied):
            dev.channel.write(Space.CONFIG, 0x30, 4, 0)
        with pytest.raises(AccessDenied):     # one channel per function at a time
            rig.qm.bus.open_channel(f)
        # Nothing was touched: the device still answers where it was.
        assert dev.bar(0).read32(RAL0) == int.from_bytes(rig.mac[:4], "little")


def test_malformed_accesses_are_bad_requests(rig: Rig) -> None:
    f = _e1000(rig)
    bar0 = next(b for b in f.bars if b.index == 0)
    with rig.qm.bus.open(f) as dev:
        for space, addr, width in ((Space.MMIO, bar0.base + 2, 4), (Space.MMIO, bar0.base, 3),
                                   (Space.MMIO, bar0.base, 16), (Space.CONFIG, 0x100, 4),
                                   (Space.CONFIG, 0x2, 4)):
            with pytest.raises(BadRequest):
                dev.channel.read(space, addr, width)


def test_isa_grants(rig: Rig) -> None:
    bus = rig.qm.bus
    e1000_io = next(b for b in _e1000(rig).bars if b.is_io)
    for base, count in ((0xCF8, 4), (0x20, 1), (e1000_io.base, 4)):
        with pytest.raises(AccessDenied):
            bus.open_ports(base, count)
    for base, count in ((0x80, 0), (0x80, 65), (0xFFFF, 2)):
        with pytest.raises(BadRequest):
            bus.open_ports(base, count)
    ch = bus.open_ports(DEBUGCON, 1)
    try:
        with pytest.raises(AccessDenied):     # already held
            bus.open_ports(DEBUGCON - 1, 2)
        with pytest.raises(AccessDenied):
            ch.read(Space.PIO, DEBUGCON + 1, 1)
        with pytest.raises(AccessDenied):     # an ISA channel has no config space
            ch.read(Space.CONFIG, 0, 4)
    finally:
        ch.close()
    with pytest.raises(ValueError):
        ch.read(Space.PIO, DEBUGCON, 1)
    bus.open_ports(DEBUGCON, 1).close()       # given back on close


# ---- bridges: a machine of its own ----

def test_devices_behind_bridges_are_numbered_assigned_and_reachable() -> None:
    spec = qtest_spec()
    spec.device("pcie-root-port", id="rp1", chassis=1, slot=1)
    spec.device("pcie-pci-bridge", id="br1", bus="rp1")
    spec.device("virtio-rng-pci", bus="br1", addr=3)       # a 64-bit prefetchable BAR4, MSI-X
    spec.device("pcie-root-port", id="rp2", chassis=2, slot=2)
    spec.device("e1000e", bus="rp2", mac="52:54:00:ab:cd:ef")
    qm = QtestMachine(spec)
    with qm:
        _check_against_qmp(qm)
        rng = qm.bus.find(0x1AF4, 0x1005)
        assert rng.bus == 2
        assert any(b.is_64 and b.prefetchable for b in rng.bars)
        with qm.bus.open(rng) as dev:
            assert dev.config.read16(0) == 0x1AF4
            msix = dict(rng.caps)[0x11]
            table = dev.config.read32(msix + 4)
            bar = dev.bar(table & 7)
            entry0 = (table & ~7)
            bar.read32(entry0)                       # the MSI-X table may be read...
            with pytest.raises(AccessDenied):        # ...but not aimed: an MSI is a DMA write
                bar.write32(entry0, 0xFEE0_0000)
        e1000e = qm.bus.find(0x8086, 0x10D3)
        with qm.bus.open(e1000e) as dev:
            assert dev.bar(0).read32(RAL0) == 0xAB005452     # reachable through rp2's window
    _assert_gone(qm)

