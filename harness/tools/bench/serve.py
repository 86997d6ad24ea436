"""``hwharness bench serve``: what a Linux machine gets from a disk served over NBD by the
Python AHCI driver, by the Python NVMe driver, and by ``qemu-nbd`` (the standard server,
the peer) serving the same kind of image file.

Each round serves a fresh image of random bytes from each server in turn (the order
rotates from round to round) and measures, on that export:

- the host's client: ``nbdcopy`` reads the whole export into a file (the server's own
  rate), checked against the image's sha256;
- a Linux client machine (the guest of ``make images``, the export its ``/dev/vda``
  through QEMU's NBD client): 4 KiB random reads at QD1 and sequential 128 KiB reads
  with the project's ``blockread`` (O_DIRECT, one request at a time; it fails on a short
  read), and sequential 1 MiB writes of random bytes with ``dd conv=fsync``, whose
  sha256 (the guest's) is checked against the image file once the server is gone.

Each figure is timed on the host around the command (the console's round trip is in
``call_ms``); the result is the median over rounds, and ``ratio_python_over_qemu_nbd_*``
divides each Python export's figure by qemu-nbd's. Everything runs on the host's cores
at once (a proxy machine, its driver process and the client machine for the Python
exports; qemu-nbd and the client for the peer): read the ratios as what a user gets,
not as the servers' own costs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ...machine import Machine
from ...machine.linux import linux
from ...services.disk import DiskService
from . import ahci, nvme
from .peer_linux import blockread, call_ms, timed

SERVERS = ("ahci", "nvme", "qemu-nbd")
PYTHON_SERVERS = ("ahci", "nvme")
FULL = dict(image_mb=64, rand_count=2000, seq_count=256, write_mb=16, rounds=3)
QUICK = dict(image_mb=16, rand_count=200, seq_count=32, write_mb=4, rounds=1)
SERVE_TIMEOUT_S = 120.0


def _sha256(path: Path, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size if length is None else length
        while left:
            chunk = f.read(min(left, 1 << 20))
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _random_image(path: Path, megabytes: int) -> str:
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(random.randbytes(1 << 20))
    return _sha256(path)


@contextlib.contextmanager
def exported(server: str, image: Path, accel: str, iommu: bool | None, directory: Path) -> Iterator[str]:
    """``image`` served over NBD on a Unix socket in ``directory`` by ``server``; yields the URI."""
    path = directory / f"{server}.sock"
    if server == "qemu-nbd":
        yield from _qemu_nbd(image, path)
        return
    with contextlib.ExitStack() as stack:
        pm, _ = (ahci.machine(stack, accel, image, iommu, name="bench-serve-ahci") if server == "ahci"
                 else nvme.machine(stack, accel, image, iommu))
        service = stack.enter_context(DiskService(pm, server, nbd=f"unix:{path}"))
        next(service.starts(timeout=SERVE_TIMEOUT_S))
        yield service.uri


def _qemu_nbd(image: Path, path: Path) -> Iterator[str]:
    """qemu-nbd on the io_uring backend where it has one (as the proxy machines get), else threads;
    persistent (-t), for the host's client and then the Linux machine."""
    for aio in ("io_uring", "threads"):
        process = subprocess.Popen(["qemu-nbd", "-f", "raw", f"--aio={aio}", "-t", "-e", "4", "-k", str(path),
                                    str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while not path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if path.exists():
            try:
                yield f"nbd+unix:///?socket={path}"
            finally:
                process.terminate()
                process.wait(30)
            return
        process.kill()
        _, error = process.communicate()
        if aio == "threads":
            raise RuntimeError(f"qemu-nbd did not serve {image}: {error.strip()}")


def measure(uri: str, image_sha: str, image_bytes: int, accel: str, sizes: dict[str, int],
            copy: Path, round_no: int) -> tuple[dict[str, float], str, float]:
    """The figures of one export; with the sha256 the guest wrote and the console's round trip."""
    figures: dict[str, float] = {}
    nbdcopy = shutil.which("nbdcopy")
    if nbdcopy is None:
        raise RuntimeError("nbdcopy is not installed: run `make deps` (libnbd-bin)")
    t0 = time.perf_counter()
    subprocess.run([nbdcopy, uri, str(copy)], check=True, timeout=600)
    figures["host_nbdcopy_read_mbps"] = image_bytes / (1 << 20) / (time.perf_counter() - t0)
    if _sha256(copy) != image_sha:
        raise RuntimeError(f"nbdcopy read {uri} and got other bytes than the image holds")
    copy.unlink()
    guest = linux()
    with Machine(guest.spec(accel=accel, disk=uri), name="bench-serve-client") as m:
        guest.wait_ready(m)
        count, seq = sizes["rand_count"], sizes["seq_count"]
        figures["linux_randread_4k_qd1_iops"], figures["linux_seqread_128k_mbps"] = \
            blockread(m, "/dev/vda", count, seq, seed=round_no + 1)
        mb = sizes["write_mb"]
        _, written = timed(m, f"dd if=/dev/urandom of=/tmp/src bs=1M count={mb} 2>/dev/null; "
                               f"sha256sum < /tmp/src")
        elapsed, _ = timed(m, f"dd if=/tmp/src of=/dev/vda bs=1M count={mb} conv=fsync 2>/dev/null")
        figures["linux_seqwrite_1m_fsync_mbps"] = mb / elapsed
        client_call_ms = call_ms(m)
    return figures, written.split()[0], client_call_ms


def run(accel: str, quick: bool = False, iommu: bool | None = None) -> dict[str, object]:
    sizes = QUICK if quick else FULL
    per_round: list[dict[str, object]] = []
    call_ms_per_round: list[float] = []
    with tempfile.TemporaryDirectory(prefix="hwh-bench-serve-") as tmp:   # short: socket paths
        directory = Path(tmp)
        image = directory / "disk.img"
        for round_no in range(sizes["rounds"]):
            order = SERVERS[round_no % 3:] + SERVERS[:round_no % 3]
            for server in order:
                image_sha = _random_image(image, sizes["image_mb"])
                with exported(server, image, accel, iommu, directory) as uri:
                    figures, written, ms = measure(uri, image_sha, sizes["image_mb"] << 20, accel, sizes,
                                                   directory / "copy.img", round_no)
                # the server is gone: what the guest wrote and flushed is in the file
                if _sha256(image, sizes["write_mb"] << 20) != written:
                    raise RuntimeError(f"{server}: the image does not hold what Linux wrote with fsync")
                per_round.append({"round": round_no, "server": server, **figures})
                call_ms_per_round.append(ms)
    medians = {server: {key: round(statistics.median(r[key] for r in per_round if r["server"] == server), 2)
                        for key in per_round[0] if key not in ("round", "server")}
               for server in SERVERS}
    ratios = {f"ratio_python_over_qemu_nbd_{server}_{key}": round(value / medians["qemu-nbd"][key], 3)
              for server in PYTHON_SERVERS for key, value in medians[server].items()}
    return {"bench": "serve", "accel": accel, "quick": quick, "rounds": sizes["rounds"],
            "image_mb": sizes["image_mb"], "sizes": sizes, "results": medians, **ratios,
            "call_ms": round(statistics.median(call_ms_per_round), 2), "checked": "nbdcopy's bytes against the image's "
            "sha256; blockread's reads whole; the image's first write_mb MiB against the sha256 Linux wrote",
            "per_round": per_round}
