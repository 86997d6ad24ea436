"""The access interface against a fake transport: bounds, widths, batches, errors."""

from typing import Sequence

import pytest

from harness.access import Access, Batch, Channel, DmaBuffer, Kind, Region, Space


class FakeChannel(Channel):
    """Remembers every access and serves reads from a dict of registers."""

    def __init__(self) -> None:
        self.log: list[Access] = []
        self.regs: dict[int, int] = {}

    def execute(self, accesses: Sequence[Access]) -> list[int]:
        out = []
        for a in accesses:
            self.log.append(a)
            if a.kind is Kind.WRITE:
                self.regs[a.addr] = a.value
                out.append(0)
            else:
                out.append(self.regs.get(a.addr, 0))
        return out


def test_region_offsets_are_relative_and_checked() -> None:
    ch = FakeChannel()
    r = Region(ch, Space.MMIO, 0x1000, 0x20, "bar0")
    r.write32(0x10, 0xABCD)
    assert r.read32(0x10) == 0xABCD
    assert ch.log[0] == Access(Kind.WRITE, Space.MMIO, 0x1010, 4, 0xABCD)
    for bad in (lambda: r.read32(0x1D), lambda: r.read32(-4), lambda: r.read(0, 3),
                lambda: r.write8(0, 0x100), lambda: Region(ch, Space.PIO, 0x60, 8).read64(0)):
        with pytest.raises(ValueError):
            bad()
    assert len(ch.log) == 2, "nothing reached the transport"


def test_batch_runs_in_order_on_exit() -> None:
    ch = FakeChannel()
    r = Region(ch, Space.PIO, 0x60, 8)
    with Batch(ch) as b:
        b.write(r, 4, 1, 0xAE)
        i = b.read(r, 4, 1)
    assert b.results[i] == 0xAE
    assert [a.kind for a in ch.log] == [Kind.WRITE, Kind.READ]


def test_access_names_itself() -> None:
    a = Access(Kind.POLL, Space.MMIO, 0xFEBC0008, 4, mask=2, expect=2, timeout=0.5)
    assert str(a) == "poll mmio 0xfebc0008 width 4 until & 0x2 == 0x2 within 0.5 s"
    c = Access(Kind.POLL_CHANGE, Space.PIO, 0x64, 1, mask=1, expect=0, timeout=0.1)
    assert str(c) == "poll-change pio 0x64 width 1 until & 0x1 != 0x0 within 0.1 s"
    assert c.satisfied_by(0x1D) and not c.satisfied_by(0x1C)
    assert a.satisfied_by(0x2) and not a.satisfied_by(0x1)


def test_register_names_are_the_channels_own() -> None:
    import enum

    class Reg(enum.IntEnum):
        CTRL = 0x0
        STATUS = 0x8
        STATUS_ALIAS = 0x8

    ch, other = FakeChannel(), FakeChannel()
    assert ch.register_name(Space.MMIO, 0x1008) == ""
    Region(ch, Space.MMIO, 0x1000, 0x20, "bar0").name_registers(Reg, prefix="P0.")
    assert ch.register_names == {(Space.MMIO, 0x1000): "P0.CTRL", (Space.MMIO, 0x1008): "P0.STATUS/STATUS_ALIAS"}
    assert ch.register_name(Space.MMIO, 0x1008) == "P0.STATUS/STATUS_ALIAS"
    assert ch.register_name(Space.PIO, 0x1008) == "" and other.register_name(Space.MMIO, 0x1008) == ""


def test_prepared_batch_takes_new_values_and_runs_in_two_halves() -> None:
    ch = FakeChannel()
    r = Region(ch, Space.MMIO, 0x1000, 0x20)
    batch = ch.prepare([r.access(Kind.WRITE, 0x8, 4, 1), r.access(Kind.READ, 0x8, 4)])
    assert batch.run()[1] == 1
    assert batch.run({0: 0xBEEF})[1] == 0xBEEF
    with pytest.raises(ValueError):                     # checked against the access's width
        batch.run({0: 1 << 32})
    for index in (-1, 2):                               # and against the batch
        with pytest.raises(ValueError):
            batch.run({index: 1})
    batch.start({0: 7})
    assert batch.finish() == [0, 7]
    with pytest.raises(RuntimeError):                   # nothing started
        batch.finish()


def test_a_transport_without_asynchrony_keeps_every_promise_of_post_and_start() -> None:
    """The contract's defaults run each batch at once: posted writes land in order, started
    batches return their own values whenever they are waited for, flush has nothing to wait for."""
    ch = FakeChannel()
    r = Region(ch, Space.MMIO, 0x1000, 0x20)
    ch.post([r.access(Kind.WRITE, 0x8, 4, 1)])
    ch.post([r.access(Kind.WRITE, 0x8, 4, 2), r.access(Kind.WRITE, 0xC, 4, 3)])
    pendings = [ch.start([r.access(Kind.WRITE, 0x8, 4, v), r.access(Kind.READ, 0x8, 4)]) for v in (4, 5, 6)]
    ch.flush()
    assert [p.wait() for p in reversed(pendings)] == [[0, 6], [0, 5], [0, 4]]
    assert r.read32(0x8) == 6 and r.read32(0xC) == 3
    assert [a.value for a in ch.log if a.kind is Kind.WRITE] == [1, 2, 3, 4, 5, 6]


def test_spin_until_stops_when_done_and_gives_up_after_its_time() -> None:
    from harness.access import spin_until
    calls = []
    assert spin_until(lambda: calls.append(1) or len(calls) >= 3, 5.0) and len(calls) == 3
    assert not spin_until(lambda: False, 0.001)


def test_dma_pool_aligns_zeroes_and_coalesces() -> None:
    from harness.proxy.dma import DmaPool
    memory = memoryview(bytearray(1 << 16))
    pool = DmaPool(memory, phys_base=0xFC000000, start=0x1000, end=1 << 16)
    a = pool.alloc(100, align=256)
    b = pool.alloc(5000)
    assert a.phys % 256 == 0 and b.phys % 4096 == 0 and a.phys >= 0xFC001000
    b.view[:] = b"\xaa" * 5000
    assert memory[b.phys - 0xFC000000] == 0xAA
    pool.free(b)
    c = pool.alloc(5000)
    assert bytes(c.view) == bytes(5000), "lent zeroed"
    pool.free(a)
    pool.free(c)
    assert pool.free_bytes == (1 << 16) - 0x1000
    assert pool.alloc((1 << 16) - 0x1000, align=1).size == (1 << 16) - 0x1000, "coalesced back into one"
    with pytest.raises(MemoryError):
        pool.alloc(1)
    with pytest.raises(ValueError):
        pool.free(DmaBuffer(0xDEAD000, memoryview(b"")))    # not one of the pool's


def test_dma_pool_over_zeroed_memory_writes_only_what_it_lent_before() -> None:
    from harness.proxy.dma import DmaPool
    memory = memoryview(bytearray(1 << 16))
    pool = DmaPool(memory, phys_base=0, start=0, end=1 << 16, zeroed=True)
    a = pool.alloc(8192)
    a.view[:] = b"\xaa" * 8192
    pool.free(a)
    memory[0x8000] = 0x55                   # never lent: the pool trusts it still holds zero
    again = pool.alloc(8192)
    assert again.phys == a.phys and bytes(again.view) == bytes(8192), "what was lent is zeroed when lent again"
    beyond = pool.alloc(0x8000, align=0x8000)
    assert beyond.phys == 0x8000 and beyond.view[0] == 0x55, "what was never lent is not written"
