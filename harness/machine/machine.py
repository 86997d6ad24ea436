"""One QEMU process: launch, QMP, console, and a shutdown that always completes."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..errors import MachineError, QemuNotFound
from .accel import resolve_accel
from .console import LINUX_RULES, Console, ConsoleRules
from .snapshots import Snapshots
from .plugin import MachinePlugin
from .spec import Endpoints, MachineSpec, RuntimeFile, build_argv

P = TypeVar("P", bound=MachinePlugin)
T = TypeVar("T")

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
_libc = ctypes.CDLL(None, use_errno=True)
WORKDIR_PREFIX = "hwharness-"
UNCONNECTED_QUIT_S = 1.0              # how long a QEMU never connected to has to quit on SIGTERM
# util-linux's setpriv sets the parent-death signal and execs QEMU, which keeps it. Python
# starts a child with vfork only without a preexec_fn; forking the harness's process for
# die_with_parent copies its page tables: 5-11 ms per launch measured here (setpriv: ~0.5-3 ms).
SETPRIV_PDEATHSIG = ["setpriv", "--pdeathsig", "KILL", "--"]


def die_with_parent() -> None:
    """Runs in the child before exec: QEMU gets SIGKILL when its parent dies, even by SIGKILL.

    Linux delivers it when the *thread* that forked exits, so start machines
    from a thread that outlives them (the main thread, normally).
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# A machine whose spec says huge_pages=False (a Linux boot: see linux.py) gets none: QEMU
# madvises its RAM and TCG's code buffer for them whatever the host's default, and
# PR_SET_THP_DISABLE, which a child inherits across fork and exec, is the one switch that
# overrides that. setpriv (below) has no option for it, so this process holds it only while it
# spawns such a child; the lock keeps a concurrent spawn from restoring it early.
_SPAWN_LOCK = threading.Lock()


@contextlib.contextmanager
def no_huge_pages_for_children() -> Iterator[None]:
    """Processes spawned meanwhile get no transparent huge pages; this one's setting is restored."""
    with _SPAWN_LOCK:
        before = _libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)      # -1 where the kernel lacks it
        if before == 0:
            _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
        try:
            yield
        finally:
            if before == 0:
                _libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)


def popen_dying_with_parent(argv: list[str], out: Any, huge_pages: bool = True) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, killed when this thread exits (die_with_parent),
    through setpriv where there is one; without transparent huge pages unless ``huge_pages``."""
    with contextlib.nullcontext() if huge_pages else no_huge_pages_for_children():
        if shutil.which(SETPRIV_PDEATHSIG[0]):
            return subprocess.Popen(SETPRIV_PDEATHSIG + argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent, start_new_session=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_prefix(name: str, prefix: str = WORKDIR_PREFIX) -> str:
    """A temporary directory's name prefix, ``<prefix><PID>-<name>-``: whose it is, so that a
    later process can remove it once its owner is gone (:func:`left_by_the_dead`)."""
    return f"{prefix}{os.getpid()}-{name}-"


def left_by_the_dead(root: Path, prefix: str = WORKDIR_PREFIX) -> Iterator[Path]:
    """The directories under ``root`` that :func:`owned_prefix` named for processes that are
    gone (killed before they could remove them); never this process's."""
    for d in root.glob(prefix + "*"):
        pid = d.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            yield d


def sweep_stale_workdirs(root: Path) -> None:
    """Remove private directories left by harness processes that were killed."""
    for d in left_by_the_dead(root):
        shutil.rmtree(d, ignore_errors=True)


def accept_once(listener: socket.socket, timeout: float) -> socket.socket:
    """The one connection a listener exists for; the listener is closed once it came."""
    listener.settimeout(timeout)
    sock, _ = listener.accept()
    listener.close()
    sock.settimeout(None)
    return sock


def listen(address: str) -> socket.socket:
    """A listening Unix socket at ``address`` for the one connection QEMU will make."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(address)
    listener.listen(1)
    return listener


class Machine:
    """A QEMU machine, used as a context manager.

    ``with Machine(spec) as m: m.qmp("query-pci"); m.console.wait_for("login:", 30)``

    Every machine has its own directory (serial log, QEMU's output, the
    command line), abstract Unix sockets (no files to leave behind) and its
    own copy of the spec's plugins (a transport's servers). The directory is removed on
    a clean exit and kept, with its path logged, when the block raised or
    ``keep_artifacts`` is set.
    """

    def __init__(self, spec: MachineSpec, *, name: str = "machine", artifacts_root: Path | None = None,
                 keep_artifacts: bool = False, launch_timeout: float = 60.0,
                 console_rules: ConsoleRules = LINUX_RULES, quiet: float | None = None) -> None:
        self.spec = spec
        self.console_rules = console_rules
        self.quiet = quiet
        self.name = name
        self.accel = resolve_accel(spec.accel)
        self.log = log.getChild(name)
        self.keep_artifacts = keep_artifacts
        self.launch_timeout = launch_timeout
        self._artifacts_root = Path(artifacts_root or tempfile.gettempdir())
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.plugins = spec.copy_plugins()
        self.console: Console | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._serial_listener: socket.socket | None = None
        self.argv: list[str] = []
        self.endpoints: Endpoints | None = None
        self.failed = False
        self.snapshots = Snapshots(self)
        # monotonic times of the launch's steps, for bench boot: "exec" (QEMU started), "serial"
        # (its console connected), "qmp" (QMP answered), "ready" (the plugins' steps done)
        self.launch_at: dict[str, float] = {}

    # ---- lifecycle ----

    def __enter__(self) -> "Machine":
        self.launch()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.failed_by(exc_type)
        self.shutdown()

    def failed_by(self, exc_type: type[BaseException] | None) -> None:
        """Mark the machine failed (its files kept for a look) when ``exc_type`` ended its
        use; not for an interruption (Ctrl-C, the CLI's SIGTERM: KeyboardInterrupt), which
        asked for everything to go."""
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.failed = True

    def launch(self) -> None:
        """Start QEMU and wait until it is connected and its plugins' steps are done."""
        self.start()
        self.wait_launched()

    def start(self) -> None:
        """Start QEMU without waiting for it to connect; :meth:`wait_launched` completes the
        launch. Machines started one after another this way build themselves side by side
        while the caller connects to the first."""
        if shutil.which(self.spec.qemu) is None:
            raise QemuNotFound(f"{self.spec.qemu} is not installed: run `make deps` "
                               "(Debian's qemu-system-x86) or put it on PATH")
        self._artifacts_root.mkdir(parents=True, exist_ok=True)
        sweep_stale_workdirs(self._artifacts_root)
        self.workdir = Path(tempfile.mkdtemp(prefix=owned_prefix(self.name),
                                             dir=self._artifacts_root))
        tag = f"\0{WORKDIR_PREFIX}{self.workdir.name}"
        self.endpoints = Endpoints(workdir=self.workdir, qmp=tag + "-qmp", serial=tag + "-serial",
                                   serial_log=self.workdir / "serial.log", tag=tag)
        self.console = Console(self.endpoints.serial_log, self, self.console_rules, self.quiet)
        try:
            self._exec(self.endpoints)
        except BaseException as exc:
            self.failed_by(type(exc))
            self.shutdown()
            raise

    def wait_launched(self, since: float | None = None) -> None:
        """Until the started QEMU is connected (console, QMP) and its plugins' steps are done,
        within the launch timeout from ``since`` (monotonic; default: QEMU's exec)."""
        assert self.endpoints is not None, "start() the machine first"
        try:
            self._connect(self.endpoints, (self.launch_at["exec"] if since is None else since) + self.launch_timeout)
        except BaseException as exc:
            self.failed_by(type(exc))
            self.shutdown()
            raise

    def _exec(self, ends: Endpoints) -> None:
        """Start a QEMU process for the spec."""
        assert self.workdir is not None
        self.argv = build_argv(self.spec, self.accel, ends, self.plugins)
        (self.workdir / "cmdline.txt").write_text(" ".join(self.argv) + "\n")
        for plugin in self.plugins:
            plugin.pre_launch(self, ends)
        self._serial_listener = listen(ends.serial)
        self.log.info("launching %s (%s): %s", self.name, self.accel, " ".join(self.argv))
        self.launch_at = {"exec": time.monotonic()}
        with open(self.workdir / "qemu.out", "wb") as out:
            self.process = popen_dying_with_parent(self.argv, out, self.spec.huge_pages)

    def _connect(self, ends: Endpoints, deadline: float) -> None:
        """Connect to the started QEMU, and the plugins' steps."""
        assert self.console is not None
        for plugin in self.plugins:
            plugin.post_launch(self, deadline)
        self.console.attach(self.accept(self._accept_serial, deadline, "the serial connection"))
        self.launch_at["serial"] = time.monotonic()
        self._connect_qmp(ends.qmp, deadline)
        self.launch_at["qmp"] = time.monotonic()
        for plugin in self.plugins:
            plugin.connected(self, deadline)
        self.launch_at["ready"] = time.monotonic()

    def plugin(self, kind: type[P]) -> P:
        """This machine's plugin of that kind (its own copy of the spec's)."""
        for p in self.plugins:
            if isinstance(p, kind):
                return p
        raise LookupError(f"{self.name} has no {kind.__name__}")

    def _accept_serial(self, timeout: float) -> socket.socket:
        assert self._serial_listener is not None
        sock = accept_once(self._serial_listener, timeout)
        self._serial_listener = None
        return sock

    def accept(self, accept: Callable[[float], T], deadline: float, what: str) -> T:
        """``accept(timeout)`` retried until it returns, failing fast with QEMU's output when
        QEMU exits or ``deadline`` passes first (``what``: the connection, for the error)."""
        while True:
            try:
                return accept(0.1)
            except socket.timeout:
                pass
            if not self.alive():
                raise self._died(f"QEMU exited before {what}")
            if time.monotonic() > deadline:
                raise self._died(f"QEMU did not make {what} within {self.launch_timeout:g} s")

    def _connect_qmp(self, address: str, deadline: float) -> None:
        while True:
            qmp = QEMUMonitorProtocol(address, nickname=self.name)
            try:
                qmp.connect()
                self._qmp = qmp
                return
            except (QMPError, OSError) as exc:
                qmp.close()
                if not self.alive():
                    raise self._died("QEMU exited before QMP answered") from exc
                if time.monotonic() > deadline:
                    raise self._died("QMP did not answer") from exc
                time.sleep(0.01)

    def _died(self, message: str) -> MachineError:
        code = self.process.poll() if self.process else None
        return MachineError(message, self.argv, self.output(), code)

    def shutdown(self, timeout: float = 10.0) -> None:
        """QMP quit, then SIGKILL, each with a bounded wait; always releases everything. A QEMU
        never connected to (a launch that failed, a machine standing by unused) is sent SIGTERM
        instead of the quit, which QEMU takes the same way, and is given a second."""
        try:
            if self.process and self.process.poll() is None:
                if self._qmp is not None:
                    grace = timeout / 2
                    try:
                        self._qmp.settimeout(grace)
                        self._qmp.cmd("quit")
                    except Exception as exc:  # QEMU may close the socket before answering
                        self.log.debug("quit: %s", exc)
                else:
                    grace = UNCONNECTED_QUIT_S
                    self.process.terminate()
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    self.log.warning("%s did not quit; killing pid %d", self.name, self.process.pid)
                    self.process.kill()
                    self.process.wait(timeout)
        finally:
            self._release()

    def _release(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception as exc:
                self.log.debug("closing QMP: %s", exc)
            self._qmp = None
        if self._serial_listener is not None:
            self._serial_listener.close()
            self._serial_listener = None
        if self.console is not None:
            self.console.close()
        for plugin in self.plugins:
            plugin.shutdown(self)
        if self.workdir and self.workdir.exists():
            if self.failed or self.keep_artifacts:
                self.log.warning("%s: artifacts kept in %s", self.name, self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- using it ----

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's process ID once it has started."""
        return self.process.pid if self.process is not None else None

    def exitcode(self) -> int | None:
        """QEMU's exit status once it has exited, else None."""
        return self.process.poll() if self.process else None

    def exit_reason(self, timeout: float = 1.0) -> str | None:
        """Why QEMU stopped: the ``reason`` of its last QMP SHUTDOWN event (``guest-reset``,
        ``guest-shutdown``, ``guest-panic``, ``host-qmp-quit``...), waiting up to ``timeout``
        for the process to exit; None when it sent none."""
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        reason = None
        # Waiting lets the QMP client read what QEMU sent before it closed the socket; it
        # hands back what it had already queued first, so ask until nothing more comes.
        for _ in range(100):
            events = self.events(wait=0.2)
            if not events:
                break
            for event in events:
                if event.get("event") == "SHUTDOWN":
                    reason = event.get("data", {}).get("reason")
        return reason

    def check_alive(self) -> None:
        """Raise MachineError if QEMU has exited."""
        if not self.alive():
            raise self._died(f"QEMU ({self.name}) is no longer running")

    def qmp(self, command: str, timeout: float = 10.0, **args: object) -> Any:
        """Run a QMP command and return its result; errors become MachineError."""
        if self._qmp is None:
            raise MachineError(f"{self.name}: QMP is not connected")
        self._qmp.settimeout(timeout)
        try:
            return self._qmp.cmd(command, **args)
        except Exception as exc:
            raise MachineError(f"QMP {command} failed: {exc}", self.argv, "",
                               self.process.poll() if self.process else None) from exc

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a copy of the open file descriptor ``fd`` as ``name`` (QMP ``getfd``), for
        a later command that names it (``fd:NAME``)."""
        if self._qmp is None:
            raise MachineError(f"{self.name}: QMP is not connected")
        try:
            self._qmp.send_fd_scm(fd)
        except OSError as exc:
            raise MachineError(f"passing a file descriptor to QEMU failed: {exc}", self.argv, "",
                               self.process.poll() if self.process else None) from exc
        self.qmp("getfd", fdname=name)

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """QMP events received so far (waiting up to ``wait`` seconds for one)."""
        if self._qmp is None:
            return []
        try:
            return self._qmp.get_events(wait=wait or False)
        except (TimeoutError, QMPError, OSError):
            return []

    def snapshot(self, name: str, timeout: float = 60.0) -> None:
        """Save the running machine's state as ``name`` (see :mod:`harness.machine.snapshots`)."""
        self.snapshots.save(name, timeout)

    def restore(self, name: str, timeout: float = 60.0) -> None:
        """Back to the state saved as ``name``, running, without a reboot; unread console output
        and evidence of failure from before are forgotten."""
        self.snapshots.load(name, timeout)
        assert self.console is not None
        self.console.forget()

    def path(self, f: RuntimeFile) -> Path:
        """Where a RuntimeFile of the spec lives."""
        assert self.workdir is not None
        return self.workdir / f.name

    def output(self) -> str:
        """QEMU's own stdout and stderr so far."""
        if not self.workdir:
            return ""
        try:
            return (self.workdir / "qemu.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""
