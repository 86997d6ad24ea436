"""``hwharness serve disk`` as a person runs it: the export's URI, a line per driver start (a
restart with its cause), third-party clients on it, and Ctrl-C that leaves nothing behind;
and a Linux machine whose root filesystem is that export (``hwharness run --disk URI --root``,
``LinuxImage.spec(disk=URI, root=True)``)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness.errors import MachineError
from harness.machine.ioeventfd import descriptors
from harness.machine.linux import nbd_server
from harness.services.disk import DiskService
from harness.tools.bench import serve
from harness.tools.bench.serve import KillPlan, e2fs_tool, fsck_problems, write_through_kills
from harness.tools.cli.disk import disk_machine
from tests.test_cli import ends, kill_its_qemu, qemu_of, workdirs
from tests.test_nbd import machine_with
from tests.unit.test_nbd import run_tool

REPO = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"driver pid (\d+) serving (ahci|nvme) disk at (\S+)")

# The kill test: Linux writes 12 files of 2 MiB (24 MiB: CI has two cores), a sync after
# every 3; the driver is SIGKILLed once the guest says files 2, 5 and 9 are written (so
# while it writes the next), and SIGSTOPped after 7 (a hang the supervisor's heartbeat finds).
PLAN = KillPlan(files=12, file_kib=2048, batch=3, kill_after=(2, 5, 9), stop_after=7)


def hwharness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


@contextlib.contextmanager
def serving(image: Path, path: Path, accel: str, *options: str,
            env: dict[str, str] | None = None) -> Iterator[tuple["subprocess.Popen[str]", str, str]]:
    """``hwharness serve disk IMAGE --nbd unix:PATH`` as a person runs it: the process, the
    first line it printed (the URI) and the second (the first driver start); killed at the
    end if it still runs."""
    serve = subprocess.Popen(hwharness("serve", "disk", str(image), *options, "--nbd", f"unix:{path}", "--accel", accel),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        yield serve, serve.stdout.readline().strip(), serve.stdout.readline()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def assert_fsck_clean(image: Path) -> None:
    """``fsck.ext4 -fn``: no error and nothing it would fix (a journal left to replay counts)."""
    report = fsck_problems(image)
    assert report is None, report


def copy_root(linux_image, directory: Path) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the root image `make images` built, for a test to write on."""
    if linux_image.root is None:
        pytest.fail("the Linux guest has no root image: rebuild it with `make images`", pytrace=False)
    image = directory / "root.img"
    shutil.copyfile(linux_image.root, image)
    return image


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="hwh-serve-"))     # short: a socket path has at most 107 bytes
    yield directory
    shutil.rmtree(directory)


def test_nbd_uris_become_qemu_blockdev_properties() -> None:
    assert nbd_server("nbd+unix:///?socket=/tmp/a,b.sock") == {"server.type": "unix", "server.path": "/tmp/a,,b.sock"}
    assert nbd_server("nbd://127.0.0.1:10810/disk") == {"server.type": "inet", "server.host": "127.0.0.1",
                                                         "server.port": 10810, "export": "disk"}
    assert nbd_server("nbd://[::1]/")["server.port"] == 10809
    for wrong in ("nbds://host/", "nbd+unix:///", "nbd:///x", "/tmp/disk.sock", "nbd+unix://host/?socket=/s"):
        with pytest.raises(ValueError):
            nbd_server(wrong)


def test_unusable_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M")
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.qcow2"), "-F", "qcow2",
             str(tmp_path / "layer.qcow2"))
    for args, says in [(("serve", "disk", str(tmp_path / "missing.img")), "no such file"),
                       (("serve", "disk", str(image), "--format", "qcow2"), "is not a qcow2 image"),
                       (("serve", "disk", str(tmp_path / "base.qcow2")), "starts with a qcow2 header; --format qcow2"),
                       (("serve", "disk", str(tmp_path / "layer.qcow2"), "--format", "qcow2"),
                        "names another file (a backing file)"),
                       (("serve", "disk", str(image), "--nbd", "udp:1"), "not unix:PATH or tcp:HOST:PORT"),
                       (("serve", "disk", str(image), "--nbd", f"unix:{tmp_path}/no/such/dir.sock"),
                        "cannot listen there"),
                       (("run", "--root", "--", "true"), "--root needs --disk"),
                       (("run", "--disk", "/tmp/disk.sock", "--", "true"), "is not an NBD URI"),
                       (("run", "--kernel", str(image), "--disk", "nbd://localhost/", "--root", "--", "true"),
                        "--root is the Linux guest's"),
                       (("run", "--disk", f"nbd+unix:///?socket={tmp_path}/none.sock", "--", "true"),
                        f"nothing at {tmp_path}/none.sock (start `hwharness serve disk"),
                       (("run", "--disk", f"nbd+unix:///?socket={image}", "--", "true"), "is not a socket"),
                       (("run", "--net", f"unix:{tmp_path}/no-wire", "--", "true"),
                        f"nothing at {tmp_path}/no-wire (start `hwharness serve net"),
                       (("boot", "--net", f"unix:{image}"), "is not a socket")]:
        done = subprocess.run(hwharness(*args), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.startswith("hwharness: error: ") and says in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.qemu
@pytest.mark.parametrize("bus", ("ahci", "nvme"))
def test_serve_prints_the_uri_and_every_start_and_stops_on_ctrl_c(
        hwharness_accel: str, tmp_path: Path, socket_dir: Path, bus: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20) * 8)
    path = socket_dir / "disk.sock"
    with serving(image, path, hwharness_accel, "--bus", bus) as (serve, uri, started):
        assert serve.stdout is not None
        assert uri == f"nbd+unix:///?socket={path}", uri + serve.stderr.read()    # type: ignore[union-attr]
        first = STARTED.match(started)
        assert first is not None and first.group(2, 3) == (bus, uri)
        (export,) = json.loads(run_tool("nbdinfo", "--json", uri))["exports"]
        assert export["export-size"] == image.stat().st_size

        os.kill(int(first.group(1)), signal.SIGKILL)        # the driver process, by the PID it printed
        line = serve.stdout.readline()
        again = STARTED.match(line)
        assert again is not None and again.group(1) != first.group(1), line
        assert "again" in line and "killed by SIGKILL" in line, line
        run_tool("nbdcopy", uri, str(tmp_path / "copy.img"))       # the next driver serves the same disk
        assert (tmp_path / "copy.img").read_bytes() == image.read_bytes()

        serve.send_signal(signal.SIGINT)
        assert serve.wait(60) == 0, serve.stderr.read()     # type: ignore[union-attr]
        assert serve.stdout.read() == "stopping\n"
    assert not path.exists(), "the socket is removed"
    for pid in (first.group(1), again.group(1)):
        assert not Path(f"/proc/{pid}").exists(), f"driver {pid} is left behind"


@pytest.mark.qemu
def test_a_qcow2_image_is_served_as_its_virtual_disk_and_stays_a_sound_qcow2(
        hwharness_accel: str, tmp_path: Path, socket_dir: Path) -> None:
    """A qcow2 image (``--format qcow2``) is served as the disk it holds, not as its file:
    qemu-img sees the export's bytes equal to the image's, and a client's write lands
    inside the image, which qemu-img check finds sound once the server is gone. The
    disk is on QEMU's io_uring backend (QEMU here has it): its QEMU holds an io_uring."""
    image = tmp_path / "disk.qcow2"
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M")
    run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(image))
    path = socket_dir / "disk.sock"
    with serving(image, path, hwharness_accel, "--format", "qcow2") as (serve, uri, started):
        assert uri == f"nbd+unix:///?socket={path}", uri + serve.stderr.read()    # type: ignore[union-attr]
        assert STARTED.match(started)
        qemu = qemu_of(serve.pid)
        assert qemu is not None and descriptors(qemu, "anon_inode:[io_uring]")
        (export,) = json.loads(run_tool("nbdinfo", "--json", uri))["exports"]
        assert export["export-size"] == 8 << 20 != image.stat().st_size
        run_tool("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(image), uri)   # -U: QEMU holds its lock
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0xa5 5M 128k", uri)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(60) == 0, serve.stderr.read()     # type: ignore[union-attr]
    run_tool("qemu-img", "check", "-f", "qcow2", str(image))
    for pattern, offset, length in (("0x5a", "1M", "64k"), ("0xa5", "5M", "128k"), ("0", "0", "1M")):
        out = run_tool("qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}", str(image))
        assert "Pattern verification failed" not in out, out


@pytest.mark.qemu
def test_an_image_another_qemu_holds_is_refused_at_once_not_retried_on_the_thread_pool(
        hwharness_accel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """serve disk's machine falls back to QEMU's thread pool only where QEMU refuses io_uring:
    QEMU's refusal of an image another QEMU holds (its write lock) is raised as it comes."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # the refused machine keeps its files here
    with disk_machine(hwharness_accel, image, None):
        with pytest.raises(MachineError, match='Failed to get "write" lock'):
            with disk_machine(hwharness_accel, image, None, name="second"):
                pass
    assert "refused aio=io_uring" not in caplog.text


@pytest.mark.qemu
def test_a_qemu_killed_under_serve_is_an_error_and_everything_goes(
        hwharness_accel: str, tmp_path: Path, socket_dir: Path) -> None:
    """The proxy machine's QEMU dies (killed here, by its PID): the devices are gone, so
    `serve disk` says so in one line, exits 1 and leaves no process and no socket behind
    (it served on, silently, before)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    path = socket_dir / "disk.sock"
    # a machine whose QEMU died keeps its files for a look: in this test's directory
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with serving(image, path, hwharness_accel, env=env) as (serve, _, line):
        started = STARTED.match(line)
        assert started is not None, serve.stderr.read()      # type: ignore[union-attr]
        kill_its_qemu(serve)
    assert not path.exists(), "the socket is removed"
    assert ends(int(started.group(1)), within=20), "the driver process is left behind"
    assert [d.name.split("-")[-2] for d in workdirs(tmp_path)] == ["serve"], "the dead machine's files"


@pytest.mark.qemu
def test_run_boots_linux_from_the_nvme_export_and_writes_on_it(
        proxy_machine_factory, linux_accel: str, linux_image, tmp_path: Path, socket_dir: Path) -> None:
    image = copy_root(linux_image, tmp_path)
    pm = proxy_machine_factory(machine_with("nvme", image), name="serve-root")
    with DiskService(pm, "nvme", nbd=f"unix:{socket_dir}/root.sock") as service:
        next(service.starts(timeout=120))
        done = subprocess.run(hwharness("run", "--accel", linux_accel, "--disk", service.uri, "--root", "--",
                                        "grep ' / ' /proc/mounts; echo written > /root/note; sync; "
                                        "mount -o remount,ro /"),
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("/dev/vda / ext4 rw"), done.stdout
    pm.close()                                          # QEMU is gone; only the file is left
    assert_fsck_clean(image)
    note = subprocess.run([e2fs_tool("debugfs"), "-R", "cat /root/note", str(image)], capture_output=True,
                          text=True, timeout=60)
    assert note.stdout == "written\n", note.stdout + note.stderr


# What a restarted disk driver tells the supervisor (zygote.mark), in the order it gets there.
DRIVER_PHASES = ("forked", "attached", "opened", "controller", "disk", "accepted", "transmission")


@pytest.mark.qemu
def test_linux_writing_on_its_root_never_notices_the_driver_killed_and_stopped(
        proxy_machine_factory, linux_machine_factory, linux_image, tmp_path: Path, socket_dir: Path,
        rng: random.Random) -> None:
    image = copy_root(linux_image, tmp_path)
    pm = proxy_machine_factory(machine_with("ahci", image), name="serve-kill")
    with DiskService(pm, "ahci", nbd=f"unix:{socket_dir}/root.sock") as service:
        report = write_through_kills(service, lambda name: linux_machine_factory(disk=service.uri, root=True,
                                                                                 name=name), PLAN, rng)
    pm.close()                                          # QEMU is gone; only the file is left
    assert report.problems() == []
    assert [r["signal"] for r in report.restarts] == ["SIGKILL", "SIGKILL", "SIGSTOP", "SIGKILL"]
    for line, restart in zip(report.lines[1:], report.restarts):
        cause = "killed by SIGKILL" if restart["signal"] == "SIGKILL" else "hung: no heartbeat"
        assert "again, " in line and cause in line, line
        # each restart's phases, as the new driver process told them, came in the order it runs them
        told = [phase for phase in restart["phases_ms"] if phase in DRIVER_PHASES]
        assert told == list(DRIVER_PHASES), restart["phases_ms"]
    assert_fsck_clean(image)


@pytest.mark.qemu
def test_a_restart_looked_at_late_is_measured_on_a_client_that_finished_writing(
        proxy_machine_factory, linux_machine_factory, linux_image, tmp_path: Path, socket_dir: Path,
        rng: random.Random, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver dies while Linux writes its last file, and the harness looks at the client
    late (as on a loaded host): once the guest says it is done and QEMU says its disk has been
    idle a while (past its journal commit), or 12 s. The probe must still keep a request on its way then: else the
    guest's next write is its writeback's, ~30 s later, and the stall reads as "the client
    completed no request" (20 s here)."""
    monkeypatch.setattr(serve, "STALL_LIMIT_S", 20.0)
    image = copy_root(linux_image, tmp_path)
    pm = proxy_machine_factory(machine_with("ahci", image), name="serve-late")
    writers = []

    def boot(name: str):  # type: ignore[no-untyped-def]
        writers.append(linux_machine_factory(disk=service.uri, root=True, name=name))
        return writers[-1]

    with DiskService(pm, "ahci", nbd=f"unix:{socket_dir}/root.sock") as service:
        on_time = service.driver.wait_serving

        def late(timeout: float = 30.0, after: int = 0) -> None:
            on_time(timeout, after=after)
            if after:
                writer = writers[-1]
                give_up = time.monotonic() + 120
                while "hwh-writer done" not in writer.console.text() and time.monotonic() < give_up:
                    time.sleep(0.1)
                until_idle(writer, idle_s=6.0, at_most_s=12.0)
        monkeypatch.setattr(service.driver, "wait_serving", late)
        report = write_through_kills(service, boot, KillPlan(files=3, file_kib=256, batch=3, kill_after=(2,)), rng)
    pm.close()
    assert report.problems() == []


def until_idle(m, idle_s: float, at_most_s: float) -> None:  # type: ignore[no-untyped-def]
    """Until QEMU says ``m``'s disk completed no request for ``idle_s`` (query-blockstats'
    idle_time_ns), or ``at_most_s`` passed."""
    deadline = time.monotonic() + at_most_s
    while time.monotonic() < deadline:
        if min(entry["stats"].get("idle_time_ns", 0) for entry in m.qmp("query-blockstats")) >= idle_s * 1e9:
            return
        time.sleep(0.1)
