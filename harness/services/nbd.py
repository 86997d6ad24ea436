"""The project's block protocol: NBD, served in front of any :class:`~harness.devices.block.BlockDevice`,
and a Python client that is one; both outlive the server process.

The disk's driver runs in a process of its own that a supervisor may kill and
restart at any moment. The supervisor keeps the listening socket across
restarts, so a client's reconnect waits in its backlog until the next server
accepts it; clients send again whatever the dead server had not answered
(QEMU's NBD client does with ``reconnect-delay``, and so does :class:`NbdClient`).

The protocol is the NBD specification's (doc/proto.md of NetworkBlockDevice/nbd),
the subset every client needs:

- fixed newstyle negotiation with ``NBD_FLAG_NO_ZEROES``; options ``GO``, ``INFO``
  (``NBD_INFO_EXPORT``, and always ``NBD_INFO_BLOCK_SIZE``: minimum the device's
  sector, preferred 4096, maximum ``MAX_PAYLOAD``), ``LIST``, ``ABORT``,
  ``EXPORT_NAME``; every other option is answered ``NBD_REP_ERR_UNSUP``
  (structured replies and TLS among them: simple replies are what every client
  takes, and a read's error is known before its header is sent);
- commands READ, WRITE (with FUA), FLUSH, TRIM (only where the device has it),
  WRITE_ZEROES (with NO_HOLE, which changes nothing here), DISC.

Checks, before anything moves; the request is answered with the error and the
connection and the device go on: an unknown command, a flag not valid for the
command -> EINVAL; WRITE, TRIM or WRITE_ZEROES on a read-only export -> EPERM;
READ or WRITE longer than ``MAX_PAYLOAD`` -> EOVERFLOW (a WRITE's payload is read
and dropped; one over ``DISCARD_LIMIT`` ends the connection, as the spec allows
for a length that large); offset or length not a multiple of the sector, or a
length of 0 -> EINVAL; past the end -> ENOSPC for WRITE and WRITE_ZEROES, EINVAL
for READ and TRIM; the device failing it -> EIO. A request header with a wrong
magic leaves the framing in doubt: that connection is closed, no other notices.

Group commit: each turn of the server's loop gathers the complete requests of
every connection, runs them (writes as one ``write_many`` batch and reads as one
``read_many`` batch where the device has them, so a device with a command queue
works on them all at once; split where a write overlaps another request so that
they land in the order they arrived),
then, if the turn holds a FLUSH or a request with FUA, flushes the device once.
Replies go in the order the requests came, each as soon as it and every one before
it is final: a READ straight from the DMA memory its batch was read into (one
sendmsg per connection, before the next batch reuses that memory), a FLUSH or a FUA
request only after the turn's flush, the rest at the end of the turn. So a plain
WRITE is acknowledged once the device has completed it (it may still sit in the
device's volatile cache, which NBD allows), a FUA write or a FLUSH only once a
device flush after it has completed.

Read-ahead: a client that reads one request at a time, each where the last ended,
gets the data past its read read ahead while it takes the reply (``READ_AHEAD``),
and its next reads answered from there without a device command. What was read
ahead is one range in the device's DMA memory; a write, TRIM or WRITE_ZEROES that
overlaps it drops it before it runs, and so does any read it does not hold (the
device's read reuses that memory).

``NBD_FLAG_CAN_MULTI_CONN`` is advertised because it is true of this design: the
server caches no writes and answers a write only after the device completed it, so
every write acknowledged on any connection before a FLUSH arrives is in the one
device whose flush (AHCI FLUSH CACHE EXT, NVMe Flush) makes it durable; the same
holds across a driver restart, because completed writes live in the device, not
in the dead process. The one read-ahead range is the server's, whatever the
connection, and dropped by any write over it, so no connection reads stale data.

Errors (all :class:`~harness.errors.HarnessError`)::

    NbdError            the server answered a request with an error; names the request
                        (command, offset, length) and the error
    NbdRefused          the server refused the export during negotiation
    NbdUnreachable      nothing listened at the address for reconnect_timeout
    NbdTimeout          a connection took no reply for the client's timeout
    NbdProtocolError    the server's replies make no sense (a bug, not a crash)
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
from typing import Callable, Iterable, Iterator, Sequence, TypeVar, Union

from ..access import Deadline, spin_until
from ..devices.block import BlockDevice
from ..errors import HarnessError

log = logging.getLogger(__name__)

# ---- the wire (doc/proto.md), big-endian ----

NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

GREETING = struct.Struct(">QQH")        # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")          # IHAVEOPT, option, length of its data
OPTION_REPLY = struct.Struct(">QIII")   # magic, option, reply type, length of its data
EXPORT_NAME_REPLY = struct.Struct(">QH")    # size, transmission flags (then 124 zeroes unless NO_ZEROES)
INFO_EXPORT = struct.Struct(">HQH")     # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")    # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")      # magic, command flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")    # magic, error, handle

MAX_PAYLOAD = 1 << 20                   # the largest READ or WRITE: the advertised maximum block size
PREFERRED_BLOCK = 4096
DISCARD_LIMIT = 1 << 25                 # an oversized WRITE's payload up to this is read and dropped
MAX_OPTION = 64 << 10                   # an option's data: a name is at most 4096 bytes


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    INFO = 6
    GO = 7


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = (1 << 31) + 1
    ERR_INVALID = (1 << 31) + 3
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    BLOCK_SIZE = 3


class Flag(enum.IntFlag):
    """Transmission flags."""
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    CAN_MULTI_CONN = 1 << 8


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1


class Errno(enum.IntEnum):
    """The error values the protocol defines (their Linux errno numbers)."""
    OK = 0
    EPERM = errno.EPERM
    EIO = errno.EIO
    EINVAL = errno.EINVAL
    ENOSPC = errno.ENOSPC
    EOVERFLOW = errno.EOVERFLOW


COMMANDS = frozenset(c.value for c in Cmd)
# Which command flags each command takes; FUA is valid on every command once SEND_FUA is advertised.
VALID_FLAGS = {Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE}
WRITING = frozenset((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
FUA = int(CmdFlag.FUA)                  # a plain int: an IntFlag's & runs in Python, on every request

# The server's turn: at most this much work before it answers, beats and looks again.
TURN_REQUESTS = 512
TURN_BYTES = 8 << 20
TICK = 0.05                             # the longest the loop waits without calling beat()
# After it answers, the server looks for its clients' next request this long (yielding the
# core each time) before it sleeps in the kernel: a client that sends one request at a time
# (a Linux machine's QD1 reads) finds it up instead of paying its wake-up. A Linux client's
# 4 KiB QD1 reads through the NVMe export (ioeventfds), three alternated rounds: 2,374 IOPS
# without, 2,812 with 0.2 ms, 2,943 with 0.5 ms, 2,751 with 2 ms (the spin then takes the
# core the client's side wants). The disk service asks the proxy guest for no spin after its
# requests (Channel.guest_spin = 0), so this is the one spinner on the server's side.
ANSWERED_SPIN = 0.5e-3
# The most device work between two beats in a turn: also the most one read_many or write_many
# call is given, so it bounds the DMA memory a device stages a batch in.
BEAT_BYTES = 4 << 20
# A client that sends one READ at a time, each where the last ended (a Linux machine's
# O_DIRECT sequential reads), would wait a device command for every request: once such a
# read is answered the server reads this much (or two of its reads, if more) past it in one
# batch while the client takes the reply, and answers the next reads from there (_ReadAhead).
READ_AHEAD = 1 << 20
# A connection whose unread input or unsent replies pass this is not read until they drain,
# so a client that never reads cannot make the server's memory grow.
CONNECTION_BUFFER = 4 << 20
RECV_SIZE = 256 << 10
# A connection's kernel send buffer: a whole MAX_PAYLOAD reply (and more) goes in one sendmsg
# straight from the device's DMA memory, instead of the rest being copied to the outbox.
SEND_BUFFER = 4 << 20
IOV_MAX = 1024                          # buffers one sendmsg takes (Linux's UIO_MAXIOV)
_Item = TypeVar("_Item")


class NbdError(HarnessError):
    """The server answered a request with an error: nothing of it was done (or, EIO, the
    device failed it). Not retried: the same request would fail the same way."""

    def __init__(self, cmd: Cmd, offset: int, length: int, error: int) -> None:
        self.cmd, self.offset, self.length, self.error = cmd, offset, length, error
        name = Errno(error).name if error in Errno.__members__.values() else f"error {error}"
        super().__init__(f"{cmd.name} offset {offset} length {length}: {name}")


class NbdRefused(HarnessError):
    """The server answered the export's NBD_OPT_GO with an error reply."""

    def __init__(self, address: object, export: str, reply: int, message: str) -> None:
        self.address, self.export, self.reply = address, export, reply
        name = Rep(reply).name if reply in Rep.__members__.values() else f"reply {reply:#x}"
        super().__init__(f"{address!r} refused export {export!r}: {name} {message}")


class NbdUnreachable(HarnessError):
    """Nothing served NBD at ``address`` (no socket, refused, no greeting) for ``timeout`` seconds."""

    def __init__(self, address: object, timeout: float, last: BaseException | None) -> None:
        self.address, self.timeout = address, timeout
        super().__init__(f"no NBD server at {address!r} within {timeout} s (last: {last})")


class NbdTimeout(HarnessError):
    """A connected server sent nothing for ``timeout`` seconds while requests waited."""


class NbdProtocolError(HarnessError):
    """The server's reply stream is malformed: a wrong magic, a handle never sent, a bad negotiation."""


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


class _ReadAhead:
    """What the server read ahead of a sequential reader: bytes [start, end) of the export in
    ``view``, the device's DMA memory as ``read_many`` returned it (valid until its next call:
    the server drops this before any)."""

    def __init__(self) -> None:
        self.start = self.end = 0
        self.view: memoryview | None = None
        self.reader: object = None  # the connection of the last read served
        self.read_end = -1          # where it ended
        self.stride = 0             # its length if it began where the one before it, on its connection, ended; else 0

    def saw(self, connection: object, offset: int, length: int) -> None:
        """A read served. A reader of its own: reads on several connections (nbdcopy's) do not follow each other."""
        self.stride = length if connection is self.reader and offset == self.read_end else 0
        self.reader, self.read_end = connection, offset + length

    def take(self, offset: int, length: int) -> memoryview | None:
        """A read's data, if all of it is held."""
        if self.view is None or offset < self.start or offset + length > self.end:
            return None
        return self.view[offset - self.start:offset - self.start + length]

    def overlaps(self, start: int, end: int) -> bool:
        return self.view is not None and start < self.end and self.start < end

    def hold(self, start: int, view: memoryview) -> None:
        self.start, self.end, self.view = start, start + len(view), view

    def drop(self) -> None:
        self.start = self.end = 0
        self.view = None

    def wanted(self, size: int) -> tuple[int, int] | None:
        """(offset, length) to read ahead now, or None: the reader is sequential and what is
        held does not hold its next read (so nothing is read twice while it would do)."""
        if not self.stride or (self.view is not None and self.end - self.read_end >= self.stride):
            return None
        length = min(max(READ_AHEAD, 2 * self.stride), BEAT_BYTES, size - self.read_end)
        return (self.read_end, length) if length > 0 else None


# ---- the server ----


@dataclass
class _Request:
    connection: "_Connection"
    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    data: bytes = b""
    error: int = Errno.OK
    reply: bytes = b""          # READ's data, when not answered straight from the device's memory
    done: bool = False          # carried out (the turn's flush apart)
    answered: bool = False      # its reply is sent (or queued in the outbox)

    @property
    def final(self) -> bool:
        """Its reply is known before the turn ends: it is done or failed, and waits for no flush."""
        return (self.done or self.error != Errno.OK) and self.cmd != Cmd.FLUSH and not self.flags & FUA

    def fail(self, error: Errno, why: str) -> None:
        self.error = error
        log.debug("%s: %s offset %d length %d: %s (%s)", self.connection.name, self.cmd, self.offset,
                  self.length, error.name, why)


class _Phase(enum.Enum):
    CLIENT_FLAGS = 1
    OPTIONS = 2
    TRANSMISSION = 3


class _Connection:
    """One client's socket and buffers. ``closing``: answer what was read, then close;
    ``skip``: payload bytes still to drop (an oversized option's or WRITE's)."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.name = f"connection {number}"
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.phase = _Phase.CLIENT_FLAGS
        self.no_zeroes = False
        self.skip = 0
        self.closing = False
        self.open = True
        self.events = 0                 # what the selector watches for

    def wanted(self) -> int:
        events = selectors.EVENT_WRITE if self.outbox else 0
        if not self.closing and len(self.inbox) < CONNECTION_BUFFER and len(self.outbox) < CONNECTION_BUFFER:
            events |= selectors.EVENT_READ
        return events

    def hang_up(self, why: str) -> None:
        """The framing is in doubt: nothing more is read; what is queued is sent, then it closes."""
        log.info("%s: %s; closing it", self.name, why)
        self.closing = True
        self.inbox.clear()


class NbdServer:
    """Serves ``device`` as one NBD export (named ``name``; the default export ``""`` too) to
    every client of ``listener`` (bound and listening; the caller's, never closed here),
    one thread, many connections, group commit (see the module's docstring).

    ``device`` is a :class:`~harness.devices.block.BlockDevice` and may have
    ``write_many([(lba, data), ...])``, a batch whose items never overlap (the server splits
    a turn's writes where they do), to issue together; ``read_many([(lba, count), ...])``,
    a batch of reads (at most ``BEAT_BYTES`` in all) to issue together, whose data it
    returns as buffers valid until its next call (views of its DMA memory: the server sends
    each reply from there, copying only what a socket does not take at once);
    and ``trim(lba, count)`` (then TRIM is advertised). ``beat()``, if given, is called
    on every turn of the loop, at least every ``TICK`` seconds while the device is idle: a
    liveness heartbeat for a supervisor. The device's exceptions of ``request_errors``
    fail the request they came from (EIO); any other escapes and ends the server (its
    clients will send again to the next one). ``accepted`` and ``flushes`` count connections and device flushes.
    ``mark(phase)``, if given, is told "accepted" and "transmission" when the first
    connection gets there: where a restarted server's first milliseconds go.
    """

    def __init__(self, device: BlockDevice, listener: socket.socket,
                 beat: Callable[[], None] | None = None,
                 request_errors: tuple[type[BaseException], ...] = (OSError,),
                 read_only: bool = False, name: str = "", mark: Callable[[str], None] | None = None) -> None:
        self.device = device
        self.mark = mark
        self.listener = listener
        self.beat = beat
        self.request_errors = request_errors
        self.read_only = read_only
        self.name = name
        self.sector_size = device.sector_size
        self.size = device.size
        self.write_many: Callable[[list[tuple[int, bytes]]], None] | None = getattr(device, "write_many", None)
        self.read_many: Callable[[list[tuple[int, int]]], Sequence[bytes | memoryview]] | None = getattr(
            device, "read_many", None)
        self.trim: Callable[[int, int], None] | None = getattr(device, "trim", None)
        flags = Flag.HAS_FLAGS | Flag.SEND_FLUSH | Flag.CAN_MULTI_CONN
        if read_only:
            flags |= Flag.READ_ONLY
        else:
            flags |= Flag.SEND_FUA | Flag.SEND_WRITE_ZEROES | (Flag.SEND_TRIM if self.trim else 0)
        self.flags = flags
        self.block_size = (self.sector_size, max(PREFERRED_BLOCK, self.sector_size), MAX_PAYLOAD)
        self.zeroes = bytes(MAX_PAYLOAD)
        self.connections: list[_Connection] = []
        self.accepted = 0
        self.flushes = 0
        self._next_first = 0            # whose requests come first in a turn: turns rotate
        self._batch: list[_Request] = []    # the turn's requests, answered in this order
        self._unanswered = 0                # the first of them not answered yet
        self._selector: selectors.BaseSelector | None = None
        self._answered_at = 0.0             # when the last turn's answers went out
        self._ahead = _ReadAhead()

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
                self._beat()
                self._turn()
        finally:
            for connection in list(self.connections):
                self._close(connection)
            self._selector.close()
            self._selector = None

    def _turn(self) -> None:
        ready = any(self._has_request(c) for c in self.connections)   # then look, but do not wait
        for key, events in self._events(ready):
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
            self._batch, self._unanswered = batch, 0
            self._run(batch)
            left = batch[self._unanswered:]
            self._answer(left, [request.reply for request in left])
            self._batch = []
            self._answered_at = time.perf_counter()
        for connection in list(self.connections):
            if connection.outbox:
                self._send(connection)
            if connection.open:
                if connection.closing and not connection.outbox:
                    self._close(connection)
                else:
                    self._watch(connection)
        if batch and self.read_many is not None:
            self._read_ahead(batch)

    def _read_ahead(self, batch: list[_Request]) -> None:
        """After a turn whose one read went on from where the last one ended: the data past it,
        read while the client takes the reply (see READ_AHEAD). A failure of the request's kind
        is the next read's to meet, so it is only logged; any other ends the server, as it would
        on a read asked for (the supervisor starts the next). The look for the next request
        (ANSWERED_SPIN) starts after it."""
        reads = [r for r in batch if r.cmd == Cmd.READ and not r.error]
        for request in reads:
            self._ahead.saw(request.connection, request.offset, request.length)
        wanted = self._ahead.wanted(self.size) if len(reads) == 1 else None
        if wanted is None:
            return
        assert self.read_many is not None
        offset, length = wanted
        self._ahead.drop()
        self._beat()
        try:
            self._ahead.hold(offset, self.read_many([(offset // self.sector_size, length // self.sector_size)])[0])
        except self.request_errors as exc:
            log.info("reading %d bytes ahead at %d failed (%s)", length, offset, exc)
        self._answered_at = time.perf_counter()

    def _events(self, ready: bool) -> list[tuple[selectors.SelectorKey, int]]:
        """What the sockets have: a look if requests are already waiting, else a wait of up to
        TICK, spun rather than slept right after an answer (ANSWERED_SPIN)."""
        selector = self._selector
        assert selector is not None
        found: list[tuple[selectors.SelectorKey, int]] = []

        def look() -> bool:
            found[:] = selector.select(0)
            return bool(found)
        if look() or ready:
            return found
        spin = self._answered_at + ANSWERED_SPIN - time.perf_counter()
        if spin > 0 and spin_until(look, spin):
            return found
        return selector.select(TICK)

    def _watch(self, connection: _Connection) -> None:
        assert self._selector is not None
        events = connection.wanted()
        if events != connection.events:
            if connection.events == 0:
                self._selector.register(connection.sock, events, connection)
            elif events == 0:
                self._selector.unregister(connection.sock)
            else:
                self._selector.modify(connection.sock, events, connection)
            connection.events = events

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:                 # capped (net.core.wmem_max) or refused: replies queue in the outbox
            pass
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Each reply is one sendmsg: Nagle would hold a short one (a WRITE's) back until the
            # client ACKs the last, which its delayed ACK may put off for tens of ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted += 1
        if self.accepted == 1 and self.mark is not None:
            self.mark("accepted")
        connection = _Connection(sock, self.accepted)
        connection.outbox += GREETING.pack(NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        self.connections.append(connection)
        log.debug("%s accepted", connection.name)
        self._watch(connection)

    def _receive(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("%s: %s", connection.name, exc)
            data = b""
        if not data:                    # the client hung up: what it sent and is whole still runs
            connection.closing = True
            if not self._has_request(connection):
                self._close(connection)
            return
        if connection.skip:
            dropped = min(connection.skip, len(data))
            connection.skip -= dropped
            data = data[dropped:]
        connection.inbox += data
        if connection.phase != _Phase.TRANSMISSION:
            self._negotiate(connection)

    def _sent(self, connection: _Connection, send: Callable[[], int]) -> int | None:
        """The bytes ``send()`` put on ``connection``'s socket: 0 where it would block; None
        once an error closed the connection."""
        try:
            return send()
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            log.info("%s: %s", connection.name, exc)
            self._close(connection)
            return None

    def _send(self, connection: _Connection) -> None:
        sent = self._sent(connection, lambda: connection.sock.send(connection.outbox, socket.MSG_NOSIGNAL))
        if sent:
            del connection.outbox[:sent]

    def _answer(self, requests: Sequence[_Request], payloads: Sequence[bytes | memoryview]) -> None:
        """Send each request's simple reply, its header and then its payload (a READ's data; empty
        else): straight from the payload's memory (a read's DMA memory: no copy in Python), one
        sendmsg per connection; what a socket does not take at once, and every reply behind bytes
        already waiting in a connection's outbox, is copied there, to go as the socket drains.
        A payload may be reused once this returns."""
        pending: dict[_Connection, list[bytes | memoryview]] = {}
        for request, payload in zip(requests, payloads):
            request.answered = True
            connection = request.connection
            if not connection.open:
                continue
            header = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, request.error, request.handle)
            if connection.outbox:
                connection.outbox += header
                connection.outbox += payload
            else:
                pending.setdefault(connection, []).extend((header, payload) if len(payload) else (header,))
        for connection, buffers in pending.items():
            self._send_buffers(connection, buffers)

    def _answer_ready(self, views: dict[int, memoryview]) -> None:
        """Answer the turn's requests, in the order they came, as far as each is final: a READ
        of ``views`` (by id) from its data there, before the device's next batch reuses it."""
        ready = []
        for request in self._batch[self._unanswered:]:
            if not request.final:
                break
            ready.append(request)
        self._unanswered += len(ready)
        self._answer(ready, [views.get(id(r), r.reply) for r in ready])

    def _send_buffers(self, connection: _Connection, buffers: list[bytes | memoryview]) -> None:
        """``buffers`` on ``connection``, whose outbox is empty: as much as the socket takes now,
        the rest copied into the outbox."""
        sent = 0
        for start in range(0, len(buffers), IOV_MAX):
            chunk = buffers[start:start + IOV_MAX]
            took = self._sent(connection, lambda: connection.sock.sendmsg(chunk, (), socket.MSG_NOSIGNAL))
            if took is None:
                return
            sent += took
            if took < sum(len(b) for b in chunk):
                break
        for buffer in buffers:
            if sent >= len(buffer):
                sent -= len(buffer)
                continue
            connection.outbox += buffer[sent:] if sent else buffer
            sent = 0

    def _close(self, connection: _Connection) -> None:
        if not connection.open:
            return
        connection.open = False
        if connection.events and self._selector is not None:
            self._selector.unregister(connection.sock)
        connection.sock.close()
        self.connections.remove(connection)
        log.debug("%s closed", connection.name)

    # -- negotiation --

    def _negotiate(self, connection: _Connection) -> None:
        """Everything of the handshake the inbox holds, answered at once (no device work)."""
        inbox = connection.inbox
        while not connection.closing and not connection.skip:
            if connection.phase == _Phase.CLIENT_FLAGS:
                if len(inbox) < CLIENT_FLAGS.size:
                    return
                (flags,) = CLIENT_FLAGS.unpack_from(inbox)
                del inbox[:CLIENT_FLAGS.size]
                if flags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                    connection.hang_up(f"unknown client flags {flags:#x}")
                    return
                connection.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
                connection.phase = _Phase.OPTIONS
            elif connection.phase == _Phase.OPTIONS:
                if len(inbox) < OPTION.size:
                    return
                magic, option, length = OPTION.unpack_from(inbox)
                if magic != IHAVEOPT:
                    connection.hang_up(f"option magic {magic:#x}, not IHAVEOPT")
                    return
                if length > MAX_OPTION:         # drop its data, refuse it
                    del inbox[:OPTION.size]
                    dropped = min(length, len(inbox))
                    del inbox[:dropped]
                    connection.skip = length - dropped
                    known = option in Opt.__members__.values()
                    self._option_reply(connection, option, Rep.ERR_TOO_BIG if known else Rep.ERR_UNSUP,
                                       f"{length} bytes of option data".encode())
                    continue
                if len(inbox) < OPTION.size + length:
                    return
                data = bytes(inbox[OPTION.size:OPTION.size + length])
                del inbox[:OPTION.size + length]
                self._option(connection, option, data)
            else:
                return

    def _option_reply(self, connection: _Connection, option: int, reply: Rep, data: bytes = b"") -> None:
        connection.outbox += OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data

    def _option(self, connection: _Connection, option: int, data: bytes) -> None:
        if option == Opt.EXPORT_NAME:
            if data.decode("utf-8", "replace") not in ("", self.name):
                connection.hang_up(f"NBD_OPT_EXPORT_NAME of an unknown export {data[:64]!r}")
                return
            connection.outbox += EXPORT_NAME_REPLY.pack(self.size, self.flags)
            if not connection.no_zeroes:
                connection.outbox += bytes(124)
            self._transmit(connection)
        elif option == Opt.ABORT:
            self._option_reply(connection, option, Rep.ACK)
            connection.closing = True
        elif option == Opt.LIST:
            if data:
                self._option_reply(connection, option, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return
            name = self.name.encode()
            self._option_reply(connection, option, Rep.SERVER, struct.pack(">I", len(name)) + name)
            self._option_reply(connection, option, Rep.ACK)
        elif option in (Opt.INFO, Opt.GO):
            self._info(connection, option, data)
        else:
            self._option_reply(connection, option, Rep.ERR_UNSUP)

    def _info(self, connection: _Connection, option: int, data: bytes) -> None:
        """NBD_OPT_INFO and NBD_OPT_GO: u32 name length, name, u16 count, count u16 info requests."""
        if len(data) < 6:
            self._option_reply(connection, option, Rep.ERR_INVALID, b"shorter than a name length and a count")
            return
        (name_length,) = struct.unpack_from(">I", data)
        if 4 + name_length + 2 > len(data):
            self._option_reply(connection, option, Rep.ERR_INVALID, b"the name runs past the option")
            return
        (count,) = struct.unpack_from(">H", data, 4 + name_length)
        if 4 + name_length + 2 + 2 * count != len(data):
            self._option_reply(connection, option, Rep.ERR_INVALID, b"the info requests do not fill the option")
            return
        name = data[4:4 + name_length].decode("utf-8", "replace")
        if name not in ("", self.name):
            self._option_reply(connection, option, Rep.ERR_UNKNOWN, f"no export {name!r}".encode()[:256])
            return
        # The export, and the block sizes whether asked for or not (the spec lets a server send
        # information not requested; a client that knows the minimum never sends less).
        self._option_reply(connection, option, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, self.size, self.flags))
        self._option_reply(connection, option, Rep.INFO, INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *self.block_size))
        self._option_reply(connection, option, Rep.ACK)
        if option == Opt.GO:
            self._transmit(connection)

    def _transmit(self, connection: _Connection) -> None:
        connection.phase = _Phase.TRANSMISSION
        if self.mark is not None and not any(c.phase == _Phase.TRANSMISSION for c in self.connections
                                             if c is not connection):
            self.mark("transmission")
        log.debug("%s: transmission", connection.name)

    # -- transmission --

    def _has_request(self, connection: _Connection) -> bool:
        """A whole request (or a header to refuse) waits in the inbox."""
        if not connection.open or connection.phase != _Phase.TRANSMISSION or len(connection.inbox) < REQUEST.size:
            return False
        magic, _, cmd, _, _, length = REQUEST.unpack_from(connection.inbox)
        if magic != REQUEST_MAGIC or cmd != Cmd.WRITE or length > MAX_PAYLOAD:
            return True
        return len(connection.inbox) >= REQUEST.size + length

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
                if request is None:
                    continue
                size += len(request.data) + (request.length if request.cmd == Cmd.READ else 0)
                batch.append(request)
        return batch

    def _parse(self, connection: _Connection) -> _Request | None:
        """Take the request at the front of the inbox and check it; None if there is nothing to answer."""
        inbox = connection.inbox
        magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(inbox)
        if magic != REQUEST_MAGIC:
            connection.hang_up(f"request magic {magic:#010x}, not {REQUEST_MAGIC:#010x}")
            return None
        request = _Request(connection, flags, cmd, handle, offset, length)
        taken = REQUEST.size
        if cmd == Cmd.WRITE:
            if length <= MAX_PAYLOAD:
                with memoryview(inbox) as view:     # one copy (a bytearray's slice would be a second)
                    request.data = bytes(view[REQUEST.size:REQUEST.size + length])
                taken += length
            else:                               # refused below; its payload is dropped as it comes
                dropped = min(length, len(inbox) - REQUEST.size)
                taken += dropped
                connection.skip = length - dropped
        del inbox[:taken]
        if cmd == Cmd.DISC:                     # no reply; what came before it is answered, then it closes
            connection.hang_up("NBD_CMD_DISC")
            return None
        self._check(request)
        if cmd == Cmd.WRITE and length > DISCARD_LIMIT:
            connection.hang_up(f"a WRITE of {length} bytes")
        return request

    def _check(self, request: _Request) -> None:
        cmd, flags, offset, length = request.cmd, request.flags, request.offset, request.length
        if cmd not in COMMANDS:
            return request.fail(Errno.EINVAL, f"unknown command {cmd}")
        cmd = request.cmd = Cmd(cmd)
        if flags & ~int(VALID_FLAGS.get(cmd, CmdFlag.FUA)):
            return request.fail(Errno.EINVAL, f"flags {flags:#x} on {cmd.name}")
        if cmd in WRITING and self.read_only:
            return request.fail(Errno.EPERM, "a read-only export")
        if cmd == Cmd.FLUSH:
            if offset or length:
                request.fail(Errno.EINVAL, "FLUSH takes offset 0 and length 0")
            return None
        if cmd == Cmd.TRIM and self.trim is None:
            return request.fail(Errno.EINVAL, "TRIM is not advertised: the device has none")
        if cmd in (Cmd.READ, Cmd.WRITE) and length > MAX_PAYLOAD:
            return request.fail(Errno.EOVERFLOW, f"over the maximum block size {MAX_PAYLOAD}")
        if length == 0 or offset % self.sector_size or length % self.sector_size:
            return request.fail(Errno.EINVAL, f"not whole {self.sector_size}-byte sectors")
        if offset + length > self.size:
            return request.fail(Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL,
                                f"past the end ({self.size} bytes)")
        return None

    def _run(self, batch: list[_Request]) -> None:
        """Carry out a turn: segments in order, each of requests that do not overlap a write of
        the same segment, so a segment's writes may go as one batch; then one flush if asked."""
        segment: list[_Request] = []
        written, read = _Spans(), _Spans()
        durable = False
        for request in batch:
            if request.error:
                continue
            durable |= bool(request.cmd == Cmd.FLUSH or request.flags & FUA)
            if request.cmd == Cmd.FLUSH:
                continue
            start, end = request.offset // self.sector_size, (request.offset + request.length) // self.sector_size
            writes = request.cmd in WRITING
            if written.overlaps(start, end) or (writes and read.overlaps(start, end)):
                self._run_segment(segment)
                segment, written, read = [], _Spans(), _Spans()
            segment.append(request)
            (written if writes else read).add(start, end)
        self._run_segment(segment)
        if durable:
            try:
                self.device.flush()
                self.flushes += 1
            except self.request_errors as exc:
                for request in batch:
                    if not request.error and (request.cmd == Cmd.FLUSH or request.flags & FUA):
                        request.fail(Errno.EIO, f"the flush after it failed: {exc}")

    def _pieces(self, request: _Request) -> list[tuple[int, bytes]]:
        """What a WRITE or WRITE_ZEROES puts on the device, as (lba, data) of at most MAX_PAYLOAD."""
        lba = request.offset // self.sector_size
        if request.cmd == Cmd.WRITE:
            return [(lba, request.data)]
        per = MAX_PAYLOAD // self.sector_size
        sectors = request.length // self.sector_size
        return [(lba + i, self.zeroes[:min(per, sectors - i) * self.sector_size]) for i in range(0, sectors, per)]

    def _run_segment(self, segment: list[_Request]) -> None:
        """Requests none of which overlaps a write among them; the loop beats between every
        BEAT_BYTES of device work, so a long turn on a slow device is not taken for a hang."""
        if not segment:
            return
        if any(r.cmd in WRITING and self._ahead.overlaps(r.offset, r.offset + r.length) for r in segment):
            self._ahead.drop()                      # what was read ahead there is about to change
        writes = [r for r in segment if r.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES)]
        if writes and self.write_many is not None:
            try:
                for group in _groups([piece for r in writes for piece in self._pieces(r)], lambda p: len(p[1])):
                    self._beat()
                    self.write_many(group)
                for request in writes:
                    request.done = True
                writes = []
            except self.request_errors as exc:      # which failed? each alone again (a rewrite is harmless)
                log.info("a batch of %d writes failed (%s); writing each alone", len(writes), exc)
        reads = [r for r in segment if r.cmd == Cmd.READ]
        if reads and self.read_many is not None:
            held = [(r, view) for r in reads if (view := self._ahead.take(r.offset, r.length)) is not None]
            if held:                                # answered from what was read ahead
                for request, _ in held:
                    request.done = True
                self._answer_ready({id(r): view for r, view in held})
                for request, view in held:
                    if not request.answered:        # the next read_many reuses that memory
                        request.reply = bytes(view)
                reads = [r for r in reads if not r.done]
            if reads:
                self._ahead.drop()
            try:
                for group in _groups(reads, lambda r: r.length):
                    self._beat()
                    data = self.read_many([(r.offset // self.sector_size, r.length // self.sector_size)
                                           for r in group])
                    for request in group:
                        request.done = True
                    self._answer_ready(dict(zip(map(id, group), data)))
                    for request, view in zip(group, data):
                        if not request.answered:        # behind one not final yet: its data kept
                            request.reply = bytes(view)
            except self.request_errors as exc:      # which failed? the unread each alone again
                log.info("a batch of %d reads failed (%s); reading each alone", len(reads), exc)
        for request in segment:
            if request.cmd == Cmd.READ and (request.answered or request.reply):
                continue
            try:
                if request in writes:
                    for lba, data in self._pieces(request):
                        self._beat()
                        self.device.write(lba, data)
                elif request.cmd == Cmd.TRIM:
                    assert self.trim is not None
                    self._beat()
                    self.trim(request.offset // self.sector_size, request.length // self.sector_size)
                elif request.cmd == Cmd.READ:
                    self._beat()
                    request.reply = self.device.read(request.offset // self.sector_size,
                                                     request.length // self.sector_size)
                request.done = True
            except self.request_errors as exc:
                request.fail(Errno.EIO, str(exc))

    def _beat(self) -> None:
        if self.beat is not None:
            self.beat()


def _groups(items: list[_Item], size: Callable[[_Item], int]) -> Iterator[list[_Item]]:
    """``items`` in order, in groups of at most ``BEAT_BYTES`` (an item larger goes alone)."""
    group: list[_Item] = []
    total = 0
    for item in items:
        if group and total + size(item) > BEAT_BYTES:
            yield group
            group, total = [], 0
        group.append(item)
        total += size(item)
    if group:
        yield group


# ---- the client ----


@dataclass
class _Sent:
    cmd: Cmd
    offset: int
    length: int
    frame: bytes                # header and data: kept until answered, to send again after a reconnect


# What a dead server looks like from the client: the connection ends, is reset, or is refused.
_GONE = (ConnectionError, FileNotFoundError)
_GONE_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE, errno.ENOENT, errno.ECONNABORTED}

# Where a server listens: a Unix socket path, an abstract name starting with "\0", or (host, port).
Address = Union[str, tuple[str, int]]


class _Disconnected(Exception):
    """The server closed the connection (EOF)."""


class NbdClient:
    """An NBD export at ``address`` (a Unix socket path, an abstract name starting with ``"\\0"``,
    or a TCP ``(host, port)``) as a block device: ``read``, ``write``, ``flush``, ``size``,
    ``sector_size`` (the export's minimum block size), so
    :class:`harness.devices.block.BlockFile` and pyfatfs work on it.

    ``write`` sends WRITEs with FUA: it returns once the server says the data are durable.
    Several requests may be in flight (``write_async``/``read_async`` and ``wait``,
    ``write_many(items, window)``). When the server goes away (EOF, ECONNRESET,
    ECONNREFUSED, EPIPE) the client connects and negotiates again, retrying for up to
    ``reconnect_timeout`` seconds (then :class:`NbdUnreachable`), and sends again every
    request not yet answered, in the order they were first sent; ``reconnects`` and
    ``resent`` count that. An error reply raises :class:`NbdError` and is not retried.
    ``timeout``: the longest a live connection may leave requests unanswered with nothing
    received (:class:`NbdTimeout`). One thread at a time.
    """

    def __init__(self, address: Address, reconnect_timeout: float = 30.0, timeout: float = 60.0,
                 export: str = "") -> None:
        self.address = address
        self.export = export
        self.reconnect_timeout = reconnect_timeout
        self.timeout = timeout
        self.reconnects = 0
        self.resent = 0
        self.closed = False
        self._sock: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._next_handle = 1
        self._sent: dict[int, _Sent] = {}                  # in the order first sent
        self._done: dict[int, bytes | NbdError] = {}
        self.size = self.flags = self.sector_size = self.preferred = self.max_bytes = self.max_count = 0
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Send NBD_CMD_DISC (if connected) and hang up; requests not yet answered are
        forgotten (their writes may or may not land)."""
        if self._sock is not None and not self._outbox and not self.closed:
            try:
                self._sock.send(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0), socket.MSG_NOSIGNAL)
            except OSError:
                pass
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
        """NBD_CMD_FLUSH. Every acknowledged write is durable already (FUA); this is a barrier
        for callers who expect one (BlockFile.flush)."""
        self.wait([self._submit(Cmd.FLUSH, 0, 0)])

    def trim(self, lba: int, count: int) -> None:
        """NBD_CMD_TRIM of ``count`` sectors (the server refuses it unless it advertised TRIM)."""
        self.wait([self._submit(Cmd.TRIM, lba * self.sector_size, count * self.sector_size)])

    def write_zeroes(self, lba: int, count: int) -> None:
        """NBD_CMD_WRITE_ZEROES of ``count`` sectors, with FUA: returns once they are durable."""
        self.wait([self._submit(Cmd.WRITE_ZEROES, lba * self.sector_size, count * self.sector_size,
                                flags=CmdFlag.FUA)])

    # -- pipelining --

    def read_async(self, lba: int, count: int) -> int:
        """Send a READ of at most ``max_count`` sectors; its data come from ``wait``."""
        if count > self.max_count:
            raise ValueError(f"{count} sectors is more than one request carries ({self.max_count}); read() splits it")
        return self._submit(Cmd.READ, lba * self.sector_size, count * self.sector_size)

    def write_async(self, lba: int, data: bytes) -> int:
        """Send a WRITE (FUA) of whole sectors, at most ``max_bytes``; ``wait`` returns once it is durable."""
        if not data or len(data) % self.sector_size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.sector_size}-byte sectors")
        if len(data) > self.max_bytes:
            raise ValueError(f"{len(data)} bytes is more than one request carries ({self.max_bytes}); "
                             f"write() and write_many() split it")
        return self._submit(Cmd.WRITE, lba * self.sector_size, len(data), data, CmdFlag.FUA)

    def wait(self, handles: Sequence[int]) -> list[bytes]:
        """Wait until every request of ``handles`` is answered; their data (READ's; b"" for the
        others) in the order of ``handles``. If any failed, the first of them raises NbdError
        (after all were answered)."""
        missing = set(handles) - self._done.keys() - self._sent.keys()
        if missing:
            raise ValueError(f"requests {sorted(missing)} were not sent, or were waited for already")
        self._pump(lambda: all(h in self._done for h in handles))
        results = [self._done.pop(h) for h in handles]
        for result in results:
            if isinstance(result, NbdError):
                raise result
        return results  # type: ignore[return-value]

    def write_many(self, items: Iterable[tuple[int, bytes]], window: int = 32) -> None:
        """Write every (lba, data), keeping up to ``window`` requests in flight; returns once all
        are durable. Items may overlap: later ones land last. On an error reply, no further
        item is sent, those in flight are waited for, and the first error is raised."""
        in_flight: deque[int] = deque()
        error: NbdError | None = None
        for lba, data in items:
            if len(data) % self.sector_size or not data:
                raise ValueError(f"{len(data)} bytes is not a whole number of {self.sector_size}-byte sectors")
            for start, n in self._pieces(lba, len(data) // self.sector_size):
                if error is not None:
                    break
                offset = (start - lba) * self.sector_size
                in_flight.append(self.write_async(start, data[offset:offset + n * self.sector_size]))
                while len(in_flight) >= max(1, window) and error is None:
                    error = self._settle(in_flight.popleft())
            if error is not None:
                break
        while in_flight:
            error = self._settle(in_flight.popleft()) or error
        if error is not None:
            raise error

    def _settle(self, handle: int) -> NbdError | None:
        try:
            self.wait([handle])
        except NbdError as exc:
            return exc
        return None

    def _pieces(self, lba: int, count: int) -> list[tuple[int, int]]:
        """(lba, count) in requests the server takes; a count of 0 goes as it is, to be refused."""
        return [(lba + i, min(self.max_count, count - i)) for i in range(0, count, self.max_count)] or [(lba, count)]

    # -- the wire --

    def _submit(self, cmd: Cmd, offset: int, length: int, data: bytes = b"", flags: int = 0) -> int:
        if self.closed:
            raise ValueError(f"the client of {self.address!r} is closed")
        handle = self._next_handle
        self._next_handle += 1
        frame = REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length) + data
        self._sent[handle] = _Sent(cmd, offset, length, frame)
        self._outbox += frame
        self._exchange(0)               # under way at once, without waiting
        return handle

    def _pump(self, finished: Callable[[], bool]) -> None:
        """Send and receive until ``finished()``, through any number of reconnects."""
        deadline = Deadline(self.timeout)
        while not finished():
            if self._exchange(min(deadline.remaining, TICK)):
                deadline = Deadline(self.timeout)
            elif deadline.expired:
                oldest = next(iter(self._sent.values()))
                raise NbdTimeout(f"{self.address!r}: nothing received for {self.timeout} s with "
                                 f"{len(self._sent)} requests unanswered, the oldest "
                                 f"{oldest.cmd.name} offset {oldest.offset} length {oldest.length}")

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
        while len(inbox) >= SIMPLE_REPLY.size:
            magic, error, handle = SIMPLE_REPLY.unpack_from(inbox)
            if magic != SIMPLE_REPLY_MAGIC:
                raise NbdProtocolError(f"{self.address!r}: reply magic {magic:#010x}, not {SIMPLE_REPLY_MAGIC:#010x}")
            sent = self._sent.get(handle)
            if sent is None:
                raise NbdProtocolError(f"{self.address!r}: a reply to request {handle}, which is not waiting")
            length = sent.length if sent.cmd == Cmd.READ and not error else 0
            if len(inbox) < SIMPLE_REPLY.size + length:
                return
            payload = bytes(inbox[SIMPLE_REPLY.size:SIMPLE_REPLY.size + length])
            del inbox[:SIMPLE_REPLY.size + length]
            del self._sent[handle]
            self._done[handle] = NbdError(sent.cmd, sent.offset, sent.length, error) if error else payload

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
        """Connect and negotiate, retrying with a growing pause while nobody serves, for
        reconnect_timeout. A connection that waits in a listener's backlog waits for the
        greeting of the next server."""
        deadline = Deadline(self.reconnect_timeout)
        pause = 0.005
        while True:
            family = socket.AF_INET6 if isinstance(self.address, tuple) and ":" in self.address[0] else (
                socket.AF_INET if isinstance(self.address, tuple) else socket.AF_UNIX)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(max(deadline.remaining, 0.001))     # a full backlog makes connect wait
            try:
                sock.connect(self.address)
                self._negotiate(sock, deadline)
                break
            except (OSError, _Disconnected) as exc:
                sock.close()
                if isinstance(exc, OSError) and not isinstance(exc, (*_GONE, TimeoutError)) \
                        and exc.errno not in _GONE_ERRNOS | {errno.EAGAIN}:
                    raise
                if deadline.expired:
                    raise NbdUnreachable(self.address, self.reconnect_timeout, exc) from exc
                time.sleep(min(pause, deadline.remaining))
                pause = min(2 * pause, 0.25)
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        self._sock = sock
        self._selector.register(sock, selectors.EVENT_READ)

    def _negotiate(self, sock: socket.socket, deadline: Deadline) -> None:
        """Fixed newstyle, NBD_OPT_GO for the export asking for its block sizes (blocking, to
        ``deadline``); checks that a server met again serves the same export."""
        def take(n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                sock.settimeout(max(deadline.remaining, 0.001))
                chunk = sock.recv(n - len(out))
                if not chunk:
                    raise _Disconnected("the server closed the connection while negotiating")
                out += chunk
            return bytes(out)

        magic, ihaveopt, handshake = GREETING.unpack(take(GREETING.size))
        if (magic, ihaveopt) != (NBDMAGIC, IHAVEOPT) or not handshake & HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdProtocolError(f"{self.address!r}: not a fixed newstyle NBD server ({magic:#x} {ihaveopt:#x} "
                                   f"flags {handshake:#x})")
        flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if handshake & HandshakeFlag.NO_ZEROES else 0)
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        sock.sendall(CLIENT_FLAGS.pack(flags) + OPTION.pack(IHAVEOPT, Opt.GO, len(data)) + data)
        size, export_flags, block_size = None, 0, (1, PREFERRED_BLOCK, 0xFFFFFFFF)
        while True:
            magic, option, reply, length = OPTION_REPLY.unpack(take(OPTION_REPLY.size))
            payload = take(length)
            if magic != OPTION_REPLY_MAGIC or option != Opt.GO:
                raise NbdProtocolError(f"{self.address!r}: option reply magic {magic:#x} option {option}")
            if reply & (1 << 31):
                raise NbdRefused(self.address, self.export, reply, payload.decode("utf-8", "replace"))
            if reply == Rep.ACK:
                break
            if reply == Rep.INFO and len(payload) >= 2:
                (kind,) = struct.unpack_from(">H", payload)
                if kind == Info.EXPORT and len(payload) == INFO_EXPORT.size:
                    _, size, export_flags = INFO_EXPORT.unpack(payload)
                elif kind == Info.BLOCK_SIZE and len(payload) == INFO_BLOCK_SIZE.size:
                    block_size = INFO_BLOCK_SIZE.unpack(payload)[1:]
        if size is None:
            raise NbdProtocolError(f"{self.address!r}: NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        minimum, preferred, maximum = block_size
        sector = max(minimum, 512)
        if self.size and (size, sector) != (self.size, self.sector_size):
            raise NbdProtocolError(f"{self.address!r}: the export was {self.size} bytes of {self.sector_size}-byte "
                                   f"sectors, now {size} of {sector}")
        self.size, self.flags, self.sector_size, self.preferred = size, export_flags, sector, preferred
        self.max_count = min(maximum, MAX_PAYLOAD) // sector
        self.max_bytes = self.max_count * sector

    def _reconnect(self) -> None:
        """A new connection, and every unanswered request on it again, oldest first."""
        self._connect()
        self.reconnects += 1
        self.resent += len(self._sent)
        self._inbox.clear()
        self._outbox = bytearray(b"".join(sent.frame for sent in self._sent.values()))
