"""The 82540EM driver: initialisation, batched zero-copy rings, interrupts or polling.

The rings and buffers live in DMA memory the host has mapped, so the hot
paths touch no register but the tail: a batch of transmits is descriptors
written in memory plus one TDT write, and receiving by polling reads the
descriptors' Descriptor Done bits straight from memory, with one RDT write
per batch to hand the buffers back. "We own the tail, the hardware the head."
"""

from __future__ import annotations

import logging
import struct
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

from harness.access import Access, Bus, Deadline, Device, DmaBuffer, IrqMode, Kind, Space
from harness.errors import HarnessError, InterruptTimeout

from .descriptors import RX_DD, RX_EOP, TX_DD, TX_EOP, TX_IFCS, TX_RS, RxDesc, TxDesc
from .regs import (EERD_ADDR_SHIFT, EERD_DATA_SHIFT, MTA_ENTRIES, TCTL_COLD_FD, TCTL_CT, TIPG_82540, Ctrl,
                   Eerd, Icr, Rctl, Reg, Stat, StatusBits, Tctl)

if TYPE_CHECKING:
    from .pool import PacketPool

log = logging.getLogger(__name__)

VENDOR, DEVICE = 0x8086, 0x100E
BUFFER_SIZE = 2048              # RCTL.BSIZE = 00: 2048-byte receive buffers
MIN_FRAME, MAX_FRAME = 14, 1514  # an Ethernet header at least; no FCS (the hardware adds it)
DESC_SIZE = 16
TX_BATCHES = 8                  # transmit batches a ring holds at least (see _transmit)
RX_TAIL_LAG = 4                 # forwarding: RDT is written once a quarter ring is refilled (recv_buffers)
IDLE_DOZE = 0.0002              # seconds a polling driver sleeps between looks at its rings
INTERRUPTS = Icr.RXT0 | Icr.TXDW | Icr.LSC | Icr.RXO

# Field offsets come from the ctypes declarations, not from here.
_TX_CMD, _TX_STA = TxDesc.cmd.offset, TxDesc.status.offset
# A transmit descriptor handed to the NIC, in one pack: address, length, CSO, command, status (0: the NIC's).
_TX_HANDED = struct.Struct("<QHBBB")
assert (TxDesc.addr.offset, TxDesc.length.offset, TxDesc.cso.offset, _TX_CMD, _TX_STA) == (0, 8, 10, 11, 12)
_RX_LEN, _RX_STA = RxDesc.length.offset, RxDesc.status.offset
assert RxDesc.addr.offset == 0
# Forwarding moves whole batches of descriptors with one strided slice per field (a field of
# descriptor d is item d * stride + offset of the ring's view cast to the field's width), not
# a Python loop per frame: the pool's buffers pass from ring to ring at memcpy speed.
_Q_STRIDE, _H_STRIDE = DESC_SIZE // 8, DESC_SIZE // 2
_RX_LEN_H = _RX_LEN // 2
_TX_LEN_H, _TX_CMD_H = TxDesc.length.offset // 2, TxDesc.cso.offset // 2   # cso and cmd: one u16
assert _RX_LEN % 2 == 0 and RX_DD == TX_DD
_DONE = bytes(1 if status & RX_DD else 0 for status in range(256))      # status -> written back?
_NOT_EOP = bytes(0 if status & RX_EOP else 1 for status in range(256))  # status -> part of a frame?


class E1000Error(HarnessError):
    """The NIC did not come up or did not do what it was told."""


class TxRingFull(E1000Error):
    """No transmit descriptor came free before the deadline; ``sent`` frames went out."""

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


class Frames(NamedTuple):
    """Frames in a packet pool's buffers, oldest first: each buffer's address and the frame's
    length (what :meth:`E1000.recv_buffers` returns and :meth:`E1000.send_buffers` takes)."""
    addresses: list[int]
    lengths: list[int]


def _runs(first: int, count: int, n: int) -> tuple[tuple[int, int], ...]:
    """Descriptors ``first`` .. ``first + count - 1`` of an ``n``-entry ring as (start, end)
    index runs: one, or two where they wrap."""
    if first + count <= n:
        return ((first, first + count),)
    return ((first, n), (0, first + count - n))


def _statuses(ring: memoryview, first: int, count: int, n: int, offset: int) -> bytes:
    """The status bytes of ``count`` descriptors from ``first`` on (at ``offset`` in each)."""
    end = first + count
    if end <= n:                                        # _runs, unrolled: this is every reclaim
        return ring[first * DESC_SIZE + offset:end * DESC_SIZE:DESC_SIZE].tobytes()
    return (ring[first * DESC_SIZE + offset::DESC_SIZE].tobytes()
            + ring[offset:(end - n) * DESC_SIZE:DESC_SIZE].tobytes())


def _written_back(statuses: bytes) -> int:
    """How many of these descriptors, from the first, the NIC has written back (DD)."""
    done = statuses.translate(_DONE).find(0)
    return len(statuses) if done < 0 else done


@dataclass(frozen=True)
class Stats:
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    missed: int         # frames dropped for want of a receive descriptor
    crc_errors: int


class E1000:
    """One 82540EM. ``E1000.open(bus)`` finds and initialises the first one."""

    def __init__(self, bus: Bus, device: Device, rx_entries: int = 256, tx_entries: int = 256,
                 interrupts: bool = True, itr: int = 0, pool: "PacketPool | None" = None,
                 promiscuous: bool = False) -> None:
        """``pool``: receive into buffers of a :class:`~drivers.e1000.pool.PacketPool` (the
        forwarding mode: :meth:`recv_buffers` and :meth:`send_buffers` pass buffers along
        without a copy) instead of buffers of the NIC's own. ``promiscuous``: receive every
        frame from the start (a bridge), as :meth:`set_promiscuous` does later."""
        for n in (rx_entries, tx_entries):
            if n % 8 or not 8 <= n <= 4096:
                raise ValueError("ring sizes are multiples of 8 from 8 to 4096 (the length is in 128-byte units)")
        self.bus, self.dev, self.regs = bus, device, device.bar(0)
        self.regs.name_registers(Reg)
        bar = self.regs.base                    # the tails are posted (_post_tx_tail, _post_rx_tail)
        self._tdt_at, self._rdt_at, self._status_at = bar + Reg.TDT, bar + Reg.RDT, bar + Reg.STATUS
        self.rx_n, self.tx_n = rx_entries, tx_entries
        self.rx_ring = device.dma_alloc(rx_entries * DESC_SIZE, 128)
        self.tx_ring = device.dma_alloc(tx_entries * DESC_SIZE, 128)
        self.pool = pool
        self.rx_bufs = device.dma_alloc(rx_entries * BUFFER_SIZE) if pool is None else None
        self.rx_held: list[int] = []            # forwarding: the pool buffer each receive descriptor has
        self.tx_held = [0] * tx_entries         # forwarding: the pool buffer a transmit descriptor sends
        self.tx_bufs = device.dma_alloc(tx_entries * BUFFER_SIZE)
        # the rings' fields by width (_Q_STRIDE, _H_STRIDE): forwarding's batch-wide slices
        self._rx_q, self._rx_h = self.rx_ring.view.cast("Q"), self.rx_ring.view.cast("H")
        self._tx_q, self._tx_h = self.tx_ring.view.cast("Q"), self.tx_ring.view.cast("H")
        self.rx_next = 0            # next descriptor the hardware will fill
        self.rx_untold = 0          # forwarding: descriptors refilled since the last RDT write
        self.tx_tail = 0            # next descriptor we fill
        self.tx_clean = 0           # oldest descriptor the hardware may still own
        self.irq = device.irq(IrqMode.INTX) if interrupts else None
        self.mac = b""
        self.promiscuous = promiscuous
        self.reset_and_init(itr)

    @classmethod
    def open(cls, bus: Bus, **kwargs: object) -> "E1000":
        return cls(bus, bus.open(bus.find(vendor=VENDOR, device=DEVICE)), **kwargs)  # type: ignore[arg-type]

    # ---- bring-up, following the 8254x manual section 14 ----

    def reset_and_init(self, itr: int = 0) -> None:
        r = self.regs
        # No DMA until both units are stopped: a NIC a killed driver left running still has
        # its rings and receives, and QEMU's e1000 takes CTRL.RST as a no-op (set_ctrl only
        # clears the bit). Left on, the moment bus mastering is back QEMU pours the frames it
        # queued meanwhile through the old head into this driver's fresh ring (the same
        # addresses, still zero: one frame over null descriptors marks every one done), and
        # the driver, trusting those DD bits, can run past the head and wait for good on a
        # descriptor the NIC never fills. Linux's e1000_reset_hw stops them before its reset too.
        self.dev.enable_decoding()
        self._stop()
        r.write32(Reg.CTRL, r.read32(Reg.CTRL) | Ctrl.RST)  # 14.3: global reset
        self._wait(Reg.CTRL, Ctrl.RST, 0, "the reset to finish")
        self.dev.enable_dma()
        r.write32(Reg.IMC, 0xFFFFFFFF)
        r.read32(Reg.ICR)
        self.mac = self.read_mac()                          # 5.6: EEPROM words 0-2
        r.write32(Reg.CTRL, r.read32(Reg.CTRL) | Ctrl.SLU | Ctrl.ASDE)   # 14.5: link up
        with self.dev.batch() as b:                         # 14.4: clear the multicast table
            for i in range(MTA_ENTRIES):
                b.write32(r, Reg.MTA + 4 * i, 0)
            b.write32(r, Reg.RAL0, int.from_bytes(self.mac[:4], "little"))
            b.write32(r, Reg.RAH0, int.from_bytes(self.mac[4:], "little") | 1 << 31)   # Address Valid
        self._init_rx()
        self._init_tx()
        self.set_itr(itr)
        if self.irq is not None:
            r.write32(Reg.IMS, INTERRUPTS)
        log.info("e1000 %s up, mac %s", self.dev.function.bdf, self.mac.hex(":"))

    def _stop(self) -> None:
        """No interrupts, no receiving, no sending: where a bring-up starts and a close ends.
        Receiving stops by an empty ring (head == tail: no descriptor to fill, so frames wait
        in QEMU's queue), not by clearing RCTL: QEMU's e1000 takes no frame for 1 s after
        any RCTL write, and the next bring-up would have to write it again."""
        with self.dev.batch() as b:
            b.write32(self.regs, Reg.IMC, 0xFFFFFFFF)
            b.write32(self.regs, Reg.RDH, 0)
            b.write32(self.regs, Reg.RDT, 0)
            b.write32(self.regs, Reg.TCTL, 0)

    def _wait(self, reg: int, mask: int, value: int, what: str, timeout: float = 2.0) -> int:
        return self.regs.wait32(reg, mask, value, timeout,
                                lambda detail, _: E1000Error(f"e1000: timed out waiting for {what}: {detail}"))

    def read_mac(self) -> bytes:
        words = []
        for addr in range(3):
            self.regs.write32(Reg.EERD, addr << EERD_ADDR_SHIFT | Eerd.START)
            value = self._wait(Reg.EERD, Eerd.DONE, Eerd.DONE, f"EEPROM word {addr}")
            words.append(value >> EERD_DATA_SHIFT)
        return b"".join(w.to_bytes(2, "little") for w in words)

    def _init_rx(self) -> None:
        ring = self.rx_ring.view
        if self.rx_bufs is not None:
            addresses = [self.rx_bufs.phys + i * BUFFER_SIZE for i in range(self.rx_n)]
        else:
            assert self.pool is not None
            self.rx_held += self.pool.take(self.rx_n - len(self.rx_held))
            if len(self.rx_held) < self.rx_n:
                raise ValueError(f"the packet pool has too few buffers for {self.rx_n} receive descriptors")
            addresses = self.rx_held
        for i, phys in enumerate(addresses):                # every descriptor gets its buffer
            struct.pack_into("<Q", ring, i * DESC_SIZE, phys)
            ring[i * DESC_SIZE + _RX_STA] = 0               # and is not done: a DD bit left from
                                                            # before (a re-init) is no frame
        rctl = Rctl.EN | Rctl.BAM | Rctl.SECRC | (Rctl.UPE | Rctl.MPE if self.promiscuous else 0)
        # QEMU's e1000 refuses to receive for 1 s (virtual) after any RCTL write: a NIC a
        # killed driver left with this very RCTL is not written again, so a restarted driver
        # forwards at once. RDT goes last: with receiving on, that write is what has QEMU
        # deliver the frames it queued meanwhile.
        write_rctl = self.regs.read32(Reg.RCTL) != rctl
        with self.dev.batch() as b:
            b.write32(self.regs, Reg.RDBAL, self.rx_ring.phys & 0xFFFFFFFF)
            b.write32(self.regs, Reg.RDBAH, self.rx_ring.phys >> 32)
            b.write32(self.regs, Reg.RDLEN, self.rx_n * DESC_SIZE)
            b.write32(self.regs, Reg.RDH, 0)
            b.write32(self.regs, Reg.RDTR, 0)
            if write_rctl:
                b.write32(self.regs, Reg.RCTL, rctl)
            b.write32(self.regs, Reg.RDT, self.rx_n - 1)    # all but one: head == tail means empty
        self.rx_next = 0
        self.rx_untold = 0

    def _init_tx(self) -> None:
        ring = self.tx_ring.view
        for i in range(self.tx_n):
            struct.pack_into("<Q", ring, i * DESC_SIZE, self.tx_bufs.phys + i * BUFFER_SIZE)
            ring[i * DESC_SIZE + _TX_STA] = TX_DD           # free
        with self.dev.batch() as b:
            b.write32(self.regs, Reg.TDBAL, self.tx_ring.phys & 0xFFFFFFFF)
            b.write32(self.regs, Reg.TDBAH, self.tx_ring.phys >> 32)
            b.write32(self.regs, Reg.TDLEN, self.tx_n * DESC_SIZE)
            b.write32(self.regs, Reg.TDH, 0)
            b.write32(self.regs, Reg.TDT, 0)
            b.write32(self.regs, Reg.TIPG, TIPG_82540)
            b.write32(self.regs, Reg.TCTL, Tctl.EN | Tctl.PSP | TCTL_CT | TCTL_COLD_FD)
        self.tx_tail = self.tx_clean = 0

    # ---- knobs ----

    def set_itr(self, interval_256ns: int) -> None:
        """Interrupt throttling: at least this many 256 ns units between interrupts (0: off)."""
        self.regs.write32(Reg.ITR, interval_256ns & 0xFFFF)

    def set_promiscuous(self, on: bool) -> None:
        """Receive every frame (``on``) or only the NIC's own, broadcasts and its multicasts;
        RCTL is written only for a change (each write stops receiving for 1 s in QEMU)."""
        rctl = self.regs.read32(Reg.RCTL)
        bits = Rctl.UPE | Rctl.MPE
        self.promiscuous = on
        wanted = rctl | bits if on else rctl & ~bits
        if wanted != rctl:
            self.regs.write32(Reg.RCTL, wanted)

    def add_multicast(self, mac: bytes) -> None:
        """Accept a multicast address: the MTA hash is bits 47:36 of it (RCTL.MO = 0)."""
        h = (mac[4] >> 4 | mac[5] << 4) & 0xFFF
        reg = Reg.MTA + 4 * (h >> 5)
        self.regs.write32(reg, self.regs.read32(reg) | 1 << (h & 31))

    @property
    def link_up(self) -> bool:
        return bool(self.regs.read32(Reg.STATUS) & StatusBits.LU)

    def stats(self) -> Stats:
        """Counters since the last call (they clear on read)."""
        with self.dev.batch() as b:
            idx = {s: b.read32(self.regs, s) for s in (Stat.GPRC, Stat.GPTC, Stat.GORCL, Stat.GOTCL,
                                                        Stat.MPC, Stat.CRCERRS)}
        v = {s: b.results[i] for s, i in idx.items()}
        return Stats(v[Stat.GPRC], v[Stat.GPTC], v[Stat.GORCL], v[Stat.GOTCL], v[Stat.MPC], v[Stat.CRCERRS])

    # ---- transmit ----

    def _reclaim(self) -> int:
        """Free every descriptor the hardware has written back (DD); how many are free."""
        n, clean, tail, ring = self.tx_n, self.tx_clean, self.tx_tail, self.tx_ring.view
        if clean != tail and ring[clean * DESC_SIZE + _TX_STA] & TX_DD:
            # The NIC writes descriptors back in ring order: the newest done means all are.
            in_flight = (tail - clean) % n
            if ring[(tail - 1) % n * DESC_SIZE + _TX_STA] & TX_DD:
                done = in_flight
            else:
                done = _written_back(_statuses(ring, clean, in_flight, n, _TX_STA))
            if self.pool is not None:                       # forwarded buffers: back to their pool
                held = self.tx_held
                for a, e in _runs(clean, done, n):
                    self.pool.give([phys for phys in held[a:e] if phys])
                    held[a:e] = [0] * (e - a)
            self.tx_clean = (clean + done) % n
        return (self.tx_clean - self.tx_tail - 1) % n

    def send(self, frames: Sequence[bytes], timeout: float = 1.0) -> int:
        """Queue ``frames`` (14 to 1514 bytes, no FCS) with one tail write per batch that fits.

        A frame of the wrong size raises ValueError before anything is queued.
        When the ring is full the call waits for descriptors to come back, up to
        ``timeout``, then raises TxRingFull; an in-flight descriptor is never reused.
        """
        for i, f in enumerate(frames):
            if not MIN_FRAME <= len(f) <= MAX_FRAME:
                raise ValueError(f"frame {i} is {len(f)} bytes; a frame is {MIN_FRAME} to {MAX_FRAME}")
        return self._transmit(frames, False, timeout)

    def send_from(self, frames: Sequence[DmaBuffer | tuple[DmaBuffer, int]], timeout: float = 1.0) -> int:
        """Zero-copy send: each descriptor points at the caller's DMA buffer (all of it, or
        ``(buffer, length)``'s first bytes); nothing is copied. The NIC reads the buffers
        while it sends, so a buffer must not change until :meth:`flush_tx` returns (one
        buffer may go out many times). Otherwise as :meth:`send`."""
        spans = [(f, f.size) if isinstance(f, DmaBuffer) else f for f in frames]
        for i, (buffer, length) in enumerate(spans):
            if not MIN_FRAME <= length <= min(MAX_FRAME, buffer.size):
                raise ValueError(f"frame {i} is {length} bytes of a {buffer.size}-byte buffer; "
                                 f"a frame is {MIN_FRAME} to {MAX_FRAME}")
        return self._transmit([(b.phys, length) for b, length in spans], True, timeout)

    def _transmit(self, frames: Sequence, zero_copy: bool, timeout: float) -> int:
        """Queue ``frames``: bytes to copy into the slots' own buffers, or (``zero_copy``)
        (address, length) pairs the descriptors point at. Every descriptor gets its address
        anew, so the two forms mix freely."""
        sent, deadline = 0, Deadline(timeout)
        while sent < len(frames):
            free = self._reclaim()
            # Batches of an eighth of a ring at least (or the rest): QEMU sends a whole batch
            # within its TDT write, so the NIC keeps up to seven eighths queued behind it and
            # never idles while Python dozes, and the tail is written eight times a ring, not
            # for every few descriptors that came back.
            if free < min(len(frames) - sent, self.tx_n // TX_BATCHES) and not deadline.expired:
                self._wait_tx(deadline)
                continue
            if not free:
                raise TxRingFull(f"no transmit descriptor came free within {timeout:g} s", sent)
            batch = frames[sent:sent + free]
            self._queue(batch, zero_copy)
            sent += len(batch)
        return sent

    def _queue(self, batch: Sequence, zero_copy: bool) -> None:
        """Fill descriptors for ``batch`` (it fits) and write the tail once."""
        ring, bufs, n = self.tx_ring.view, self.tx_bufs.view, self.tx_n
        own, pack = self.tx_bufs.phys, _TX_HANDED.pack_into
        cmd = TX_EOP | TX_IFCS | TX_RS
        tail = self.tx_tail
        for frame in batch:
            if not zero_copy:
                size = len(frame)
                bufs[tail * BUFFER_SIZE:tail * BUFFER_SIZE + size] = frame
                pack(ring, tail * DESC_SIZE, own + tail * BUFFER_SIZE, size, 0, cmd, 0)
            else:
                pack(ring, tail * DESC_SIZE, frame[0], frame[1], 0, cmd, 0)
            tail = (tail + 1) % n
        self.tx_tail = tail
        self._post_tx_tail(tail)                            # one register write for the batch

    def _post_tx_tail(self, tail: int) -> None:
        """TDT, posted: the NIC sends while Python goes on; a failure is raised by the
        channel's next waited request."""
        self.dev.channel.post([Access(Kind.WRITE, Space.MMIO, self._tdt_at, 4, tail)])

    def send_buffers(self, frames: Frames) -> int:
        """Forwarding: queue the pool's buffers as they are, as many as the ring has room for
        now, without waiting, with one tail write; each goes back to the pool once sent.
        Returns how many were queued: the rest are still the caller's."""
        count = min(len(frames.addresses), self._reclaim())
        if not count:
            return 0
        tail, q, h, status, held = self.tx_tail, self._tx_q, self._tx_h, self.tx_ring.view, self.tx_held
        command = (TX_EOP | TX_IFCS | TX_RS) << 8               # cso 0 in the low byte
        at = 0
        for a, e in _runs(tail, count, self.tx_n):
            addresses = frames.addresses[at:at + e - a]
            q[a * _Q_STRIDE:e * _Q_STRIDE:_Q_STRIDE] = array("Q", addresses)
            h[a * _H_STRIDE + _TX_LEN_H:e * _H_STRIDE:_H_STRIDE] = array("H", frames.lengths[at:at + e - a])
            h[a * _H_STRIDE + _TX_CMD_H:e * _H_STRIDE:_H_STRIDE] = array("H", [command]) * (e - a)
            status[a * DESC_SIZE + _TX_STA:e * DESC_SIZE:DESC_SIZE] = bytes(e - a)    # the NIC's
            held[a:e] = addresses
            at += e - a
        self.tx_tail = (tail + count) % self.tx_n
        self._post_tx_tail(self.tx_tail)
        return count

    def _wait_tx(self, deadline: Deadline) -> None:
        """Wait a while for the NIC to give descriptors back: its interrupt, or (polling) a
        doze, which leaves the core to the vCPU that sends (a spin here took it, and
        measured slower)."""
        if self.irq is None:
            time.sleep(min(IDLE_DOZE, deadline.remaining))
            return
        self._wait_irq(min(0.01, deadline.remaining))

    def flush_tx(self, timeout: float = 2.0) -> None:
        """Wait until the hardware has sent everything queued."""
        deadline = Deadline(timeout)
        while self.tx_clean != self.tx_tail:
            self._reclaim()
            if self.tx_clean == self.tx_tail:
                return
            if deadline.expired:
                raise E1000Error(f"transmit ring did not drain within {timeout:g} s")
            self._wait_tx(deadline)

    # ---- receive ----

    def recv(self, max_frames: int = 256, timeout: float = 0.0) -> list[bytes]:
        """Frames that have arrived, oldest first, up to ``max_frames``; waits up to ``timeout``
        for the first one (by interrupt, or by polling memory). One RDT write per batch."""
        out = self._harvest(max_frames)
        if out or timeout <= 0:
            return out
        deadline = Deadline(timeout)
        quiet = Deadline(0.001)
        while not out and not deadline.expired:
            if self.irq is not None:
                self._wait_irq(min(0.05, deadline.remaining))
            else:
                time.sleep(IDLE_DOZE)
            out = self._harvest(max_frames)
            if not out and quiet.expired:
                # Restate the tail: QEMU may hold frames it queued while it thought the
                # ring full until the tail is written again.
                self.restate_rx_tail()
                quiet = Deadline(0.001)
        return out

    def _harvest(self, max_frames: int) -> list[bytes]:
        assert self.rx_bufs is not None, "a NIC with a packet pool receives with recv_buffers"
        ring, bufs, n = self.rx_ring.view, self.rx_bufs.view, self.rx_n
        out: list[bytes] = []
        i = self.rx_next
        while len(out) < max_frames:
            d = i * DESC_SIZE
            status = ring[d + _RX_STA]
            if not status & RX_DD:
                break
            size = ring[d + _RX_LEN] | ring[d + _RX_LEN + 1] << 8
            if status & RX_EOP:                             # 2048-byte buffers: a frame fits one
                out.append(bytes(bufs[i * BUFFER_SIZE:i * BUFFER_SIZE + size]))
            ring[d + _RX_STA] = 0
            i = (i + 1) % n
        if i != self.rx_next:
            self.rx_next = i
            self._post_rx_tail()                            # the descriptors back to the NIC
        return out

    def recv_buffers(self, max_frames: int = 256) -> Frames:
        """Forwarding: frames that have arrived, in the pool's buffers, now the caller's (to
        :meth:`send_buffers` elsewhere, or ``pool.give``); each descriptor gets a fresh buffer
        from the pool. When the pool is empty the rest stay in the ring until buffers come
        back (the NIC counts what it then misses).

        The refilled descriptors go back to the NIC (RDT) once a ``1 / RX_TAIL_LAG`` of the
        ring has gathered, not after every batch: each tail write is a request the proxy
        serves and often a wake-up of the guest, and the NIC has the rest of the ring
        meanwhile (a ring it finds full was harvested past the lag, so the write comes)."""
        pool, ring, first, n = self.pool, self.rx_ring.view, self.rx_next, self.rx_n
        assert pool is not None, "recv_buffers is for a NIC opened with a packet pool"
        if not ring[first * DESC_SIZE + _RX_STA] & RX_DD:
            return Frames([], [])
        statuses = _statuses(ring, first, min(max_frames, n - 1), n, _RX_STA)
        fresh = pool.take(_written_back(statuses))
        count = len(fresh)
        if not count:
            return Frames([], [])
        q, h, held = self._rx_q, self._rx_h, self.rx_held
        addresses: list[int] = []
        lengths: list[int] = []
        at = 0
        for a, e in _runs(first, count, n):
            addresses += held[a:e]
            lengths += h[a * _H_STRIDE + _RX_LEN_H:e * _H_STRIDE:_H_STRIDE].tolist()
            held[a:e] = fresh[at:at + e - a]
            q[a * _Q_STRIDE:e * _Q_STRIDE:_Q_STRIDE] = array("Q", fresh[at:at + e - a])
            ring[a * DESC_SIZE + _RX_STA:e * DESC_SIZE:DESC_SIZE] = bytes(e - a)    # not done
            at += e - a
        self.rx_next = (first + count) % n
        self.rx_untold += count
        if self.rx_untold >= n // RX_TAIL_LAG:               # the descriptors back to the NIC
            self.rx_untold = 0
            self._post_rx_tail()
        if statuses[:count].translate(_NOT_EOP).find(1) >= 0:
            return self._whole_frames(addresses, lengths, statuses[:count])
        return Frames(addresses, lengths)

    def _whole_frames(self, addresses: list[int], lengths: list[int], statuses: bytes) -> Frames:
        """Only the buffers that end a frame (EOP); the others back to the pool. With
        2048-byte buffers and long frames off, QEMU never splits a frame: this is for a NIC
        that does."""
        assert self.pool is not None
        kept = Frames([], [])
        for phys, length, status in zip(addresses, lengths, statuses):
            if status & RX_EOP:
                kept.addresses.append(phys)
                kept.lengths.append(length)
            else:
                self.pool.give([phys])
        return kept

    def restate_rx_tail(self) -> None:
        """Tell the NIC every descriptor up to the one before ``rx_next`` is its to fill; written
        again when idle, because QEMU may hold frames it queued while it thought the ring full
        until the tail is written again."""
        self.rx_untold = 0
        self.dev.channel.execute(self._rx_tail_flushed())

    def _post_rx_tail(self) -> None:
        """:meth:`restate_rx_tail`, posted (the hot path): nobody waits for it; a failure is
        raised by the channel's next waited request."""
        self.dev.channel.post(self._rx_tail_flushed())

    def _rx_tail_flushed(self) -> list[Access]:
        """RDT, then a read of STATUS in the same batch: the e1000 "write flush". PCI writes
        are posted, and QEMU under KVM batches writes to most e1000 registers (coalesced
        MMIO; RDT among them) until the next access that exits, so without the read the
        NIC may not see the new tail at all."""
        return [Access(Kind.WRITE, Space.MMIO, self._rdt_at, 4, (self.rx_next - 1) % self.rx_n),
                Access(Kind.READ, Space.MMIO, self._status_at, 4)]

    def _wait_irq(self, timeout: float) -> None:
        assert self.irq is not None
        try:
            self.irq.wait(timeout)
        except InterruptTimeout:
            return
        self.regs.read32(Reg.ICR)                           # reading ICR lowers the line
        self.irq.ack()

    def close(self) -> None:
        """Stop the NIC and give back its memory."""
        try:
            self._stop()
        finally:
            if self.irq is not None:
                self.irq.close()
            for buf in (self.rx_ring, self.tx_ring, self.rx_bufs, self.tx_bufs):
                if buf is not None:
                    self.dev.dma_free(buf)
            if self.pool is not None:               # the buffers its descriptors held
                self.pool.give([*self.rx_held, *(p for p in self.tx_held if p)])
            self.dev.close()
