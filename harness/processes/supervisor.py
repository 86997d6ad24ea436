"""Drivers in processes of their own, restarted when they die or hang: MINIX 3's
reincarnation server, for the harness.

``Supervisor(pm).run("harness.services.disk:serve", function, sockets={"clients": listener})``
starts the driver in a child process that attaches to one of the machine's
driver slots (:mod:`harness.processes.control`) and calls the entry with its bus
and its device. The supervisor watches every driver: its process (a pidfd)
and its heartbeat in the slot window (``bus.beat()``). When one dies or
stops beating for ``hang_timeout`` seconds (it is killed then), the owner
takes its slot back (interrupts detached, bus mastering off, DMA domains
unmapped, the window cleared), and the driver starts again and initialises
its device afresh. Each restart is recorded with its cause and its time from
death to serving again, and the moments its phases were reached (``Restart.phases``:
the supervisor's ``spawned``, then whatever the new process told
:func:`~harness.processes.zygote.mark`). A driver counts as serving from its first heartbeat.

Sockets handed to a driver (``sockets=``) are the supervisor's: they outlive
each driver process, so a client's reconnect waits in a listener's backlog
while the driver restarts.

A driver run with ``standby=True`` has a second process kept ready once it serves: forked
and attached to a slot of its own, waiting for a go before it touches the device. When the
serving one dies, the standby is told to go as soon as the dead one's slot is revoked (until
then the device is the dead one's: the revoke turns its bus mastering off), so a restart pays neither the fork
nor the attach; a new standby is prepared once the new driver serves. It costs a driver slot
and an idle process; a standby that died meanwhile is replaced by a fresh start.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..access import PciFunction
from ..errors import SupervisorError
from .control import serve
from .zygote import MAX_MESSAGE, START as ZYGOTE_START

if TYPE_CHECKING:
    from ..proxy.machine import ProxyMachine

log = logging.getLogger(__name__)

POLL_SECONDS = 0.01          # how often the watcher looks at heartbeats (a death wakes it at once)
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 5.0   # seconds before restarting a driver that died before serving
UNCLAIMED_PROCESSES = 16     # processes whose phases wait to be claimed (one is claimed ms after its fork)
SLOT_BACK_S = 5.0            # the longest a standby waits for its dead predecessor's slot to be revoked


@dataclass
class Restart:
    cause: str                  # "killed by SIGKILL", "exited with status 1", "hung: no heartbeat for 1.0 s"
    died_at: float              # time.monotonic() when the death (or the hang) was seen
    serving_at: float = 0.0     # when the new process first beat
    pid: int = 0                # the process started in the dead one's place
    phases: dict[str, float] = field(default_factory=dict)     # phase -> time.monotonic() it was reached

    @property
    def ms(self) -> float:
        """From death to serving again."""
        return (self.serving_at - self.died_at) * 1e3


@dataclass
class Driver:
    """One supervised driver: whichever process runs it now, and its history."""
    name: str
    spec: dict[str, Any]
    sockets: dict[str, socket.socket]
    restart: bool
    pid: int = 0
    slot: int | None = None
    state: str = "starting"             # starting, serving, dead (not to be restarted), stopped
    started_at: float = 0.0
    last_beat: int = 0
    last_beat_at: float = 0.0
    restarts: list[Restart] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)
    pidfd: int | None = None
    pending: Restart | None = None      # a restart under way: its death, waiting for the first beat
    early_deaths: int = 0               # deaths in a row before serving: a crash loop backs off
    restart_at: float = 0.0             # when a backed-off restart is due
    keep_standby: bool = False          # keep a standby process ready (see the module's docstring)
    standby: "Standby | None" = None
    _serving: threading.Condition = field(default_factory=threading.Condition)

    def wait_serving(self, timeout: float = 30.0, after: int = 0) -> None:
        """Until the driver serves with at least ``after`` restarts behind it."""
        with self._serving:
            if not self._serving.wait_for(lambda: (self.state == "serving" and len(self.restarts) >= after)
                                          or self.state in ("dead", "stopped"), timeout):
                raise SupervisorError(f"driver {self.name} did not serve within {timeout:g} s "
                                      f"({self.state}; deaths: {self.deaths[-3:]})")
            if self.state != "serving":
                raise self._ended()

    def _ended(self) -> SupervisorError:
        """Why the driver does not serve and will not again (dead, or stopped)."""
        return SupervisorError(f"driver {self.name} is {self.state}: {self.deaths[-3:]}")

    def starts(self, doing: str, timeout: float = 60.0, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """One line per start, as it serves (``driver pid N <doing>``): the first, then each
        restart with its cause and time from death to serving again, until ``stop()`` is true
        (looked at every 0.1 s). A driver that does not serve within ``timeout`` raises
        SupervisorError. What ``hwharness serve ...`` prints until Ctrl-C."""
        self.wait_serving(timeout)
        yield f"driver pid {self.pid} {doing}"
        seen = 0
        while not stop():
            if len(self.restarts) > seen:
                self.wait_serving(timeout, after=seen + 1)
                restart = self.restarts[seen]
                seen += 1
                yield f"driver pid {self.pid} {doing} again, {restart.ms:.0f} ms after the last was {restart.cause}"
            elif self.state == "dead":          # for good: the supervisor says why
                raise self._ended()
            else:
                time.sleep(0.1)


@dataclass
class Standby:
    """A driver process forked and attached ahead, waiting for a byte on ``go``; ``phases``: what
    it told so far (a restart it takes over starts with them: forked and attached before the death)."""
    pid: int
    pidfd: int
    go: socket.socket
    phases: dict[str, float] = field(default_factory=dict)

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]


def kill(pidfd: int) -> None:
    """SIGKILL the driver process ``pidfd`` names (our own child's child), if it has not ended:
    through its pidfd, so that a PID that init reaped and reused (the zygote gone) is safe."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if status < 0:
        return "ended (status unknown)"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Zygote:
    """The supervisor's end of :mod:`harness.processes.zygote`."""

    def __init__(self, guest_elf: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self._lock = threading.Lock()
        self.loaded: set[str] = set()
        self.gone: str | None = None        # why the zygote can no longer be asked, once it cannot
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE_START, str(os.getpid()),
                                         str(theirs.fileno()), guest_elf], pass_fds=[theirs.fileno()])
        theirs.close()
        self.sock.settimeout(60.0)
        reply = self._recv()
        if reply[0] != "ready":
            raise SupervisorError(f"the zygote said {reply!r}")

    def _ask(self, request: tuple, fds: Sequence[int] = ()) -> tuple:
        """Send ``request`` (with ``fds``) and return the reply; SupervisorError once the zygote is gone."""
        if self.gone is not None:
            raise SupervisorError(f"the zygote is gone: {self.gone}")
        try:
            socket.send_fds(self.sock, [pickle.dumps(request)], list(fds))
        except OSError as exc:
            raise self._lost(exc.strerror or str(exc)) from None
        return self._recv()

    def _recv(self) -> tuple:
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except OSError as exc:
            raise self._lost(exc.strerror or str(exc)) from None
        if not data:
            raise self._lost("it exited")
        return pickle.loads(data)

    def _lost(self, how: str) -> SupervisorError:
        """The zygote cannot be asked any more: remember why, for every later request."""
        self.gone = f"{how} (status {self.process.poll()})"
        return SupervisorError(f"the zygote is gone: {self.gone}")

    def preload(self, module: str) -> None:
        """Have the zygote import ``module``, so that its drivers' forks start with it imported."""
        with self._lock:
            if module not in self.loaded:
                reply = self._ask(("preload", module))
                if reply[0] != "loaded":
                    raise SupervisorError(f"the zygote could not import {module}: {reply[1]}")
                self.loaded.add(module)

    def spawn(self, spec: dict[str, Any], fds: list[int]) -> int:
        with self._lock:
            return int(self._ask(("spawn", spec), fds)[1])

    def reap(self, pid: int) -> int:
        """How driver process ``pid`` ended (a wait status); -1 once the zygote is gone (its
        children were handed to init, which reaped them)."""
        with self._lock:
            try:
                return int(self._ask(("reap", pid))[1])
            except SupervisorError:
                return -1

    def close(self) -> None:
        self.sock.close()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Supervisor:
    """Runs drivers in processes of their own and restarts them; see the module's docstring."""

    def __init__(self, pm: "ProxyMachine", hang_timeout: float = 1.0, start_timeout: float = 30.0,
                 preload: list[str] | None = None) -> None:
        self.pm = pm
        self.control = serve(pm)
        self.hang_timeout = hang_timeout
        self.start_timeout = start_timeout
        self.zygote = Zygote(str(pm.elf))
        # The drivers' phases (zygote.mark): datagrams, each "pid phase time", read by the watcher.
        self._phases, self._phases_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._phases.setblocking(False)
        self._phases_lock = threading.Lock()
        # Phases of a process not known yet: it may tell "forked" before the zygote's answer
        # names it (a standby, a restart), so they wait here until it is registered (_claim).
        self._unclaimed: dict[int, dict[str, float]] = {}
        for module in preload or []:
            self.zygote.preload(module)
        self.drivers: list[Driver] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="hwharness-supervisor", daemon=True)
        self._watcher.start()

    def run(self, entry: str, device: PciFunction, restart: bool = True, name: str | None = None,
            sockets: dict[str, socket.socket] | None = None, also: Sequence[PciFunction] = (),
            standby: bool = False, **kwargs: Any) -> Driver:
        """Start ``entry`` ("module:function", called as ``entry(bus, function, **sockets,
        **kwargs)``) in a driver process for ``device`` (and the devices ``also``, which it may
        open too: a bridge's second NIC); returns at once (``wait_serving()``). ``standby``:
        keep a second process ready to take over (see the module's docstring)."""
        name = name or f"{entry.rpartition(':')[2]}@{device}"
        self.zygote.preload(entry.partition(":")[0])    # imported once: every restart forks with it
        spec = {"name": name, "entry": entry, "devfn": device.devfn, "address": self.control.address,
                "sockets": list((sockets or {}).keys()), "kwargs": kwargs, "attach_wait": self.start_timeout,
                "token": self.control.reserve([device.devfn, *(f.devfn for f in also)])}     # its devices only
        driver = Driver(name, spec, dict(sockets or {}), restart, keep_standby=standby and restart)
        with self._lock:
            self.drivers.append(driver)
            self._start(driver)
        return driver

    def _spawn(self, driver: Driver, standby: bool = False) -> tuple[int, socket.socket | None]:
        """Fork a process for ``driver`` (a standby: with the socket its go is sent on)."""
        fds = [self._phases_theirs.fileno()]
        go = theirs = None
        if standby:
            go, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            fds.append(theirs.fileno())
        try:
            pid = self.zygote.spawn({**driver.spec, "standby": standby},
                                    fds + [s.fileno() for s in driver.sockets.values()])
        finally:
            if theirs is not None:
                theirs.close()
        return pid, go

    def _prepare_standby(self, driver: Driver) -> None:
        pid, go = self._spawn(driver, standby=True)
        assert go is not None
        driver.standby = Standby(pid, os.pidfd_open(pid), go, self._claim(pid))
        log.info("driver %s: standby process %d started", driver.name, pid)

    def _drop_standby(self, driver: Driver) -> None:
        """End the standby (SIGKILL, our own child's child, by its PID) and reap it."""
        standby, driver.standby = driver.standby, None
        if standby is None:
            return
        kill(standby.pidfd)
        self.zygote.reap(standby.pid)
        os.close(standby.pidfd)
        standby.go.close()

    def _wake_standby(self, driver: Driver) -> dict[str, float] | None:
        """Make the standby the driver, once the dead one's slot is revoked; the phases it
        went through (None if there is none alive: then a fresh process starts)."""
        self.collect_phases()
        standby = driver.standby
        if standby is None or not standby.alive():
            self._drop_standby(driver)
            return None
        if driver.slot is not None and not self.control.wait_revoked(driver.slot, SLOT_BACK_S):
            log.warning("driver %s: slot %d not revoked within %g s; the standby goes anyway",
                        driver.name, driver.slot, SLOT_BACK_S)
        try:
            standby.go.send(b"g")
        except OSError:                         # it died just now
            self._drop_standby(driver)
            return None
        standby.go.close()
        driver.standby = None
        driver.pid, driver.pidfd = standby.pid, standby.pidfd
        return {**standby.phases, "woken": time.monotonic()}

    def _start(self, driver: Driver) -> None:
        woken = self._wake_standby(driver)
        if woken is None:
            driver.pid, _ = self._spawn(driver)
            driver.pidfd = os.pidfd_open(driver.pid)
            told = {"spawned": time.monotonic(), **self._claim(driver.pid)}
        if driver.pending is not None:
            driver.pending.pid = driver.pid
            driver.pending.phases = woken if woken is not None else told
        driver.state, driver.slot, driver.last_beat = "starting", None, 0
        driver.started_at = driver.last_beat_at = time.monotonic()
        log.info("driver %s: process %d %s", driver.name, driver.pid, "started" if woken is None else "woken")

    def collect_phases(self) -> None:
        """Read the phases the drivers told so far into their restarts (the watcher does, every
        ``POLL_SECONDS``; call this to have the last ones now)."""
        with self._phases_lock:
            while True:
                try:
                    pid, phase, at = self._phases.recv(256).decode().split()
                except BlockingIOError:
                    return
                known = [restart.phases for driver in self.drivers
                         for restart in driver.restarts[-1:] + ([driver.pending] if driver.pending else [])
                         if restart.pid == int(pid)]
                known += [driver.standby.phases for driver in self.drivers
                          if driver.standby is not None and driver.standby.pid == int(pid)]
                for phases in known or [self._unclaimed.setdefault(int(pid), {})]:
                    phases.setdefault(phase, float(at))
                while len(self._unclaimed) > UNCLAIMED_PROCESSES:    # the oldest: a first start's, never claimed
                    del self._unclaimed[next(iter(self._unclaimed))]

    def _claim(self, pid: int) -> dict[str, float]:
        """The phases process ``pid`` told before it was registered (a standby, a restart's)."""
        with self._phases_lock:
            return self._unclaimed.pop(pid, {})

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._until_a_death(POLL_SECONDS)
            if self._stop.is_set():
                return
            self.collect_phases()
            with self._lock:
                if not self.pm.machine.alive():         # first: its drivers' deaths follow from it
                    code = self.pm.machine.exitcode()
                    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else \
                        f"exit status {code}"
                    self._abandon(f"QEMU exited ({how}): the devices are gone")
                    return
                for driver in self.drivers:
                    try:
                        self._look_at(driver)
                    except Exception:
                        if self.zygote.gone is None:
                            log.exception("supervisor: watching %s", driver.name)
                if self.zygote.gone is not None:
                    self._abandon(f"the zygote is gone ({self.zygote.gone}): no driver process can be started")
                    return

    def _abandon(self, why: str) -> None:
        """Nothing can be served any more (the machine's QEMU exited, or the zygote, and with it
        every driver process, is gone): every driver process ends, every driver is dead, its
        waiters are told ``why``, and watching ends; ``stop()`` still cleans up."""
        log.warning("supervisor: %s", why)        # what a waiter's SupervisorError says too
        for driver in self.drivers:
            self._drop_standby(driver)
            self._end(driver)
            with driver._serving:
                if driver.state != "stopped":
                    driver.state = "dead"
                driver.deaths.append(why)
                driver._serving.notify_all()

    def _until_a_death(self, timeout: float) -> None:
        """Wait ``timeout`` seconds, or less if a driver process ends: its pidfd becomes
        readable, so the restart starts at once, not at the next look."""
        pidfds = [driver.pidfd for driver in self.drivers if driver.pidfd is not None]
        try:
            select.select(pidfds, [], [], timeout)
        except (OSError, ValueError):       # one was closed meanwhile: look now
            pass

    def _look_at(self, driver: Driver) -> None:
        now = time.monotonic()
        if driver.pidfd is None:
            if driver.restart_at and now >= driver.restart_at and not self._stop.is_set():
                driver.restart_at = 0.0
                self._start(driver)
            return
        if select.select([driver.pidfd], [], [], 0)[0]:
            self._died(driver, _describe(self.zygote.reap(driver.pid)), now)
            return
        if driver.slot is None:
            driver.slot = self.control.slot_of(driver.pid)
        beat = self.pm.admin.slots[driver.slot - 1].heartbeat if driver.slot else 0
        if beat != driver.last_beat:
            driver.last_beat, driver.last_beat_at = beat, now
            if driver.state == "starting" and beat:
                driver.early_deaths = 0
                with driver._serving:
                    if driver.pending is not None:
                        driver.pending.serving_at = now
                        driver.restarts.append(driver.pending)
                        log.warning("driver %s: serving again %.0f ms after it was %s", driver.name,
                                    driver.pending.ms, driver.pending.cause)
                        driver.pending = None
                    driver.state = "serving"
                    driver._serving.notify_all()
                if driver.keep_standby and driver.standby is None and not self._stop.is_set():
                    self._prepare_standby(driver)   # now, not while the new driver was starting
        elif driver.state == "serving" and now - driver.last_beat_at > self.hang_timeout:
            self._kill(driver, f"hung: no heartbeat for {now - driver.last_beat_at:.1f} s", now)
        elif driver.state == "starting" and now - driver.started_at > self.start_timeout:
            self._kill(driver, f"did not start within {self.start_timeout:g} s", now)

    def _kill(self, driver: Driver, cause: str, now: float) -> None:
        """A hung driver: SIGKILL it (even a stopped process dies of that), and restart it."""
        assert driver.pidfd is not None
        kill(driver.pidfd)
        self.zygote.reap(driver.pid)
        self._died(driver, cause, now)

    def _end(self, driver: Driver) -> None:
        """SIGKILL the driver's process, if it has one, reap it and let go of its pidfd."""
        if driver.pidfd is not None:
            kill(driver.pidfd)
            self.zygote.reap(driver.pid)
            os.close(driver.pidfd)
            driver.pidfd = None

    def _died(self, driver: Driver, cause: str, now: float) -> None:
        assert driver.pidfd is not None
        os.close(driver.pidfd)
        driver.pidfd = None
        driver.deaths.append(cause)
        log.info("driver %s: process %d %s", driver.name, driver.pid, cause)
        if driver.state == "stopped":
            return
        if not driver.restart or self._stop.is_set():
            if driver.restart:
                log.warning("driver %s: %s, and is not restarted (the supervisor is stopping)", driver.name, cause)
            with driver._serving:
                driver.state = "dead"
                driver._serving.notify_all()
            return
        if driver.pending is None:              # died again before serving: the first death counts
            driver.pending = Restart(cause, now)
        if driver.state == "starting":          # it never served: do not spin on a driver that cannot start
            driver.early_deaths += 1
            driver.restart_at = now + min(BACKOFF_FIRST * 2 ** (driver.early_deaths - 1), BACKOFF_MAX)
            log.warning("driver %s: died %d times before serving; next try in %.2f s", driver.name,
                        driver.early_deaths, driver.restart_at - now)
            return
        self._start(driver)

    def stop(self) -> None:
        """Stop every driver (SIGKILL: a driver must survive that anyway), then the zygote."""
        self._stop.set()
        self._watcher.join()
        for driver in self.drivers:
            self._drop_standby(driver)
            with driver._serving:
                if driver.pidfd is None and driver.state != "dead":
                    driver.state = "stopped"        # one waiting to be restarted: it will not be
                driver._serving.notify_all()
            if driver.pidfd is not None:
                driver.state = "stopped"
                self._end(driver)
                if driver.slot:
                    self.control.wait_free(driver.slot, 10.0)
            self.control.unreserve(driver.spec["token"])
        self.zygote.close()
        self._phases.close()
        self._phases_theirs.close()

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
