"""A booted machine saved to files once, and fresh machines restored from them in tens of milliseconds.

How Firecracker restores, with QEMU's parts:

- The booted machine's RAM is a file (``-object memory-backend-file,share=on`` and
  ``-machine memory-backend=``: :class:`FileRam`), so saving it copies nothing: the file
  already holds it.
- Saving migrates the device state alone into a file (the ``x-ignore-shared``
  capability skips shared RAM; a busybox guest's state is ~120 KB, saved in ~15 ms), and
  the machine is shut down: from then on the RAM file is the saved machine's.
- A restore is a new QEMU (``-incoming defer``, :class:`Incoming`) whose RAM maps that file
  privately (``share=off``: copy-on-write, as Firecracker maps its memory file), so no
  page is copied until the guest writes it, and machines restored from one file at once
  never see each other's writes. Measured on a 2-core TCG host, a 256 MiB guest with
  ~94 MiB touched: copying the RAM file per restore instead costs 90-110 ms on tmpfs
  (sparse ``cp``) and ~250 ms with ``cp --reflink=auto`` on ext4, which cannot reflink.
  With the capability set on the incoming side too, QEMU expects no page for the block
  and keeps what the mapping shows. QEMU reads the state from a file descriptor the
  harness hands it, and is given no kernel to load (the firmware stays: its ROM is one of
  the RAM blocks the state names).
- Where a restore's time goes (``hwharness bench boot``, ``restore_phases_p50_ms``): QEMU's
  start (exec to QMP, ~35 ms on an idle host), the state load (~10 ms), and the first
  command's answer, most of it TCG translating, for the first time in this process, every
  guest instruction the command runs (~7,400 translation blocks for one ``true``).
- A QEMU can stand by (:meth:`SavedMachine.stand_by`): started, its machine built, waiting
  for the state, as Firecracker's process is started before its snapshot-load request. A
  restore then skips QEMU's exec and build (dynamic linking, page faults, the machine: ~30
  ms of a 2-core TCG host, which no machine type or option changed) and another QEMU stands
  up behind it. One that waits costs no CPU and no guest memory.
- Disks: the booted machine writes into qcow2 overlays of its drives, saved with it; each
  restore gets an overlay of its own over those (:class:`DiskOverlays`), discarded with
  the machine's directory.

A restored machine is a new process (new PID, sockets, console log) in the saved state,
running. Its RAM is private, so ``Machine.snapshot``/``restore`` work on it as on a
booted one. Machines with state outside QEMU (a plugin that is not ``snapshottable``,
such as the proxy's shared windows) cannot be saved.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import MachineError, SnapshotError
from .machine import Machine, owned_prefix, sweep_stale_workdirs
from .plugin import MachinePlugin
from .spec import Option, RuntimeFile

if TYPE_CHECKING:
    from .spec import Endpoints, MachineSpec

log = logging.getLogger(__name__)

RAM_ID = "hwh-ram"
RAM_FILE = "ram"
STATE_FILE = "devices.state"
# tmpfs: the RAM file's pages stay in memory and are never written back to a disk.
SHM = Path("/dev/shm")
IGNORE_SHARED = "x-ignore-shared"
STATE_FD = "hwh-state"                 # the saved state's file descriptor, as QEMU names it


class FileRam(MachinePlugin):
    """The machine's RAM is ``path``: shared (written through, to be saved) or a private
    copy-on-write mapping of it (a restore)."""

    def __init__(self, path: Path, memory_mb: int, private: bool) -> None:
        self.path = path
        self.memory_mb = memory_mb
        self.private = private

    def options(self, ends: Endpoints, accel: str) -> list[Option]:
        return [Option("object", "memory-backend-file", {"id": RAM_ID, "size": f"{self.memory_mb}M",
                                                         "mem-path": str(self.path), "share": not self.private}),
                Option("machine", "", {"memory-backend": RAM_ID})]


def set_ignore_shared(machine: Machine, on: bool) -> None:
    machine.qmp("migrate-set-capabilities", capabilities=[{"capability": IGNORE_SHARED, "state": on}])


def wait_migration(machine: Machine, what: str, timeout: float) -> None:
    """Until the machine's migration (``query-migrate``) has completed; SnapshotError if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        status = machine.qmp("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"{what} {status}: {machine.qmp('query-migrate').get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise SnapshotError(f"{what} did not finish within {timeout:g} s (status {status})")
        time.sleep(0.001)


class Incoming(MachinePlugin):
    """QEMU starts waiting for a migration; once QMP answers, the saved device state comes in
    (RAM excepted) and the machine runs by itself.

    The saved machine was running when its state was taken (see :func:`save_booted`), so
    QEMU starts it as soon as the state is in: no ``cont``. The capability stays on: this
    machine's RAM is a private mapping, which ``x-ignore-shared`` never skips, so a later
    snapshot of the restored machine still holds all of its RAM.
    """

    def __init__(self, state: Path) -> None:
        self.state = state

    def args(self) -> list[str]:
        return ["-incoming", "defer"]

    def connected(self, machine: Machine, deadline: float) -> None:
        set_ignore_shared(machine, True)       # both sides must agree, or QEMU refuses the stream
        # QEMU reads the file itself: `exec:cat FILE` would fork QEMU, a shell and cat first
        # (~20 ms of a restore measured here on a loaded 2-core host, against ~10 ms in all)
        state = os.open(self.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            machine.send_fd(state, STATE_FD)
        finally:
            os.close(state)
        machine.qmp("migrate-incoming", uri=f"fd:{STATE_FD}")
        # "inmigrate" until the state is in; QEMU exits if it cannot load it
        while True:
            try:
                status = machine.qmp("query-status")["status"]
            except MachineError as exc:
                raise SnapshotError(f"the saved state {self.state} did not load: {machine.output()[-500:]}") from exc
            if status == "running":
                return
            if status != "inmigrate":
                raise SnapshotError(f"the machine restored from {self.state} is {status}, not running")
            if time.monotonic() > deadline:
                raise SnapshotError(f"the saved state {self.state} did not load within the launch timeout")
            time.sleep(0.001)


class DiskOverlays(MachinePlugin):
    """A qcow2 overlay per drive in the machine's own directory, over the saved machine's."""

    def __init__(self, backing: dict[str, Path]) -> None:
        self.backing = backing                 # overlay file name -> the saved overlay under it

    def pre_launch(self, machine: Machine, ends: Endpoints) -> None:
        for name, below in self.backing.items():
            qcow2_overlay(below, "qcow2", ends.workdir / name)


def qcow2_overlay(backing: Path, backing_format: str, path: Path) -> None:
    """A qcow2 at ``path`` that reads through to ``backing`` and takes every write."""
    done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()),
                           "-F", backing_format, str(path)], capture_output=True, text=True)
    if done.returncode:
        raise SnapshotError(f"qemu-img could not make an overlay of {backing}: {done.stderr.strip()}")


def writable_drives(spec: MachineSpec) -> list[Option]:
    return [o for o in spec.options if o.name == "drive" and "file" in o.props and not o.props.get("readonly")]


@dataclass
class SavedMachine:
    """A booted machine in files (``directory``): RAM, device state, disk overlays.
    ``restore()`` starts a machine in that state; ``remove()`` deletes the files."""

    spec: MachineSpec                          # the booted machine's spec, its drives on the overlays
    directory: Path
    disks: dict[str, Path] = field(default_factory=dict)   # a restore's overlay name -> saved overlay
    # the QEMU standing by (started, waiting for the state), the restore() arguments it is for,
    # and the thread that started it (the QEMU dies with that thread: die_with_parent)
    _standby: Machine | None = field(default=None, init=False, repr=False, compare=False)
    _standby_for: tuple[str, dict[str, Any]] | None = field(default=None, init=False, repr=False, compare=False)
    _standby_thread: int = field(default=0, init=False, repr=False, compare=False)
    _standby_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def restore_spec(self) -> MachineSpec:
        """The spec of a machine restored from these files (what ``restore`` launches)."""
        spec = copy.deepcopy(self.spec)
        # No kernel to boot: QEMU would read it and the initrd (73 MB for the Linux guest) into
        # fw_cfg for nothing, as the guest's RAM and the devices come from the saved machine.
        # The firmware stays: its ROM is one of the RAM blocks the saved state names.
        spec.kernel = spec.initrd = spec.append = None
        # huge pages for TCG's code buffer: a restore faults in little fresh memory (its RAM is
        # the file's pages), and without them its first answer took 38 ms against 31 (p50, five
        # rounds of 20, bench compare 60b1a6d --only boot)
        spec.huge_pages = True
        spec.plugins = [p for p in spec.plugins if not isinstance(p, FileRam)]
        spec.plugins += [FileRam(self.directory / RAM_FILE, spec.memory_mb, private=True),
                         Incoming(self.directory / STATE_FILE), DiskOverlays(self.disks)]
        saved_to_own = {str(saved): name for name, saved in self.disks.items()}
        for drive in writable_drives(spec):
            drive.props["file"] = RuntimeFile(saved_to_own[str(drive.props["file"])])
        return spec

    def restore(self, name: str = "restored", plugins: tuple[MachinePlugin, ...] = (),
                **machine_args: Any) -> Machine:
        """A new machine in the saved state, running, with ``plugins`` added to the saved
        machine's; the caller shuts it down. Where a QEMU this thread started stands by for
        this ``name`` and these ``machine_args`` (:meth:`stand_by`) and no plugin is added,
        that QEMU takes the state, and another stands up behind it before this returns."""
        served = not plugins and self._standby_for == (name, machine_args)
        m = self._take_standby() if served else None
        if m is not None:
            try:
                m.wait_launched(since=time.monotonic())
            except MachineError as exc:         # it died between the look and the connection
                log.warning("the QEMU standing by for %s could not take the state (%s); starting another",
                            self.directory, exc)
                m = None
        if m is None:
            spec = self.restore_spec()
            spec.plugins += plugins
            m = Machine(spec, name=name, **machine_args)
            m.launch()
        if served:
            self._stand_up_quietly()
        return m

    def stand_by(self, name: str = "restored", **machine_args: Any) -> None:
        """Keep a QEMU started for this thread's next ``restore(name, **machine_args)``: its
        machine built, waiting for the saved state (within ``launch_timeout`` of the restore
        that takes it). It dies with this thread (as every machine dies with the thread that
        started it: :func:`~.machine.die_with_parent`), so other threads' restores leave it
        alone, and a restore that finds it dead starts QEMU itself. :meth:`stand_down` or
        :meth:`remove` kills it."""
        self.stand_down()
        with self._standby_lock:
            self._standby_for = (name, dict(machine_args))
        self._stand_up()

    @property
    def standing_by(self) -> Machine | None:
        """The QEMU standing by for the next restore (started, not yet connected), if any."""
        return self._standby

    def stand_down(self) -> None:
        """No QEMU stands by any more (the one that did is killed)."""
        with self._standby_lock:
            m, self._standby, self._standby_for = self._standby, None, None
        if m is not None:
            m.shutdown()

    def _stand_up(self) -> None:
        """A QEMU for the restore ``_standby_for`` names, started by this thread."""
        with self._standby_lock:
            if self._standby_for is None or self._standby is not None:
                return
            name, machine_args = self._standby_for
            m = Machine(self.restore_spec(), name=name, **machine_args)
            m.start()
            self._standby, self._standby_thread = m, threading.get_ident()

    def _stand_up_quietly(self) -> None:
        """:meth:`_stand_up`, whose failure (a full disk, no file descriptors left) costs the
        next restore its head start, not this one its machine."""
        try:
            self._stand_up()
        except Exception as exc:
            log.warning("no QEMU stands by for the next restore from %s: %s", self.directory, exc)

    def _take_standby(self) -> Machine | None:
        """The QEMU standing by, if this thread started it and it is alive (taken: none stands
        by now)."""
        with self._standby_lock:
            m = self._standby
            if m is None or self._standby_thread != threading.get_ident():
                return None
            self._standby = None
        if not m.alive():
            log.warning("the QEMU standing by for %s exited (status %s); its output is kept",
                        self.directory, m.exitcode())
            m.failed = True
            m.shutdown()
            return None
        return m

    def restore_many(self, count: int, name: str = "restored", **machine_args: Any) -> list[Machine]:
        """``count`` new machines in the saved state, running (named ``name0``, ``name1``...);
        the caller shuts them down. Every QEMU is started before the first is waited for, so
        they build themselves side by side instead of one after another."""
        machines = [Machine(self.restore_spec(), name=f"{name}{i}", **machine_args) for i in range(count)]
        try:
            for m in machines:
                m.start()
            for m in machines:
                m.wait_launched()
        except BaseException:
            for m in machines:
                m.shutdown()
            raise
        return machines

    def remove(self) -> None:
        self.stand_down()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "SavedMachine":
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()


class OwnEventLoop(MachinePlugin):
    """The machine's QMP client runs on an event loop of its own, closed with the machine.

    QEMU's synchronous QMP client runs on its thread's current event loop, made when the
    client is: machines restored by one thread and used by others (:class:`RestoredAhead`)
    would otherwise share that thread's loop, and two threads running it at once fail
    ("This event loop is already running").
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def pre_launch(self, machine: Machine, ends: Endpoints) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)      # what the client, made after this, runs on

    def shutdown(self, machine: Machine) -> None:
        if self.loop is not None:              # the client has been closed before this
            self.loop.close()
            self.loop = None


class RestoredAhead:
    """Machines restored from ``saved`` before anyone asks for one, so that a caller waits
    only for what is left of its restore: ``with RestoredAhead(saved, prepare) as ahead:
    m = ahead.take()``.

    A thread of the pool's own keeps ``size`` machines ready: restored, then ``prepare(m)``
    (for the Linux guest, a command answered at the prompt). ``take()`` hands out the oldest
    and the thread starts the next at once, while the taker uses its machine. Each machine
    is restored for one taker and handed out once; it is the taker's to shut down. The
    thread stops at ``close()``, which shuts down the machines nobody took: QEMU dies with
    the thread that started it (:func:`~.machine.die_with_parent`), so a machine taken must
    be shut down before the pool closes.

    A restore or ``prepare`` that fails is raised by the ``take()`` that would have had its
    machine (whose directory is kept); the next ``take()`` tries again.
    """

    def __init__(self, saved: SavedMachine, prepare: Callable[[Machine], object], *, size: int = 1,
                 name: str = "restored", **machine_args: Any) -> None:
        if size < 1:
            raise ValueError(f"a pool keeps at least one machine ready, not {size}")
        self.saved = saved
        self.prepare = prepare
        self.name = name
        self.machine_args = machine_args
        self._ready: queue.Queue[Machine | BaseException] = queue.Queue()
        self._room = threading.Semaphore(size)      # released by each take(): restore another
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._keep_ready, name=f"restore-ahead-{name}", daemon=True)
        self._thread.start()

    def _keep_ready(self) -> None:
        n = 0
        while True:
            self._room.acquire()
            if self._closed.is_set():
                break
            n += 1
            try:
                m = self.saved.restore(name=f"{self.name}{n}", plugins=(OwnEventLoop(),), **self.machine_args)
            except BaseException as exc:
                self._ready.put(exc)
                continue
            try:
                self.prepare(m)
            except BaseException as exc:
                m.failed = True
                m.shutdown()
                self._ready.put(exc)
                continue
            self._ready.put(m)
        while not self._ready.empty():          # nobody takes them now
            left = self._ready.get_nowait()
            if isinstance(left, Machine):
                left.shutdown()

    def take(self) -> Machine:
        """The next machine ready (waiting for it if need be), the caller's from now on."""
        while True:
            if self._closed.is_set() or not self._thread.is_alive():
                raise MachineError(f"the pool of machines restored from {self.saved.directory} is closed")
            try:
                got = self._ready.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        self._room.release()
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        """Stop restoring and shut down every machine not taken."""
        self._closed.set()
        self._room.release()                    # wakes the thread if it waits for room
        self._thread.join()

    def __enter__(self) -> "RestoredAhead":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def save_booted(spec: MachineSpec, ready: Callable[[Machine], object], *, name: str = "saved",
                root: Path | None = None, timeout: float = 60.0, **machine_args: Any) -> SavedMachine:
    """Boot ``spec``, call ``ready(machine)`` (wait for the prompt, prepare the guest), save the
    machine into a new directory under ``root`` (default: /dev/shm) and shut it down.

    ``machine_args`` go to the booted Machine (artifacts, console rules, launch timeout).
    """
    unfit = [type(p).__name__ for p in spec.plugins if not p.snapshottable]
    if unfit:
        raise SnapshotError(f"a machine with a {', '.join(unfit)} cannot be saved: part of its state is outside QEMU's")
    root = root or (SHM if SHM.is_dir() else Path(tempfile.gettempdir()))
    sweep_stale_workdirs(root)
    directory = Path(tempfile.mkdtemp(prefix=owned_prefix(name), dir=root))
    saved = SavedMachine(copy.deepcopy(spec), directory)
    try:
        saved.spec.plugins.append(FileRam(directory / RAM_FILE, spec.memory_mb, private=False))
        for n, drive in enumerate(writable_drives(saved.spec)):
            overlay = directory / f"disk{n}.qcow2"
            qcow2_overlay(Path(str(drive.props["file"])), str(drive.props.get("format", "raw")), overlay)
            drive.props.update(file=str(overlay), format="qcow2")
            drive.props.pop("snapshot", None)  # the overlays are what keeps the original unwritten
            saved.disks[overlay.name] = overlay
        with Machine(saved.spec, name=name, **machine_args) as m:
            ready(m)
            t0 = time.monotonic()
            set_ignore_shared(m, True)
            # Not stopped first: the migration stops the guest itself once the (RAM-less) state
            # is written, and records it as running, so a restore runs without a `cont`.
            m.qmp("migrate", uri=f"exec:cat > {directory / STATE_FILE}")
            wait_migration(m, "saving the device state", timeout)
            log.info("%s: saved in %.0f ms to %s", name, (time.monotonic() - t0) * 1e3, directory)
    except BaseException:
        saved.remove()
        raise
    return saved
