"""A real AHCI disk (QEMU's ICH9, an ide-hd) served over NBD by the Python
driver (harness/services/disk.py), written by an NbdClient in another process, and the
image file checked byte-exact once QEMU is gone."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.services.disk import serve_disk
from harness.access import Deadline
from tests.test_ahci import attach

pytestmark = pytest.mark.qemu

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_BYTES = 32 << 20
BLOCK = 4096
BLOCKS = 400
OVERLAPS = 16
GUARD = 600.0           # the longest the client may take before the test calls it a hang


def plan(seed: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """The client's writes: BLOCKS distinct 4 KiB blocks at distinct places, then pairs that
    overlap (the same place twice in one batch: the second must win)."""
    rng = random.Random(seed)
    places = rng.sample(range(IMAGE_BYTES // BLOCK), BLOCKS + OVERLAPS)
    unique = [(place * BLOCK // 512, rng.randbytes(BLOCK)) for place in places[:BLOCKS]]
    overlapping = []
    for place in places[BLOCKS:]:
        overlapping += [(place * BLOCK // 512, rng.randbytes(BLOCK)), (place * BLOCK // 512, rng.randbytes(BLOCK))]
    return unique, overlapping


# The client process: write the plan, read it back, and say how it went on one JSON line.
CLIENT = """
import json, sys, time
from harness.services.nbd import NbdClient
from tests.test_block_ahci import plan
unique, overlapping = plan(int(sys.argv[2]))
with NbdClient("\\0" + sys.argv[1]) as client:      # an abstract name; argv cannot carry its NUL
    start = time.perf_counter()
    client.write_many(unique, window=32)
    seconds = time.perf_counter() - start
    client.write_many(overlapping, window=32)
    final = dict(unique + overlapping)
    wrong = [lba for lba, data in final.items() if client.read(lba, len(data) // 512) != data]
    print(json.dumps({"write_seconds": seconds, "wrong": wrong, "size": client.size}))
"""


def test_a_served_disk_keeps_every_acknowledged_write(proxy_machine_factory, tmp_path: Path,
                                                      rng: random.Random) -> None:
    image = tmp_path / "disk.img"
    original = rng.randbytes(IMAGE_BYTES)
    image.write_bytes(original)
    pm = proxy_machine_factory(attach(image), name="ahci-block")
    name = f"hwharness-ahci-block-{os.getpid()}-{rng.getrandbits(32):08x}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(16)
    seed = rng.getrandbits(32)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = subprocess.Popen([sys.executable, "-c", CLIENT, name, str(seed)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    beats = [0]
    deadline = Deadline(GUARD)
    try:
        serve_disk(pm.bus, listener, beat=lambda: beats.__setitem__(0, beats[0] + 1),
                   until=lambda: client.poll() is not None or deadline.expired)
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGKILL)
        out, err = client.communicate()
        listener.close()
    assert client.returncode == 0, f"the client failed:\n{err.decode()}"
    report = json.loads(out)
    assert report["size"] == IMAGE_BYTES
    assert report["wrong"] == [], "read back through the server, these differ"
    assert beats[0] > 0
    throughput = BLOCKS * BLOCK / report["write_seconds"]
    log.info("%d acknowledged 4 KiB writes in %.2f s: %.0f KiB/s, %.0f writes/s", BLOCKS, report["write_seconds"],
             throughput / 1024, BLOCKS / report["write_seconds"])
    print(f"block protocol over AHCI: {BLOCKS} 4 KiB writes, window 32: {throughput / 1024:.0f} KiB/s")
    pm.close()                                          # QEMU is gone; only the file is left
    unique, overlapping = plan(seed)
    expected = bytearray(original)
    for lba, data in unique + overlapping:
        expected[lba * 512:lba * 512 + len(data)] = data
    on_disk = image.read_bytes()
    for lba, data in dict(unique + overlapping).items():
        assert on_disk[lba * 512:lba * 512 + len(data)] == data, f"sector {lba}"
    assert on_disk == expected, "nothing else changed"
