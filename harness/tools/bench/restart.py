"""``hwharness bench restart``: the AHCI driver in a supervised process, killed under a
write load, and what the clients lose (nothing, or the bench fails its own check).

A client (a thread of this process, through the block protocol of
:mod:`harness.services.nbd`, NBD) writes distinct 4 KiB blocks, each with content of its
own, keeping 32 writes in flight, and counts a block once its write is
acknowledged (durable: written and flushed). Meanwhile the driver process is
killed at random moments (SIGKILL, or SIGSTOP for a hang the heartbeat must
catch); the supervisor restarts it, and the client reconnects and sends again
what was not acknowledged. When the machine is gone, the image file is read
back: every acknowledged block must hold its own content (``acked_lost``).

``restart_ms`` is from the supervisor seeing the death (or, for a hang, the
missing heartbeat) to the new driver's first heartbeat, the device initialised
again. Under the emulating KVM the counts are cut tenfold.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import random
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from drivers.ahci.driver import DEVICE as AHCI_DEVICE, VENDOR as AHCI_VENDOR

from ...services.nbd import NbdClient
from ...processes.supervisor import Supervisor
from .ahci import machine
from .stats import pct

log = logging.getLogger(__name__)

BLOCK = 4096
WINDOW = 32                     # writes a client keeps in flight
_serial = itertools.count(1)


def content(seed: int, block: int) -> bytes:
    """Block ``block``'s own 4 KiB: no two blocks alike, and cheap to check."""
    head = hashlib.blake2b(f"{seed}:{block}".encode(), digest_size=64).digest()
    return head * (BLOCK // len(head))


def disk_listener() -> tuple[socket.socket, str]:
    """The supervisor's listening socket for the disk's clients (abstract: no file to leave)."""
    name = f"\0hwharness-disk-{os.getpid()}-{next(_serial)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(name)
    listener.listen(64)
    return listener, name


class Writer(threading.Thread):
    """Writes blocks 0..count-1 once, in a random order, then rewrites written ones (same
    content) until told to stop; ``acked`` holds every block whose write was acknowledged."""

    def __init__(self, address: str, seed: int, count: int) -> None:
        super().__init__(name="hwharness-writer", daemon=True)
        self.address, self.seed, self.count = address, seed, count
        self.acked: set[int] = set()
        self.writes_acked = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.first_pass_done = threading.Event()
        self.client: NbdClient | None = None

    def run(self) -> None:
        try:
            rng = random.Random(self.seed)
            order = list(range(self.count))
            rng.shuffle(order)
            with NbdClient(self.address, reconnect_timeout=60.0) as client:
                self.client = client
                per = BLOCK // client.sector_size
                start = 0
                while not self.stop.is_set() or start < len(order):
                    if start >= len(order):
                        self.first_pass_done.set()
                        chunk = rng.sample(order, WINDOW)
                    else:
                        chunk = order[start:start + 256]
                        start += len(chunk)
                    client.write_many([(b * per, content(self.seed, b)) for b in chunk], window=WINDOW)
                    self.acked.update(chunk)
                    self.writes_acked += len(chunk)
                self.first_pass_done.set()
        except BaseException as exc:            # the bench reports it; the thread must not hide it
            self.error = exc
            self.first_pass_done.set()


def run(accel: str, quick: bool = False, kills: int | None = None, blocks: int | None = None,
        hang: bool = False, seed: int | None = None, iommu: bool | None = None) -> dict[str, object]:
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hwharness-restart-")))
        image = scratch / "disk.img"
        with open(image, "wb") as f:
            f.truncate(128 << 20)            # sparse: 20,000 blocks of 4 KiB and room to spare
        listener, address = disk_listener()
        stack.callback(listener.close)
        with contextlib.ExitStack() as running:
            pm, aio = machine(running, accel, image, iommu, name="bench-restart")
            slow = pm.machine.accel != "tcg"
            kills = kills or (3 if quick else 20) // (10 if slow and not quick else 1) or 2
            blocks = blocks or (2000 if quick else 20000) // (10 if slow else 1)
            if blocks * BLOCK > image.stat().st_size:
                raise ValueError(f"{blocks} blocks do not fit the {image.stat().st_size >> 20} MiB disk")
            sup = running.enter_context(Supervisor(pm, hang_timeout=1.0))
            ahci = pm.bus.find(vendor=AHCI_VENDOR, device=AHCI_DEVICE)
            driver = sup.run("harness.services.disk:disk_driver", ahci, sockets={"listener": listener})
            driver.wait_serving(120)
            writer = Writer(address, seed, blocks)
            started = time.monotonic()
            writer.start()
            for n in range(1, kills + 1):
                time.sleep(rng.uniform(0.05, 0.4))
                if writer.error is not None:
                    break
                os.kill(driver.pid, signal.SIGSTOP if hang else signal.SIGKILL)   # our driver, by its PID
                driver.wait_serving(120, after=n)
            writer.stop.set()
            writer.join(600)
            elapsed = time.monotonic() - started
            if writer.error is not None:
                raise writer.error
            client = writer.client
            assert client is not None
        # QEMU is gone: what the image holds is what the disk kept
        with open(image, "rb") as f:
            lost = [b for b in sorted(writer.acked) if (f.seek(b * BLOCK), f.read(BLOCK))[1] != content(seed, b)]
    restarts = [r.ms for r in driver.restarts]
    if lost:
        log.error("acknowledged blocks lost: %s", lost[:20])
    results: dict[str, Any] = {
        "restart_p50_ms": statistics.median(restarts), "restart_p99_ms": pct(sorted(restarts), 0.99),
        "restart_max_ms": max(restarts), "restarts": len(restarts), "acked_lost": len(lost),
        "writes_acked": writer.writes_acked, "blocks_acked": len(writer.acked), "blocks": blocks,
        "reconnects": client.reconnects, "resent": client.resent, "writes_per_s": writer.writes_acked / elapsed,
    }
    return {"benchmark": "restart", "accel": pm.machine.accel, "aio": aio, "clock": "host", "quick": quick,
            "signal": "SIGSTOP" if hang else "SIGKILL", "seed": seed,
            "causes": sorted({r.cause.split(" for ")[0] for r in driver.restarts}), "results": results}
