"""The real disks served over NBD by their supervised Python drivers (harness/services/disk.py),
an AHCI port and an NVMe namespace, to third-party clients: nbdinfo sees the export, QEMU's
own NBD client (qemu-io, with ``reconnect-delay``) writes through a driver SIGKILLed under
it and never reports an error, nbdcopy reads back what it wrote, and once QEMU is gone the
image file holds exactly that. Malformed requests reach the real driver too, and it goes on."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.machine.spec import MachineSpec
from harness.services.disk import DiskService
from harness.services.nbd import REQUEST, Cmd, Errno, NbdClient, NbdError
from tests.test_ahci import attach
from tests.test_nvme import raw
from tests.unit.test_nbd import negotiated, read_reply, request, run_tool

pytestmark = pytest.mark.qemu

IMAGE_BYTES = 64 << 20
WRITE = 64 << 10
WRITES = 600                    # 37.5 MiB through the driver, while it is killed
KILL_AFTER = (1, WRITES // 2)   # the driver is killed once these writes (in qemu-io's order) have landed
GUARD = 600.0


def machine_with(controller: str, image: Path) -> Callable[[MachineSpec], None]:
    """The disk as ``hwharness serve disk`` has it: NVMe with QEMU's ioeventfds, which a
    restarted driver takes anew."""
    if controller == "ahci":
        return attach(image)
    return lambda spec: spec.nvme([raw(image)], ioeventfd="on")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="hwh-nbd-"))      # short: a socket path has at most 107 bytes
    yield directory
    shutil.rmtree(directory)


@pytest.mark.parametrize("controller", ("ahci", "nvme"))
def test_qemu_io_writes_through_driver_kills_without_an_error_and_every_byte_lands(
        proxy_machine_factory, tmp_path: Path, socket_dir: Path, rng: random.Random, controller: str) -> None:
    image = tmp_path / "disk.img"
    original = rng.randbytes(IMAGE_BYTES)
    image.write_bytes(original)
    pm = proxy_machine_factory(machine_with(controller, image), name=f"nbd-{controller}")
    path = socket_dir / "disk.sock"
    # qemu-io's writes: distinct 64 KiB places, each its own byte pattern, then each read back
    places = rng.sample(range(IMAGE_BYTES // WRITE), WRITES)
    patterns = [1 + n % 255 for n in range(WRITES)]
    commands = [f"write -P {p} {place * WRITE} {WRITE}" for place, p in zip(places, patterns)] + ["flush"]
    commands += [f"read -P {p} {place * WRITE} {WRITE}" for place, p in zip(places, patterns)]
    expected = bytearray(original)
    for place, p in zip(places, patterns):
        expected[place * WRITE:(place + 1) * WRITE] = bytes([p]) * WRITE
    with DiskService(pm, controller, nbd=f"unix:{path}") as service:
        starts = service.starts(timeout=120)
        assert next(starts).startswith(f"driver pid {service.driver.pid} serving {controller} disk at "
                                       f"nbd+unix:///?socket={path}")
        (export,) = json.loads(run_tool("nbdinfo", "--json", service.uri))["exports"]
        assert export["export-size"] == IMAGE_BYTES
        assert (export["block_size_minimum"], export["can_fua"], export["can_multi_conn"]) == (512, True, True)
        assert export["can_trim"] == (controller == "nvme"), "TRIM only where the device has it (NVMe DSM)"

        argv = ["qemu-io", "--image-opts",
                f"driver=nbd,server.type=unix,server.path={path},reconnect-delay=120"]
        for command in commands:
            argv += ["-c", command]
        client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(client.communicate(timeout=GUARD)))
        reader.start()
        try:
            with image.open("rb") as disk:
                for landed in KILL_AFTER:
                    place, pattern = places[landed - 1], patterns[landed - 1]
                    while os.pread(disk.fileno(), WRITE, place * WRITE) != bytes([pattern]) * WRITE:
                        assert client.poll() is None, "qemu-io ended before its writes landed"
                        threading.Event().wait(0.002)
                    victim = service.driver.pid
                    os.kill(victim, signal.SIGSTOP)                   # frozen mid-load: qemu-io waits on it
                    assert client.poll() is None, "qemu-io is still writing"
                    os.kill(victim, signal.SIGKILL)                   # our driver process, by its PID
                    line = next(starts)
                    assert line.startswith(f"driver pid {service.driver.pid} serving") \
                        and "killed by SIGKILL" in line, line
        finally:
            reader.join(GUARD)
            if client.poll() is None:
                client.kill()
                client.wait()
        stdout, stderr = output
        assert client.returncode == 0, stdout + stderr
        assert "error" not in (stdout + stderr).lower() and "fail" not in (stdout + stderr).lower(), stdout + stderr
        assert stdout.count("wrote ") == WRITES and stdout.count("read ") == WRITES, stdout[-2000:]
        assert len(service.driver.restarts) == len(KILL_AFTER)

        # through the export: nbdcopy reads it whole, and it is what qemu-io wrote
        run_tool("nbdcopy", service.uri, str(tmp_path / "copy.img"))
        assert (tmp_path / "copy.img").read_bytes() == bytes(expected)

        # malformed requests reach the real driver: each its error, and the connection goes on
        with negotiated(str(path)) as sock:
            for frame, code in [(request(Cmd.WRITE, 1, 100, 512, bytes(512)), Errno.EINVAL),
                                (request(Cmd.WRITE, 2, IMAGE_BYTES, 512, bytes(512)), Errno.ENOSPC),
                                (request(Cmd.READ, 3, 0, 2 << 20), Errno.EOVERFLOW)]:
                handle = REQUEST.unpack_from(frame)[3]
                sock.sendall(frame + request(Cmd.READ, 100 + handle, 0, 512))
                assert read_reply(sock) == (code, handle, b"")
                assert read_reply(sock, 512) == (0, 100 + handle, bytes(expected[:512]))
    pm.close()                                          # QEMU is gone; only the file is left
    assert image.read_bytes() == bytes(expected), "every byte qemu-io wrote, and nothing else"


def test_a_read_only_nvme_export_over_tcp_reads_whole_and_refuses_writes(
        proxy_machine_factory, tmp_path: Path, rng: random.Random) -> None:
    image = tmp_path / "disk.img"
    original = rng.randbytes(8 << 20)
    image.write_bytes(original)
    pm = proxy_machine_factory(machine_with("nvme", image), name="nbd-ro")
    with DiskService(pm, "nvme", nbd="tcp:127.0.0.1:0", read_only=True) as service:
        host, port = service.address
        assert service.uri == f"nbd://127.0.0.1:{port}/"
        assert next(service.starts(timeout=120)).endswith(f"serving nvme disk (read-only) at {service.uri}")
        (export,) = json.loads(run_tool("nbdinfo", "--json", service.uri))["exports"]
        assert (export["is_read_only"], export["can_trim"], export["can_zero"]) == (True, False, False)
        run_tool("nbdcopy", service.uri, str(tmp_path / "copy.img"))
        assert (tmp_path / "copy.img").read_bytes() == original
        with NbdClient((host, port)) as client:
            assert client.read(8, 8) == original[4096:8192]
            with pytest.raises(NbdError) as refused:
                client.write(8, bytes(4096))
            assert refused.value.error == Errno.EPERM
    pm.close()
    assert image.read_bytes() == original
