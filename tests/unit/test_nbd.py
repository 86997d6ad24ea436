"""The block protocol, NBD (harness/services/nbd.py), without QEMU: a file served by NbdServer
children on one listener that the test keeps, as the supervisor will, and clients that outlive them.

What is checked: bytes round trip exactly; requests that are out of range or malformed are
refused with the protocol's error codes and change nothing; a connection that sends garbage,
or half a request, disturbs no one else; a turn's FUA writes are flushed before any of them is
acknowledged, and plain writes are not flushed; every write acknowledged survives the server
being SIGKILLed at random moments; pyfatfs works through a client, and fsck.fat and mtools
agree with what it wrote; third-party clients (nbdinfo, qemu-img, qemu-io, nbdcopy) see the
export as advertised and move bytes exactly; the disk backend stages every command where a
disk as strict as NVMe's PRPs takes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest

from harness.access import Deadline, DmaBuffer
from harness.services.disk import DiskBackend
from harness.services.nbd import (CLIENT_FLAGS, EXPORT_NAME_REPLY, GREETING, IHAVEOPT, MAX_PAYLOAD, OPTION,
                                  READ_AHEAD, REQUEST, REQUEST_MAGIC, SIMPLE_REPLY, SIMPLE_REPLY_MAGIC, ClientFlag, Cmd,
                                  CmdFlag, Errno, NbdClient, NbdError, NbdServer, NbdTimeout, NbdUnreachable, Opt)

ROOT = Path(__file__).resolve().parents[2]
SECTOR = 512
MAX_COUNT = MAX_PAYLOAD // SECTOR
GUARD = 120.0           # the longest any wait here may take before the test calls it a hang


class FileDevice:
    """An image file as a block device: pread, pwrite, and fsync for flush."""

    sector_size = SECTOR

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    def read(self, lba: int, count: int) -> bytes:
        return os.pread(self.fd, count * SECTOR, lba * SECTOR)

    def write(self, lba: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], lba * SECTOR + done)

    def flush(self) -> None:
        os.fsync(self.fd)


# The server child: serves the image on the inherited listener until killed, or until the
# test process that started it is gone (so that nothing outlives an interrupted run).
SERVER = """
import os, socket, sys
from harness.services.nbd import NbdServer
from tests.unit.test_nbd import FileDevice
listener = socket.socket(fileno=int(sys.argv[1]))
parent = int(sys.argv[3])
NbdServer(FileDevice(sys.argv[2]), listener).serve(until=lambda: os.getppid() != parent)
"""


class Served:
    """An image served by one NbdServer child at a time, all on one listener the test keeps:
    ``kill()`` SIGKILLs the child, ``start()`` starts the next; clients' connections wait in
    the listener's backlog meanwhile."""

    def __init__(self, image: Path, address: str) -> None:
        self.image, self.address = image, address
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(128)
        self.server: subprocess.Popen[bytes] | None = None
        self.started = 0

    def start(self) -> None:
        fd = self.listener.fileno()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.server = subprocess.Popen([sys.executable, "-c", SERVER, str(fd), str(self.image), str(os.getpid())],
                                       pass_fds=[fd], cwd=ROOT, env=env)
        self.started += 1

    def kill(self) -> None:
        if self.server is not None:
            os.kill(self.server.pid, signal.SIGKILL)
            self.server.wait()
            assert self.server.returncode == -signal.SIGKILL, "the server was running until killed"
            self.server = None

    def close(self) -> None:
        if self.server is not None:
            os.kill(self.server.pid, signal.SIGKILL)
            self.server.wait()
            self.server = None
        self.listener.close()
        if not self.address.startswith("\0"):
            os.unlink(self.address)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for socket files (a Unix socket's path has at most 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="hwh-block-"))
    yield directory
    left = list(directory.iterdir())
    shutil.rmtree(directory)
    assert not left, f"socket files left behind: {left}"


@pytest.fixture
def serve(tmp_path: Path, socket_dir: Path) -> Iterator[Callable[..., Served]]:
    """``serve(image, abstract=False)``: the image served by a child, at a path or an abstract name."""
    made: list[Served] = []

    def start(image: Path, abstract: bool = False) -> Served:
        name = f"blk-{os.getpid()}-{len(made)}"
        address = f"\0hwharness-{name}-{random.getrandbits(32):08x}" if abstract else str(socket_dir / name)
        served = Served(image, address)
        made.append(served)
        served.start()
        return served

    yield start
    for served in made:
        served.close()


def random_image(path: Path, size: int, rng: random.Random) -> Path:
    path.write_bytes(rng.randbytes(size))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- round trips ----


@pytest.mark.parametrize("abstract", (False, True), ids=("path", "abstract"))
def test_reads_and_writes_round_trip_byte_exact(serve, tmp_path: Path, rng: random.Random, abstract: bool) -> None:
    image = random_image(tmp_path / "disk.img", 8 << 20, rng)
    served = serve(image, abstract)
    sectors = image.stat().st_size // SECTOR
    with NbdClient(served.address) as client:
        assert (client.size, client.sector_size) == (image.stat().st_size, SECTOR)
        raw = image.read_bytes()
        for lba, count in [(0, 1), (sectors - 1, 1), (rng.randrange(sectors - 3000), 3000)]:   # 3000: two requests
            assert client.read(lba, count) == raw[lba * SECTOR:(lba + count) * SECTOR]
        writes = {0: rng.randbytes(SECTOR), sectors - 8: rng.randbytes(8 * SECTOR),
                  1000: rng.randbytes(MAX_COUNT * SECTOR + 3 * SECTOR)}                         # split in two
        for lba, data in writes.items():
            client.write(lba, data)
            assert client.read(lba, len(data) // SECTOR) == data
        pipelined = [rng.randbytes(4096) for _ in range(64)]          # all in flight at once
        ids = [client.write_async(6000 + 8 * i, data) for i, data in enumerate(pipelined)]
        reads = [client.read_async(6000 + 8 * i, 8) for i in range(64)]
        assert client.wait(ids) == [b""] * 64
        assert client.wait(reads) == pipelined, "a read sent after a write sees it"
        writes[6000] = b"".join(pipelined)
        client.flush()
        for lba, data in writes.items():         # acknowledged, so in the file already
            assert raw_at(image, lba, len(data)) == data
        assert client.reconnects == 0 and client.resent == 0


def raw_at(image: Path, lba: int, size: int) -> bytes:
    with image.open("rb") as f:
        f.seek(lba * SECTOR)
        return f.read(size)


# ---- refusals ----


def test_out_of_range_and_zero_lengths_raise_typed_errors_and_change_nothing(serve, tmp_path: Path,
                                                                             rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 20, rng)
    before = image.read_bytes()
    served = serve(image)
    sectors = image.stat().st_size // SECTOR
    with NbdClient(served.address) as client:
        # the spec: ENOSPC for a write past the end, EINVAL for a read past it or of nothing
        refused: list[tuple[Callable[[], object], Cmd, int, int, Errno]] = [
            (lambda: client.read(sectors - 1, 2), Cmd.READ, sectors - 1, 2, Errno.EINVAL),
            (lambda: client.write(sectors, bytes(SECTOR)), Cmd.WRITE, sectors, 1, Errno.ENOSPC),
            (lambda: client.write(sectors - 1, bytes(2 * SECTOR)), Cmd.WRITE, sectors - 1, 2, Errno.ENOSPC),
            (lambda: client.write(2**54, bytes(SECTOR)), Cmd.WRITE, 2**54, 1, Errno.ENOSPC),
            (lambda: client.read(0, 0), Cmd.READ, 0, 0, Errno.EINVAL),
        ]
        for call, cmd, lba, count, code in refused:
            with pytest.raises(NbdError) as error:
                call()
            offset, length = lba * SECTOR, count * SECTOR
            assert (error.value.cmd, error.value.offset, error.value.length, error.value.error) == \
                (cmd, offset, length, code)
            assert f"{cmd.name} offset {offset} length {length}: {code.name}" in str(error.value)
        with pytest.raises(ValueError):
            client.write(0, bytes(SECTOR - 1))                  # not whole sectors: never sent
        # a batch stops at its first refusal; what was acknowledged before it stays
        first = rng.randbytes(SECTOR)
        with pytest.raises(NbdError) as error:
            client.write_many([(0, first), (sectors, bytes(SECTOR)), (1, bytes(SECTOR))], window=1)
        assert error.value.offset == sectors * SECTOR
    after = image.read_bytes()
    assert after[:SECTOR] == first, "acknowledged before the refusal"
    assert after[SECTOR:] == before[SECTOR:], "nothing else changed"


def request(cmd: int, handle: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0,
            magic: int = REQUEST_MAGIC) -> bytes:
    return REQUEST.pack(magic, flags, cmd, handle, offset, length) + data


def read_reply(sock: socket.socket, payload: int = 0) -> tuple[int, int, bytes] | None:
    """(error, handle, data): a simple reply, with ``payload`` bytes of data if it is a
    successful READ's; None at EOF."""
    header = recv_exactly(sock, SIMPLE_REPLY.size)
    if header is None:
        return None
    magic, error, handle = SIMPLE_REPLY.unpack(header)
    assert magic == SIMPLE_REPLY_MAGIC
    data = recv_exactly(sock, payload) if payload and not error else b""
    assert data is not None
    return error, handle, data


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            assert not data, f"EOF inside a reply ({len(data)} of {n} bytes)"
            return None
        data += chunk
    return data


def raw_connection(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(GUARD)
    sock.connect(address)
    return sock


def negotiated(address: str) -> socket.socket:
    """A raw connection in the transmission phase (fixed newstyle, NO_ZEROES, NBD_OPT_EXPORT_NAME "")."""
    sock = raw_connection(address)
    greeting = recv_exactly(sock, GREETING.size)
    assert greeting is not None
    sock.sendall(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
                 + OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, 0))
    assert recv_exactly(sock, EXPORT_NAME_REPLY.size) is not None
    return sock


def test_malformed_requests_get_the_protocols_errors_and_change_nothing(tmp_path: Path, socket_dir: Path,
                                                                        rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 20, rng)
    before = digest(image)
    sectors = image.stat().st_size // SECTOR
    with served_here(FileDevice(str(image)), socket_dir / "rw") as address:
        # a wrong magic leaves the framing in doubt: no reply, the connection is closed
        with negotiated(address) as sock:
            sock.sendall(request(Cmd.WRITE, 7, 0, SECTOR, rng.randbytes(SECTOR), magic=0xDEADBEEF))
            assert read_reply(sock) is None, "closed, without a reply"
        # well-framed but refused: the error, and the connection goes on (each is checked by
        # the READ after it, answered on the same connection)
        with negotiated(address) as sock:
            for frame, code in [
                    (request(99, 1, 0, SECTOR), Errno.EINVAL),                                  # unknown command
                    (request(Cmd.WRITE, 2, 0, 0), Errno.EINVAL),                                # nothing to write
                    (request(Cmd.WRITE, 3, 100, SECTOR, rng.randbytes(SECTOR)), Errno.EINVAL),  # misaligned
                    (request(Cmd.READ, 4, 0, SECTOR - 1), Errno.EINVAL),                        # not whole sectors
                    (request(Cmd.READ, 5, 0, SECTOR, flags=CmdFlag.NO_HOLE), Errno.EINVAL),     # a flag READ lacks
                    (request(Cmd.READ, 6, 0, SECTOR, flags=1 << 9), Errno.EINVAL),              # an unknown flag
                    (request(Cmd.WRITE, 7, (sectors - 1) * SECTOR, 2 * SECTOR, rng.randbytes(2 * SECTOR)),
                     Errno.ENOSPC),                                                             # past the end
                    (request(Cmd.WRITE_ZEROES, 8, sectors * SECTOR, SECTOR), Errno.ENOSPC),
                    (request(Cmd.READ, 9, sectors * SECTOR, SECTOR), Errno.EINVAL),
                    (request(Cmd.TRIM, 10, 0, SECTOR), Errno.EINVAL),      # not advertised: a file has no trim
                    (request(Cmd.FLUSH, 11, 5, 0), Errno.EINVAL),
                    (request(Cmd.READ, 12, 0, 2**32 - SECTOR), Errno.EOVERFLOW),               # over the maximum
                    (request(Cmd.WRITE, 13, 0, MAX_PAYLOAD + SECTOR, rng.randbytes(MAX_PAYLOAD + SECTOR)),
                     Errno.EOVERFLOW)]:                                                 # its payload dropped
                handle = REQUEST.unpack_from(frame)[3]
                sock.sendall(frame + request(Cmd.READ, 100 + handle, 0, SECTOR))
                assert read_reply(sock) == (code, handle, b"")
                assert read_reply(sock, SECTOR) == (0, 100 + handle, raw_at(image, 0, SECTOR)), "it goes on"
        # a WRITE cut short, then the client leaves: nothing of it is written
        with negotiated(address) as sock:
            sock.sendall(request(Cmd.WRITE, 1, 0, 4096, rng.randbytes(4096))[:-100])
        with NbdClient(address) as client:
            client.flush()                                  # the server has taken everything before this
            assert client.read(0, 8) == raw_at(image, 0, 4096)
    assert digest(image) == before
    # a read-only export: every writing command is EPERM, reads go on
    with served_here(FileDevice(str(image)), socket_dir / "ro", read_only=True) as address:
        with negotiated(address) as sock:
            for frame in [request(Cmd.WRITE, 1, 0, SECTOR, rng.randbytes(SECTOR)),
                          request(Cmd.WRITE_ZEROES, 2, 0, SECTOR), request(Cmd.TRIM, 3, 0, SECTOR)]:
                handle = REQUEST.unpack_from(frame)[3]
                sock.sendall(frame + request(Cmd.READ, 100 + handle, 0, SECTOR))
                assert read_reply(sock) == (Errno.EPERM, handle, b"")
                assert read_reply(sock, SECTOR) == (0, 100 + handle, raw_at(image, 0, SECTOR))
    assert digest(image) == before


class served_here:
    """``device`` served by an NbdServer thread of this process at ``path``, until the block ends."""

    def __init__(self, device: object, path: Path, **kwargs: object) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.server = NbdServer(device, self.listener, **kwargs)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop.is_set,))

    def __enter__(self) -> str:
        self.thread.start()
        return str(self.path)

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(GUARD)
        self.listener.close()
        os.unlink(self.path)
        assert not self.thread.is_alive()


def test_a_connection_spewing_garbage_or_half_a_request_disturbs_no_one_else(serve, tmp_path: Path,
                                                                             rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 4 << 20, rng)
    served = serve(image)
    stop = threading.Event()
    outcomes: list[str] = []

    def spew(seed: int, negotiate: bool) -> None:
        noise = random.Random(seed)
        with (negotiated if negotiate else raw_connection)(served.address) as sock:
            try:
                while not stop.is_set():
                    junk = noise.randbytes(noise.randint(1, 64 << 10))
                    if junk[:4] == REQUEST_MAGIC.to_bytes(4, "big"):
                        junk = b"\0" + junk
                    sock.sendall(junk)
                outcomes.append("never closed")
            except (BrokenPipeError, ConnectionResetError):
                outcomes.append("closed")

    stalled = negotiated(served.address)                # half a request, held open throughout
    stalled.sendall(request(Cmd.WRITE, 1, 0, MAX_PAYLOAD, bytes(1000)))
    # garbage in the transmission phase, and (the last) in the negotiation
    spewers = [threading.Thread(target=spew, args=(rng.getrandbits(32), n < 2)) for n in range(3)]
    for t in spewers:
        t.start()
    try:
        blocks = {8 * i: rng.randbytes(4096) for i in rng.sample(range(1, 1024), 300)}
        with NbdClient(served.address) as client:
            client.write_many(blocks.items(), window=16)
            for lba, data in blocks.items():
                assert client.read(lba, 8) == data
    finally:
        stop.set()
        for t in spewers:
            t.join(GUARD)
        stalled.close()
    assert outcomes == ["closed"] * 3
    for lba, data in blocks.items():
        assert raw_at(image, lba, 4096) == data
    assert raw_at(image, 0, 4096) != bytes(4096), "the stalled half request wrote nothing"


# ---- group commit, in this process, against a device that records what it is asked ----


class RecordingDevice:
    """Memory as a block device that logs every call; at each flush it notes how many reply
    bytes the client could already read (any would be an acknowledgment before the flush)."""

    sector_size = SECTOR

    def __init__(self, sectors: int, peek: Callable[[], int]) -> None:
        self.memory = bytearray(sectors * SECTOR)
        self.size = len(self.memory)
        self.calls: list[tuple[object, ...]] = []
        self.peek = peek

    def read(self, lba: int, count: int) -> bytes:
        self.calls.append(("read", lba))
        return bytes(self.memory[lba * SECTOR:(lba + count) * SECTOR])

    def write(self, lba: int, data: bytes) -> None:
        self.calls.append(("write", lba))
        self.memory[lba * SECTOR:lba * SECTOR + len(data)] = data

    def flush(self) -> None:
        self.calls.append(("flush", self.peek()))


class BatchingDevice(RecordingDevice):
    def write_many(self, items: list[tuple[int, bytes]]) -> None:
        self.calls.append(("write_many", [lba for lba, _ in items]))
        for lba, data in items:
            self.memory[lba * SECTOR:lba * SECTOR + len(data)] = data


NEGOTIATION = GREETING.size + EXPORT_NAME_REPLY.size     # what the server says before any reply


@pytest.mark.parametrize("durable", (True, False), ids=("fua-and-flush", "plain"))
@pytest.mark.parametrize("device_type", (BatchingDevice, RecordingDevice), ids=("write_many", "write"))
def test_a_turns_fua_writes_are_flushed_once_before_any_is_acknowledged(socket_dir: Path, rng: random.Random,
                                                                        device_type: type[RecordingDevice],
                                                                        durable: bool) -> None:
    address = str(socket_dir / "group")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    client = raw_connection(address)

    def waiting_reply_bytes() -> int:
        return int.from_bytes(fcntl.ioctl(client.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)

    device = device_type(64, waiting_reply_bytes)
    a, b, c, d = (rng.randbytes(8 * SECTOR) for _ in range(4))
    fua = CmdFlag.FUA if durable else 0
    # All of it is in the socket before the server starts, so one turn takes it all: writes to
    # 0 and 8; a read of 0 (it must see a); a write of 0 again (after the read); FLUSH; 16.
    # Plain (no FUA, no FLUSH), NBD lets the writes be answered before they are durable.
    client.sendall(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
                   + OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, 0)
                   + request(Cmd.WRITE, 1, 0, 4096, a, fua) + request(Cmd.WRITE, 2, 4096, 4096, b, fua)
                   + request(Cmd.READ, 3, 0, 4096) + request(Cmd.WRITE, 4, 0, 4096, c, fua)
                   + (request(Cmd.FLUSH, 5) if durable else b"") + request(Cmd.WRITE, 6, 8192, 4096, d, fua))
    handles = [1, 2, 3, 4, 5, 6] if durable else [1, 2, 3, 4, 6]
    replies: dict[int, tuple[int, bytes]] = {}
    server = NbdServer(device, listener)
    thread = threading.Thread(target=server.serve, args=(lambda: len(replies) == len(handles),))
    thread.start()
    try:
        # nothing is read until every reply is in (so the flush's peek saw only what the server
        # had sent by then)
        everything = NEGOTIATION + SIMPLE_REPLY.size * len(handles) + 4096
        deadline = Deadline(GUARD)
        while waiting_reply_bytes() < everything and not deadline.expired:
            threading.Event().wait(0.01)
        assert recv_exactly(client, NEGOTIATION) is not None
        while len(replies) < len(handles):
            reply = read_reply(client, 4096 if len(replies) == 2 else 0)
            assert reply is not None
            replies[reply[1]] = (reply[0], reply[2])
    finally:
        thread.join(GUARD)
        client.close()
        listener.close()
        os.unlink(address)
    assert not thread.is_alive()
    writes: list[tuple[object, ...]]
    if device_type is BatchingDevice:
        writes = [("write_many", [0, 8]), ("read", 0), ("write_many", [0, 16])]
    else:
        writes = [("write", 0), ("write", 8), ("read", 0), ("write", 0), ("write", 16)]
    if durable:
        # the negotiation's bytes may have gone out before the turn (all or part), no reply's
        assert device.calls[:-1] == writes and device.calls[-1][0] == "flush", "one flush after every write"
        assert device.calls[-1][1] <= NEGOTIATION, "nothing answered before the flush"
    else:
        assert device.calls == writes, "plain writes: no flush"
    assert {handle: error for handle, (error, _) in replies.items()} == dict.fromkeys(handles, 0)
    assert replies[3][1] == a, "the read saw the write that came before it, not the one after"
    assert bytes(device.memory[:24 * SECTOR]) == c + b + d


def test_the_loop_beats_while_idle(socket_dir: Path) -> None:
    address = str(socket_dir / "idle")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    beats = [0]
    server = NbdServer(RecordingDevice(8, lambda: 0), listener, beat=lambda: beats.__setitem__(0, beats[0] + 1))
    thread = threading.Thread(target=server.serve, args=(lambda: beats[0] >= 5,))
    thread.start()
    thread.join(GUARD)
    listener.close()
    os.unlink(address)
    assert not thread.is_alive() and beats[0] == 5, "no client, yet the loop went round"


# ---- clients that outlive their server ----


class StuckDevice(RecordingDevice):
    """A device whose reads never complete until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(8, lambda: 0)
        self.release = threading.Event()

    def read(self, lba: int, count: int) -> bytes:
        self.release.wait(GUARD)
        return super().read(lba, count)


def test_nobody_serving_raises_unreachable_and_a_silent_server_raises_timeout(socket_dir: Path) -> None:
    with pytest.raises(NbdUnreachable):
        NbdClient(str(socket_dir / "nobody"), reconnect_timeout=0.2)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)     # listens, never accepts: no greeting
    listener.bind(str(socket_dir / "mute"))
    listener.listen(8)
    try:
        with pytest.raises(NbdUnreachable):
            NbdClient(str(socket_dir / "mute"), reconnect_timeout=0.2)
    finally:
        listener.close()
        os.unlink(socket_dir / "mute")
    device = StuckDevice()                                            # negotiates, never answers
    with served_here(device, socket_dir / "silent") as address:
        try:
            with NbdClient(address, timeout=0.2) as client, pytest.raises(NbdTimeout):
                client.read(0, 1)
        finally:
            device.release.set()


BLOCKS = 3000
BLOCK = 4096
WINDOW = 32
KILLS = 10


def test_acknowledged_writes_survive_the_server_being_killed_at_random_moments(serve, tmp_path: Path,
                                                                                rng: random.Random) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(BLOCKS * BLOCK)
    served = serve(image)
    blocks = [rng.randbytes(BLOCK) for _ in range(BLOCKS)]
    order = rng.sample(range(BLOCKS), BLOCKS)
    acked: list[int] = []
    progress = threading.Condition()
    outcome: dict[str, object] = {}

    def writer() -> None:
        try:
            with NbdClient(served.address) as client:
                in_flight: deque[tuple[int, int]] = deque()

                def settle() -> None:
                    block, id_ = in_flight.popleft()
                    client.wait([id_])
                    with progress:
                        acked.append(block)
                        progress.notify_all()
                for block in order:
                    in_flight.append((block, client.write_async(block * BLOCK // SECTOR, blocks[block])))
                    if len(in_flight) >= WINDOW:
                        settle()
                while in_flight:
                    settle()
                outcome["counts"] = (client.reconnects, client.resent)
        except BaseException as exc:           # the test's thread reports it
            outcome["error"] = exc
        finally:
            with progress:
                outcome["done"] = True
                progress.notify_all()

    def check_on_disk(done: list[int]) -> None:
        with image.open("rb") as f:
            for block in done:
                f.seek(block * BLOCK)
                assert f.read(BLOCK) == blocks[block], f"block {block} was acknowledged, and is not on disk"

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        served_since = 0                       # acknowledgments when the running server started
        for threshold in sorted(rng.sample(range(BLOCKS // 20, BLOCKS - BLOCKS // 10), KILLS)):
            # kill only a server that has acknowledged something: it surely had the connection
            with progress:
                assert progress.wait_for(lambda: len(acked) >= max(threshold, served_since + 1) or "done" in outcome,
                                         GUARD), "the writer made no progress"
            assert "done" not in outcome, outcome.get("error")
            threading.Event().wait(rng.uniform(0, 0.004))     # somewhere inside the server's turn
            served.kill()
            with progress:
                done = list(acked)
            check_on_disk(done)
            served_since = len(done)
            served.start()
        thread.join(GUARD)
        assert not thread.is_alive(), "the writer did not finish"
    finally:
        if thread.is_alive():
            served.kill()                      # the writer gives up once nobody listens
            thread.join(GUARD)
    assert "error" not in outcome, outcome["error"]
    assert sorted(acked) == list(range(BLOCKS))
    check_on_disk(acked)
    reconnects, resent = outcome["counts"]     # type: ignore[misc]
    assert reconnects == KILLS, "each killed server held the writer's connection"
    assert resent > 0
    assert served.started == KILLS + 1


# ---- a filesystem through a client ----


def test_pyfatfs_through_a_client_across_a_server_restart_is_clean_for_fsck_and_mtools(
        serve, tmp_path: Path, rng: random.Random) -> None:
    from harness.devices.fat import DriverFatFS
    from tests.fatimages import SBIN, have_tools, make_image, mtools_listing, mtools_read

    missing = have_tools()
    if missing:
        pytest.fail(f"{missing} is not installed: run `make deps` (dosfstools, mtools)", pytrace=False)
    image = make_image(tmp_path / "fat16.img", 16, {"OLD.TXT": b"made by mcopy\n", "keep": None}, tmp_path)
    served = serve(image)
    written = {"/NEW.BIN": rng.randbytes(200_000), "/OUT/NOTE.TXT": b"through the block protocol\n",
               "/keep/Long file name.data": rng.randbytes(5000)}
    with NbdClient(served.address) as client:
        fat = DriverFatFS(client)
        try:
            fat.writebytes("/NEW.BIN", written["/NEW.BIN"])
            served.kill()                       # between requests: the client finds out on its next one
            served.start()
            fat.makedir("/OUT")
            fat.writebytes("/OUT/NOTE.TXT", written["/OUT/NOTE.TXT"])
            fat.writebytes("/keep/Long file name.data", written["/keep/Long file name.data"])
            assert fat.readbytes("/OLD.TXT") == b"made by mcopy\n"
        finally:
            fat.close()
        assert client.reconnects == 1
    served.kill()
    check = subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True,
                           env=dict(os.environ, PATH=os.environ.get("PATH", "") + os.pathsep + SBIN))
    assert check.returncode == 0, check.stdout + check.stderr
    for path, data in written.items():
        assert mtools_read(image, path) == data, path
    assert {"/NEW.BIN", "/OUT/", "/OUT/NOTE.TXT", "/keep/Long file name.data", "/OLD.TXT"} <= mtools_listing(image)



# ---- third-party clients: libnbd's nbdinfo and nbdcopy, QEMU's qemu-img and qemu-io ----


TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")


class TrimmingDevice(FileDevice):
    """A file that can be trimmed (punching holes), so the server advertises TRIM."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.trimmed: list[tuple[int, int]] = []

    def trim(self, lba: int, count: int) -> None:
        self.trimmed.append((lba, count))
        os.pwrite(self.fd, bytes(count * SECTOR), lba * SECTOR)     # what a deallocated range reads as here


def run_tool(*argv: str) -> str:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{missing} not installed: run `make deps` (libnbd-bin, qemu-utils)", pytrace=False)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=GUARD)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


def uri(address: str) -> str:
    return f"nbd+unix:///?socket={address}"


@pytest.mark.parametrize("read_only", (False, True), ids=("read-write", "read-only"))
@pytest.mark.parametrize("device_type", (FileDevice, TrimmingDevice), ids=("file", "trimming"))
def test_nbdinfo_sees_the_size_the_block_sizes_and_the_flags_as_they_are(
        tmp_path: Path, socket_dir: Path, rng: random.Random, device_type: type[FileDevice], read_only: bool) -> None:
    image = random_image(tmp_path / "disk.img", 3 << 20, rng)
    with served_here(device_type(str(image)), socket_dir / "info", read_only=read_only) as address:
        (export,) = json.loads(run_tool("nbdinfo", "--json", uri(address)))["exports"]
        (listed,) = json.loads(run_tool("nbdinfo", "--json", "--list", uri(address)))["exports"]
    assert export["export-size"] == listed["export-size"] == 3 << 20
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == \
        (SECTOR, 4096, MAX_PAYLOAD)
    flags = {name: export[name] for name in ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
                                              "can_multi_conn", "can_df", "can_cache", "can_fast_zero")}
    assert flags == {"is_read_only": read_only, "can_flush": True, "can_fua": not read_only,
                     "can_trim": device_type is TrimmingDevice and not read_only, "can_zero": not read_only,
                     "can_multi_conn": True, "can_df": False, "can_cache": False, "can_fast_zero": False}


def test_qemu_img_and_nbdcopy_move_whole_images_byte_exact(tmp_path: Path, socket_dir: Path,
                                                            rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 16 << 20, rng)
    source = random_image(tmp_path / "source.img", 16 << 20, rng)
    with served_here(FileDevice(str(image)), socket_dir / "copy") as address:
        run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri(address))
        run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri(address))
        assert digest(image) == digest(source)
        other = random_image(tmp_path / "other.img", 16 << 20, rng)
        run_tool("nbdcopy", str(other), uri(address))
        assert digest(image) == digest(other)
        run_tool("nbdcopy", uri(address), str(tmp_path / "back.img"))
        assert digest(tmp_path / "back.img") == digest(other)


def test_qemu_io_reads_writes_zeroes_discards_and_flushes(tmp_path: Path, socket_dir: Path,
                                                          rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 8 << 20, rng)
    before = image.read_bytes()
    device = TrimmingDevice(str(image))
    with served_here(device, socket_dir / "io") as address:
        run_tool("qemu-io", "-f", "raw",
                 "-c", "write -P 0xab 1M 64k", "-c", "write -f -P 0xcd 3M 4k",     # -f: FUA
                 "-c", "write -z 2M 1M", "-c", "write -z 5M 3M",                   # 3M: over the maximum
                 "-c", "discard 4M 64k", "-c", "flush",
                 "-c", "read -P 0xab 1M 64k", "-c", "read -P 0xcd 3M 4k", "-c", "read -P 0 2M 1M",
                 "-c", "read -P 0 5M 3M", "-c", "read -v 0 512", uri(address))
    after = image.read_bytes()
    expected = bytearray(before)
    expected[1 << 20:(1 << 20) + (64 << 10)] = b"\xab" * (64 << 10)
    expected[3 << 20:(3 << 20) + 4096] = b"\xcd" * 4096
    expected[2 << 20:3 << 20] = bytes(1 << 20)
    expected[5 << 20:8 << 20] = bytes(3 << 20)
    expected[4 << 20:(4 << 20) + (64 << 10)] = bytes(64 << 10)           # TrimmingDevice zeroes a trim
    assert device.trimmed == [((4 << 20) // SECTOR, (64 << 10) // SECTOR)]
    assert after == bytes(expected)


def test_listen_takes_unix_and_tcp_specs_and_names_their_uris(socket_dir: Path) -> None:
    from harness.services.disk import listen
    listener, address, unix_uri = listen(f"unix:{socket_dir / 'l.sock'}")
    with listener:
        assert (address, unix_uri) == (str(socket_dir / "l.sock"), f"nbd+unix:///?socket={socket_dir / 'l.sock'}")
    os.unlink(socket_dir / "l.sock")
    listener, address, tcp_uri = listen("tcp:127.0.0.1:0")
    with listener:
        assert address == ("127.0.0.1", listener.getsockname()[1]) and tcp_uri == f"nbd://127.0.0.1:{address[1]}/"
    for bad in ("unix:", "tcp:127.0.0.1", "tcp:host:port", "nbd:x"):
        with pytest.raises(ValueError):
            listen(bad)


# ---- the disk backend's DMA staging, against a disk as strict as NVMe's PRPs ----


class PageStrictDisk:
    """Memory as a queueing disk that, like NVMe's PRPs, refuses a command whose buffer does not
    start on a page; it logs each call as (how, [(lba, bytes)])."""

    sector_size = SECTOR
    queue_depth = 32
    max_transfer = 128 << 10

    def __init__(self, sectors: int) -> None:
        self.memory = bytearray(os.urandom(sectors * SECTOR))
        self.size = len(self.memory)
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []

    def _check(self, how: str, requests) -> None:  # type: ignore[no-untyped-def]
        for _, buffer in requests:
            assert buffer.phys % 4096 == 0 and 0 < buffer.size <= self.max_transfer, (buffer.phys, buffer.size)
        self.calls.append((how, [(lba, buffer.size) for lba, buffer in requests]))

    def read_queued_into(self, requests) -> None:  # type: ignore[no-untyped-def]
        self._check("read_queued", requests)
        for lba, buffer in requests:
            buffer.view[:] = self.memory[lba * SECTOR:lba * SECTOR + buffer.size]

    def read_into(self, lba: int, buffers) -> None:  # type: ignore[no-untyped-def]
        self._check("read", [(lba, b) for b in buffers])
        self.read_queued_into([(lba, b) for b in buffers])
        self.calls.pop()

    def write_queued_from(self, requests) -> None:  # type: ignore[no-untyped-def]
        self._check("write_queued", requests)
        for lba, buffer in requests:
            self.memory[lba * SECTOR:lba * SECTOR + buffer.size] = buffer.view

    def flush(self) -> None:
        self.calls.append(("flush", []))


class HostDma:
    """DMA memory as bytearrays at page-aligned made-up addresses."""

    def __init__(self) -> None:
        self.next = 1 << 20
        self.channel = SimpleNamespace(guest_spin=2e-4)     # as a proxy channel opens

    def dma_alloc(self, size: int) -> DmaBuffer:
        buffer = DmaBuffer(self.next, memoryview(bytearray(size)))
        self.next += -(-size // 4096) * 4096
        return buffer

    def dma_free(self, buffer: DmaBuffer) -> None:
        pass


def test_the_disk_backend_stages_every_command_on_a_page_and_splits_at_the_largest_transfer() -> None:
    disk = PageStrictDisk(4096)
    backend = DiskBackend(HostDma(), disk)
    assert backend.dev.channel.guest_spin == 0, "the guest spins on after a client's request"
    # reads of 1 KiB, 3.5 KiB and 300 KiB: each starts on a page, the long one in 128 KiB pieces
    items = [(1, 2), (100, 7), (1000, 600)]
    data = backend.read_many(items)
    assert [bytes(d) for d in data] == [bytes(disk.memory[lba * SECTOR:(lba + n) * SECTOR]) for lba, n in items]
    assert disk.calls == [("read_queued", [(1, 1024), (100, 3584), (1000, 128 << 10), (1256, 128 << 10),
                                           (1512, 44 << 10)])]
    assert backend.read_many([(7, 1)])[0] == disk.memory[7 * SECTOR:8 * SECTOR] and disk.calls[-1] == \
        ("read", [(7, 512)]), "one command alone is a plain read"
    # writes of 512 bytes then 4 KiB: the second is not staged right behind the first
    writes = [(2000, os.urandom(512)), (2100, os.urandom(4096))]
    backend.write_many(writes)
    assert disk.calls[-1] == ("write_queued", [(2000, 512), (2100, 4096)])
    assert all(disk.memory[lba * SECTOR:lba * SECTOR + len(d)] == d for lba, d in writes)
    backend.close()


def test_a_sequential_reader_is_answered_from_what_was_read_ahead_and_a_write_there_drops_it(
        socket_dir: Path, rng: random.Random) -> None:
    """One 64 KiB READ at a time, each where the last ended (a Linux machine's O_DIRECT reads):
    after the second, the server reads READ_AHEAD past it in one batch and answers the next
    sixteen reads from there, with no device command, reading ahead again only once they are
    used up; a write into that range from
    another connection drops it before it is acknowledged, so the next read sees the write;
    reads that do not follow each other read nothing ahead. The device is the disk service's
    own backend, whose DMA staging every read_many reuses."""
    disk = PageStrictDisk(8192)
    backend = DiskBackend(HostDma(), disk)
    stride = 128                                            # sectors: 64 KiB

    def device_reads() -> list[tuple[str, list[tuple[int, int]]]]:
        return [call for call in disk.calls if call[0].startswith("read")]

    def expected(lba: int, count: int) -> bytes:
        return bytes(disk.memory[lba * SECTOR:(lba + count) * SECTOR])
    with served_here(backend, socket_dir / "ahead") as address, NbdClient(address) as reader, \
            NbdClient(address) as writer:
        for k in range(12):
            assert reader.read(k * stride, stride) == expected(k * stride, stride), f"read {k}"
        ahead = READ_AHEAD // SECTOR
        assert device_reads() == [("read", [(0, 64 << 10)]), ("read", [(stride, 64 << 10)]),
                                  ("read_queued", [(2 * stride + i, 128 << 10) for i in range(0, ahead, 256)])]
        data = rng.randbytes(4096)
        writer.write(12 * stride + 8, data)                 # into what was read ahead
        assert disk.memory[(12 * stride + 8) * SECTOR:][:4096] == data
        assert reader.read(12 * stride, stride) == expected(12 * stride, stride), "the write was not seen"
        lbas = rng.sample(range(4096, 8192 - stride, 16), 20)     # past what that read has ahead
        lbas = [lba for i, lba in enumerate(lbas) if i == 0 or lba != lbas[i - 1] + stride]
        for lba in lbas:
            assert reader.read(lba, stride) == expected(lba, stride)
        assert device_reads()[3:] == [("read", [(12 * stride, 64 << 10)]),
                                      ("read_queued", [(13 * stride + i, 128 << 10) for i in range(0, ahead, 256)]),
                                      *[("read", [(lba, 64 << 10)]) for lba in lbas]], "random reads read ahead"
    backend.close()


def test_a_read_answered_from_what_was_read_ahead_keeps_its_data_while_it_waits_for_a_flush(
        socket_dir: Path) -> None:
    """A read the read-ahead holds, behind a FLUSH in the same turn (so not answered until the
    turn's flush), and a read the device must do after it, whose batch reuses the DMA
    staging the read-ahead lives in: the first still gets its own data."""
    disk = PageStrictDisk(8192)
    backend = DiskBackend(HostDma(), disk)
    stride = 128
    with served_here(backend, socket_dir / "behind") as address:
        sock = negotiated(address)
        for k, handle in ((0, 1), (1, 2)):              # a sequential reader: the server reads ahead
            sock.sendall(request(Cmd.READ, handle, k * stride * SECTOR, stride * SECTOR))
            assert read_reply(sock, stride * SECTOR) == (0, handle, bytes(disk.memory[k * stride * SECTOR:][:stride * SECTOR]))
        sock.sendall(request(Cmd.FLUSH, 3) + request(Cmd.READ, 4, 2 * stride * SECTOR, stride * SECTOR)
                     + request(Cmd.READ, 5, 4096 * SECTOR, stride * SECTOR))
        replies = [read_reply(sock), read_reply(sock, stride * SECTOR), read_reply(sock, stride * SECTOR)]
        sock.close()
    assert replies == [(0, 3, b""), (0, 4, bytes(disk.memory[2 * stride * SECTOR:][:stride * SECTOR])),
                       (0, 5, bytes(disk.memory[4096 * SECTOR:][:stride * SECTOR]))]
    assert [c[0] for c in disk.calls] == ["read", "read", "read_queued", "read", "flush"], disk.calls
    backend.close()
