"""NVMe command encoding and completion decoding, against a fake queue-pair transport."""

from __future__ import annotations

import os
import select
import struct
from dataclasses import replace
import threading
from types import SimpleNamespace

import pytest

from drivers.nvme import Command, NvmeError, QueuePair
from drivers.nvme.core import parse_controller, parse_namespace, read_write_command
from drivers.nvme.pci import MAX_TRANSFER
from drivers.nvme.regs import CQE, DOORBELL_BASE, SQE, Nvm
from harness.access import Kind, Region, Space

from tests.unit.fakes import FakeDma, FakeMmio

BAR = 0xFEB0_0000
STRIDE = 4


class FakeController:
    """Just enough of an NVMe controller for one I/O queue pair: on each tail doorbell it
    fetches the new submission entries and posts a completion for each, at once, with
    the status ``status_of(entry)`` gives and the phase it should carry."""

    def __init__(self, entries: int, status_of=lambda sqe: 0, shadow: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.dma = FakeDma()
        # with shadow doorbells (as QEMU after Doorbell Buffer Config) an I/O queue's doorbell
        # value is read from the shadow page, whatever was written to the register
        shadow_page = self.dma.dma_alloc(4096) if shadow else None
        self.shadow_words = shadow_page.view.cast("I") if shadow_page else None    # what the fake reads
        self.channel = FakeMmio(self._doorbell, self.dma)
        self.regs = Region(self.channel, Space.MMIO, BAR, 0x4000)
        self.status_of = status_of
        self.entries = entries
        self.fetched: list[tuple] = []
        self.sq_head = self.cq_tail = 0
        self.phase = 1
        self.heads: list[int] = []
        controller = SimpleNamespace(regs=self.regs, doorbell_stride=STRIDE, doorbell_lock=threading.Lock(),
                                     shadow=shadow_page,
                                     dev=SimpleNamespace(channel=self.channel, dma_alloc=self.dma.dma_alloc,
                                                         dma_free=self.dma.dma_free))
        self.qp = QueuePair(controller, 1, entries, None)     # type: ignore[arg-type]

    def _doorbell(self, addr: int, value: int) -> None:
        offset = addr - BAR
        if self.shadow_words is not None:
            value = self.shadow_words[(offset - DOORBELL_BASE) // 4]
        if offset == DOORBELL_BASE + 3 * STRIDE:          # CQ 1 head
            self.heads.append(value)
            return
        assert offset == DOORBELL_BASE + 2 * STRIDE        # SQ 1 tail
        while self.sq_head != value:
            sqe = SQE.unpack_from(self.qp.sq.view, self.sq_head * 64)
            self.fetched.append(sqe)
            self.sq_head = (self.sq_head + 1) % self.entries
            status = self.status_of(sqe) << 1 | self.phase
            CQE.pack_into(self.qp.cq.view, self.cq_tail * 16, 0x1000 + sqe[2], 0, self.sq_head, 1, sqe[2], status)
            self.cq_tail = (self.cq_tail + 1) % self.entries
            if self.cq_tail == 0:
                self.phase ^= 1


def test_a_read_is_encoded_with_its_prp_list() -> None:
    fake = FakeController(8)
    pages = [0x2000_0000, 0x2000_1000, 0x2000_5000, 0x2000_9000]
    result = fake.qp.execute(Command(Nvm.READ, 3, pages, cdw10=0x89ABCDEF, cdw11=0x12, cdw12=31, name="READ"))
    opcode, flags, cid, nsid, _, _, mptr, prp1, prp2, cdw10, cdw11, cdw12, *_ = fake.fetched[0]
    assert (opcode, flags, nsid, mptr, prp1) == (Nvm.READ, 0, 3, 0, pages[0])
    assert (cdw10, cdw11, cdw12) == (0x89ABCDEF, 0x12, 31)
    assert prp2 == fake.qp.prp_lists.phys + cid * 4096           # the command's own list page
    assert struct.unpack_from("<3Q", fake.dma.view, prp2 - fake.dma.base) == tuple(pages[1:])
    assert result == 0x1000 + cid                                 # dword 0 of its completion


def test_two_pages_go_in_prp2_and_one_page_leaves_it_zero() -> None:
    fake = FakeController(8)
    fake.qp.run([Command(Nvm.WRITE, 1, [0x3000_0000, 0x3000_1000]), Command(Nvm.FLUSH, 1)])
    assert [entry[7:9] for entry in fake.fetched] == [(0x3000_0000, 0x3000_1000), (0, 0)]


def test_phase_wraps_and_a_full_queue_never_holds_more_than_entries_minus_one() -> None:
    fake = FakeController(4)
    done: list[int] = []
    results = fake.qp.run([Command(Nvm.FLUSH, 1, name=f"FLUSH {i}") for i in range(10)],
                          on_done=lambda index, _: done.append(index))
    assert sorted(done) == list(range(10)) and len(results) == 10
    assert fake.qp.most_in_flight == 3 and fake.qp.submitted == 10
    assert len({entry[2] for entry in fake.fetched}) == 3         # three command identifiers, reused
    # every round is one posted batch: the completion queue's head and the submission queue's tail
    # where they moved; the host sees the completions in the queue itself (this fake posts them at
    # once), so no guest-side wait is needed
    cq_head, sq_tail = BAR + DOORBELL_BASE + 3 * STRIDE, BAR + DOORBELL_BASE + 2 * STRIDE
    for batch in fake.channel.batches:
        assert all(a.kind is Kind.WRITE for a in batch)
        assert [a.addr for a in batch] in ([cq_head, sq_tail], [sq_tail], [cq_head])
    assert fake.qp.head == 10 % 4 and fake.qp.phase == fake.phase == 1     # wrapped twice: flipped and back


def test_an_error_status_is_decoded_and_the_other_commands_complete() -> None:
    failing_lba = 77
    fake = FakeController(8, status_of=lambda sqe: (0x2 << 8 | 0x81) if sqe[9] == failing_lba else 0)
    commands = [Command(Nvm.READ, 1, [0x4000_0000], cdw10=lba, name=f"READ {lba}", lba=lba) for lba in (5, 77, 9)]
    done: list[int] = []
    with pytest.raises(NvmeError) as failed:
        fake.qp.run(commands, on_done=lambda index, _: done.append(index))
    error = failed.value
    assert (error.command, error.sct, error.sc, error.lba, error.failed) == ("READ 77", 2, 0x81, 77, [1])
    assert "Unrecovered Read Error" in str(error) and "LBA 77" in str(error)
    assert sorted(done) == [0, 2]


def test_a_read_or_write_is_named_in_its_error_though_built_without_a_name() -> None:
    """Reads and Writes are built nameless (the hot path); the error still names the one that failed."""
    far = (1 << 32) + 8                                             # an LBA whose high half is in CDW11
    fake = FakeController(8, status_of=lambda sqe: 0x80 if (sqe[9], sqe[10]) == (8, 1) else 0)
    commands = [read_write_command(Nvm.WRITE, 1, lba, 8, range(0x4000_0000, 0x4000_1000, 4096)) for lba in (8, far)]
    assert [c.name for c in commands] == ["", ""]
    with pytest.raises(NvmeError) as failed:
        fake.qp.run(commands)
    assert (failed.value.command, failed.value.failed) == (f"WRITE ns 1 {far}+8", [1])
    assert "LBA Out of Range" in str(failed.value)


def test_identify_structures_are_parsed() -> None:
    ctrl = bytearray(4096)
    ctrl[4:24] = b"SERIAL-1".ljust(20)
    ctrl[24:64] = b"Model X".ljust(40)
    ctrl[64:72] = b"1.0".ljust(8)
    ctrl[77] = 5                                                   # MDTS: 2^5 pages
    struct.pack_into("<I", ctrl, 516, 4)
    struct.pack_into("<H", ctrl, 520, 1 << 2)                      # ONCS: Dataset Management
    identity = parse_controller(bytes(ctrl), 4096, MAX_TRANSFER)
    assert (identity.serial, identity.model, identity.firmware) == ("SERIAL-1", "Model X", "1.0")
    assert identity.max_transfer == 128 << 10 and identity.namespaces == 4 and identity.dsm
    ns = bytearray(4096)
    struct.pack_into("<QQQBBBB", ns, 0, 1000, 1000, 10, 0, 1, 1, 0)  # two formats, the second in use
    struct.pack_into("<II", ns, 128, 9 << 16, 8 | 12 << 16)
    parsed = parse_namespace(1, bytes(ns), identity)
    assert parsed.sectors == 1000 and parsed.sector_size == 4096
    assert parsed.lba_formats == ((0, 512), (8, 4096)) and parsed.model == "Model X"


def test_an_interrupted_call_lets_its_commands_end_and_the_queue_goes_on() -> None:
    fake = FakeController(8)

    def stop(index: int, _: int) -> None:
        if index == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fake.qp.run([Command(Nvm.FLUSH, 1, name=f"FLUSH {i}") for i in range(20)], on_done=stop)
    assert not fake.qp.broken and fake.heads[-1] == fake.qp.head == fake.cq_tail   # all reaped, given back
    fetched = len(fake.fetched)
    assert fake.qp.run([Command(Nvm.READ, 1, [0x5000_0000], cdw10=i) for i in range(5)]) == \
        [0x1000 + entry[2] for entry in fake.fetched[fetched:]]
    with pytest.raises(ValueError):
        fake.qp.run([Command(Nvm.FLUSH, 1)], depth=0)


def test_a_lent_queue_is_described_and_taken_back_where_the_borrower_left_it() -> None:
    fake = FakeController(8)
    fake.qp.run([Command(Nvm.FLUSH, 1) for _ in range(3)])
    lent = fake.qp.state()
    assert (lent.qid, lent.sq, lent.cq, lent.prp_lists, lent.entries) == \
        (1, fake.qp.sq.phys, fake.qp.cq.phys, fake.qp.prp_lists.phys, 8)
    assert (lent.sq_doorbell, lent.cq_doorbell) == (DOORBELL_BASE + 2 * STRIDE, DOORBELL_BASE + 3 * STRIDE)
    assert (lent.tail, lent.head, lent.phase, lent.acked) == (3, 3, 1, 0)      # the head is rung lazily
    # A borrower runs six commands past the wrap, rings every tail it wrote, reaps and rings the head
    for k in range(6):
        slot = (lent.tail + k) % 8
        fake.qp.sq.view[slot * 64:slot * 64 + 64] = SQE.pack(Nvm.FLUSH, 0, k, 1, *[0] * 11)
    fake._doorbell(BAR + lent.sq_doorbell, 1)
    fake._doorbell(BAR + lent.cq_doorbell, 1)
    fake.qp.resume(replace(lent, tail=1, head=1, phase=0, acked=1))
    assert fake.qp.run([Command(Nvm.FLUSH, 1)]) == [0x1000]   # its completion, in the new phase
    with pytest.raises(ValueError):
        fake.qp.resume(replace(lent, qid=2))                   # another queue's state
    with pytest.raises(ValueError):
        fake.qp.resume(replace(lent, phase=2))


def test_with_shadow_doorbells_each_value_is_in_the_shadow_before_its_doorbell_rings() -> None:
    fake = FakeController(4, shadow=True)       # the fake takes the values from the shadows only
    results = fake.qp.run([Command(Nvm.FLUSH, 1, name=f"FLUSH {i}") for i in range(10)])
    assert len(results) == 10 and len(fake.fetched) == 10 and fake.qp.head == 10 % 4
    written = [a.value for batch in fake.channel.batches for a in batch]
    assert written and fake.heads        # the head went back (4 entries, 10 commands), through the shadow too
    assert fake.qp.state().sq_shadow == fake.qp.controller.shadow.phys + 2 * STRIDE
    assert fake.qp.state().cq_shadow == fake.qp.controller.shadow.phys + 3 * STRIDE


def test_with_ioeventfds_a_doorbell_is_a_signal_and_the_guest_carries_nothing() -> None:
    fake = FakeController(4, shadow=True)
    head_fd, tail_fd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    fake.qp.eventfds = (head_fd, tail_fd)
    signals = {head_fd: 0, tail_fd: 0}
    stop = threading.Event()

    def qemu_main_loop() -> None:           # an eventfd fires: the register's value is in the shadow
        while not stop.is_set():
            for fd in select.select([head_fd, tail_fd], [], [], 0.02)[0]:
                signals[fd] += os.eventfd_read(fd)
                fake._doorbell(BAR + DOORBELL_BASE + (3 if fd == head_fd else 2) * STRIDE, -1)
    loop = threading.Thread(target=qemu_main_loop)
    loop.start()
    try:
        results = fake.qp.run([Command(Nvm.FLUSH, 1, name=f"FLUSH {i}") for i in range(10)])
    finally:
        stop.set()
        loop.join()
    assert len(results) == 10 and [e[0] for e in fake.fetched] == [Nvm.FLUSH] * 10
    assert fake.channel.batches == []       # no doorbell, no wait went through the proxy
    assert signals[tail_fd] >= 3 and signals[head_fd] >= 1 and fake.heads
    fake.qp.free()
    assert fake.qp.eventfds is None
    with pytest.raises(OSError):
        os.fstat(tail_fd)                   # the queue closed its descriptors
