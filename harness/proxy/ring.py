"""One request ring of a shared window, as the host drives it (abi.h: ``struct proxy_ring``).

The host writes entries from ``head`` on and publishes them with one 8-byte
store into the first (:meth:`Ring.publication`: its lap's mark and how many
entries), then kicks the guest if it sleeps; the guest, watching the next entry,
serves what is published in order, writes status, value and TSC back into each,
and moves ``served``. Both counters run modulo 2**32: entry ``seq`` lives in slot
``seq % size``. A request so moves one cache line each way, its entry's.

A channel (:class:`~harness.proxy.channel.ProxyChannel`) drives its ring;
tests may read it, and publish entries without waiting (to catch the guest
mid-batch).
"""

from __future__ import annotations

from ..errors import AbiError
from .window import SPIN_SECONDS, SharedWindow

REQUEST_FIELDS = ["op", "width", "status", "timeout_us", "addr", "value", "mask", "expect"]


def reached(served: int, end: int) -> bool:
    """Whether the guest's count of entries served has reached ``end``: both count modulo
    2**32, and later batches may have taken ``served`` past ``end`` (never by half of that)."""
    return (served - end) & 0xFFFFFFFF < 0x80000000


class Ring:
    """Ring ``index`` of ``window``: ``size`` entries, the host's ``head``, the guest's ``served``."""

    def __init__(self, window: SharedWindow, index: int) -> None:
        abi = window.abi
        self.window = window
        self.index = index
        self.size = abi.PROXY_RING_ENTRIES
        self.mask = self.size - 1
        self.entry_size = abi.sizeof("proxy_request")
        ring = window.rings_off + index * window.ring_size
        self.entries_off = ring + abi.offsetof("proxy_ring", "entries")
        self.served_idx = (ring + abi.offsetof("proxy_ring", "served")) // 4
        self.idle_spin_idx = (ring + abi.offsetof("proxy_ring", "idle_spin_us")) // 4
        self.fenced = False     # fence each post before looking whether the guest sleeps (window.py)
        self.status_off = abi.offsetof("proxy_request", "status")
        self.value_off = abi.offsetof("proxy_request", "value")
        self.start_tsc_off = abi.offsetof("proxy_request", "start_tsc")
        self.published_off = abi.offsetof("proxy_request", "published")
        self.first_off = abi.offsetof("proxy_request", REQUEST_FIELDS[0])
        self.pack = abi.packer("proxy_request", REQUEST_FIELDS).pack_into
        # The hot path leaves mask and expect alone: only polls read them.
        self.pack_short = abi.packer("proxy_request", REQUEST_FIELDS[:6]).pack_into
        if self.entries_off % 8 or self.entry_size % 8 or self.status_off % 2 or self.value_off % 8 \
                or self.published_off % 8 or abi.offsetof("proxy_request", "count") != self.published_off + 4:
            raise AbiError("ring entries are not laid out as the host writes them: aligned words, "
                           "published then count in one")
        # for publication_at(seq) and publication(seq, count), which the hot path
        # (ProxyChannel._one) inlines
        self.published_base = (self.entries_off + self.published_off) // 8
        self.published_stride = self.entry_size // 8
        self.lap_shift = self.size.bit_length() - 1
        # The next entry the host publishes: where the guest left the ring (it skipped what
        # a last owner published and it never served when the channel opened).
        self.head = window.u32[self.served_idx]

    def __repr__(self) -> str:
        return f"<Ring {self.index} head {self.head} served {self.served}>"

    def offset(self, seq: int) -> int:
        """Where entry ``seq`` starts in the window."""
        return self.entries_off + (seq & self.mask) * self.entry_size

    def write(self, seq: int, *fields: int) -> None:
        """Fill entry ``seq`` with a request (REQUEST_FIELDS, in order), its ``start_tsc`` zeroed
        (:meth:`taken_up`); nothing is published."""
        self.pack(self.window.mem, self.offset(seq), *fields)
        self.window.u64[(self.offset(seq) + self.start_tsc_off) >> 3] = 0

    def publication_at(self, seq: int) -> int:
        """Where entry ``seq``'s publication word is, as an index of the window's 64-bit words."""
        return self.published_base + (seq & self.mask) * self.published_stride

    def publication(self, seq: int, count: int) -> int:
        """The 8-byte word that publishes ``count`` entries from ``seq`` on (abi.h): the NOT of
        ``seq``'s lap of the ring, then the count."""
        return ~(seq >> self.lap_shift) & 0xFFFFFFFF | count << 32

    def publish(self, count: int) -> int:
        """Hand the ``count`` entries from ``head`` on to the guest, without waiting; returns
        the new head, which ``served`` reaches once the guest has served them all."""
        w, first = self.window, self.head
        w.u64[self.publication_at(first)] = self.publication(first, count)
        head = self.head = (first + count) & 0xFFFFFFFF
        if self.fenced:
            w.fence()
        w.kick_if_sleeping()
        return head

    def wait(self, head: int, timeout: float, what: object, spin: float = SPIN_SECONDS) -> None:
        """Wait until the guest has served up to ``head``; ProxyUnresponsive after ``timeout``."""
        u32, served = self.window.u32, self.served_idx
        if u32[served] != head:
            self.window.wait(lambda: u32[served] == head, timeout, what, self.index, spin=spin)

    def wait_past(self, end: int, timeout: float, what: object, spin: float = SPIN_SECONDS) -> None:
        """Wait until the guest has served every entry before ``end``, which later batches may
        follow (so ``served`` may be past it: counted modulo 2**32)."""
        u32, served = self.window.u32, self.served_idx
        if not reached(u32[served], end):
            self.window.wait(lambda: reached(u32[served], end), timeout, what, self.index, spin=spin)

    @property
    def served(self) -> int:
        """The guest's count of entries served."""
        return int(self.window.u32[self.served_idx])

    def taken_up(self, seq: int) -> bool:
        """Whether the guest has begun entry ``seq`` (it stamps ``start_tsc`` first), for an
        entry whose ``start_tsc`` was zeroed before it was published."""
        return self.start_tsc(seq) != 0

    def status(self, seq: int) -> int:
        """Entry ``seq``'s status (``enum proxy_status``; PENDING until served)."""
        return int(self.window.u16[(self.offset(seq) + self.status_off) >> 1])

    def value(self, seq: int) -> int:
        """Entry ``seq``'s value: what was read, once served."""
        return int(self.window.u64[(self.offset(seq) + self.value_off) >> 3])

    def start_tsc(self, seq: int) -> int:
        """The guest's TSC just before it carried entry ``seq`` out."""
        return int(self.window.u64[(self.offset(seq) + self.start_tsc_off) >> 3])
