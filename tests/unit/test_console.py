"""The console against a scripted shell on a socketpair: parsing and fail-fast, without QEMU."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from harness.errors import ConsoleTimeout, GuestHang, GuestOops, GuestPanic, QemuExited
from harness.machine import MachineSpec
from harness.machine.console import Console

NOISE = "[   12.345678] e1000: eth0 NIC Link is Up\r\n"


class FakeMachine:
    """What the console asks of its machine: QMP status, why QEMU stopped, artifacts."""

    def __init__(self, workdir: Path, status: str = "running") -> None:
        self.workdir = workdir
        self.status = status
        self.failed = False
        self.argv = ["qemu-system-x86_64"]
        self.spec = MachineSpec()

    def qmp(self, command: str, timeout: float = 10.0, **_: Any) -> dict[str, Any]:
        assert command == "query-status"
        return {"status": self.status}

    def exit_reason(self, timeout: float = 1.0) -> str | None:
        return None

    def output(self) -> str:
        return ""

    def exitcode(self) -> int | None:
        return 0


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Console, socket.socket, FakeMachine]]:
    harness_end, guest_end = socket.socketpair()
    machine = FakeMachine(tmp_path)
    console = Console(tmp_path / "serial.log", machine)  # type: ignore[arg-type]
    console.attach(harness_end)
    yield console, guest_end, machine
    guest_end.close()
    console.close()


def shell(guest: socket.socket, reply: Callable[[str, str], str], uptime: str | None = None,
          uptime_first: str | None = None) -> threading.Thread:
    """Answer one command line: ``reply(marker, command_line)`` is what the 'guest' prints.
    With ``uptime``, then the question the console asks when the output holds log lines:
    what ``/proc/uptime`` says (``""``: a guest without it); with ``uptime_first``, the
    same question before the command (a machine under -icount)."""
    def line() -> tuple[str, str]:
        got = b""
        while not got.endswith(b"\n"):
            got += guest.recv(4096)
        text = got.decode()
        marker = "".join(re.search(r"echo '(hwh[0-9a-f]*)''([0-9a-f]*)'[BU]", text).groups())  # type: ignore[union-attr]
        return marker, text

    def serve() -> None:
        if uptime_first is not None:
            marker, text = line()
            assert "/proc/uptime" in text
            guest.sendall(f"{marker}U {uptime_first}\r\nhwh-linux# ".encode())
        marker, text = line()
        guest.sendall(reply(marker, text).encode())
        if uptime is not None:
            marker, text = line()
            assert "/proc/uptime" in text
            guest.sendall(f"{marker}U {uptime}\r\nhwh-linux# ".encode())
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def with_noise_everywhere(text: str, every: int = 3) -> str:
    """``text`` with a kernel log line after every few characters, as printk can interleave."""
    return "".join(c + (NOISE if i % every == 1 else "") for i, c in enumerate(text))


def test_run_parses_through_noise_inside_markers_output_and_status(wired) -> None:
    console, guest, _ = wired
    t = shell(guest, lambda m, line: "hwh-linux# " + line.replace("\n", "\r\n")
              + with_noise_everywhere(f"{m}B\r\nforty-two\r\nsecond line\r\n{m}E 17\r\n") + "hwh-linux# \x1b[6n",
              uptime="12.40")
    assert console.run("whatever", timeout=5) == ("forty-two\nsecond line", 17)
    t.join()
    assert NOISE.strip() in (console.path).read_text(), "the log keeps everything, noise included"


def test_the_echoed_command_line_never_matches_a_marker(wired) -> None:
    console, guest, _ = wired
    # A terminal that echoes the line before the shell runs it: the echo shows the marker split.
    t = shell(guest, lambda m, line: line.replace("\n", "\r\n") + f"{m}B\r\nok\r\n{m}E 0\r\n")
    assert console.run("echo ok", timeout=5) == ("ok", 0)
    t.join()


def test_a_panic_line_ends_a_wait_within_a_second(wired) -> None:
    console, guest, machine = wired
    guest.sendall(b"[    3.1] Kernel panic - not syncing: sysrq triggered crash\r\n[    3.2] CPU: 0 PID: 1\r\n")
    t0 = time.monotonic()
    with pytest.raises(GuestPanic, match="sysrq triggered crash") as failure:
        console.expect("never printed", timeout=30)
    assert time.monotonic() - t0 < 5
    assert "CPU: 0 PID: 1" in failure.value.console, "the tail after the panic line is quoted"
    assert machine.failed, "the machine is told to keep its artifacts"


def test_a_panic_outranks_the_oops_before_it(wired) -> None:
    console, guest, _ = wired
    guest.sendall(b"[    1.0] BUG: kernel NULL pointer dereference, address: 0\r\n"
                  b"[    1.1] Oops: 0002 [#1] SMP\r\n"
                  b"[    1.2] Kernel panic - not syncing: Fatal exception\r\n")
    with pytest.raises(GuestPanic, match="Fatal exception"):
        console.expect("never printed", timeout=30)


def test_an_oops_alone_is_a_guest_oops(wired) -> None:
    console, guest, _ = wired
    guest.sendall(b"[    1.1] Oops: 0002 [#1] SMP\r\n")
    with pytest.raises(GuestOops):
        console.expect("never printed", timeout=30)


def test_silence_is_a_hang_that_says_what_qmp_says(wired) -> None:
    console, _, machine = wired
    machine.status = "paused"
    with pytest.raises(GuestHang, match="query-status: paused") as failure:
        console.expect("never printed", timeout=30, quiet=0.3)
    assert failure.value.status == "paused"


def test_timeout_and_exit_are_typed_and_quote_the_console(wired) -> None:
    console, guest, _ = wired
    guest.sendall(b"booting...\r\n")
    with pytest.raises(ConsoleTimeout, match="booting"):
        console.expect("login:", timeout=0.3)
    guest.shutdown(socket.SHUT_WR)              # QEMU closing its end: the guest is gone
    with pytest.raises(QemuExited, match="booting"):
        console.expect("login:", timeout=30)


def test_forget_drops_what_came_before_a_restore(wired) -> None:
    console, guest, _ = wired
    guest.sendall(b"[    3.1] Kernel panic - not syncing: old\r\nold output\r\n")
    time.sleep(0.1)
    console.forget()
    guest.sendall(b"new output\r\n")
    found = console.expect("output", timeout=5)
    assert found.before == "new ", "nothing from before the restore is matched, nor raised"


def test_dmesg_output_keeps_its_old_log_lines_while_live_noise_goes(wired) -> None:
    console, guest, _ = wired
    guest.sendall(b"[    5.000000] the newest line before the command\r\nhwh-linux# ")
    console.expect("hwh-linux# ", timeout=5)
    replay = "[    0.000000] Linux version 6.1\r\n[    4.999999] older still\r\n"
    live = "[    6.100000] printed while dmesg ran\r\n"
    t = shell(guest, lambda m, line: f"{m}B\r\n" + replay[:20] + live + replay[20:] + f"{m}E 0\r\n",
              uptime="6.15")
    output, status = console.run("dmesg", timeout=5)
    t.join()
    assert (output, status) == ("[    0.000000] Linux version 6.1\n[    4.999999] older still", 0)


def test_under_icount_the_uptime_before_the_command_parts_old_log_lines_from_live_ones(wired) -> None:
    """The guest's clock counts instructions: asked after the command, less the host's time
    since, it would put the line before the boot and call dmesg's whole output live."""
    console, guest, machine = wired
    machine.spec.icount_shift = 0
    replay = "[    0.000000] Linux version 6.1\r\n[    0.214400] Run /init as init process\r\n"
    live = "[    0.260000] printed while dmesg ran\r\n"
    t = shell(guest, lambda m, line: f"{m}B\r\n" + replay + live + f"{m}E 0\r\n", uptime_first="0.25")
    output, status = console.run("dmesg", timeout=5)
    t.join()
    assert (output, status) == ("[    0.000000] Linux version 6.1\n[    0.214400] Run /init as init process", 0)


def test_without_proc_uptime_log_lines_newer_than_the_console_showed_are_noise(wired) -> None:
    console, guest, _ = wired
    guest.sendall(b"[    5.000000] the newest line before the command\r\nhwh-linux# ")
    console.expect("hwh-linux# ", timeout=5)
    t = shell(guest, lambda m, line: f"{m}B\r\nout[    4.000000] old\r\n{NOISE}put\r\n{m}E 0\r\n", uptime="")
    assert console.run("dmesg", timeout=5) == ("out[    4.000000] old\nput", 0)
    t.join()


def test_a_panic_just_before_qemu_exits_is_still_the_panic(wired) -> None:
    console, guest, _ = wired
    guest.sendall(b"[    3.1] Kernel panic - not syncing: Attempted to kill init!\r\n")
    guest.shutdown(socket.SHUT_WR)
    with pytest.raises(GuestPanic, match="kill init"):
        console.expect("never printed", timeout=30)
