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
  read), sequential 1 MiB reads with ``dd iflag=direct`` (each must be whole), and
  sequential 1 MiB writes of random bytes with ``dd conv=fsync``, whose sha256 (the
  guest's) is checked against the image file once the server is gone.

Each figure is timed on the host around the command (the console's round trip is in
``call_ms``); the result is the median over rounds, and ``ratio_python_over_qemu_nbd_*``
divides each Python export's figure by qemu-nbd's. Everything runs on the host's cores
at once (a proxy machine, its driver process and the client machine for the Python
exports; qemu-nbd and the client for the peer): read the ratios as what a user gets,
not as the servers' own costs. ``foreign_cores`` is the CPU that processes other than
this one and its descendants (the machines, the driver, qemu-nbd) used while the Linux
client ran, per export: another job on the host's cores shows there.

``bench serve --kill N`` (:func:`kill_run`) measures something else: Linux with its root
on the AHCI export writes files (320 MiB; 16 with ``--quick``), ``sync`` between batches,
while the driver process is SIGKILLed N times at random moments and SIGSTOPped once; it
fails unless Linux's log has no I/O error, every file reads back after a power-off and a
reboot with the sha256 it was written with, and ``fsck.ext4 -fn`` is clean. Per restart:
the supervisor's time from death to serving, the client's stall (see
:func:`write_through_kills`), and ``phases_ms``, each phase's moment in ms from the signal:
the supervisor ``noticed`` the death, the zygote ``spawned`` the next process, which
``forked`` (ran), ``attached`` to a slot, ``opened`` the controller's PCI function (its DMA
domain), brought the ``controller`` up (reset, ports started), identified the
``disk``, was ``serving`` (its first heartbeat), ``accepted`` QEMU's reconnect, reached
``transmission`` (negotiated), and the client completed its first request since
(``client_done``, which ends the stall). The service keeps a standby driver process: a
restart it takes over was ``forked`` and ``attached`` before the signal (negative ms), and
is ``woken`` (instead of ``spawned``) once the dead driver's slot is taken back. The kill test (tests/test_serve.py) runs the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ...errors import BadInput, HarnessError, ImageMissing
from ...machine import Machine
from ...machine.linux import ROOT_DEVICE, linux
from ...services.disk import DiskService
from ..cli.disk import disk_machine
from .paired import ForeignLoad
from .peer_linux import blockread, call_ms, timed

SERVERS = ("ahci", "nvme", "qemu-nbd")
PYTHON_SERVERS = ("ahci", "nvme")
FULL = dict(image_mb=64, rand_count=2000, seq_count=256, seq_mb=48, write_mb=16, rounds=3)
QUICK = dict(image_mb=16, rand_count=200, seq_count=32, seq_mb=8, write_mb=4, rounds=1)
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
    with disk_machine(accel, image, iommu, name=f"bench-serve-{server}", bus=server, ioeventfd=True) as pm, \
            DiskService(pm, server, nbd=f"unix:{path}") as service:    # the machine serve disk boots
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


def _descendants(pid: int) -> list[int]:
    """Every living process under ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def measure(uri: str, image_sha: str, image_bytes: int, accel: str, sizes: dict[str, int],
            copy: Path, round_no: int) -> tuple[dict[str, float], str, float]:
    """The figures of one export (``foreign_cores`` among them); with the sha256 the guest
    wrote and the console's round trip."""
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
        load = ForeignLoad([os.getpid(), *_descendants(os.getpid())])
        count, seq = sizes["rand_count"], sizes["seq_count"]
        figures["linux_randread_4k_qd1_iops"], figures["linux_seqread_128k_mbps"] = \
            blockread(m, "/dev/vda", count, seq, seed=round_no + 1)
        seq_mb = sizes["seq_mb"]
        elapsed, out = timed(m, f"dd if=/dev/vda of=/dev/null bs=1M count={seq_mb} iflag=direct 2>&1")
        if f"{seq_mb}+0 records in" not in out:
            raise RuntimeError(f"dd did not read {seq_mb} whole MiB from the export: {out[-300:]}")
        figures["linux_seqread_1m_mbps"] = seq_mb / elapsed
        mb = sizes["write_mb"]
        _, written = timed(m, f"dd if=/dev/urandom of=/tmp/src bs=1M count={mb} 2>/dev/null; "
                               f"sha256sum < /tmp/src")
        elapsed, _ = timed(m, f"dd if=/tmp/src of=/dev/vda bs=1M count={mb} conv=fsync 2>/dev/null")
        figures["linux_seqwrite_1m_fsync_mbps"] = mb / elapsed
        figures["foreign_cores"] = round(load.since_last(), 2)
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
              for server in PYTHON_SERVERS for key, value in medians[server].items() if key != "foreign_cores"}
    return {"bench": "serve", "accel": accel, "clock": "host", "quick": quick, "rounds": sizes["rounds"],
            "image_mb": sizes["image_mb"], "sizes": sizes, "results": medians, **ratios,
            "call_ms": round(statistics.median(call_ms_per_round), 2),
            "foreign_cores": [r["foreign_cores"] for r in per_round], "checked": "nbdcopy's bytes against the "
            "image's sha256; blockread's and dd's reads whole; the image's first write_mb MiB against the sha256 "
            "Linux wrote",
            "per_round": per_round}


# ---- bench serve --kill N: a Linux machine writing on its root while the driver dies ----

# What Linux's log says when a disk or its filesystem failed a request.
IO_ERROR = re.compile(r"I/O error|blk_update_request|critical \w+ error|EXT4-fs (error|warning)|"
                      r"Remounting filesystem read-only|virtio_blk.*(error|fail)", re.IGNORECASE)
KILL_FULL = dict(files=40, file_kib=8192, batch=4, kills=10)    # 320 MiB
KILL_QUICK = dict(files=8, file_kib=2048, batch=2, kills=2)     # 16 MiB
STALL_POLL_S = 0.005
STALL_LIMIT_S = 60.0


class KillCheckFailed(HarnessError):
    """Linux writing through driver kills saw an error, lost a file's bytes, or left an unclean filesystem."""


@dataclass(frozen=True)
class KillPlan:
    """Linux writes ``files`` files of ``file_kib`` KiB on its root (``/data/f1``...), each a
    header line of its own and then one random source, its sha256 taken from the stream as
    it is written, with ``sync`` after every ``batch`` files. After the guest says
    file i of ``kill_after`` is written, at a random moment of writing the next, the driver
    process is SIGKILLed; after file ``stop_after``, SIGSTOPped (the heartbeat finds it)."""

    files: int
    file_kib: int
    batch: int
    kill_after: tuple[int, ...]
    stop_after: int | None = None

    @classmethod
    def random(cls, rng: random.Random, files: int, file_kib: int, batch: int, kills: int) -> "KillPlan":
        """``kills`` SIGKILLs and one SIGSTOP after distinct files, never the last."""
        if not 0 < kills < files - 1:
            raise BadInput(f"--kill {kills}: between 1 and {files - 2} kills fit a run of {files} files")
        *killed, stopped = rng.sample(range(1, files), kills + 1)
        return cls(files, file_kib, batch, tuple(sorted(killed)), stopped)


@dataclass
class KillReport:
    """What a run of :func:`write_through_kills` saw; ``problems()`` is empty when it all held."""

    plan: KillPlan
    written: dict[str, str] = field(default_factory=dict)       # /data/fN -> sha256 as written
    read_back: dict[str, str] = field(default_factory=dict)     # the same after a reboot
    failed: list[int] = field(default_factory=list)             # files whose writing failed in the guest
    lines: list[str] = field(default_factory=list)              # the service's line per driver start
    restarts: list[dict[str, object]] = field(default_factory=list)
    io_errors: list[str] = field(default_factory=list)          # lines of the writer's kernel log
    foreign_cores: float = 0.0      # CPU that processes not of this run used while Linux wrote

    def problems(self) -> list[str]:
        found = [f"the guest failed to write files {self.failed}"] if self.failed else []
        if self.io_errors:
            found.append(f"Linux's log reports I/O errors: {self.io_errors[:5]}")
        if len(self.written) != self.plan.files:
            found.append(f"{len(self.written)} of {self.plan.files} files written")
        if self.read_back != self.written:
            wrong = sorted(n for n in self.written if self.read_back.get(n) != self.written[n])
            found.append(f"after a reboot these files hold other bytes than were written: {wrong}")
        expected = len(self.plan.kill_after) + (self.plan.stop_after is not None)
        if len(self.restarts) != expected:
            found.append(f"{len(self.restarts)} driver restarts, not {expected}")
        return found


def _disk_operations(m: Machine) -> int:
    """Requests QEMU's block layer completed for the guest (its own counters)."""
    return sum(entry["stats"][key] for entry in m.qmp("query-blockstats")
               for key in ("rd_operations", "wr_operations", "flush_operations"))


def write_through_kills(service: DiskService, boot: Callable[[str], Machine], plan: KillPlan,
                        rng: random.Random, timeout: float = 600.0) -> KillReport:
    """Boot Linux with its root on ``service``'s export (``boot(name)``: a started machine at
    its prompt), write the files of ``plan`` while the driver is killed and stopped, shut it
    down without unmounting (a power cut), boot again and read every file back.

    A restart's ``stall_ms`` is what the client saw: from the signal to the first request
    QEMU's block layer completed for the guest once the next driver served (the guest's
    probe keeps one on its way, a few ms apart)."""
    report = KillReport(plan)
    starts = service.starts(timeout=120)
    report.lines.append(next(starts))
    writer = boot("writer")
    console = writer.console
    assert console is not None
    mounted, _ = console.run("grep ' / ' /proc/mounts")
    if not mounted.startswith(f"{ROOT_DEVICE} / ext4 rw"):
        raise KillCheckFailed(f"the writer's root is not the export, mounted read-write: {mounted!r}")
    # One random source in tmpfs, so that once the files start the guest only writes. A probe
    # reads a random 4 KiB of the disk (O_DIRECT) again and again meanwhile, so that a request
    # is always on its way when the driver dies and the stall is the client's, not an idle
    # moment's; it runs until the last restart is measured (below), not just until the files
    # are written: a harness that looks late at a restart during the last file would find the
    # guest done and its disk idle, and no request ever completing (the stall unmeasured).
    # The markers are quoted apart so that the shell's echo of the line does not match.
    console.sendline(
        f"set -o pipefail; mkdir -p /data; dd if=/dev/urandom of=/tmp/src bs=64k count={plan.file_kib // 64} "
        f"2>/dev/null; ( while :; do dd if={ROOT_DEVICE} of=/dev/null bs=4k count=1 skip=$((RANDOM % 4096)) "
        f"iflag=direct 2>/dev/null; done ) & probe=$!; for i in $(seq 1 {plan.files}); do "
        f"s=$( {{ printf 'hwh file %08d\\n' $i; cat /tmp/src; }} | tee /data/f$i | sha256sum ) "
        f"|| echo hwh-'failed' $i; echo hwh-'wrote' $i $s; [ $((i % {plan.batch})) = 0 ] && sync; done; "
        f"sync; echo hwh-'writer' done")
    last: float | None = None               # when the guest said the last file was written
    load = ForeignLoad([os.getpid(), *_descendants(os.getpid())])
    for i in range(1, plan.files + 1):
        found = console.expect([r"hwh-wrote (\d+) ([0-9a-f]{64})", r"hwh-failed (\d+)\r?\n"], timeout=timeout)
        if found.index == 1:
            report.failed.append(int(found.match.group(1)))
            continue
        report.written[f"/data/f{found.match.group(1)}"] = found.match.group(2)
        now = time.monotonic()
        per_file, last = (now - last if last is not None else 0.0), now
        if i in plan.kill_after or i == plan.stop_after:
            time.sleep(rng.uniform(0, 0.8 * per_file))          # a random moment of writing the next file
            report.restarts.append(_kill_once(service, writer, i in plan.kill_after))
            report.lines.append(next(starts))
            last = time.monotonic()
    console.wait_for("hwh-writer done", timeout=timeout)
    console.run("kill $probe; wait $probe")
    load.own = [os.getpid(), *_descendants(os.getpid())]       # the drivers started since are ours too
    report.foreign_cores = round(load.since_last(), 2)
    dmesg, _ = console.run("dmesg")
    report.io_errors = [line for line in dmesg.splitlines() if IO_ERROR.search(line)]
    writer.shutdown()                      # power off: a reboot without unmounting

    reader = boot("reader")
    assert reader.console is not None
    listed, status = reader.console.run("sha256sum /data/f*", timeout=timeout)
    if status:
        raise KillCheckFailed(f"the files cannot be read back after a reboot: {listed[-300:]}")
    report.read_back = dict(reversed(line.split()) for line in listed.splitlines())
    if reader.console.run("mount -o remount,ro /") != ("", 0):
        raise KillCheckFailed("the root filesystem would not remount read-only after reading back")
    reader.shutdown()
    return report


def _kill_once(service: DiskService, client: Machine, kill: bool) -> dict[str, object]:
    """SIGKILL (or SIGSTOP) the serving driver; its restart's time and the client's stall."""
    driver = service.driver
    after = len(driver.restarts) + 1
    signalled = time.monotonic()
    os.kill(driver.pid, signal.SIGKILL if kill else signal.SIGSTOP)        # our driver, by its PID
    driver.wait_serving(STALL_LIMIT_S, after=after)
    restart = driver.restarts[after - 1]
    before = _disk_operations(client)
    while _disk_operations(client) == before:
        if time.monotonic() - signalled > STALL_LIMIT_S:
            raise KillCheckFailed(f"the client completed no request for {STALL_LIMIT_S} s after a driver restart")
        time.sleep(STALL_POLL_S)
    done = time.monotonic()
    assert service.supervisor is not None
    service.supervisor.collect_phases()
    moments = {"noticed": restart.died_at, **restart.phases, "serving": restart.serving_at, "client_done": done}
    return {"signal": "SIGKILL" if kill else "SIGSTOP", "cause": restart.cause, "restart_ms": round(restart.ms, 1),
            "stall_ms": round((done - signalled) * 1e3, 1),
            "phases_ms": {phase: round((at - signalled) * 1e3, 1) for phase, at in sorted(moments.items(),
                                                                                      key=lambda item: item[1])}}


def e2fs_tool(name: str) -> str:
    """The path of an e2fsprogs tool (Debian keeps them in /sbin)."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")
    if found is None:
        raise ImageMissing(f"{name} is not installed: run `make deps` (e2fsprogs)")
    return found


def fsck_problems(image: Path) -> str | None:
    """``fsck.ext4 -fn`` of ``image`` (QEMU gone): None if clean, else its report (an error,
    something it would fix, or a journal left to replay)."""
    done = subprocess.run([e2fs_tool("fsck.ext4"), "-fn", str(image)], capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    clean = done.returncode == 0 and "Fix?" not in report and "journal recovery" not in report
    return None if clean else report


def grown_root(directory: Path, megabytes: int) -> Path:
    """A copy of the root image `make images` built, grown to ``megabytes`` (resize2fs)."""
    source = linux().root
    if source is None:
        raise ImageMissing("the Linux guest has no root image: rebuild it with `make images`")
    image = directory / "root.img"
    shutil.copyfile(source, image)
    if megabytes << 20 > image.stat().st_size:
        os.truncate(image, megabytes << 20)
        subprocess.run([e2fs_tool("e2fsck"), "-fp", str(image)], check=True, capture_output=True, timeout=120)
        subprocess.run([e2fs_tool("resize2fs"), str(image)], check=True, capture_output=True, timeout=120)
    return image


def linux_through_kills(accel: str, plan: KillPlan, rng: random.Random, iommu: bool | None = None,
                        name: str = "bench-serve-kill") -> tuple[KillReport, str | None, float]:
    """A copy of the root image (grown to hold ``plan``'s files) on a proxy machine's AHCI
    port, served by its supervised driver; :func:`write_through_kills` on it; then, QEMU
    gone, ``fsck.ext4 -fn``. The report, fsck's complaint (None: clean) and the seconds the
    writing and reading back took."""
    guest = linux()
    with tempfile.TemporaryDirectory(prefix="hwh-kill-") as tmp:    # short: socket paths
        directory = Path(tmp)
        image = grown_root(directory, 128 + plan.files * plan.file_kib // 1024)
        with contextlib.ExitStack() as stack:
            pm = stack.enter_context(disk_machine(accel, image, iommu, name=name))
            service = stack.enter_context(DiskService(pm, "ahci", nbd=f"unix:{directory}/root.sock"))

            def boot(name: str) -> Machine:
                m = stack.enter_context(Machine(guest.spec(accel=accel, disk=service.uri, root=True), name=name))
                guest.wait_ready(m)
                return m
            started = time.monotonic()
            report = write_through_kills(service, boot, plan, rng)
            elapsed = time.monotonic() - started
        return report, fsck_problems(image), elapsed        # QEMU is gone; only the file is left


def kill_run(accel: str, kills: int | None, quick: bool = False, iommu: bool | None = None,
             seed: int | None = None) -> dict[str, object]:
    """``bench serve --kill N``: Linux on the AHCI export writes files while the driver is
    killed N times and stopped once; fails (KillCheckFailed) unless nothing was lost."""
    sizes = dict(KILL_QUICK if quick else KILL_FULL)
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    plan = KillPlan.random(rng, sizes["files"], sizes["file_kib"], sizes["batch"], kills or sizes["kills"])
    report, fsck, elapsed = linux_through_kills(accel, plan, rng, iommu)
    problems = report.problems() + ([f"fsck.ext4 -fn: {fsck[-500:]}"] if fsck else [])
    if problems:
        raise KillCheckFailed("; ".join(problems))
    killed = [r for r in report.restarts if r["signal"] == "SIGKILL"]
    stalls = sorted(float(r["stall_ms"]) for r in killed)       # type: ignore[arg-type]
    restarts = sorted(float(r["restart_ms"]) for r in killed)   # type: ignore[arg-type]
    phases: dict[str, list[float]] = {}
    for r in killed:
        for phase, ms in r["phases_ms"].items():                # type: ignore[attr-defined]
            phases.setdefault(phase, []).append(ms)
    return {"bench": "serve", "kill": len(plan.kill_after), "accel": accel, "clock": "host", "quick": quick,
            "seed": seed,
            "plan": asdict(plan), "written_mb": plan.files * plan.file_kib / 1024, "elapsed_s": round(elapsed, 1),
            "results": {"restart_p50_ms": statistics.median(restarts), "restart_max_ms": max(restarts),
                        "stall_p50_ms": statistics.median(stalls), "stall_max_ms": max(stalls),
                        "io_errors": 0, "checksum_mismatches": 0, "fsck": "clean",
                        "phases_p50_ms": {phase: statistics.median(ms) for phase, ms in
                                          sorted(phases.items(), key=lambda item: statistics.median(item[1]))}},
            "foreign_cores": report.foreign_cores, "restarts": report.restarts, "lines": report.lines,
            "checked": "no I/O error in Linux's log; every file's sha256 as written equals its sha256 read back "
                       "after a power-off and reboot; fsck.ext4 -fn clean once QEMU is gone"}
