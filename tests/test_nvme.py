"""The NVMe driver against QEMU's ``nvme`` with ``nvme-ns`` namespaces, checked against the
image files, QMP, mtools and fsck.fat."""

from __future__ import annotations

import copy
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.devices.fat import DriverFatFS
from drivers.nvme import Command, Nvme, NvmeError
from drivers.nvme.regs import LBA_OUT_OF_RANGE, UNRECOVERED_READ_ERROR, Nvm
from harness.access import DmaBuffer
from harness.machine import MachineSpec
from harness.proxy import ProxyMachine

from tests.fatimages import IMAGE, check_against_mtools, fresh_image, mtools

pytestmark = pytest.mark.qemu

SERIAL = "HWH-TEST-7"
SMALL = 8 << 20                     # the second namespace: random bytes


def raw(path: Path, **extra: object) -> dict[str, object]:
    return {"file": str(path), "format": "raw", **extra}


def namespaces(*drives: dict[str, object]) -> Callable[[MachineSpec], None]:
    def configure(spec: MachineSpec) -> None:
        spec.nvme(list(drives), serial=SERIAL)
    return configure


def scaled(pm: ProxyMachine, n: int) -> int:
    """Under this host's emulating KVM every guest instruction costs a microsecond: keep runs short."""
    return max(8, n // 10) if pm.machine.accel == "kvm" else n


@pytest.fixture(scope="module")
def machine(proxy_machine_factory_module, tmp_path_factory) -> tuple[ProxyMachine, Path, Path]:
    """Namespace 1 a FAT image from mkfs.fat and mtools, namespace 2 random bytes (read only here)."""
    tmp = tmp_path_factory.mktemp("nvme")
    fat = fresh_image(tmp, "fat.img")
    noise = tmp / "random.img"
    noise.write_bytes(random.Random(7).randbytes(SMALL))
    return proxy_machine_factory_module(namespaces(raw(fat), raw(noise)), name="nvme"), fat, noise


@pytest.fixture
def nvme(machine) -> Iterator[Nvme]:
    controller = Nvme.open(machine[0].bus, queues=2)
    yield controller
    controller.close()


def test_identify_agrees_with_qmp_and_the_command_line(machine, nvme) -> None:
    pm, fat, noise = machine
    assert nvme.identity.serial == SERIAL
    assert nvme.identity.model == "QEMU NVMe Ctrl"            # QEMU's, as no model was set
    assert nvme.identity.max_transfer == 4096 << 7             # QEMU's default MDTS, 7
    sizes = {b["qdev"] if not b["device"] else b["device"]: b["inserted"]["image"]["virtual-size"]
             for b in pm.machine.qmp("query-block") if "inserted" in b}
    sizes = {name.rsplit("-", 1)[-1]: size for name, size in sizes.items()}   # nvme0-ns1 -> ns1
    found = nvme.namespaces()
    assert [ns.nsid for ns in found] == [1, 2]
    assert [ns.size for ns in found] == [sizes["ns1"], sizes["ns2"]] == [fat.stat().st_size, SMALL]
    assert all(ns.sector_size == 512 for ns in found)


def test_random_reads_across_two_queue_pairs_return_the_images_bytes(machine, nvme, rng: random.Random) -> None:
    pm, fat, noise = machine
    images = {1: fat.read_bytes(), 2: noise.read_bytes()}
    count = scaled(pm, 1000)
    requests = []
    for _ in range(count):
        nsid = rng.choice((1, 2))
        blocks = rng.randint(1, 256)
        requests.append((nsid, rng.randrange(len(images[nsid]) // 512 - blocks), blocks))
    halves = [requests[:count // 2], requests[count // 2:]]
    results: list[list[bytes]] = [[], []]
    errors: list[BaseException] = []
    by_nsid = {ns.nsid: ns for ns in nvme.namespaces()}

    def worker(k: int) -> None:
        try:
            queue = nvme.queues[k]
            for nsid in (1, 2):
                mine = [(lba, blocks) for n, lba, blocks in halves[k] if n == nsid]
                results[k] += by_nsid[nsid].on(queue).read_queued(mine, depth=32)
        except BaseException as exc:        # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k in range(2):
        expected = [images[nsid][lba * 512:(lba + blocks) * 512]
                    for nsid in (1, 2) for n, lba, blocks in halves[k] if n == nsid]
        assert len(results[k]) == len(expected)
        for i, (got, want) in enumerate(zip(results[k], expected)):
            assert got == want, f"queue {k + 1}, read {i}"
    assert nvme.queues[0].submitted and nvme.queues[1].submitted


def test_reads_spread_over_two_queue_pairs_from_one_thread_return_the_images_bytes(
        machine, nvme, rng: random.Random) -> None:
    pm, _, noise = machine
    image = noise.read_bytes()
    ns = nvme.namespaces()[1]
    count = scaled(pm, 300)
    requests = [(8 * block, nvme.dev.dma_alloc(4096)) for block in rng.sample(range(SMALL // 4096), count)]
    before = [queue.submitted for queue in nvme.queues]
    try:
        ns.read_queued_into(requests, depth=32, queues=nvme.queues)
        for i, (lba, buffer) in enumerate(requests):
            assert bytes(buffer.view) == image[lba * 512:lba * 512 + 4096], f"request {i} at {lba}"
    finally:
        for _, buffer in requests:
            nvme.dev.dma_free(buffer)
    # request i on queue i % 2
    assert [queue.submitted - b for queue, b in zip(nvme.queues, before)] == [(count + 1) // 2, count // 2]
    with pytest.raises(ValueError):                 # the admin queue is no I/O queue pair
        nvme.run_spread([nvme.queues[0], nvme.admin], [Command(Nvm.FLUSH, 1)] * 2)


def test_fat_listed_and_read_as_mtools_sees_it(machine, nvme) -> None:
    fat = DriverFatFS(nvme.namespaces()[0], read_only=True)
    try:
        check_against_mtools(fat)
    finally:
        fat.close()


def test_bad_input_gets_a_typed_error_and_changes_nothing(machine, nvme) -> None:
    pm, fat, noise = machine
    before = hashlib.sha256(fat.read_bytes()).hexdigest()
    ns = nvme.namespaces()[0]
    end = ns.identity.sectors
    buffer = nvme.dev.dma_alloc(8192)
    try:
        with pytest.raises(ValueError):
            ns.read(end - 1, 2)                                 # runs past the end: the driver knows
        with pytest.raises(ValueError):
            ns.write(end, b"\0" * 512)
        with pytest.raises(ValueError):
            ns.write(0, b"\0" * 511)                            # not whole blocks
        misaligned = DmaBuffer(buffer.phys + 512, buffer.view[512:4608])
        with pytest.raises(ValueError, match="page"):
            ns.read_into(0, [misaligned])
        too_big = nvme.dev.dma_alloc(nvme.identity.max_transfer + 4096)
        try:
            with pytest.raises(ValueError, match="MDTS"):
                ns.read_into(0, [too_big])                       # one command may not exceed MDTS
        finally:
            nvme.dev.dma_free(too_big)
        blocks = nvme.identity.max_transfer // 512 + 24          # but a copying read is split
        assert ns.read(100, blocks) == fat.read_bytes()[100 * 512:(100 + blocks) * 512]
        # The device's own verdict, on a command the driver would have refused
        with pytest.raises(NvmeError) as failed:
            ns.queue.execute(Command(Nvm.READ, ns.nsid, [buffer.phys], cdw10=end, name="READ past the end", lba=end))
        assert (failed.value.sct, failed.value.sc) == LBA_OUT_OF_RANGE and failed.value.lba == end
        assert "LBA Out of Range" in str(failed.value)
        assert ns.read(0, 1)[510:512] == b"\x55\xaa", "the queue still works"
    finally:
        nvme.dev.dma_free(buffer)
    assert hashlib.sha256(fat.read_bytes()).hexdigest() == before


def test_a_guest_side_wait_on_dma_memory_stays_inside_the_domain(machine, nvme) -> None:
    from harness.access import Access, Kind, Space
    from harness.errors import AccessDenied, BadRequest, DeviceTimeout
    pm = machine[0]
    channel = nvme.dev.channel
    buffer = nvme.dev.dma_alloc(4096)
    try:
        buffer.view[8:16] = (0x1234_5678_9ABC_DEF0).to_bytes(8, "little")
        poll = lambda addr, width, expect: Access(Kind.POLL, Space.DMA, addr, width, 0, 0xFFFF, expect, 0.01)  # noqa: E731
        assert channel.execute([poll(buffer.phys + 8, 8, 0xDEF0)]) == [0x1234_5678_9ABC_DEF0]
        with pytest.raises(DeviceTimeout) as late:
            channel.execute([poll(buffer.phys + 8, 2, 0x1111)])
        assert late.value.last_value == 0xDEF0
        with pytest.raises(AccessDenied):
            channel.execute([poll(0x1000, 2, 0)])                      # guest memory outside the domain
        with pytest.raises(AccessDenied):                              # the shared window outside it too
            channel.execute([poll(pm.bus.window.field("window_phys"), 4, 0)])
        domain = nvme.dev.channel.domain
        with pytest.raises(AccessDenied):
            channel.execute([poll(domain.base + domain.size, 2, 0)])  # just past this device's domain
        with pytest.raises(AccessDenied):
            channel.execute([poll(nvme.regs.base, 4, 0)])              # a device register is no DMA memory
        with pytest.raises(BadRequest):
            channel.execute([poll(buffer.phys + 9, 2, 0)])             # misaligned
    finally:
        nvme.dev.dma_free(buffer)


def settled(nvme: Nvme, *irqs) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    """The vectors' counts once three round trips 20 ms apart saw them unchanged (at most 10 s)."""
    deadline, last, still = time.monotonic() + 10, None, 0
    while still < 3:
        assert time.monotonic() < deadline, "the interrupt counts never held still"
        nvme.dev.channel.guest_time()
        counts = tuple(irq.count for irq in irqs)
        still = still + 1 if counts == last else 0
        last = counts
        time.sleep(0.02)
    return last


def test_each_queue_pairs_completions_arrive_on_its_own_vector(machine) -> None:
    pm, fat, noise = machine
    nvme = Nvme.open(pm.bus, queues=2, interrupts=True)
    try:
        admin, first, second = nvme.irqs
        assert admin.count > 0, "the admin queue's commands completed on vector 0"
        ns = nvme.namespaces()[1]
        expected = noise.read_bytes()
        for queue, own, other in ((nvme.queues[0], first, second), (nvme.queues[1], second, first)):
            # The host sees a completion in memory before the guest has counted its MSI, and under
            # an emulating KVM one round trip is not always enough for it to arrive: the counts
            # are taken once they hold still.
            before = settled(nvme, own, other, admin)
            for lba in range(0, 80, 8):
                assert ns.on(queue).read(lba, 8) == expected[lba * 512:(lba + 8) * 512]
            after = settled(nvme, own, other, admin)
            assert after[0] > before[0], f"queue {queue.qid}'s vector counted its completions"
            assert after[1:] == before[1:], "and no other vector did"
    finally:
        nvme.close()


def test_a_full_submission_queue_waits_and_never_overwrites(machine, rng: random.Random) -> None:
    pm, fat, noise = machine
    nvme = Nvme.open(pm.bus, queues=1, entries=4)               # three commands in flight at most
    try:
        ns = nvme.namespaces()[1]
        expected = noise.read_bytes()
        requests = [(rng.randrange(SMALL // 512 - 64), rng.randint(1, 64)) for _ in range(scaled(pm, 60))]
        for (lba, blocks), got in zip(requests, ns.read_queued(requests, depth=32)):
            assert got == expected[lba * 512:(lba + blocks) * 512]
        assert nvme.queues[0].most_in_flight == 3 and nvme.queues[0].submitted == len(requests)
    finally:
        nvme.close()


def test_writes_from_two_queue_pairs_and_a_fat_filesystem_land_in_the_image_files(
        proxy_machine_factory, tmp_path: Path, rng: random.Random) -> None:
    fat_image = fresh_image(tmp_path, "fat.img")
    noise = tmp_path / "random.img"
    noise.write_bytes(rng.randbytes(SMALL))
    pm = proxy_machine_factory(namespaces(raw(fat_image), raw(noise, discard="unmap")), name="nvme-write")
    nvme = Nvme.open(pm.bus, queues=2)
    fat_ns, ns = nvme.namespaces()
    payload = rng.randbytes(150_000)
    fat = DriverFatFS(fat_ns)
    fat.writebytes("/NEW.BIN", payload)
    fat.makedir("/OUT")
    fat.writebytes("/OUT/NOTE.TXT", b"written by the python NVMe driver\n")
    fat.close()
    # Two threads, a queue pair each, writing disjoint 64-block slots at queue depth 32
    slots = rng.sample(range(SMALL // 512 // 64), 2 * scaled(pm, 48))
    written: dict[int, bytes] = {}
    plans = []
    for k in range(2):
        plan = []
        for slot in slots[k::2]:
            buffer = nvme.dev.dma_alloc(512 * rng.randint(1, 64))
            buffer.view[:] = rng.randbytes(buffer.size)
            plan.append((slot * 64, buffer))
            written[slot * 64] = bytes(buffer.view)
        plans.append(plan)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            ns.on(nvme.queues[k]).write_queued_from(plans[k], depth=32)
        except BaseException as exc:        # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # and from one thread, spread over both queue pairs
    spread = []
    for slot in rng.sample(sorted(set(range(SMALL // 512 // 64)) - set(slots)), scaled(pm, 48)):
        buffer = nvme.dev.dma_alloc(512 * rng.randint(1, 64))
        buffer.view[:] = rng.randbytes(buffer.size)
        spread.append((slot * 64, buffer))
        written[slot * 64] = bytes(buffer.view)
    slots += [lba // 64 for lba, _ in spread]
    before = [queue.submitted for queue in nvme.queues]
    ns.write_queued_from(spread, depth=32, queues=nvme.queues)
    assert [queue.submitted - b for queue, b in zip(nvme.queues, before)] == [(len(spread) + 1) // 2, len(spread) // 2]
    with pytest.raises(ValueError):                            # overlapping queued writes have no order
        ns.write_queued_from([plans[0][0], (plans[0][0][0], plans[1][0][1])])
    free = sorted(set(range(SMALL // 512 // 64)) - set(slots))
    trimmed = free[0] * 64
    assert ns.read(trimmed, 8) != bytes(4096)
    ns.deallocate([(trimmed, 64)])                              # Dataset Management, where supported
    assert ns.read(trimmed, 64) == bytes(64 * 512)
    ns.flush()
    fat_ns.flush()
    nvme.close()
    pm.close()                                                  # QEMU is gone; only the files are left
    assert mtools("mcopy", "-n", "-i", str(fat_image), "::/NEW.BIN", "-") == payload
    assert mtools("mtype", "-i", str(fat_image), "::/OUT/NOTE.TXT") == b"written by the python NVMe driver\n"
    check = subprocess.run(["fsck.fat", "-n", str(fat_image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    data = noise.read_bytes()
    for lba, bytes_ in written.items():
        assert data[lba * 512:lba * 512 + len(bytes_)] == bytes_, f"block {lba}"
    assert data[trimmed * 512:(trimmed + 64) * 512] == bytes(64 * 512)


def test_an_error_injected_block_fails_its_own_read_and_no_other(
        proxy_machine_factory, tmp_path: Path, rng: random.Random) -> None:
    image = tmp_path / "random.img"
    image.write_bytes(rng.randbytes(SMALL))
    bad = 5_000
    # raw over blkdebug over the file: every read that touches block `bad` fails with EIO
    drive = {"driver": "raw", "file.driver": "blkdebug", "file.image.driver": "file",
             "file.image.filename": str(image), "file.inject-error.0.event": "read_aio",
             "file.inject-error.0.sector": bad, "file.inject-error.0.errno": 5}
    pm = proxy_machine_factory(namespaces(drive), name="nvme-bad-block")
    nvme = Nvme.open(pm.bus, queues=2)
    try:
        ns = nvme.namespaces()[0]
        requests = [(lba, nvme.dev.dma_alloc(4096)) for lba in rng.sample(range(0, 16_000, 8), 40)
                    if not lba <= bad < lba + 8]
        victim = rng.randrange(len(requests))
        requests.insert(victim, (bad - 3, nvme.dev.dma_alloc(4096)))
        with pytest.raises(NvmeError) as failed:
            ns.read_queued_into(requests, depth=32)
        assert failed.value.failed == [victim]
        assert (failed.value.sct, failed.value.sc) == UNRECOVERED_READ_ERROR and failed.value.lba == bad - 3
        assert f"READ ns 1 {bad - 3}+8" in str(failed.value)
        data = image.read_bytes()
        for i, (lba, buffer) in enumerate(requests):
            if i != victim:
                assert bytes(buffer.view) == data[lba * 512:lba * 512 + 4096], f"request {i} at {lba}"
        assert ns.read(0, 8) == data[:4096], "the queue still reads"
        for _, buffer in requests:
            buffer.view[:] = bytes(buffer.size)
        with pytest.raises(NvmeError) as failed:    # spread over two queue pairs: indexed the same
            ns.read_queued_into(requests, depth=32, queues=nvme.queues)
        assert failed.value.failed == [victim] and failed.value.lba == bad - 3
        for i, (lba, buffer) in enumerate(requests):
            if i != victim:
                assert bytes(buffer.view) == data[lba * 512:lba * 512 + 4096], f"spread request {i} at {lba}"
        good = requests[:victim] + requests[victim + 1:]
        for _, buffer in good:
            buffer.view[:] = bytes(buffer.size)
        ns.read_queued_into(good, queues=nvme.queues)           # both queues go on
        for i, (lba, buffer) in enumerate(good):
            assert bytes(buffer.view) == data[lba * 512:lba * 512 + 4096], f"after the failure: {i} at {lba}"
        for _, buffer in requests:
            nvme.dev.dma_free(buffer)
    finally:
        nvme.close()


def test_the_native_loop_reads_what_it_was_given_and_stays_in_its_grants(machine, nvme, rng: random.Random) -> None:
    from harness.tools.bench.nvme import NativeNvmeLoop
    from harness.errors import AccessDenied
    pm, fat, noise = machine
    data = noise.read_bytes()
    loop = NativeNvmeLoop(pm.bus, nvme, 64)
    ns = nvme.namespaces()[1]
    buffers = [nvme.dev.dma_alloc(4096) for _ in range(64)] + [nvme.dev.dma_alloc(128 << 10) for _ in range(3)]
    try:
        for depth, blocks, count, queues in ((1, 8, 64, nvme.queues[:1]), (32, 8, 64, nvme.queues),
                                             (1, 256, 3, nvme.queues[:1])):
            own = buffers[:64] if blocks == 8 else buffers[64:]
            for b in own:
                b.view[:] = bytes(b.size)
            requests = [(rng.randrange(SMALL // 512 // blocks) * blocks, own[i]) for i in range(count)]
            assert loop.prepare(ns, requests, blocks, depth, queues)() == count
            for i, (lba, buffer) in enumerate(requests):
                assert bytes(buffer.view) == data[lba * 512:(lba + blocks) * 512], f"depth {depth}, request {i}"
        # the Python driver carries on where the loop left its queues, even where the loop's
        # last tail and the next command's tail are the one the driver itself rang last
        queue = nvme.queues[0]
        ns.on(queue).read(0, 8)
        rung_before = queue.tail
        laps = queue.entries - 1
        assert loop.prepare(ns, [(8 * i, buffers[i % 64]) for i in range(laps)], 8, 32, [queue])() == laps
        assert (queue.tail + 1) % queue.entries == rung_before
        assert ns.on(queue).read(8, 8) == data[8 * 512:16 * 512]
        assert ns.on(nvme.queues[1]).read(16, 8) == data[16 * 512:24 * 512]
        outside = DmaBuffer(0x1000, buffers[0].view)                # a buffer outside the DMA pool
        with pytest.raises(AccessDenied):
            loop.prepare(ns, [(0, outside)], 8, 1, nvme.queues[:1])()
        aimed = copy.copy(nvme.queues[0])
        aimed.qid = (0x2000 - 0x1000) // (2 * nvme.doorbell_stride)  # its "doorbell": the MSI-X table
        with pytest.raises(AccessDenied):
            loop.prepare(ns, [(0, buffers[0])], 8, 1, [aimed])()
        assert ns.read(0, 8) == data[:4096], "the queue survived the refusals"
    finally:
        loop.close()
        for b in buffers:
            nvme.dev.dma_free(b)


def test_with_ioeventfds_on_the_io_queues_ring_qemus_own_eventfds(
        proxy_machine_factory, tmp_path: Path, rng: random.Random) -> None:
    noise = tmp_path / "random.img"
    noise.write_bytes(random.Random(11).randbytes(SMALL))
    pm = proxy_machine_factory(lambda spec: spec.nvme([raw(noise)], ioeventfd="on"), name="nvme-ioeventfd")
    controller = Nvme.open(pm.bus, queues=2, ioeventfds=True)
    try:
        assert controller.shadow is not None
        for queue in controller.queues:
            assert queue.eventfds is not None
            assert all(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]" for fd in queue.eventfds)
        data, ns = noise.read_bytes(), controller.namespaces()[0]
        before, ring = blockstats(pm, "nvme0-ns1"), controller.dev.channel.ring
        published = ring.head
        requests = [(rng.randrange(SMALL // 512 - 8), rng.randint(1, 8)) for _ in range(scaled(pm, 300))]
        assert ns.on(controller.queues[1]).read_queued(requests, depth=32) == [
            data[lba * 512:(lba + n) * 512] for lba, n in requests]
        assert blockstats(pm, "nvme0-ns1") - before == len(requests)     # QEMU's own count: each read once
        assert ring.head == published, "the guest carried no doorbell and no wait"
        ns.write(8, bytes(range(256)) * 2)
        assert ns.read(8, 1) == bytes(range(256)) * 2 == noise.read_bytes()[8 * 512:9 * 512]
    finally:
        controller.close()


def test_by_default_the_doorbells_are_register_writes_the_guest_carries(machine, nvme) -> None:
    assert nvme.shadow is None and all(queue.eventfds is None for queue in nvme.queues)


def test_asked_for_ioeventfds_where_qemu_has_none_the_guest_rings_with_the_shadows_set(
        machine, rng: random.Random) -> None:
    pm, fat, noise = machine
    controller = Nvme.open(pm.bus, queues=1, ioeventfds=True)
    try:
        assert controller.shadow is not None and controller.queues[0].eventfds is None
        data, ns = noise.read_bytes(), controller.namespaces()[1]
        requests = [(rng.randrange(SMALL // 512 - 8), rng.randint(1, 8)) for _ in range(scaled(pm, 300))]
        assert ns.read_queued(requests, depth=32) == [data[lba * 512:(lba + n) * 512] for lba, n in requests]
        assert [ns.read(lba, n) for lba, n in requests[:20]] == [data[lba * 512:(lba + n) * 512]
                                                                  for lba, n in requests[:20]]
    finally:
        controller.close()


def blockstats(pm: ProxyMachine, drive: str) -> int:
    """Reads QEMU's block layer has completed on ``drive``."""
    return next(int(entry["stats"]["rd_operations"]) for entry in pm.machine.qmp("query-blockstats")
                if entry.get("qdev", "").endswith(drive) or entry.get("device") == drive)


def test_the_disk_commands_take_bus_nvme(hwharness_accel: str) -> None:
    if not IMAGE.is_file():
        pytest.fail(f"{IMAGE} is missing: run `make images`", pytrace=False)

    def cli(*args: str) -> bytes:
        run = subprocess.run([sys.executable, "-m", "harness", "disk", *args, "--bus", "nvme", "--accel",
                              hwharness_accel], capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        return run.stdout
    listed = sorted(line.split()[-1] for line in cli("ls", str(IMAGE)).decode().splitlines())
    assert listed == sorted(line.rstrip("/").rsplit("/", 1)[1]
                            for line in mtools("mdir", "-b", "-i", str(IMAGE), "::/").decode().splitlines())
    assert cli("cat", str(IMAGE), "/RANDOM.BIN") == mtools("mcopy", "-n", "-i", str(IMAGE), "::/RANDOM.BIN", "-")
    identity = cli("identify", str(IMAGE)).decode()
    assert "model: QEMU NVMe Ctrl" in identity and f"({IMAGE.stat().st_size} bytes)" in identity
