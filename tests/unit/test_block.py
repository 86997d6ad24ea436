"""The block protocol (harness/services/block.py) without QEMU: a file served by BlockServer children
on one listener that the test keeps, as the supervisor will, and clients that outlive them.

What is checked: bytes round trip exactly; requests that are out of range or malformed are
refused with typed errors and change nothing; a connection that sends garbage, or half a
request, disturbs no one else; a turn's writes are flushed before any of them is
acknowledged; every write acknowledged survives the server being SIGKILLed at random
moments; pyfatfs works through a client, and fsck.fat and mtools agree with what it wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
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
from typing import Callable, Iterator

import pytest

from harness.services.block import (INFO, MAX_REQUEST_BYTES, REPLY, REPLY_MAGIC, REQUEST, REQUEST_MAGIC, BlockClient,
                           BlockError, BlockServer, BlockTimeout, BlockUnreachable, Op, Status)

ROOT = Path(__file__).resolve().parents[2]
SECTOR = 512
MAX_COUNT = MAX_REQUEST_BYTES // SECTOR
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
from harness.services.block import BlockServer
from tests.unit.test_block import FileDevice
listener = socket.socket(fileno=int(sys.argv[1]))
parent = int(sys.argv[3])
BlockServer(FileDevice(sys.argv[2]), listener).serve(until=lambda: os.getppid() != parent)
"""


class Served:
    """An image served by one BlockServer child at a time, all on one listener the test keeps:
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
    with BlockClient(served.address) as client:
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


def test_out_of_range_and_zero_counts_raise_typed_errors_and_change_nothing(serve, tmp_path: Path,
                                                                            rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 20, rng)
    before = image.read_bytes()
    served = serve(image)
    sectors = image.stat().st_size // SECTOR
    with BlockClient(served.address) as client:
        refused: list[tuple[Callable[[], object], Op, int, int, Status]] = [
            (lambda: client.read(sectors - 1, 2), Op.READ, sectors - 1, 2, Status.OUT_OF_RANGE),
            (lambda: client.write(sectors, bytes(SECTOR)), Op.WRITE, sectors, 1, Status.OUT_OF_RANGE),
            (lambda: client.write(sectors - 1, bytes(2 * SECTOR)), Op.WRITE, sectors - 1, 2, Status.OUT_OF_RANGE),
            (lambda: client.write(2**63, bytes(SECTOR)), Op.WRITE, 2**63, 1, Status.OUT_OF_RANGE),
            (lambda: client.read(0, 0), Op.READ, 0, 0, Status.BAD_COUNT),
        ]
        for call, op, lba, count, status in refused:
            with pytest.raises(BlockError) as error:
                call()
            assert (error.value.op, error.value.lba, error.value.count, error.value.status) == (op, lba, count, status)
            assert f"{op.name} lba {lba} count {count}" in str(error.value)
        with pytest.raises(ValueError):
            client.write(0, bytes(SECTOR - 1))                  # not whole sectors: never sent
        # a batch stops at its first refusal; what was acknowledged before it stays
        first = rng.randbytes(SECTOR)
        with pytest.raises(BlockError) as error:
            client.write_many([(0, first), (sectors, bytes(SECTOR)), (1, bytes(SECTOR))], window=1)
        assert error.value.lba == sectors
    after = image.read_bytes()
    assert after[:SECTOR] == first, "acknowledged before the refusal"
    assert after[SECTOR:] == before[SECTOR:], "nothing else changed"


def request(op: int, id_: int, lba: int = 0, count: int = 0, data: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    return REQUEST.pack(magic, op, id_, lba, count) + data


def read_reply(sock: socket.socket) -> tuple[int, int, bytes] | None:
    """(status, id, payload), or None at EOF."""
    header = recv_exactly(sock, REPLY.size)
    if header is None:
        return None
    magic, status, id_, length = REPLY.unpack(header)
    assert magic == REPLY_MAGIC
    payload = recv_exactly(sock, length)
    assert payload is not None
    return status, id_, payload


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


def test_malformed_requests_get_an_error_reply_and_change_nothing(serve, tmp_path: Path, rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 20, rng)
    before = digest(image)
    served = serve(image)
    sectors = image.stat().st_size // SECTOR
    # headers that leave the framing in doubt: a reply, then the connection is closed
    for frame, status in [
            (request(Op.WRITE, 7, 0, 1, rng.randbytes(SECTOR), magic=0xDEADBEEF), Status.BAD_MAGIC),
            (request(99, 7, 0, 1), Status.BAD_OP),
            (request(Op.WRITE, 7, 0, MAX_COUNT + 1, rng.randbytes(SECTOR)), Status.BAD_COUNT),
            (request(Op.READ, 7, 0, 2**32 - 1), Status.BAD_COUNT)]:
        with raw_connection(served.address) as sock:
            sock.sendall(frame)
            reply = read_reply(sock)
            assert reply is not None and reply[:2] == (status, 7), reply
            assert read_reply(sock) is None, "closed after the reply"
    # well-framed but impossible: a reply, and the connection goes on
    with raw_connection(served.address) as sock:
        for frame, status in [
                (request(Op.WRITE, 1, 0, 0), Status.BAD_COUNT),
                (request(Op.WRITE, 2, sectors - 1, 2, rng.randbytes(2 * SECTOR)), Status.OUT_OF_RANGE),
                (request(Op.FLUSH, 3, 5, 0), Status.BAD_ARGUMENT),
                (request(Op.INFO, 4, 0, 1), Status.BAD_ARGUMENT),
                (request(Op.INFO, 5), Status.OK)]:
            sock.sendall(frame)
            reply = read_reply(sock)
            assert reply is not None and reply[:2] == (status, REQUEST.unpack_from(frame)[2])
        assert INFO.unpack(reply[2]) == (SECTOR, sectors * SECTOR, MAX_REQUEST_BYTES)
    # a WRITE cut short, then the client leaves: nothing of it is written
    with raw_connection(served.address) as sock:
        sock.sendall(request(Op.WRITE, 1, 0, 8, rng.randbytes(4096))[:-100])
    with BlockClient(served.address) as client:
        client.flush()                                  # the server has taken everything before this
        assert client.read(0, 8) == raw_at(image, 0, 4096)
    assert digest(image) == before


def test_a_connection_spewing_garbage_or_half_a_request_disturbs_no_one_else(serve, tmp_path: Path,
                                                                             rng: random.Random) -> None:
    image = random_image(tmp_path / "disk.img", 4 << 20, rng)
    served = serve(image)
    stop = threading.Event()
    outcomes: list[str] = []

    def spew(seed: int) -> None:
        noise = random.Random(seed)
        with raw_connection(served.address) as sock:
            try:
                while not stop.is_set():
                    junk = noise.randbytes(noise.randint(1, 64 << 10))
                    if junk[:4] == REQUEST_MAGIC.to_bytes(4, "little"):
                        junk = b"\0" + junk
                    sock.sendall(junk)
                outcomes.append("never closed")
            except (BrokenPipeError, ConnectionResetError):
                outcomes.append("closed")

    stalled = raw_connection(served.address)            # half a request, held open throughout
    stalled.sendall(request(Op.WRITE, 1, 0, MAX_COUNT, bytes(1000)))
    spewers = [threading.Thread(target=spew, args=(rng.getrandbits(32),)) for _ in range(3)]
    for t in spewers:
        t.start()
    try:
        blocks = {8 * i: rng.randbytes(4096) for i in rng.sample(range(1, 1024), 300)}
        with BlockClient(served.address) as client:
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


@pytest.mark.parametrize("device_type", (BatchingDevice, RecordingDevice), ids=("write_many", "write"))
def test_a_turns_writes_are_flushed_once_before_any_is_acknowledged(socket_dir: Path, rng: random.Random,
                                                                    device_type: type[RecordingDevice]) -> None:
    address = str(socket_dir / "group")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    client = raw_connection(address)

    def waiting_reply_bytes() -> int:
        return int.from_bytes(fcntl.ioctl(client.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)

    device = device_type(64, waiting_reply_bytes)
    a, b, c, d = (rng.randbytes(8 * SECTOR) for _ in range(4))
    # All of it is in the socket before the server starts, so one turn takes it all: writes to
    # 0 and 8; a read of 0 (it must see a); a write of 0 again (after the read); FLUSH; 16.
    client.sendall(request(Op.WRITE, 1, 0, 8, a) + request(Op.WRITE, 2, 8, 8, b) + request(Op.READ, 3, 0, 8)
                   + request(Op.WRITE, 4, 0, 8, c) + request(Op.FLUSH, 5) + request(Op.WRITE, 6, 16, 8, d))
    replies: dict[int, tuple[int, bytes]] = {}
    server = BlockServer(device, listener)
    thread = threading.Thread(target=server.serve, args=(lambda: len(replies) == 6,))
    thread.start()
    try:
        while len(replies) < 6:
            reply = read_reply(client)
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
    assert device.calls == writes + [("flush", 0)], "one flush after every write, with nothing answered yet"
    assert {id_: status for id_, (status, _) in replies.items()} == dict.fromkeys(range(1, 7), Status.OK)
    assert replies[3][1] == a, "the read saw the write that came before it, not the one after"
    assert bytes(device.memory[:24 * SECTOR]) == c + b + d


def test_the_loop_beats_while_idle(socket_dir: Path) -> None:
    address = str(socket_dir / "idle")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    beats = [0]
    server = BlockServer(RecordingDevice(8, lambda: 0), listener, beat=lambda: beats.__setitem__(0, beats[0] + 1))
    thread = threading.Thread(target=server.serve, args=(lambda: beats[0] >= 5,))
    thread.start()
    thread.join(GUARD)
    listener.close()
    os.unlink(address)
    assert not thread.is_alive() and beats[0] == 5, "no client, yet the loop went round"


# ---- clients that outlive their server ----


def test_nobody_listening_raises_unreachable_and_a_silent_server_raises_timeout(socket_dir: Path) -> None:
    with pytest.raises(BlockUnreachable):
        BlockClient(str(socket_dir / "nobody"), reconnect_timeout=0.2)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)     # listens, never accepts
    listener.bind(str(socket_dir / "silent"))
    listener.listen(8)
    try:
        with pytest.raises(BlockTimeout):
            BlockClient(str(socket_dir / "silent"), timeout=0.2)
    finally:
        listener.close()
        os.unlink(socket_dir / "silent")


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
            with BlockClient(served.address) as client:
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
    with BlockClient(served.address) as client:
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

