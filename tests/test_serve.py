"""``hwharness serve disk`` as a person runs it: the export's URI, a line per driver start (a
restart with its cause), third-party clients on it, and Ctrl-C that leaves nothing behind."""

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

from tests.unit.test_nbd import run_tool

REPO = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"driver pid (\d+) serving (ahci|nvme) disk at (\S+)")


def hwharness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="hwh-serve-"))     # short: a socket path has at most 107 bytes
    yield directory
    shutil.rmtree(directory)


def test_unusable_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    for args, says in [((str(tmp_path / "missing.img"),), "no such file"),
                       ((str(image), "--nbd", "udp:1"), "not unix:PATH or tcp:HOST:PORT"),
                       ((str(image), "--nbd", f"unix:{tmp_path}/no/such/dir.sock"), "cannot listen there")]:
        done = subprocess.run(hwharness("serve", "disk", *args), cwd=REPO, capture_output=True, text=True,
                              timeout=60)
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
