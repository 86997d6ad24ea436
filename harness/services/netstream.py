"""A steady stream of numbered UDP datagrams to an echo service, and an account of what came back.

The stream is the host's side of a service that may go away and come back (a driver
restarted under it): it keeps sending at its own pace whatever happens, and afterwards
says which datagrams came back, which did not (as runs: the gaps), and whether any came
back twice or changed. It judges by sequence numbers, never by time; the times are for
people to read.

Every payload starts with its sequence number (8 bytes, big-endian), then bytes from a
seeded generator, of a length that varies from datagram to datagram (a short one makes
an Ethernet frame that needs padding, a long one fills the MTU). An echo counts only if
it is byte for byte what was sent.
"""

from __future__ import annotations

import logging
import random
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..access import Deadline
from .netstack import NetError

log = logging.getLogger(__name__)

SEQ = struct.Struct(">Q")       # the sequence number that leads every payload
MAX_PAYLOAD = 1472              # a 1500-byte IP MTU less the IP and UDP headers: no fragments
RECEIVE_BUFFER = 8 << 20        # room for the burst of echoes a service sends when it catches up
SO_RCVBUFFORCE = 33             # Linux: SO_RCVBUF past net.core.rmem_max, for a privileged process


def udp_socket(host: str = "127.0.0.1", buffer: int = RECEIVE_BUFFER) -> socket.socket:
    """A UDP socket bound on ``host`` whose receive buffer holds ``buffer`` bytes (past the
    system's cap where the process may: a burst of frames must not be dropped here)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer)
    except PermissionError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    s.bind((host, 0))
    return s


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port on ``host`` that was free when asked (whoever binds it next gets it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def udp_forward(host_port: int, guest: str = "10.0.2.15", guest_port: int = 7, host: str = "127.0.0.1") -> str:
    """A user netdev's ``hostfwd`` rule that forwards ``host:host_port`` to the guest's echo port."""
    return f"udp:{host}:{host_port}-{guest}:{guest_port}"


@dataclass(frozen=True)
class Gap:
    """A run of consecutive sequence numbers that never came back, and when (seconds after
    the stream started) the first and the last of them were sent."""

    first: int
    last: int
    start: float
    end: float

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class StreamReport:
    sent: int
    echoed: int                 # sequence numbers that came back exact (once each)
    lost: int                   # sent and never came back: the sum of the gaps
    gaps: tuple[Gap, ...]
    duplicates: int             # echoes of a sequence number that had already come back
    corrupted: int              # echoes that matched no datagram sent, byte for byte
    reordered: int              # echoes that arrived after one with a higher number
    rtt_median: float | None    # s, over the datagrams that came back
    rtt_max: float | None

    def lost_numbers(self) -> list[int]:
        return [n for g in self.gaps for n in range(g.first, g.last + 1)]


class UdpEchoStream:
    """Numbered datagrams from a loopback socket to ``host:host_port``, one every
    ``interval`` seconds, from a thread; another thread takes the echoes.

    ``with UdpEchoStream(port) as stream: ...`` starts and stops it; ``stream.stop()``
    returns the :class:`StreamReport`. ``count`` stops sending after that many.
    Payloads are ``sizes[0]`` to ``sizes[1]`` bytes, from ``seed``.

    ``window`` paces the stream by the service as well: no datagram goes out while that
    many have gone out since the newest one that came back. A service slower than the
    stream then never has more than ``window`` waiting for it anywhere on the way, so
    none is dropped for want of room (a stream into a service that is down stalls).
    """

    def __init__(self, host_port: int, interval: float = 0.002, count: int | None = None,
                 sizes: tuple[int, int] = (SEQ.size, MAX_PAYLOAD), seed: int | None = None,
                 window: int | None = None, host: str = "127.0.0.1") -> None:
        if not SEQ.size <= sizes[0] <= sizes[1] <= MAX_PAYLOAD:
            raise ValueError(f"payload sizes are {SEQ.size} to {MAX_PAYLOAD} bytes, not {sizes}")
        if window is not None and window < 1:
            raise ValueError(f"a window is at least one datagram, not {window}")
        self.peer = (host, host_port)
        self.interval, self.count, self.sizes, self.window = interval, count, sizes, window
        self.seed = random.randrange(2**32) if seed is None else seed
        self._rng = random.Random(self.seed)
        self._sock = udp_socket(host)
        self._sock.settimeout(0.05)             # how often the receiver looks at the stop flag
        self._lock = threading.Condition()
        self._payloads: list[bytes] = []
        self._sent_at: list[float] = []
        self._echoed_at: list[float | None] = []
        self._echoed = self._duplicates = self._corrupted = self._reordered = 0
        self._highest = -1                      # the highest number that has come back
        self._error: OSError | None = None     # what stopped a thread early
        self._sending = threading.Event()
        self._receiving = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0
        self._report: StreamReport | None = None

    # ---- progress, for a caller that waits on it ----

    @property
    def sent(self) -> int:
        """How many have been sent: the next sequence number."""
        with self._lock:
            return len(self._payloads)

    @property
    def echoed(self) -> int:
        with self._lock:
            return self._echoed

    @property
    def highest_echoed(self) -> int:
        """The highest sequence number that has come back (-1: none yet)."""
        with self._lock:
            return self._highest

    def wait_until(self, condition: Callable[["UdpEchoStream"], bool], timeout: float, what: str) -> None:
        """Wait (up to ``timeout``) until ``condition(stream)`` holds; NetError, with the
        stream's figures, if it does not."""
        deadline = Deadline(timeout)
        with self._lock:
            while not condition(self):
                if deadline.expired:
                    raise NetError(f"the stream to {self.peer[0]}:{self.peer[1]}: no {what} within {timeout:g} s "
                                   f"({len(self._payloads)} sent, {self._echoed} echoed)")
                self._lock.wait(min(0.05, deadline.remaining))

    # ---- lifetime ----

    def start(self) -> "UdpEchoStream":
        self._t0 = time.perf_counter()
        self._sending.set()
        self._receiving.set()
        self._threads = [threading.Thread(target=self._send_loop, name="udp-stream-send", daemon=True),
                         threading.Thread(target=self._receive_loop, name="udp-stream-receive", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, drain: float = 2.0) -> StreamReport:
        """Stop sending; wait for the echoes still on their way, until all are back or
        ``drain`` seconds pass without one; close the socket; the report."""
        if self._report is not None:
            return self._report
        if not self._threads:
            raise NetError("the stream was never started")
        self._sending.clear()
        self._threads[0].join()
        with self._lock:
            quiet_since = time.perf_counter()
            while self._echoed < len(self._payloads):
                seen = self._echoed
                self._lock.wait(0.05)
                if self._echoed != seen:
                    quiet_since = time.perf_counter()
                elif time.perf_counter() - quiet_since > drain:
                    break
        self._receiving.clear()
        self._threads[1].join()
        self._sock.close()
        if self._error is not None:
            raise NetError(f"the stream to {self.peer[0]}:{self.peer[1]} broke: {self._error}") from self._error
        self._report = self.report()
        log.info("stream to port %d: %s", self.peer[1], self._report)
        return self._report

    def __enter__(self) -> "UdpEchoStream":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ---- the two threads ----

    def _send_loop(self) -> None:
        """One datagram per interval. When it falls behind (a busy host) it does not
        catch up in a burst: the pace stays what was asked for, or slower."""
        due = time.perf_counter()
        while self._sending.is_set() and (self.count is None or len(self._payloads) < self.count):
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            due = max(due, time.perf_counter() - self.interval) + self.interval
            with self._lock:
                while (self.window is not None and len(self._payloads) - 1 - self._highest >= self.window
                       and self._sending.is_set()):
                    self._lock.wait(0.05)
                if not self._sending.is_set():
                    return
                seq = len(self._payloads)
                payload = SEQ.pack(seq) + self._rng.randbytes(self._rng.randint(*self.sizes) - SEQ.size)
                self._payloads.append(payload)
                self._sent_at.append(time.perf_counter() - self._t0)
                self._echoed_at.append(None)
                self._lock.notify_all()
            try:
                self._sock.sendto(payload, self.peer)
            except OSError as exc:              # stop() raises it: a thread has no one else to tell
                self._error = exc
                return

    def _receive_loop(self) -> None:
        while self._receiving.is_set():
            try:
                data, source = self._sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                self._error = exc
                return
            if source != self.peer:
                continue                        # not from the service (nothing else knows this port)
            arrived = time.perf_counter() - self._t0
            with self._lock:
                self._account(data, arrived)
                self._lock.notify_all()

    def _account(self, data: bytes, arrived: float) -> None:
        seq = SEQ.unpack_from(data)[0] if len(data) >= SEQ.size else -1
        if not 0 <= seq < len(self._payloads) or data != self._payloads[seq]:
            self._corrupted += 1
            log.debug("corrupted echo: %d bytes, %s", len(data), data[:16].hex())
            return
        if self._echoed_at[seq] is not None:
            self._duplicates += 1
            return
        self._echoed_at[seq] = arrived
        self._echoed += 1
        if seq < self._highest:
            self._reordered += 1
        self._highest = max(self._highest, seq)

    # ---- the account ----

    def report(self) -> StreamReport:
        """What has happened so far; a datagram still on its way counts as lost until it is back."""
        with self._lock:
            gaps: list[Gap] = []
            rtts = []
            for seq, (sent, back) in enumerate(zip(self._sent_at, self._echoed_at)):
                if back is not None:
                    rtts.append(back - sent)
                elif gaps and gaps[-1].last == seq - 1:
                    gaps[-1] = Gap(gaps[-1].first, seq, gaps[-1].start, sent)
                else:
                    gaps.append(Gap(seq, seq, sent, sent))
            return StreamReport(sent=len(self._payloads), echoed=self._echoed, lost=sum(g.count for g in gaps),
                                gaps=tuple(gaps), duplicates=self._duplicates, corrupted=self._corrupted,
                                reordered=self._reordered,
                                rtt_median=statistics.median(rtts) if rtts else None,
                                rtt_max=max(rtts) if rtts else None)
