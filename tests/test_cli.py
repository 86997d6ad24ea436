"""The command line as a person meets it: every bad input is one line on stderr, before any
machine boots, with exit 2; failures of checks and devices exit 1; ``--debug`` shows the traceback.

Bad inputs run with no QEMU on PATH: had a command booted before checking, it would fail
with "qemu-system-x86_64 is not installed" instead of the message asserted here.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.tools.cli import Terminated, report
from harness.tools.cli.common import CheckFailed
from harness.errors import DeviceNotFound, MachineError
from tests.fatimages import have_tools, make_image, tree

REPO = Path(__file__).resolve().parents[1]


def hwharness(*args: str, cwd: Path, qemu: bool = False, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run the CLI of this checkout as a person would, from ``cwd``."""
    environment = {k: v for k, v in os.environ.items() if k != "HWHARNESS_DEBUG"}
    environment.update(PYTHONPATH=str(REPO), **(env or {}))
    if not qemu:
        empty = cwd / "no-qemu-here"
        empty.mkdir(exist_ok=True)
        environment["PATH"] = str(empty)
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def refused(result: subprocess.CompletedProcess[str], status: int, *names: str) -> str:
    """Assert one error line naming each of ``names``, nothing on stdout, and the status."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hwharness: error: "), result.stderr
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    for name in names:
        assert name in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = have_tools()
    if missing:
        pytest.fail(f"{missing} is not installed: run `make deps` (dosfstools, mtools)", pytrace=False)
    root = tmp_path_factory.mktemp("cli")
    fat32 = make_image(root / "fat32.img", 32, tree(random.Random(3)), root)
    (root / "empty.img").write_bytes(b"")
    (root / "random.img").write_bytes(random.randbytes(1 << 20))
    (root / "truncated.img").write_bytes(fat32.read_bytes()[:2 << 20])
    return root


@pytest.mark.parametrize("command", ["ls", "cat", "identify"])
def test_a_missing_image_is_named(images: Path, command: str) -> None:
    args = ["disk", command, "missing.img"] + (["/x"] if command == "cat" else [])
    refused(hwharness(*args, cwd=images), 2, "image missing.img: no such file")


@pytest.mark.parametrize("command", ["ls", "cat", "identify"])
def test_an_empty_image_is_named(images: Path, command: str) -> None:
    args = ["disk", command, "empty.img"] + (["/x"] if command == "cat" else [])
    refused(hwharness(*args, cwd=images), 2, "image empty.img: is empty")


@pytest.mark.parametrize("command", ["ls", "cat"])
def test_a_random_image_is_not_fat(images: Path, command: str) -> None:
    args = ["disk", command, "random.img"] + (["/x"] if command == "cat" else [])
    refused(hwharness(*args, cwd=images), 2, "not a FAT filesystem: random.img")


@pytest.mark.parametrize("command", ["ls", "cat"])
def test_a_truncated_image_says_so(images: Path, command: str) -> None:
    args = ["disk", command, "truncated.img"] + (["/x"] if command == "cat" else [])
    refused(hwharness(*args, cwd=images), 2, "truncated FAT filesystem: truncated.img holds 2097152 bytes")


def test_a_directory_is_not_an_image(images: Path) -> None:
    refused(hwharness("disk", "identify", str(images), cwd=images), 2, f"image {images}: is a directory")


def test_a_path_that_is_not_on_the_image(images: Path) -> None:
    refused(hwharness("disk", "ls", "fat32.img", "/deep/nowhere", cwd=images), 2,
            "fat32.img: there is no /deep/nowhere", "hwharness disk ls fat32.img")
    refused(hwharness("disk", "cat", "fat32.img", "/NOTES.TXT", cwd=images), 2, "there is no /NOTES.TXT")


def test_cat_of_a_directory(images: Path) -> None:
    refused(hwharness("disk", "cat", "fat32.img", "/Deep", cwd=images), 2,
            "/Deep is a directory", "hwharness disk ls fat32.img /Deep")


def test_untypeable_text_lists_every_character_once(images: Path) -> None:
    line = refused(hwharness("keyboard", "--type", "café crème €5", cwd=images), 2, "--type")
    assert "'é' (U+00E9), 'è' (U+00E8), '€' (U+20AC)" in line
    assert line.count("é") == 1
    refused(hwharness("keyboard", "--type", "", cwd=images), 2, "--type: no text to type")


def test_parport_needs_a_readable_file(images: Path) -> None:
    refused(hwharness("parport", "--send", "/nonexistent", cwd=images), 2, "--send /nonexistent: no such file")
    refused(hwharness("parport", "--send", str(images), cwd=images), 2, "is a directory")


def test_boot_and_run_need_a_kernel_file_and_run_a_command(images: Path) -> None:
    refused(hwharness("boot", "--kernel", "missing-bzImage", cwd=images), 2, "--kernel missing-bzImage: no such file")
    refused(hwharness("run", "--kernel", "fat32.img", "--initrd", str(images), "--", "true", cwd=images), 2,
            f"--initrd {images}: is a directory")
    refused(hwharness("run", "--kernel", "fat32.img", cwd=images), 2, "nothing to run")


def test_outputs_that_cannot_be_written_are_refused_first(images: Path) -> None:
    refused(hwharness("bench", "roundtrip", "--json", str(images), cwd=images), 2, f"--json {images}: is a directory")
    (images / "a-file").write_text("")
    refused(hwharness("net", "ping", "--pcap", str(images / "a-file" / "x.pcap"), cwd=images), 2,
            "--pcap", "cannot write in")


def test_argparse_errors_share_the_prefix_and_status(images: Path) -> None:
    result = hwharness("latency", "--count", "0", cwd=images)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("hwharness latency: error: argument --count: "
                                              "must be a whole number above 0, not '0'")


@pytest.mark.parametrize("args", [
    ["boot", "--accel", "fast"], ["demo", "--accel", "fast"], ["bench", "nope"], ["bench", "roundtrip", "--json"],
    ["bench", "boot", "--count", "0"], ["run", "--memory", "lots"],
    ["net", "ping", "--count", "-1"], ["disk", "ls"], ["keyboard"], ["parport"], ["latency", "--mode", "busy"]],
    ids=lambda args: " ".join(args))
def test_every_command_refuses_malformed_arguments(images: Path, args: list[str]) -> None:
    result = hwharness(*args, cwd=images)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("hwharness ")
    assert ": error: " in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["--debug first", "--debug last", "HWHARNESS_DEBUG=1"])
def test_debug_adds_the_traceback(images: Path, how: str) -> None:
    args = ["disk", "ls", "random.img"]
    result = {"--debug first": lambda: hwharness("--debug", *args, cwd=images),
              "--debug last": lambda: hwharness(*args, "--debug", cwd=images),
              "HWHARNESS_DEBUG=1": lambda: hwharness(*args, cwd=images, env={"HWHARNESS_DEBUG": "1"})}[how]()
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "NotFatFilesystem" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("hwharness: error: not a FAT filesystem")


def test_without_qemu_the_error_says_how_to_install_it(images: Path) -> None:
    refused(hwharness("disk", "identify", "fat32.img", "--accel", "tcg", cwd=images), 1,
            "qemu-system-x86_64 is not installed", "make deps")


def test_errors_map_to_their_status(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [(DeviceNotFound("this machine has no PCI device with vendor 0x1234"), 1),
             (CheckFailed("the printer chardev received 3 bytes that differ"), 1),
             (MachineError("QEMU exited", ["qemu"], "line one\nline two", 1), 1),
             (ZeroDivisionError("division by zero"), 1),
             (KeyboardInterrupt(), 130),
             (Terminated(), 143)]
    for error, status in cases:
        assert report(error, debug=False) == status
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hwharness: error: "), lines
    assert report(ZeroDivisionError("x"), debug=False) == 1
    assert "internal error: ZeroDivisionError: x (--debug" in capsys.readouterr().err


@pytest.mark.parametrize("output, reason", [
    ('qemu-system-x86_64: -device ide-hd,drive=disk0: Failed to get "write" lock\n'
     "Is another process using the image [/tmp/a.img]?\n", '-device ide-hd,drive=disk0: Failed to get "write" lock'),
    ("qemu: invalid kernel header\n", "invalid kernel header"),
    ("/usr/bin/qemu-system-x86_64: -m lots: Parameter 'size' expects a size\n",
     "-m lots: Parameter 'size' expects a size"),
    ("some guest noise: not QEMU's\n", None)])
def test_qemus_own_reason_is_on_the_one_line(capsys: pytest.CaptureFixture[str], output: str,
                                             reason: str | None) -> None:
    """A QEMU that will not start says why in its output: that reason ends the one line,
    the rest of the output stays for -v."""
    assert report(MachineError("QEMU exited before QMP answered", ["qemu"], output, 1), debug=False) == 1
    (line,) = capsys.readouterr().err.splitlines()
    first = "hwharness: error: QEMU exited before QMP answered (exit code 1)"
    assert line == (f"{first}: {reason}" if reason else first) + " (-v shows the details)"


@pytest.mark.qemu
def test_lowercase_names_on_fat32_listed_and_read_through_the_cli(images: Path, hwharness_accel: str) -> None:
    """The issue's first report: `disk ls IMAGE /deep` on mkfs.fat -F 32 + mmd ::/deep."""
    listed = hwharness("disk", "ls", "fat32.img", "/deep", "--accel", hwharness_accel, cwd=images, qemu=True)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[-1] for line in listed.stdout.splitlines()] == ["Nested", "notes.txt"]
    one = hwharness("disk", "ls", "fat32.img", "/Deep/Notes.TXT", "--accel", hwharness_accel, cwd=images, qemu=True)
    assert one.returncode == 0 and one.stdout.split() == [str(len(tree(random.Random(3))["deep/notes.txt"])),  # type: ignore[arg-type]
                                                          "notes.txt"], one.stderr
    read = hwharness("disk", "cat", "fat32.img", "/DEEP/NOTES.TXT", "--accel", hwharness_accel, cwd=images, qemu=True)
    assert read.returncode == 0, read.stderr
    assert read.stdout == tree(random.Random(3))["deep/notes.txt"].decode()  # type: ignore[union-attr]


@pytest.mark.qemu
def test_a_device_the_machine_does_not_have_is_named(proxy_machine) -> None:
    with pytest.raises(DeviceNotFound, match=r"no PCI device with vendor 0x1234, device 0x5678 \(it has: .*8086:100e"):
        proxy_machine.bus.find(vendor=0x1234, device=0x5678)


@pytest.mark.qemu
@pytest.mark.parametrize("stop", (signal.SIGINT, signal.SIGTERM), ids=("SIGINT", "SIGTERM"))
def test_boot_serve_stops_on_sigint_or_sigterm_though_started_with_it_ignored(
        hwharness_accel: str, stop: signal.Signals, tmp_path: Path) -> None:
    """A shell without job control starts a background job (`make test &`) with SIGINT
    ignored, and Python keeps it so: Ctrl-C must still stop `boot --serve`; so must a
    service manager's SIGTERM. `boot` keeps its machine's files for a look afterwards, so
    they go to this test's own directory, not the host's /tmp."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    boot = subprocess.Popen([sys.executable, "-m", "harness", "boot", "--serve", "--accel", hwharness_accel],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(stop, signal.SIG_IGN))
    try:
        assert boot.stdout is not None
        assert any(line.startswith("Ctrl-C to stop.") for line in boot.stdout), boot.stderr.read()
        boot.send_signal(stop)
        assert boot.wait(60) == 0
        assert boot.stdout.read() == "stopping\n"
        assert [d.name.split("-")[-2] for d in workdirs(tmp_path)] == ["boot"], "its files, kept where it said"
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()


def workdirs(root: Path) -> list[Path]:
    return sorted(root.glob("hwharness-*"))


@pytest.mark.qemu
def test_sigterm_unwinds_a_command_and_leaves_nothing_behind(hwharness_accel: str, tmp_path: Path) -> None:
    """`timeout` or a cancelled CI job sends SIGTERM: the command shuts its machine down and
    removes its files, as Ctrl-C would, says so and exits 143 (128 + SIGTERM)."""
    root = tmp_path / "tmp"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HWHARNESS_DEBUG"}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(root))
    latency = subprocess.Popen([sys.executable, "-m", "harness", "latency", "--count", "100000000",
                                "--accel", hwharness_accel],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qemu = None
    try:
        while qemu is None and latency.poll() is None:     # until its QEMU runs (no clock: it may be slow)
            qemu = qemu_of(latency.pid)
        assert qemu is not None, latency.communicate()
        latency.send_signal(signal.SIGTERM)
        _, stderr = latency.communicate(timeout=120)
        assert latency.returncode == 128 + signal.SIGTERM, stderr
        assert stderr.strip().splitlines()[-1] == "hwharness: error: terminated", stderr
    finally:
        if latency.poll() is None:
            latency.kill()
            latency.wait()
    assert workdirs(root) == [], "the machine's files are removed"
    # Shut down, or (a SIGTERM that came while QEMU was being started, before the harness
    # held it) killed a moment after its parent, by its parent-death signal.
    assert ends(qemu, within=20), f"QEMU {qemu} is left behind"


def children(pid: int) -> list[int]:
    """The processes ``pid``'s threads started (Linux's /proc/PID/task/TID/children)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:           # a thread that ended meanwhile
            pass
    return found


def qemu_of(pid: int) -> int | None:
    """The QEMU process ``pid`` started, if one runs now."""
    return next((child for child in children(pid) if process_name(child).startswith("qemu-system")), None)


def kill_its_qemu(command: subprocess.Popen[str]) -> str:
    """Kill the QEMU that ``command`` runs (SIGKILL, by its PID) and return the command's
    stderr once it has ended, which must be a failure said in one line naming the death."""
    qemu = qemu_of(command.pid)
    assert qemu is not None, "the command runs no QEMU"
    os.kill(qemu, signal.SIGKILL)
    _, stderr = command.communicate(timeout=120)
    assert command.returncode == 1, stderr
    (line,) = stderr.strip().splitlines()                   # a failure is one line
    assert line.startswith("hwharness: error: ") and "QEMU exited (killed by SIGKILL)" in line, stderr
    return stderr


def ends(pid: int, within: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``within`` seconds (a limit, not a measurement)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def process_name(pid: int) -> str:
    """``pid``'s command name, or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""
