"""``hwharness serve disk`` as a person runs it: the export's URI, a line per driver start (a
restart with its cause), third-party clients on it, and Ctrl-C that leaves nothing behind;
and a Linux machine whose root filesystem is that export (``hwharness run --disk URI --root``,
``LinuxImage.spec(disk=URI, root=True)``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from harness.machine.linux import ROOT_DEVICE, nbd_server
from harness.services.disk import DiskService
from tests.test_nbd import machine_with
from tests.unit.test_nbd import run_tool

REPO = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"driver pid (\d+) serving (ahci|nvme) disk at (\S+)")

# The kill test: Linux writes FILES files of FILE_KIB each (24 MiB: CI has two cores), each
# with fsync, a sync after every BATCH; the driver is SIGKILLed once the guest says these
# files are written (so while it writes the next), and SIGSTOPped once (a hang the
# supervisor's heartbeat finds).
FILES, FILE_KIB, BATCH = 12, 2048, 3
KILL_AFTER = (2, 5, 9)
STOP_AFTER = 7
# what Linux's log says when a disk or its filesystem failed a request
IO_ERROR = re.compile(r"I/O error|blk_update_request|critical \w+ error|EXT4-fs (error|warning)|"
                      r"Remounting filesystem read-only|virtio_blk.*(error|fail)", re.IGNORECASE)


def hwharness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def e2fs_tool(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")
    if found is None:
        pytest.fail(f"{name} is not installed: run `make deps` (e2fsprogs)", pytrace=False)
    return found


def assert_fsck_clean(image: Path) -> None:
    """``fsck.ext4 -fn``: no error and nothing it would fix (a journal left to replay counts)."""
    done = subprocess.run([e2fs_tool("fsck.ext4"), "-fn", str(image)], capture_output=True, text=True, timeout=120)
    report = done.stdout + done.stderr
    assert done.returncode == 0 and "Fix?" not in report and "journal recovery" not in report, report


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
    for args, says in [(("serve", "disk", str(tmp_path / "missing.img")), "no such file"),
                       (("serve", "disk", str(image), "--nbd", "udp:1"), "not unix:PATH or tcp:HOST:PORT"),
                       (("serve", "disk", str(image), "--nbd", f"unix:{tmp_path}/no/such/dir.sock"),
                        "cannot listen there"),
                       (("run", "--root", "--", "true"), "--root needs --disk"),
                       (("run", "--disk", "/tmp/disk.sock", "--", "true"), "is not an NBD URI"),
                       (("run", "--kernel", str(image), "--disk", "nbd://localhost/", "--root", "--", "true"),
                        "--root is the Linux guest's")]:
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
    serve = subprocess.Popen(hwharness("serve", "disk", str(image), "--bus", bus, "--nbd", f"unix:{path}",
                                       "--accel", hwharness_accel),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        uri = serve.stdout.readline().strip()
        assert uri == f"nbd+unix:///?socket={path}", uri + serve.stderr.read()    # type: ignore[union-attr]
        first = STARTED.match(serve.stdout.readline())
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
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert not path.exists(), "the socket is removed"
    for pid in (first.group(1), again.group(1)):
        assert not Path(f"/proc/{pid}").exists(), f"driver {pid} is left behind"


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


@pytest.mark.qemu
def test_linux_writing_on_its_root_never_notices_the_driver_killed_and_stopped(
        proxy_machine_factory, linux_machine_factory, linux_image, tmp_path: Path, socket_dir: Path) -> None:
    image = copy_root(linux_image, tmp_path)
    pm = proxy_machine_factory(machine_with("ahci", image), name="serve-kill")
    with DiskService(pm, "ahci", nbd=f"unix:{socket_dir}/root.sock") as service:
        starts = service.starts(timeout=120)
        next(starts)
        writer = linux_machine_factory(disk=service.uri, root=True, name="writer")
        console = writer.console
        assert console.run("grep ' / ' /proc/mounts")[0].startswith(f"{ROOT_DEVICE} / ext4 rw")
        # the sources in tmpfs first, so that once the copies start the guest only writes;
        # the markers are quoted apart so that the shell's echo of the line does not match
        console.sendline(
            f"mkdir -p /data; for i in $(seq 1 {FILES}); do "
            f"dd if=/dev/urandom of=/tmp/src$i bs=64k count={FILE_KIB // 64} 2>/dev/null; "
            f"echo hwh-'sum' $i $(sha256sum < /tmp/src$i); done; "
            f"for i in $(seq 1 {FILES}); do "
            f"dd if=/tmp/src$i of=/data/f$i bs=64k conv=fsync 2>/dev/null || echo hwh-'failed' $i; "
            f"echo hwh-'wrote' $i; [ $((i % {BATCH})) = 0 ] && sync; done; sync; echo hwh-'writer' done")
        sums = {}
        for i in range(1, FILES + 1):
            found = console.wait_for(r"hwh-sum (\d+) ([0-9a-f]{64})", timeout=300)
            sums[f"/data/f{found.group(1)}"] = found.group(2)
        assert len(sums) == FILES
        for i in range(1, FILES + 1):
            found = console.expect([r"hwh-wrote (\d+)\r?\n", r"hwh-failed (\d+)\r?\n"], timeout=300)
            assert (found.index, found.match.group(1)) == (0, str(i)), found.before
            if i in KILL_AFTER or i == STOP_AFTER:
                victim = service.driver.pid
                os.kill(victim, signal.SIGKILL if i in KILL_AFTER else signal.SIGSTOP)   # ours, by its PID
                line = next(starts)
                cause = "killed by SIGKILL" if i in KILL_AFTER else "hung: no heartbeat"
                assert "again, " in line and cause in line, line
        console.wait_for("hwh-writer done", timeout=300)
        assert len(service.driver.restarts) == len(KILL_AFTER) + 1
        dmesg, _ = console.run("dmesg")
        assert not IO_ERROR.search(dmesg), dmesg
        writer.shutdown()                      # power off: a reboot without unmounting

        reader = linux_machine_factory(disk=service.uri, root=True, name="reader")
        listed, status = reader.console.run("sha256sum /data/f*", timeout=120)
        assert status == 0, listed
        assert dict(reversed(line.split()) for line in listed.splitlines()) == sums
        assert reader.console.run("mount -o remount,ro /") == ("", 0)
        reader.shutdown()
    pm.close()                                          # QEMU is gone; only the file is left
    assert_fsck_clean(image)
