"""A block protocol: one process serves a disk, others read and write it, and they outlive the server.

The disk's driver runs in a process of its own that a supervisor may kill and
restart at any moment; clients in other processes keep their requests and
send again whatever the dead server had not answered. So that nothing a
client was told is lost, a write is acknowledged only once it is durable:
the server has written it and a flush has completed after it. The
supervisor keeps the listening socket across restarts, so a client's
reconnect waits in its backlog until the next server accepts it.

Wire format: a Unix stream socket (a path, or an abstract name starting with
``"\\0"``), fixed little-endian headers (``struct``), any number of
requests in flight on one connection, answered in any order by id.

Request (28 bytes, then ``count * sector_size`` bytes of data for WRITE)::

    u32 magic       REQUEST_MAGIC, b"HWBQ"
    u32 op          Op: READ 1, WRITE 2, FLUSH 3, INFO 4
    u64 id          the client's, echoed in the reply
    u64 lba         first sector (READ, WRITE; 0 for FLUSH and INFO)
    u32 count       sectors, 1 to MAX_REQUEST_BYTES / sector_size (READ, WRITE; 0 for FLUSH and INFO)

Reply (20 bytes, then ``length`` bytes)::

    u32 magic       REPLY_MAGIC, b"HWBR"
    u32 status      Status: OK 0, else why the request was refused or failed
    u64 id          the request's
    u32 length      of what follows: READ's data; INFO's u32 sector size, u64 size
                    in bytes, u32 largest request in bytes; an error's reason
                    (UTF-8); nothing for WRITE and FLUSH

The server checks every request before anything moves. A well-framed request
that asks for the impossible (a count of 0, sectors past the end) gets an
error reply and the connection goes on. A header that leaves the framing in
doubt (a wrong magic, an unknown op, a count over the cap, whose data the
server will not read) gets an error reply and then the connection is closed:
what follows is garbage. Other connections see nothing of it.

Group commit: each turn of the server's loop gathers the complete requests of
every connection, runs them (writes as one ``write_many`` batch where the
backend has it, split where two overlap so that they land in the order they
arrived), then flushes once, then answers them all, reads too: so a read never
returns what a write not yet durable put there. One flush serves every write of
the turn, which is what makes many clients' small writes fast.

Errors (all :class:`~harness.errors.HarnessError`)::

    BlockError          the server answered a request with an error status;
                        names the request (op, lba, count), the status and why
    BlockUnreachable    nothing listened at the address for reconnect_timeout
    BlockTimeout        a connection took no reply for the client's timeout
    BlockProtocolError  the server's replies make no sense (a bug, not a crash)
"""

from __future__ import annotations

import bisect
import enum
import errno
import logging
import selectors
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..access import Deadline
from ..devices.block import BlockDevice
from ..errors import HarnessError

log = logging.getLogger(__name__)


REQUEST = struct.Struct("<IIQQI")       # magic, op, id, lba, count
REPLY = struct.Struct("<IIQI")          # magic, status, id, length
INFO = struct.Struct("<IQI")            # sector size, size in bytes, largest request in bytes
REQUEST_MAGIC = int.from_bytes(b"HWBQ", "little")
REPLY_MAGIC = int.from_bytes(b"HWBR", "little")
MAX_REQUEST_BYTES = 1 << 20             # the data of one READ or WRITE
MAX_REASON = 1024                       # an error reply's text

# The server's turn: at most this much work before it answers, beats and looks again.
TURN_REQUESTS = 512
TURN_BYTES = 8 << 20
TICK = 0.05                             # the longest the loop waits without calling beat()
# A connection whose unread input or unsent replies pass this is not read until they drain,
# so a client that never reads cannot make the server's memory grow.
CONNECTION_BUFFER = 4 << 20
RECV_SIZE = 256 << 10


class Op(enum.IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3
    INFO = 4


OPS = frozenset(op.value for op in Op)


class Status(enum.IntEnum):
    OK = 0
    BAD_MAGIC = 1           # not a request header: the connection is closed after the reply
    BAD_OP = 2              # an unknown op: closed after the reply
    BAD_COUNT = 3           # READ or WRITE of 0 sectors, or (closed after the reply) over the cap
    BAD_ARGUMENT = 4        # FLUSH or INFO with a nonzero lba or count
    OUT_OF_RANGE = 5        # sectors past the end of the disk
    IO_ERROR = 6            # the device failed the request (or the flush after it)


STATUSES = frozenset(status.value for status in Status)


class BlockError(HarnessError):
    """The server answered a request with an error: nothing of it was done (or, IO_ERROR,
    the device failed it). Not retried: the same request would fail the same way."""

    def __init__(self, op: Op, lba: int, count: int, status: int, reason: str) -> None:
        self.op, self.lba, self.count, self.status, self.reason = op, lba, count, status, reason
        name = Status(status).name if status in STATUSES else f"status {status}"
        super().__init__(f"{op.name} lba {lba} count {count}: {name}: {reason}")


class BlockUnreachable(HarnessError):
    """Nothing listened at ``address`` (no socket, or refused) for ``timeout`` seconds."""

    def __init__(self, address: str, timeout: float, last: BaseException | None) -> None:
        self.address, self.timeout = address, timeout
        super().__init__(f"no block server at {address!r} within {timeout} s (last: {last})")


class BlockTimeout(HarnessError):
    """A connected server sent nothing for ``timeout`` seconds while requests waited."""


class BlockProtocolError(HarnessError):
    """The server's reply stream is malformed: a wrong magic, an id never sent, a wrong length."""


class _Spans:
    """Disjoint, sorted sector ranges [start, end): what a segment of a turn has touched."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i and self.ends[i - 1] > start:
            return True
        return i < len(self.starts) and self.starts[i] < end

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.ends, start)         # the first span that ends at or after start
        j = bisect.bisect_right(self.starts, end)        # past the last span that starts at or before end
        if i < j:                                        # they touch or overlap: merge them
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [start], [end]


# ---- the server ----


@dataclass
class _Request:
    connection: "_Connection"
    op: int
    id: int
    lba: int
    count: int
    data: bytes = b""
    status: int = Status.OK
    reply: bytes = b""          # READ's data, INFO's fields, or an error's reason

    def fail(self, status: Status, reason: str) -> None:
        self.status, self.reply = status, reason.encode()[:MAX_REASON]


class _Connection:
    """One client's socket and buffers. ``closing``: answer what was read, then close."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.name = f"connection {number}"
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.closing = False
        self.open = True
        self.events = 0                 # what the selector watches for

    def wanted(self) -> int:
        events = selectors.EVENT_WRITE if self.outbox else 0
        if not self.closing and len(self.inbox) < CONNECTION_BUFFER and len(self.outbox) < CONNECTION_BUFFER:
            events |= selectors.EVENT_READ
        return events


class BlockServer:
    """Serves ``device`` to every client of ``listener`` (bound and listening; the caller's,
    never closed here), one thread, many connections, group commit.

    ``device`` has ``sector_size``, ``size`` (bytes), ``read(lba, count)``, ``write(lba, data)``,
    ``flush()``, and may have ``write_many([(lba, data), ...])``, a batch whose items never
    overlap (the server splits a turn's writes where they do), to issue together.
    ``beat()``, if given, is called on every turn of the loop, at least every ``TICK`` seconds
    while the device is idle: a liveness heartbeat for a supervisor.
    The device's exceptions of ``request_errors`` fail the request they came from (IO_ERROR);
    any other escapes, and ends the server (its clients will send again to the next one).
    ``accepted`` and ``flushes`` count connections and flushes.
    """

    def __init__(self, device: BlockDevice, listener: socket.socket,
                 beat: Callable[[], None] | None = None,
                 request_errors: tuple[type[BaseException], ...] = (OSError,)) -> None:
        self.device = device
        self.listener = listener
        self.beat = beat
        self.request_errors = request_errors
        self.sector_size = device.sector_size
        self.sectors = device.size // device.sector_size
        self.max_count = MAX_REQUEST_BYTES // self.sector_size
        self.info = INFO.pack(self.sector_size, device.size, self.max_count * self.sector_size)
        self.write_many: Callable[[list[tuple[int, bytes]]], None] | None = getattr(device, "write_many", None)
        self.connections: list[_Connection] = []
        self.accepted = 0
        self.flushes = 0
        self._next_first = 0            # whose requests come first in a turn: turns rotate
        self._selector: selectors.BaseSelector | None = None

    def serve_forever(self) -> None:
        """Serve until the process is killed (or the device raises an error not in request_errors)."""
        self.serve(lambda: False)

    def serve(self, until: Callable[[], bool]) -> None:
        """Serve until ``until()`` is true (asked every turn); then close the client connections
        (their clients will reconnect) and leave the listener open."""
        self.listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        try:
            while not until():
                if self.beat is not None:
                    self.beat()
                self._turn()
        finally:
            for connection in list(self.connections):
                self._close(connection)
            self._selector.close()
            self._selector = None

    def _turn(self) -> None:
        ready = any(self._has_request(c) for c in self.connections)   # then look, but do not wait
        assert self._selector is not None
        for key, events in self._selector.select(0 if ready else TICK):
            if key.fileobj is self.listener:
                self._accept()
                continue
            connection: _Connection = key.data
            if events & selectors.EVENT_READ:
                self._receive(connection)
            if events & selectors.EVENT_WRITE and connection.open:
                self._send(connection)
        batch = self._gather()
        if batch:
            self._run(batch)
            for request in batch:
                if request.connection.open:
                    request.connection.outbox += REPLY.pack(REPLY_MAGIC, request.status, request.id,
                                                            len(request.reply)) + request.reply
        for connection in list(self.connections):
            if connection.outbox:
                self._send(connection)
            if connection.open:
                if connection.closing and not connection.outbox:
                    self._close(connection)
                else:
                    self._watch(connection)

    # -- sockets --

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # e.g. out of descriptors: try again next turn
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            self.accepted += 1
            connection = _Connection(sock, self.accepted)
            self.connections.append(connection)
            assert self._selector is not None
            connection.events = selectors.EVENT_READ
            self._selector.register(sock, connection.events, connection)
            log.debug("%s accepted", connection.name)

    def _watch(self, connection: _Connection) -> None:
        wanted = connection.wanted()
        if wanted != connection.events:
            assert self._selector is not None
            if connection.events and wanted:
                self._selector.modify(connection.sock, wanted, connection)
            elif wanted:
                self._selector.register(connection.sock, wanted, connection)
            else:
                self._selector.unregister(connection.sock)
            connection.events = wanted

    def _receive(self, connection: _Connection) -> None:
        while len(connection.inbox) < CONNECTION_BUFFER:
            try:
                data = connection.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("%s: %s", connection.name, exc)
                self._close(connection)
                return
            if not data:            # the client is gone; what it sent unanswered may be dropped
                self._close(connection)
                return
            connection.inbox += data

    def _send(self, connection: _Connection) -> None:
        while connection.outbox:
            try:
                sent = connection.sock.send(connection.outbox, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("%s: %s", connection.name, exc)
                self._close(connection)
                return
            del connection.outbox[:sent]

    def _close(self, connection: _Connection) -> None:
        if connection.open:
            connection.open = False
            self.connections.remove(connection)
            if connection.events:
                assert self._selector is not None
                self._selector.unregister(connection.sock)
            connection.sock.close()
            log.debug("%s closed", connection.name)

    # -- requests --

    def _has_request(self, connection: _Connection) -> bool:
        """A whole request (or a header to refuse) waits in the connection's inbox."""
        if connection.closing or len(connection.inbox) < REQUEST.size or len(connection.outbox) >= CONNECTION_BUFFER:
            return False
        magic, op, _, _, count = REQUEST.unpack_from(connection.inbox)
        if magic != REQUEST_MAGIC or op != Op.WRITE or not 0 < count <= self.max_count:
            return True
        needed: int = REQUEST.size + count * self.sector_size
        return len(connection.inbox) >= needed

    def _gather(self) -> list[_Request]:
        """This turn's requests, checked, each connection's in the order they came."""
        batch: list[_Request] = []
        size = 0
        if not self.connections:
            return batch
        first = self._next_first % len(self.connections)
        self._next_first += 1
        for connection in self.connections[first:] + self.connections[:first]:
            while len(batch) < TURN_REQUESTS and size < TURN_BYTES and self._has_request(connection):
                request = self._parse(connection)
                size += len(request.data) + (request.count * self.sector_size if request.op == Op.READ else 0)
                batch.append(request)
                if not connection.closing:
                    del connection.inbox[:REQUEST.size + len(request.data)]
        return batch

    def _parse(self, connection: _Connection) -> _Request:
        """The request at the front of the inbox (whole, or a header to refuse), checked."""
        inbox = connection.inbox
        magic, op, id_, lba, count = REQUEST.unpack_from(inbox)
        request = _Request(connection, op, id_, lba, count)
        if magic != REQUEST_MAGIC:
            request.fail(Status.BAD_MAGIC, f"magic {magic:#010x}, not {REQUEST_MAGIC:#010x}")
        elif op not in OPS:
            request.fail(Status.BAD_OP, f"op {op} is not one of {[o.value for o in Op]}")
        elif op in (Op.READ, Op.WRITE) and count > self.max_count:
            request.fail(Status.BAD_COUNT, f"{count} sectors is over the cap of {self.max_count} a request")
        if request.status != Status.OK:     # the framing is in doubt: answer, then hang up
            log.info("%s: %s; closing it", connection.name, request.reply.decode())
            connection.closing = True
            inbox.clear()
            return request
        if op == Op.WRITE:
            request.data = bytes(inbox[REQUEST.size:REQUEST.size + count * self.sector_size])
        if op in (Op.READ, Op.WRITE):
            if count == 0:
                request.fail(Status.BAD_COUNT, "a request of 0 sectors")
            elif lba + count > self.sectors:
                request.fail(Status.OUT_OF_RANGE, f"sectors {lba}..{lba + count - 1} are not on a disk of {self.sectors}")
        elif lba or count:
            request.fail(Status.BAD_ARGUMENT, f"{Op(op).name} takes lba 0 and count 0, not {lba} and {count}")
        return request

    def _run(self, batch: list[_Request]) -> None:
        """Carry out a turn: segments in order, each of requests that do not overlap a write
        of the same segment, so a segment's writes may go as one batch; then one flush for all."""
        segment: list[_Request] = []
        written, read = _Spans(), _Spans()
        wrote, flush_wanted = False, False
        for request in batch:
            if request.status != Status.OK:
                continue
            if request.op == Op.INFO:
                request.reply = self.info
                continue
            if request.op == Op.FLUSH:
                flush_wanted = True
                continue
            start, end = request.lba, request.lba + request.count
            clash = written.overlaps(start, end) or (request.op == Op.WRITE and read.overlaps(start, end))
            if clash:
                wrote |= self._run_segment(segment)
                segment, written, read = [], _Spans(), _Spans()
            segment.append(request)
            (written if request.op == Op.WRITE else read).add(start, end)
        wrote |= self._run_segment(segment)
        if wrote or flush_wanted:
            try:
                self.device.flush()
                self.flushes += 1
            except self.request_errors as exc:
                for request in batch:
                    if request.status == Status.OK and request.op in (Op.WRITE, Op.FLUSH):
                        request.fail(Status.IO_ERROR, f"the flush after it failed: {exc}")

    def _run_segment(self, segment: list[_Request]) -> bool:
        """Reads and writes that do not overlap any write among them; True if anything was written."""
        if not segment:
            return False
        if self.beat is not None:           # a long turn still beats, between its segments
            self.beat()
        writes = [r for r in segment if r.op == Op.WRITE]
        if writes and self.write_many is not None:
            try:
                self.write_many([(r.lba, r.data) for r in writes])
                writes = []
            except self.request_errors as exc:      # which failed? each alone again (a rewrite is harmless)
                log.info("a batch of %d writes failed (%s); writing each alone", len(writes), exc)
        for request in writes:
            try:
                self.device.write(request.lba, request.data)
            except self.request_errors as exc:
                request.fail(Status.IO_ERROR, str(exc))
        for request in segment:
            if request.op == Op.READ:
                try:
                    request.reply = self.device.read(request.lba, request.count)
                except self.request_errors as exc:
                    request.fail(Status.IO_ERROR, str(exc))
        return any(r.op == Op.WRITE and r.status == Status.OK for r in segment)


# ---- the client ----


@dataclass
class _Sent:
    op: Op
    lba: int
    count: int
    frame: bytes                # header and data: kept until answered, to send again after a reconnect


# What a dead server looks like from the client: the connection ends, is reset, or is refused.
_GONE = (ConnectionError, FileNotFoundError)
_GONE_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE, errno.ENOENT, errno.ECONNABORTED}


class _Disconnected(Exception):
    """The server closed the connection (EOF)."""


class BlockClient:
    """A block device served by a :class:`BlockServer` at ``address`` (a Unix socket path, or
    an abstract name starting with ``"\\0"``): ``read``, ``write``, ``flush``, ``size``,
    ``sector_size``, so :class:`harness.devices.block.BlockFile` and pyfatfs work on it.

    ``write`` returns once the server says the data are durable (written and flushed).
    Several requests may be in flight (``write_async``/``read_async`` and ``wait``,
    ``write_many(items, window)``). When the server goes away (EOF, ECONNRESET,
    ECONNREFUSED, EPIPE) the client connects again, retrying for up to
    ``reconnect_timeout`` seconds (then :class:`BlockUnreachable`), and sends again every
    request not yet answered, in the order they were first sent; ``reconnects`` and
    ``resent`` count that. An error reply raises :class:`BlockError` and is not retried.
    ``timeout``: the longest a live connection may leave requests unanswered with nothing
    received (:class:`BlockTimeout`). One thread at a time.
    """

    def __init__(self, address: str, reconnect_timeout: float = 30.0, timeout: float = 60.0) -> None:
        self.address = address
        self.reconnect_timeout = reconnect_timeout
        self.timeout = timeout
        self.reconnects = 0
        self.resent = 0
        self.closed = False
        self._sock: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._next_id = 1
        self._sent: dict[int, _Sent] = {}                  # in the order first sent
        self._done: dict[int, bytes | BlockError] = {}
        self.sector_size = self.size = self.max_bytes = self.max_count = 0     # until INFO answers
        try:
            self._connect()
            (info,) = self.wait([self._submit(Op.INFO, 0, 0)])
        except BaseException:
            self.close()
            raise
        self.sector_size, self.size, self.max_bytes = INFO.unpack(info)
        self.max_count = self.max_bytes // self.sector_size

    def __enter__(self) -> "BlockClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hang up; requests not yet answered are forgotten (their writes may or may not land)."""
        self._hang_up()
        self._selector.close()
        self.closed = True

    # -- the block device --

    def read(self, lba: int, count: int) -> bytes:
        """``count`` sectors from ``lba`` (in requests of up to ``max_count`` sectors, all in flight)."""
        return b"".join(self.wait([self.read_async(start, n) for start, n in self._pieces(lba, count)]))

    def write(self, lba: int, data: bytes) -> None:
        """Whole sectors at ``lba``; returns once they are durable."""
        self.write_many([(lba, data)])

    def flush(self) -> None:
        """A flush on the server. Every acknowledged write is durable already; this is a barrier
        for callers who expect one (BlockFile.flush)."""
        self.wait([self._submit(Op.FLUSH, 0, 0)])

    # -- pipelining --

    def read_async(self, lba: int, count: int) -> int:
        """Send a READ of at most ``max_count`` sectors; its data come from ``wait``."""
        if count > self.max_count:
            raise ValueError(f"{count} sectors is more than one request carries ({self.max_count}); read() splits it")
        return self._submit(Op.READ, lba, count)

    def write_async(self, lba: int, data: bytes) -> int:
        """Send a WRITE of whole sectors, at most ``max_bytes``; ``wait`` returns once it is durable."""
        if not data or len(data) % self.sector_size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.sector_size}-byte sectors")
        if len(data) > self.max_bytes:
            raise ValueError(f"{len(data)} bytes is more than one request carries ({self.max_bytes}); "
                             f"write() and write_many() split it")
        return self._submit(Op.WRITE, lba, len(data) // self.sector_size, data)

    def wait(self, ids: Sequence[int]) -> list[bytes]:
        """Wait until every request of ``ids`` is answered; their data (READ, INFO; b"" for the
        others) in the order of ``ids``. If any failed, the first of them raises BlockError
        (after all were answered)."""
        missing = set(ids) - self._done.keys() - self._sent.keys()
        if missing:
            raise ValueError(f"requests {sorted(missing)} were not sent, or were waited for already")
        self._pump(lambda: all(i in self._done for i in ids))
        results = [self._done.pop(i) for i in ids]
        for result in results:
            if isinstance(result, BlockError):
                raise result
        return results  # type: ignore[return-value]

    def write_many(self, items: Iterable[tuple[int, bytes]], window: int = 32) -> None:
        """Write every (lba, data), keeping up to ``window`` requests in flight; returns once all
        are durable. Items may overlap: later ones land last. On an error reply, no further
        item is sent, those in flight are waited for, and the first error is raised."""
        in_flight: deque[int] = deque()
        error: BlockError | None = None
        for lba, data in items:
            if len(data) % self.sector_size or not data:
                raise ValueError(f"{len(data)} bytes is not a whole number of {self.sector_size}-byte sectors")
            for start, n in self._pieces(lba, len(data) // self.sector_size):
                if error is not None:
                    break
                offset = (start - lba) * self.sector_size
                in_flight.append(self._submit(Op.WRITE, start, n, data[offset:offset + n * self.sector_size]))
                while len(in_flight) >= max(1, window) and error is None:
                    error = self._settle(in_flight.popleft())
            if error is not None:
                break
        while in_flight:
            error = self._settle(in_flight.popleft()) or error
        if error is not None:
            raise error

    def _settle(self, id_: int) -> BlockError | None:
        try:
            self.wait([id_])
        except BlockError as exc:
            return exc
        return None

    def _pieces(self, lba: int, count: int) -> list[tuple[int, int]]:
        """(lba, count) in requests the server takes; a count of 0 goes as it is, to be refused."""
        return [(lba + i, min(self.max_count, count - i)) for i in range(0, count, self.max_count)] or [(lba, count)]

    # -- the wire --

    def _submit(self, op: Op, lba: int, count: int, data: bytes = b"") -> int:
        if self.closed:
            raise ValueError(f"the client of {self.address!r} is closed")
        id_ = self._next_id
        self._next_id += 1
        frame = REQUEST.pack(REQUEST_MAGIC, op, id_, lba, count) + data
        self._sent[id_] = _Sent(op, lba, count, frame)
        self._outbox += frame
        self._exchange(0)               # under way at once, without waiting
        return id_

    def _pump(self, finished: Callable[[], bool]) -> None:
        """Send and receive until ``finished()``, through any number of reconnects."""
        deadline = Deadline(self.timeout)
        while not finished():
            if self._exchange(min(deadline.remaining, TICK)):
                deadline = Deadline(self.timeout)
            elif deadline.expired:
                oldest = next(iter(self._sent.values()))
                raise BlockTimeout(f"{self.address!r}: nothing received for {self.timeout} s with "
                                   f"{len(self._sent)} requests unanswered, the oldest "
                                   f"{oldest.op.name} lba {oldest.lba} count {oldest.count}")

    def _exchange(self, timeout: float) -> bool:
        """One look at the socket: send what it takes, take what came. True if anything moved;
        a lost connection is replaced (and counts as moving)."""
        if self._sock is None:
            self._reconnect()
            return True
        sock = self._sock
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbox else 0)
        self._selector.modify(sock, events)
        moved = False
        try:
            for _, ready in self._selector.select(timeout):
                if ready & selectors.EVENT_WRITE:
                    sent = sock.send(self._outbox, socket.MSG_NOSIGNAL)
                    del self._outbox[:sent]
                    moved = True
                if ready & selectors.EVENT_READ:
                    data = sock.recv(RECV_SIZE)
                    if not data:
                        raise _Disconnected("the server closed the connection")
                    self._inbox += data
                    self._take_replies()
                    moved = True
        except (BlockingIOError, InterruptedError):
            pass
        except _Disconnected as exc:
            self._lost(exc)
            return True
        except OSError as exc:
            if not isinstance(exc, _GONE) and exc.errno not in _GONE_ERRNOS:
                raise
            self._lost(exc)
            return True
        return moved

    def _take_replies(self) -> None:
        inbox = self._inbox
        while len(inbox) >= REPLY.size:
            magic, status, id_, length = REPLY.unpack_from(inbox)
            if magic != REPLY_MAGIC:
                raise BlockProtocolError(f"{self.address!r}: reply magic {magic:#010x}, not {REPLY_MAGIC:#010x}")
            sent = self._sent.get(id_)
            if sent is None:
                raise BlockProtocolError(f"{self.address!r}: a reply to request {id_}, which is not waiting")
            if status == Status.OK:
                expected = {Op.READ: sent.count * self.sector_size, Op.INFO: INFO.size}.get(sent.op, 0)
            else:
                expected = min(length, MAX_REASON)
            if length != expected:
                raise BlockProtocolError(f"{self.address!r}: a reply of {length} bytes to "
                                         f"{sent.op.name} lba {sent.lba} count {sent.count}, not {expected}")
            if len(inbox) < REPLY.size + length:
                return
            payload = bytes(inbox[REPLY.size:REPLY.size + length])
            del inbox[:REPLY.size + length]
            del self._sent[id_]
            self._done[id_] = payload if status == Status.OK else BlockError(
                sent.op, sent.lba, sent.count, status, payload.decode("utf-8", "replace"))

    def _lost(self, why: BaseException) -> None:
        log.info("%s: connection lost (%s); %d requests to send again", self.address, why, len(self._sent))
        self._hang_up()
        self._reconnect()

    def _hang_up(self) -> None:
        if self._sock is not None:
            self._selector.unregister(self._sock)
            self._sock.close()
            self._sock = None

    def _connect(self) -> None:
        """Connect, retrying with a growing pause while nobody listens, for reconnect_timeout."""
        deadline = Deadline(self.reconnect_timeout)
        pause = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(deadline.remaining, 0.001))     # a full backlog makes connect wait
            try:
                sock.connect(self.address)
                break
            except OSError as exc:
                sock.close()
                if not isinstance(exc, (*_GONE, TimeoutError)) and exc.errno not in _GONE_ERRNOS | {errno.EAGAIN}:
                    raise
                if deadline.expired:
                    raise BlockUnreachable(self.address, self.reconnect_timeout, exc) from exc
                time.sleep(min(pause, deadline.remaining))
                pause = min(2 * pause, 0.25)
        sock.setblocking(False)
        self._sock = sock
        self._selector.register(sock, selectors.EVENT_READ)

    def _reconnect(self) -> None:
        """A new connection, and every unanswered request on it again, oldest first."""
        self._connect()
        self.reconnects += 1
        self.resent += len(self._sent)
        self._inbox.clear()
        self._outbox = bytearray(b"".join(sent.frame for sent in self._sent.values()))
