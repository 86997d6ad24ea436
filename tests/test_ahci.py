"""The AHCI driver against QEMU's ICH9 AHCI with real FAT images made by mkfs.fat and mtools."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from drivers.ahci import Ahci, DiskError
from drivers.ahci.driver import QueuedRun
from harness.access import DmaBuffer
from harness.devices.fat import DriverFatFS
from drivers.ahci.regs import Px
from harness.machine import MachineSpec
from harness.proxy import ProxyMachine

from tests.fatimages import IMAGE, check_against_mtools, fresh_image, mtools

pytestmark = pytest.mark.qemu

def attach(image: Path, **drive: object):  # type: ignore[no-untyped-def]
    def configure(spec: MachineSpec) -> None:
        spec.drive(id="disk0", **{"if": "none"}, **(drive or {"file": str(image), "format": "raw"}))
        spec.device("ide-hd", drive="disk0", bus="ide.0")
    return configure


@pytest.fixture(scope="module")
def reader(proxy_machine_factory_module, tmp_path_factory) -> Iterator[tuple[ProxyMachine, Ahci, Path]]:
    image = fresh_image(tmp_path_factory.mktemp("ahci"))
    pm = proxy_machine_factory_module(attach(image), name="ahci")
    hba = Ahci.open(pm.bus)
    yield pm, hba, image
    hba.close()


def test_identify_agrees_with_qemu(reader) -> None:
    pm, hba, image = reader
    disk = hba.disks()[0]
    identity = disk.identify()
    blocks = {b["device"] or b["qdev"]: b for b in pm.machine.qmp("query-block")}
    size = next(b["inserted"]["image"]["virtual-size"] for b in blocks.values() if "inserted" in b)
    assert identity.sectors * 512 == size == image.stat().st_size
    assert identity.model == "QEMU HARDDISK"
    assert identity.lba48 and identity.ncq and identity.queue_depth == 32


def test_fat_files_listed_and_read_byte_exact_as_mtools_sees_them(reader) -> None:
    _, hba, image = reader
    fat = DriverFatFS(hba.disks()[0], read_only=True)
    try:
        check_against_mtools(fat)
    finally:
        fat.close()


def test_32_queued_commands_each_complete_with_their_data(reader, rng: random.Random) -> None:
    _, hba, image = reader
    disk = hba.disks()[0]
    requests = [(rng.randrange(0, disk.size // 512 - 128), rng.randint(1, 128)) for _ in range(32)]
    raw = image.read_bytes()
    results = disk.read_queued(requests)
    assert len(results) == 32
    for (lba, count), data in zip(requests, results):
        assert data == raw[lba * 512:(lba + count) * 512]


def test_the_native_disk_loop_reads_the_lbas_it_was_given(reader, rng: random.Random) -> None:
    from harness.tools.bench.ahci import NativeDiskLoop
    from harness.errors import AccessDenied
    pm, hba, image = reader
    disk = hba.disks()[0]
    raw = image.read_bytes()
    native = NativeDiskLoop(pm.bus, disk, 64)
    buffers = [hba.dev.dma_alloc(4096) for _ in range(64)] + [hba.dev.dma_alloc(128 << 10) for _ in range(3)]
    try:
        for depth, sectors, count in ((1, 8, 64), (32, 8, 64), (1, 256, 3)):
            own = buffers[:64] if sectors == 8 else buffers[64:]
            for b in own:
                b.view[:] = bytes(b.size)
            blocks = len(raw) // (sectors * 512)
            requests = [(rng.randrange(blocks) * sectors, own[i]) for i in range(count)]
            assert native.prepare(requests, sectors, depth)() == count
            for i, (lba, buffer) in enumerate(requests):
                assert bytes(buffer.view) == raw[lba * 512:(lba + sectors) * 512], f"depth {depth}, request {i}"
        outside = type(buffers[0])(0x1000, buffers[0].view)     # a buffer address outside the DMA pool
        with pytest.raises(AccessDenied):
            native.prepare([(0, outside)], 8, 1)()
        assert disk.read(0, 1)[510:512] == b"\x55\xaa", "the port still reads"
    finally:
        native.close()
        for b in buffers:
            hba.dev.dma_free(b)


def test_a_queue_interrupted_midway_leaves_the_port_and_channel_usable(
        proxy_machine_factory, tmp_path: Path, monkeypatch) -> None:
    image = tmp_path / "random.img"
    image.write_bytes(random.randbytes(4 << 20))
    # QEMU holds each read 10 ms or so (100 IOPS): commands from the broken call are still
    # running when the next call starts, and would come back on tags it reuses.
    pm = proxy_machine_factory(attach(image, file=str(image), format="raw", **{"throttling.iops-total": 100}),
                               name="ahci-throttled")
    hba = Ahci.open(pm.bus)
    try:
        disk = hba.disks()[0]
        raw = image.read_bytes()
        requests = [(lba, 8) for lba in random.sample(range(0, 8000, 8), 48)]
        calls = [0]
        build = QueuedRun.build

        def build_then_break(self, *args):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == 40:                              # while a round is in flight
                raise KeyboardInterrupt
            return build(self, *args)
        monkeypatch.setattr(QueuedRun, "build", build_then_break)
        with pytest.raises(KeyboardInterrupt):
            disk.read_queued(requests)
        monkeypatch.undo()
        assert hba.regs.read32(disk.base + Px.SACT), "commands of the broken call are still in flight"
        again = requests[::-1]                              # other requests on the same tags
        for (lba, count), got in zip(again, disk.read_queued(again)):
            assert got == raw[lba * 512:(lba + count) * 512], f"sector {lba}"
    finally:
        hba.close()


def test_bad_requests_raise_before_anything_is_written(reader) -> None:
    _, hba, image = reader
    disk = hba.disks()[0]
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    sectors = disk.size // 512
    with pytest.raises(ValueError):
        disk.read(sectors - 1, 2)                       # runs past the end
    with pytest.raises(ValueError):
        disk.write(sectors, b"\0" * 512)                # starts past the end
    with pytest.raises(ValueError):
        disk.write(0, b"\0" * 511)                      # not whole sectors
    with pytest.raises(ValueError):
        disk.read_queued([(0, 129)])
    buffer = hba.dev.dma_alloc(4096)
    try:                                                # a queue is checked whole, before any command
        with pytest.raises(ValueError, match=rf"sectors {sectors - 1}\.\.{sectors + 6} are not on"):
            disk.write_queued_from([(0, buffer), (sectors - 1, buffer), (16, buffer)])
        with pytest.raises(ValueError, match=r"sectors -8\.\.-1 are not on"):
            disk.write_queued_from([(0, buffer), (-8, buffer)])
        with pytest.raises(ValueError, match="whole sectors"):
            disk.write_queued_from([(0, buffer), (16, DmaBuffer(buffer.phys, buffer.view[:1000]))])
    finally:
        hba.dev.dma_free(buffer)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_writes_through_the_driver_are_read_back_by_mtools_and_fsck_is_clean(
        proxy_machine_factory, tmp_path: Path, rng: random.Random) -> None:
    image = fresh_image(tmp_path)
    pm = proxy_machine_factory(attach(image), name="ahci-write")
    hba = Ahci.open(pm.bus)
    payload = random.randbytes(150_000)
    fat = DriverFatFS(hba.disks()[0])
    fat.writebytes("/NEW.BIN", payload)
    fat.makedir("/OUT")
    fat.writebytes("/OUT/NOTE.TXT", b"written by the python AHCI driver\n")
    fat.close()
    disk = hba.disks()[0]
    slots = rng.sample(range(40_000 // 16, disk.size // 512 // 16), 20)     # 16-sector slots: no overlaps
    spots = {slot * 16 + rng.randrange(8): rng.randbytes(512 * rng.randint(1, 8)) for slot in slots}
    for lba, data in sorted(spots.items()):            # raw sectors far past the files
        disk.write(lba, data)
    # 96 queued writes (NCQ, 32 in flight) from DMA buffers, in slots of their own
    free = sorted(set(range(40_000 // 16, disk.size // 512 // 16)) - set(slots))
    queued = []
    for slot in rng.sample(free, 96):
        buffer = hba.dev.dma_alloc(512 * rng.randint(1, 16))
        buffer.view[:] = rng.randbytes(buffer.size)
        queued.append((slot * 16, buffer))
    disk.write_queued_from(queued)
    spots.update((lba, bytes(b.view)) for lba, b in queued)
    with pytest.raises(ValueError):                    # overlapping queued writes have no order
        disk.write_queued_from([(queued[0][0], queued[0][1]), (queued[0][0], queued[1][1])])
    disk.flush()                                       # acknowledged after flush: must be on disk
    hba.close()
    pm.close()                                         # QEMU is gone; only the file is left
    assert mtools("mcopy", "-n", "-i", str(image), "::/NEW.BIN", "-") == payload
    assert mtools("mtype", "-i", str(image), "::/OUT/NOTE.TXT") == b"written by the python AHCI driver\n"
    check = subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = image.read_bytes()
    for lba, data in spots.items():
        assert raw[lba * 512:lba * 512 + len(data)] == data


def test_a_device_write_error_is_reported_and_the_image_is_unchanged(
        proxy_machine_factory, tmp_path: Path) -> None:
    image = fresh_image(tmp_path)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    # blkdebug fails every write with EROFS (errno 30): a disk that will not be written
    drive = {"driver": "blkdebug", "image.driver": "raw", "image.file.driver": "file",
             "image.file.filename": str(image), "inject-error.0.event": "pwritev", "inject-error.0.iotype": "write",
             "inject-error.0.errno": 30, "werror": "report"}
    pm = proxy_machine_factory(attach(image, **drive), name="ahci-ro")
    hba = Ahci.open(pm.bus)
    disk = hba.disks()[0]
    with pytest.raises(DiskError) as failed:
        disk.write(100, b"\xff" * 512)
    assert failed.value.status & 0x01, "ERR in the task file"
    assert disk.read(0, 1)[510:512] == b"\x55\xaa", "the port recovered and still reads"
    hba.close()
    pm.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_a_bad_sector_in_a_queue_fails_its_own_request_and_no_other(
        proxy_machine_factory, tmp_path: Path, rng: random.Random) -> None:
    image = tmp_path / "random.img"
    image.write_bytes(random.randbytes(20_480 * 512))      # every sector different: a lost read shows
    bad = 5_000
    # raw over blkdebug over the file: every read that touches sector `bad` fails with EIO
    drive = {"driver": "raw", "file.driver": "blkdebug", "file.image.driver": "file",
             "file.image.filename": str(image), "file.inject-error.0.event": "read_aio",
             "file.inject-error.0.sector": bad, "file.inject-error.0.errno": 5, "rerror": "report"}
    pm = proxy_machine_factory(attach(image, **drive), name="ahci-bad-sector")
    hba = Ahci.open(pm.bus)
    try:
        disk = hba.disks()[0]
        requests = [(lba, hba.dev.dma_alloc(4096)) for lba in rng.sample(range(0, 20_000, 8), 40)
                    if not lba <= bad < lba + 8]
        victim = rng.randrange(len(requests))
        requests.insert(victim, (bad - 3, hba.dev.dma_alloc(4096)))
        with pytest.raises(DiskError) as failed:
            disk.read_queued_into(requests)
        assert failed.value.failed == [victim]
        raw = image.read_bytes()
        for i, (lba, buffer) in enumerate(requests):
            if i != victim:
                assert bytes(buffer.view) == raw[lba * 512:lba * 512 + 4096], f"request {i} at {lba}"
        assert disk.read(0, 8) == raw[:4096], "the port recovered and still reads"
        for _, buffer in requests:
            hba.dev.dma_free(buffer)
    finally:
        hba.close()


def test_scatter_gather_and_completion_by_interrupt(proxy_machine_factory, tmp_path: Path,
                                                   rng: random.Random) -> None:
    image = fresh_image(tmp_path)
    pm = proxy_machine_factory(attach(image), name="ahci-irq")
    hba = Ahci.open(pm.bus, interrupts=True)
    try:
        disk = hba.disks()[0]
        sizes = [512, 4096, 1024, 65536, 2048]                 # five buffers, one command
        buffers = [hba.dev.dma_alloc(n) for n in sizes]
        data = random.randbytes(sum(sizes))
        offset = 0
        for b in buffers:
            b.view[:] = data[offset:offset + b.size]
            offset += b.size
        disk.write_from(30_000, buffers)
        disk.flush()
        for b in buffers:
            b.view[:] = bytes(b.size)
        disk.read_into(30_000, list(reversed(buffers)))       # the same sectors, scattered the other way
        scattered = b"".join(bytes(b.view) for b in reversed(buffers))
        assert scattered == data
        assert disk.read(30_000, len(data) // 512) == data
        assert hba.irq is not None and hba.irq.count > 0, "the HBA raised its MSI on completion"
        pristine = IMAGE.read_bytes()                          # the sectors below 30 000 are mkfs's
        requests = [(rng.randrange(0, 29_000), rng.randint(1, 128)) for _ in range(70)]
        for (lba, count), got in zip(requests, disk.read_queued(requests)):
            assert got == pristine[lba * 512:(lba + count) * 512]
        for b in buffers:
            hba.dev.dma_free(b)
    finally:
        hba.close()
    pm.close()                                                 # QEMU is gone; only the file is left
    assert image.read_bytes()[30_000 * 512:30_000 * 512 + len(data)] == data


def test_atapi_reads_a_cdrom_image_byte_exact(proxy_machine_factory, tmp_path: Path) -> None:
    disc = tmp_path / "disc.bin"
    disc.write_bytes(random.randbytes(2048 * 400))        # 400 blocks of 2048 bytes

    def configure(spec: MachineSpec) -> None:
        spec.drive(file=str(disc), format="raw", id="cd0", readonly=True, media="cdrom", **{"if": "none"})
        spec.device("ide-cd", drive="cd0", bus="ide.1")

    pm = proxy_machine_factory(configure, name="ahci-cd")
    hba = Ahci.open(pm.bus)
    try:
        assert not hba.disks()
        cd = hba.cdroms()[0]
        assert cd.identify_packet().model == "QEMU DVD-ROM"
        assert cd.atapi_capacity() == (400, 2048)
        data = disc.read_bytes()
        assert cd.atapi_read(0, 1) == data[:2048]
        assert cd.atapi_read(123, 77) == data[123 * 2048:200 * 2048]   # crosses a 64 KiB transfer
        with pytest.raises(ValueError):
            cd.atapi_read(399, 2)
    finally:
        hba.close()
