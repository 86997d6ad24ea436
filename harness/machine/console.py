"""The serial console: a socket QEMU connects to, read by a thread, logged, matched with pexpect.

QEMU's serial port is a client socket chardev and the harness listens before QEMU
starts, so nothing the guest prints is lost. A reader thread drains the socket as
bytes arrive (the guest never stalls on a full socket while nobody waits), appends
them to ``serial.log`` in the machine's directory and to the transcript, and scans
them for evidence that the guest is gone (:class:`ConsoleRules`: a panic, an oops).

Waits (:meth:`Console.expect`, :meth:`Console.run`) use pexpect's expect engine on a
stream that thread feeds, and each wait also ends, with a typed error quoting the
console's tail, on that evidence (within a second), on QEMU exiting, and on no
output for ``quiet`` seconds (:class:`~harness.errors.GuestHang`, with what QMP's
``query-status`` says).

:meth:`Console.run` frames a shell command between two unique markers. The kernel
may print between any two bytes the shell writes; the markers are matched with its
log lines allowed anywhere inside them and those lines are removed from the output,
so ``printk`` noise cannot break the parse (labgrid#1749). Only log lines stamped no
earlier than the command's start count as noise, so the output of ``dmesg`` (old
stamps) comes back whole; that start is asked of the guest only when the output holds
log lines at all (see :meth:`Console.run`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import select
import shlex
import socket
import struct
import termios
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

from pexpect import TIMEOUT
from pexpect.spawnbase import SpawnBase

from ..errors import ConsoleTimeout, GuestFailure, GuestHang, GuestOops, GuestPanic, GuestReset, QemuExited

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

Pattern = Union[str, "re.Pattern[str]"]


class _Default:
    """The type of :data:`DEFAULT`: use the console's own setting."""


DEFAULT = _Default()
Quiet = Union[float, None, _Default]
TAIL_CHARS = 3000
SETTLE_S = 0.25          # after evidence, wait this long for silence so the error quotes the whole trace
EVIDENCE_GRACE_S = 1.0   # ... but never longer than this
UPTIME_MARGIN_S = 0.2    # /proc/uptime is ahead of the kernel log's clock by some 30 ms
POLL_S = 0.05            # how often a wait looks up from the stream (evidence, QEMU gone, quiet)
VT100 = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class ConsoleRules:
    """What a guest's console looks like: its log lines (noise for :meth:`Console.run`)
    and the lines that mean it has failed (most severe first)."""

    noise: str = r"\[ *\d+\.\d+\] [^\n]*\n"     # a Linux printk line with its timestamp
    stamp: str = r"^\[ *(\d+\.\d+)\]"             # the time in a noise line (seconds since boot)
    failures: tuple[tuple[str, type[GuestFailure]], ...] = (
        (r"Kernel panic - not syncing[^\n]*", GuestPanic),
        (r"\] (?:Oops|BUG|kernel BUG at|general protection fault)[: ][^\n]*", GuestOops),
    )


LINUX_RULES = ConsoleRules()


@dataclass
class Expected:
    """The outcome of :meth:`Console.expect`."""

    index: int                 # which of the patterns matched
    before: str                # console text between the previous match and this one
    match: "re.Match[str]"


@dataclass
class _Evidence:
    error: type[GuestFailure]
    line: str
    seen_at: float
    rank: int


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0


class _Stream(SpawnBase):  # type: ignore[misc]
    """pexpect's expect engine reading what the console's reader thread hands on."""

    def __init__(self, console: "Console") -> None:
        super().__init__(timeout=None, maxread=65536, encoding="utf-8", codec_errors="replace")
        self.delayafterread = None
        self._console = console

    def read_nonblocking(self, size: int = 1, timeout: float | None = None) -> str:
        data = self._console._take(size, timeout)
        text: str = self._decoder.decode(data, final=False)
        return text


class Console:
    """A machine's serial console: send, expect, run a shell command, with fail-fast waits."""

    def __init__(self, log_path: Path, machine: "Machine", rules: ConsoleRules = LINUX_RULES,
                 quiet: float | None = None) -> None:
        self.path = log_path
        self.rules = rules
        self.quiet = quiet          # default quiet time of every wait (None: never a GuestHang)
        self._machine = machine
        self._failures = [(re.compile(p), err) for p, err in rules.failures]
        self._noise = re.compile(rules.noise)
        self._stamp = re.compile(rules.stamp, re.MULTILINE)
        self._kernel_time = 0.0           # the newest log stamp seen on the console
        self._cond = threading.Condition()
        self._transcript = bytearray()
        self._pending = bytearray()       # read from the socket, not yet taken by an expect
        self._scanned = 0                 # transcript offset the failure scan has covered
        self._last_output = time.monotonic()
        self.first_output_at: float | None = None    # when the guest's first byte came (boot timings)
        self._wait_started = 0.0
        self._quiet_now: float | None = None
        self._eof = True
        self._evidence: _Evidence | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._log_file = open(log_path, "ab", buffering=0)
        self._stream = _Stream(self)

    # ---- the connection (the machine attaches each QEMU process it starts) ----

    def attach(self, sock: socket.socket) -> None:
        """Start reading a freshly connected serial socket."""
        self.detach()
        with self._cond:
            self._sock, self._eof = sock, False
            self._last_output = time.monotonic()
        self._thread = threading.Thread(target=self._read, args=(sock,), name=f"console-{self.path.parent.name}",
                                        daemon=True)
        self._thread.start()

    def detach(self, timeout: float = 5.0) -> None:
        """Stop reading and close the socket (QEMU exiting closes it too)."""
        sock, thread = self._sock, self._thread
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout)
        if sock is not None:
            sock.close()
        self._sock = self._thread = None

    def close(self) -> None:
        self.detach()
        self._log_file.close()

    def forget(self, settle: float = 0.5) -> None:
        """Drop unread output and any evidence: the guest was restored to an earlier state.

        What QEMU wrote before the restore may still sit in the socket; wait (up to
        ``settle`` seconds) until the reader has taken it, so none of it counts later.
        """
        deadline = time.monotonic() + settle
        while self._sock is not None and _unread(self._sock) and time.monotonic() < deadline:
            time.sleep(0.001)
        with self._cond:
            self._scanned = len(self._transcript)
            self._evidence = None
            self._kernel_time = 0.0       # the restored kernel's clock is behind what we saw
        self._drain()

    def _read(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._log_file.write(data)
                if self.first_output_at is None:
                    self.first_output_at = time.monotonic()
                self._transcript += data
                self._pending += data
                self._last_output = time.monotonic()
                self._scan()
                self._cond.notify_all()

    def _scan(self) -> None:
        """Look for failure evidence in the new complete lines (called with the lock held)."""
        end = self._transcript.rfind(b"\n") + 1
        if end <= self._scanned:
            return
        text = self._transcript[self._scanned:end].decode("utf-8", "replace")
        self._scanned = end
        for stamp in self._stamp.findall(text):
            self._kernel_time = max(self._kernel_time, float(stamp))
        for rank, (regex, error) in enumerate(self._failures):
            m = regex.search(text)
            if m and (self._evidence is None or rank < self._evidence.rank):
                log.warning("%s: %s on the console: %s", self.path.parent.name, error.__name__, m.group(0))
                self._evidence = _Evidence(error, m.group(0).strip(), time.monotonic(), rank)

    # ---- reading ----

    def text(self) -> str:
        """Everything the guest has printed so far."""
        with self._cond:
            return self._transcript.decode("utf-8", "replace")

    def tail(self, chars: int = TAIL_CHARS) -> str:
        """The last ``chars`` characters the guest printed."""
        with self._cond:
            return self._transcript[-chars * 2:].decode("utf-8", "replace")[-chars:]

    def _take(self, size: int, timeout: float | None) -> bytes:
        """Up to ``size`` unread bytes for the expect engine, or the reason there will be none."""
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            with self._cond:
                failure = self._settled_failure()
                if failure is None and self._pending:
                    data = bytes(self._pending[:size])
                    del self._pending[:size]
                    return data
                eof = self._eof
                silent_since = max(self._last_output, self._wait_started)
                if failure is None and not eof:
                    self._cond.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))
                    if self._pending:
                        continue
            if failure is not None:
                raise failure
            if eof:
                raise self._exited()
            now = time.monotonic()
            if self._quiet_now is not None and now - silent_since >= self._quiet_now:
                raise self._hang(now - silent_since)
            if now >= deadline:
                raise TIMEOUT("no console output")

    def _settled_failure(self) -> GuestFailure | None:
        ev = self._evidence
        if ev is None:
            return None
        now = time.monotonic()
        if now - ev.seen_at < EVIDENCE_GRACE_S and now - self._last_output < SETTLE_S:
            return None
        return self._failure(ev.error, ev.line)

    def _failure(self, error: type[GuestFailure], what: str, **extra: object) -> GuestFailure:
        self._machine.failed = True      # keep the artifacts
        return error(what, self.tail(), self._machine.workdir, **extra)

    def _exited(self) -> Exception:
        ev = self._evidence
        if ev is not None:                # it panicked and then QEMU went: the panic is the news
            return self._failure(ev.error, ev.line)
        reason = self._machine.exit_reason(timeout=1.0)
        if reason == "guest-reset":
            return self._failure(GuestReset, "the guest reset (a triple fault or a reboot); -no-reboot made "
                                             "QEMU exit")
        if reason == "guest-panic":
            return self._failure(GuestPanic, "QEMU reported a guest panic")
        self._machine.failed = True
        return QemuExited(f"QEMU exited while waiting on the console (shutdown reason: {reason or 'none'})",
                          self._machine.argv, self._machine.output(), self._machine.exitcode(),
                          console=self.tail())

    def _hang(self, silent: float) -> GuestHang:
        try:
            status = str(self._machine.qmp("query-status", timeout=2.0)["status"])
        except Exception as exc:  # QMP itself may be what hangs; say so rather than hide the hang
            status = f"unknown (query-status failed: {exc})"
        return self._failure(GuestHang, f"no console output for {silent:.1f} s; QMP query-status: {status}",
                             status=status)  # type: ignore[return-value]

    # ---- waiting ----

    def expect(self, patterns: Pattern | Sequence[Pattern], timeout: float,
               quiet: Quiet = DEFAULT) -> Expected:
        """Wait until one of ``patterns`` (regular expressions; strings are compiled with
        ``re.DOTALL``, so ``.`` spans lines) appears after the previous match.

        Returns which matched, the text before it and the match. Raises
        :class:`~harness.errors.ConsoleTimeout` after ``timeout`` seconds, a
        :class:`~harness.errors.GuestFailure` (``GuestPanic``, ``GuestOops``,
        ``GuestReset``, ``GuestHang`` after ``quiet`` seconds without output; the
        console's default when not given) or :class:`~harness.errors.QemuExited`.
        """
        plist = [patterns] if isinstance(patterns, (str, re.Pattern)) else list(patterns)
        compiled = [re.compile(p, re.DOTALL) if isinstance(p, str) else p for p in plist]
        self._wait_started = time.monotonic()
        self._quiet_now = self.quiet if isinstance(quiet, _Default) else quiet
        try:
            index = self._stream.expect_list(compiled, timeout=timeout)
        except TIMEOUT:
            raise ConsoleTimeout(f"timed out after {timeout:g} s waiting for "
                                 f"{' or '.join(repr(p.pattern) for p in compiled)} on the console",
                                 console=self.tail(), workdir=self._machine.workdir) from None
        return Expected(index, str(self._stream.before), self._stream.match)

    def wait_for(self, pattern: Pattern, timeout: float) -> "re.Match[str]":
        """Wait until ``pattern`` appears after the previous match; return the match."""
        return self.expect([pattern], timeout).match

    def send(self, text: str) -> None:
        """Type ``text`` into the serial port (no newline added)."""
        sock = self._sock
        if sock is None:
            raise QemuExited("the console is not connected", self._machine.argv, self._machine.output(),
                             self._machine.exitcode(), console=self.tail())
        sock.sendall(text.encode())

    def sendline(self, line: str = "") -> None:
        """Type ``line`` and Enter."""
        self.send(line + "\n")

    def _tolerant(self, literal: str) -> str:
        """A regex for ``literal`` that allows the guest's log lines between any two characters."""
        gap = f"(?:{self.rules.noise})*"
        return gap.join(re.escape(c) for c in literal)

    def clean(self, text: str, since: float = 0.0) -> str:
        """``text`` without the guest's log lines stamped ``since`` or later, terminal escapes
        and carriage returns."""
        def strip(line: re.Match[str]) -> str:
            text = line.group(0)
            stamp = self._stamp.match(text)
            if stamp is None or float(stamp.group(1)) >= since:
                return ""
            # an older line (dmesg's output) may have a live one printed into its middle
            return text[0] + self._noise.sub(strip, text[1:])
        return VT100.sub("", self._noise.sub(strip, text)).replace("\r", "")

    def run(self, command: str, timeout: float = 30.0,
            quiet: Quiet = DEFAULT) -> tuple[str, int]:
        """Run ``command`` at a POSIX shell prompt; its output (stdout and stderr) and exit status.

        The command runs through ``command eval`` in the current shell (``cd`` and
        variables stay; a syntax error is status 2), framed by markers that its own
        echo cannot contain. Log lines the kernel printed into the output while the
        command ran are removed; older ones (``dmesg``'s) are output. Only when the output
        holds log lines at all does a second command ask the guest's clock
        (:meth:`_uptime_at`) where the line between them lies: a command's first run in a
        new QEMU is mostly TCG translating what the guest runs, and reading
        ``/proc/uptime`` on every command made it ~15 ms longer. Under ``-icount`` the guest's
        clock counts instructions, not the host's time, so the uptime is read before the
        command instead, and is the line exactly.
        """
        marker = self._marker()
        self._drain()
        deadline = time.monotonic() + timeout
        with self._cond:
            since = self._kernel_time
        counted = self._machine.spec.icount_shift is not None
        if counted:
            since = max(since, self._uptime(deadline, quiet))
        sent_at = time.monotonic()
        self.sendline(f"echo {self._split(marker)}B; command eval {shlex.quote(command)}; "
                      f"echo {self._split(marker)}E $?")
        noise = self.rules.noise
        begin = self._tolerant(marker + "B") + r"(?:" + noise + r")*\r?\n"
        end = self._tolerant(marker + "E ") + r"(?P<status>\d(?:" + noise + r"|\d)*)(?:" + noise + r")*\r?\n"
        self.expect([begin], max(0.0, deadline - time.monotonic()), quiet)
        found = self.expect([end], max(0.0, deadline - time.monotonic()), quiet)
        if self._noise.search(found.before) and not counted:
            # the log's clock runs some 30 ms behind /proc/uptime's: leave a margin
            since = max(since, self._uptime_at(sent_at, deadline, quiet) - UPTIME_MARGIN_S)
        output = self.clean(found.before, since)
        status = int(self._noise.sub("", found.match.group("status")))
        return (output[:-1] if output.endswith("\n") else output), status

    @staticmethod
    def _marker() -> str:
        return "hwh" + secrets.token_hex(4)

    @staticmethod
    def _split(marker: str) -> str:
        """``marker`` as the shell prints it whole and its echo shows it split."""
        return f"'{marker[:5]}''{marker[5:]}'"

    def _uptime_at(self, moment: float, deadline: float, quiet: Quiet) -> float:
        """The guest's uptime at ``moment`` (host monotonic time, past): ``/proc/uptime`` read
        now less the host's time since, which errs early by the answer's way back (the guest's
        clock runs with the host's: TCG reads the host's TSC, KVM's kvmclock follows it).
        0.0 where there is no ``/proc/uptime``."""
        uptime = self._uptime(deadline, quiet)
        return uptime - (time.monotonic() - moment) if uptime else 0.0

    def _uptime(self, deadline: float, quiet: Quiet) -> float:
        """What the guest's ``/proc/uptime`` says; 0.0 where there is none."""
        marker = self._marker()
        self.sendline(f"{{ read -r _hwh_up _ < /proc/uptime; }} 2>/dev/null; echo {self._split(marker)}U $_hwh_up")
        answer = self._tolerant(marker + "U") + r"(?P<uptime>(?:[ \d.]|" + self.rules.noise + r")*)\r?\n"
        found = self.expect([answer], max(0.0, deadline - time.monotonic()), quiet)
        uptime = self._noise.sub("", found.match.group("uptime")).strip()
        return float(uptime) if re.fullmatch(r"\d+\.\d+", uptime) else 0.0

    def interact(self, in_fd: int = 0, out_fd: int = 1, escape: bytes = b"\x1d") -> None:
        """Attach a terminal to the console until ``escape`` (Ctrl-]) is typed or QEMU exits.

        The terminal is put in raw mode so keys (Ctrl-C, arrows) reach the guest; what the
        guest prints goes to ``out_fd`` as it comes. Failure evidence is not raised here:
        the person watching sees it.
        """
        saved = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
        if saved is not None:
            tty.setraw(in_fd)
        try:
            with self._cond:
                backlog, self._pending = bytes(self._pending), bytearray()
            os.write(out_fd, backlog)
            while True:
                ready, _, _ = select.select([in_fd], [], [], POLL_S)
                if ready:
                    keys = os.read(in_fd, 1024)
                    if not keys or escape in keys:
                        self.send(keys.split(escape)[0].decode(errors="replace"))
                        return
                    self.send(keys.decode(errors="replace"))
                with self._cond:
                    out, self._pending = bytes(self._pending), bytearray()
                    eof = self._eof
                if out:
                    os.write(out_fd, out)
                if eof:
                    return
        finally:
            if saved is not None:
                termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)

    def _drain(self) -> None:
        """Forget output nobody waited for (a prompt, boot messages) so a match starts from now."""
        with self._cond:
            self._pending.clear()
        self._stream.buffer = ""
        self._stream._before = self._stream.buffer_type()
