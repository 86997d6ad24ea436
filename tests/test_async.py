"""Asynchronous proxy channels against real QEMU: posted batches, batches in flight, and
completions the host sees in DMA memory (an AHCI D2H FIS, NVMe completion entries),
each checked against what QEMU itself reports."""

from __future__ import annotations

import random
from typing import Iterator

import pytest

from drivers.ahci import Ahci
from drivers.ahci.regs import FIS_TYPE_D2H, RFIS_D2H, Px
from drivers.nvme import Nvme
from harness.access import Access, Device, Kind, Space
from harness.errors import AccessDenied, BadRequest
from harness.machine import MachineSpec
from harness.proxy import ProxyMachine

pytestmark = pytest.mark.qemu

E1000 = dict(vendor=0x8086, device=0x100E)
RAL1 = 0x5408                   # a receive address the e1000 has no use for here: a scratch register
DISK_BYTES = 4 << 20
AHCI_DRIVE, NVME_DRIVE = "disk0", "nvme0-ns1"


@pytest.fixture(scope="module")
def rig(proxy_machine_factory_module, tmp_path_factory) -> tuple[ProxyMachine, bytes, bytes]:
    """An e1000 (its scratch register), an AHCI disk and an NVMe namespace of random bytes."""
    tmp = tmp_path_factory.mktemp("async")
    images = {}
    for name in ("ahci", "nvme"):
        images[name] = tmp / f"{name}.img"
        images[name].write_bytes(random.Random(name).randbytes(DISK_BYTES))

    def configure(spec: MachineSpec) -> None:
        spec.netdev("user", "net0", restrict=True)
        spec.device("e1000", netdev="net0")
        spec.drive(id=AHCI_DRIVE, file=str(images["ahci"]), format="raw", **{"if": "none"})
        spec.device("ide-hd", drive=AHCI_DRIVE, bus="ide.0")
        spec.nvme([{"file": str(images["nvme"]), "format": "raw"}], serial="HWH-ASYNC")
    pm = proxy_machine_factory_module(configure, name="async")
    return pm, images["ahci"].read_bytes(), images["nvme"].read_bytes()


@pytest.fixture
def nic(rig) -> Iterator[Device]:
    pm = rig[0]
    with pm.bus.open(pm.bus.find(**E1000)) as dev:
        yield dev


def scratch_write(dev: Device, value: int) -> Access:
    return dev.bar(0).access(Kind.WRITE, RAL1, 4, value)


def denied_write(dev: Device) -> Access:
    """A write just past the e1000's BAR0: outside the channel's grants, so the proxy refuses it."""
    bar = dev.bar(0)
    return Access(Kind.WRITE, Space.MMIO, bar.base + bar.size, 4, 0)


def blocks_read(pm: ProxyMachine, drive: str) -> int:
    """Read operations QEMU's block layer has completed on ``drive`` (QMP query-blockstats)."""
    for entry in pm.machine.qmp("query-blockstats"):
        if entry.get("device") == drive or entry.get("qdev", "").endswith(drive):
            return int(entry["stats"]["rd_operations"])
    raise AssertionError(f"query-blockstats has no drive {drive}")


def test_posted_writes_land_in_order_across_ring_wraps(nic) -> None:
    ch = nic.channel
    ring_size = 256
    for value in range(3 * ring_size + 7):         # more than the ring holds: the oldest are collected
        ch.post([scratch_write(nic, value)])
    assert nic.bar(0).read32(RAL1) == 3 * ring_size + 6
    ch.post([scratch_write(nic, 0x1234), scratch_write(nic, 0x5678)])
    ch.flush()
    assert nic.bar(0).read32(RAL1) == 0x5678


def test_a_posted_failure_is_raised_typed_on_the_next_waited_request_and_the_channel_goes_on(nic) -> None:
    ch, bar = nic.channel, nic.bar(0)
    bar.write32(RAL1, 1)
    bad = denied_write(nic)
    ch.post([bad])                                  # nobody waits: no error yet
    ch.post([scratch_write(nic, 2)])                # a batch of its own: it runs
    ch.post([bad, scratch_write(nic, 3)])           # the rest of a failed batch is skipped
    with pytest.raises(AccessDenied) as exc:
        bar.read32(RAL1)
    assert exc.value.request == bad, "the error names the posted access that failed"
    assert bar.read32(RAL1) == 2, "the batch after the failed one ran, the rest of the failed one did not"
    # A started batch waits behind a posted failure: the failure first, then its own values.
    ch.post([Access(Kind.WRITE, Space.MMIO, bar.base + RAL1, 3, 0)])   # width 3: malformed
    pending = ch.start([scratch_write(nic, 4), bar.access(Kind.READ, RAL1, 4)])
    with pytest.raises(BadRequest):
        pending.wait()
    assert pending.wait() == [0, 4]
    ch.flush()                                      # nothing left to tell
    assert bar.read32(RAL1) == 4


def test_a_posted_failure_among_many_reclaimed_at_once_is_still_raised(nic) -> None:
    """Served posted batches are reclaimed together once the ring fills; one that failed among
    them must not be dropped with them."""
    ch, bar = nic.channel, nic.bar(0)
    ring_size = 256
    bad = denied_write(nic)
    for value in range(ring_size // 2):
        ch.post([scratch_write(nic, value)])
    ch.post([bad])
    for value in range(2 * ring_size):             # the ring wraps twice over the failed batch
        ch.post([scratch_write(nic, value)])
    with pytest.raises(AccessDenied) as exc:
        bar.read32(RAL1)
    assert exc.value.request == bad
    assert bar.read32(RAL1) == 2 * ring_size - 1, "every batch after the failed one ran"


def test_batches_in_flight_complete_in_order(nic) -> None:
    ch, bar = nic.channel, nic.bar(0)
    read = bar.access(Kind.READ, RAL1, 4)
    pendings = [ch.start([scratch_write(nic, 100 + i), read]) for i in range(40)]
    failing = ch.start([denied_write(nic)])
    after = ch.start([read])
    for i, pending in reversed(list(enumerate(pendings))):     # waited in any order, done in order
        assert pending.wait() == [0, 100 + i]
    assert after.wait() == [139], "a batch after a failed one runs"
    with pytest.raises(AccessDenied):
        failing.wait()
    # a round trip waits behind every batch in flight
    late = [ch.start([scratch_write(nic, 200 + i)]) for i in range(5)]
    assert bar.read32(RAL1) == 204
    assert [p.wait() for p in late] == [[0]] * 5


def test_ahci_completion_seen_in_the_fis_is_what_the_port_reports(rig) -> None:
    pm, image, _ = rig
    hba = Ahci.open(pm.bus)
    try:
        disk = hba.disks()[0]
        buf = hba.dev.dma_alloc(4096)
        rng = random.Random(19)
        before = blocks_read(pm, AHCI_DRIVE)
        lbas = [rng.randrange(DISK_BYTES // 512 - 8) for _ in range(50)]
        for lba in lbas:
            disk.read_into(lba, [buf])              # a posted issue, completion seen in the FIS
            assert bytes(buf.view) == image[lba * 512:lba * 512 + 4096]
            fis = disk.received_fis.view
            assert fis[RFIS_D2H] == FIS_TYPE_D2H
            assert disk._r(Px.CI) == 0, "the slot is free once the FIS is there"
            assert disk._r(Px.TFD) & 0xFFFF == fis[RFIS_D2H + 3] << 8 | fis[RFIS_D2H + 2]
        assert blocks_read(pm, AHCI_DRIVE) - before == len(lbas), "QEMU ran each command once"
        hba.dev.dma_free(buf)
    finally:
        hba.close()


def test_nvme_completions_seen_in_the_queue_are_what_qemu_ran(rig) -> None:
    pm, _, image = rig
    nvme = Nvme.open(pm.bus, queues=1)
    try:
        ns = nvme.namespaces()[0]
        rng = random.Random(21)
        buffers = [nvme.dev.dma_alloc(4096) for _ in range(40)]
        before = blocks_read(pm, NVME_DRIVE)
        one_by_one = [rng.randrange(DISK_BYTES // 512 - 8) for _ in range(30)]
        for lba in one_by_one:
            ns.read_into(lba, [buffers[0]])
            assert bytes(buffers[0].view) == image[lba * 512:lba * 512 + 4096]
        queued = [(rng.randrange(DISK_BYTES // 512 - 8), b) for b in buffers]
        ns.read_queued_into(queued, depth=32)
        for lba, b in queued:
            assert bytes(b.view) == image[lba * 512:lba * 512 + 4096]
        assert blocks_read(pm, NVME_DRIVE) - before == len(one_by_one) + len(queued)
        nvme.dev.channel.flush()                    # no posted doorbell failed
        for b in buffers:
            nvme.dev.dma_free(b)
    finally:
        nvme.close()

