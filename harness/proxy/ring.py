"""One request ring of a shared window, as the host drives it (abi.h: ``struct proxy_ring``).

The host writes entries from ``head`` on and publishes them by moving the
ring's ``submit`` to the new head (then flags the ring posted, and kicks the
guest if it sleeps); the guest serves every entry up to it, writes status,
value and TSC back into each, and moves ``served``. Both counters run modulo
2**32: entry ``seq`` lives in slot ``seq % size``.

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
        self.submit_idx = (ring + abi.offsetof("proxy_ring", "submit")) // 4
        self.served_idx = (ring + abi.offsetof("proxy_ring", "served")) // 4
        self.idle_spin_idx = (ring + abi.offsetof("proxy_ring", "idle_spin_us")) // 4
        self.fenced = False     # fence each post before looking whether the guest sleeps (window.py)
        self.posted_off = abi.offsetof("proxy_shared", "ring_posted") + index   # set after each move of submit
        self.status_off = abi.offsetof("proxy_request", "status")
        self.value_off = abi.offsetof("proxy_request", "value")
        self.start_tsc_off = abi.offsetof("proxy_request", "start_tsc")
        self.first_off = abi.offsetof("proxy_request", REQUEST_FIELDS[0])
        self.pack = abi.packer("proxy_request", REQUEST_FIELDS).pack_into
        # The hot path leaves mask and expect alone: only polls read them.
        self.pack_short = abi.packer("proxy_request", REQUEST_FIELDS[:6]).pack_into
        if self.entries_off % 8 or self.entry_size % 8 or self.status_off % 2 or self.value_off % 8:
            raise AbiError("ring entries are not naturally aligned; the host reads them as words")
        self.head = window.u32[self.submit_idx]     # the next entry the host publishes

    def __repr__(self) -> str:
        return f"<Ring {self.index} head {self.head} served {self.served}>"

    def offset(self, seq: int) -> int:
        """Where entry ``seq`` starts in the window."""
        return self.entries_off + (seq & self.mask) * self.entry_size

    def write(self, seq: int, *fields: int) -> None:
        """Fill entry ``seq`` with a request (REQUEST_FIELDS, in order); nothing is published."""
        self.pack(self.window.mem, self.offset(seq), *fields)

    def publish(self, count: int) -> int:
        """Hand the ``count`` entries from ``head`` on to the guest, without waiting; returns
        the new head, which ``served`` reaches once the guest has served them all."""
        w = self.window
        head = self.head = (self.head + count) & 0xFFFFFFFF
        w.u32[self.submit_idx] = head
        w.mem[self.posted_off] = 1
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

    @property
    def posted(self) -> bool:
        """Whether the guest has yet to take up what was last published (it clears the flag first)."""
        return bool(self.window.mem[self.posted_off])

    def status(self, seq: int) -> int:
        """Entry ``seq``'s status (``enum proxy_status``; PENDING until served)."""
        return int(self.window.u16[(self.offset(seq) + self.status_off) >> 1])

    def value(self, seq: int) -> int:
        """Entry ``seq``'s value: what was read, once served."""
        return int(self.window.u64[(self.offset(seq) + self.value_off) >> 3])

    def start_tsc(self, seq: int) -> int:
        """The guest's TSC just before it carried entry ``seq`` out."""
        return int(self.window.u64[(self.offset(seq) + self.start_tsc_off) >> 3])
