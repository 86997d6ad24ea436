"""The zygote: a small process that has already imported the harness and the drivers it
was asked to run, and forks driver processes on request, so that a restart costs a fork, not a Python
start-up (about 0.3 s of imports and 0.3 s of reading the guest's ABI here).

It is started by :class:`harness.processes.supervisor.Supervisor` and talks to it over a
SOCK_SEQPACKET pair (a message each, descriptors alongside). Requests are
pickled tuples:

- ``("preload", module)``: the module is imported here, once, before the first
  driver that runs it; the reply is ``("loaded", module)`` or ``("failed", why)``.
- ``("spawn", spec)`` with the descriptors the driver gets (the first: a datagram
  socket for :func:`mark`; for a standby, ``spec["standby"]``, the second: the socket its
  go comes on): the reply is ``("pid", pid)``. The child runs :func:`driver_main`.
- ``("reap", pid)``: the reply is ``("status", wait status)``. Children are
  reaped only when asked, so the supervisor learns how each one ended.

The zygote dies with its parent (PR_SET_PDEATHSIG), and each driver with the
zygote, so killing the supervisor, even with SIGKILL, leaves no process behind.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import socket
import sys
import time
from typing import Any, Callable

from ..errors import SupervisorError

MAX_MESSAGE = 1 << 16

_phases: socket.socket | None = None     # in a driver process: where mark() tells the supervisor


def mark(phase: str) -> None:
    """Tell the supervisor that this driver process reached ``phase`` now (CLOCK_MONOTONIC, which
    every process on the host shares): where a restart's time goes. Nothing outside a
    supervised driver process, and nothing that could hold the driver up."""
    if _phases is not None:
        try:
            _phases.send(f"{os.getpid()} {phase} {time.monotonic()!r}".encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass


def driver_main(spec: dict[str, Any], fds: list[int]) -> int:
    """A driver process's life, in the zygote's child: attach, find the device, run the entry.
    ``fds``: the phases socket (:func:`mark`), for a standby its go socket, then the entry's
    sockets. A standby attaches, then waits for a byte on its go socket before it touches the
    device (its predecessor holds it until then); the socket closed instead: it exits."""
    global _phases
    _phases = socket.socket(fileno=fds[0])
    mark("forked")
    from .attached import attach
    logging.basicConfig(level=logging.WARNING, format=f"driver {spec['name']} %(levelname)s %(message)s")
    go = socket.socket(fileno=fds[1]) if spec.get("standby") else None
    entry_fds = fds[2:] if go is not None else fds[1:]
    sockets = {name: socket.socket(fileno=fd) for name, fd in zip(spec["sockets"], entry_fds)}
    bus = attach(spec["address"], wait=spec["attach_wait"], token=spec["token"])
    mark("attached")
    if go is not None:
        if not go.recv(1):
            bus.close()
            return 0
    try:
        function = next((f for f in bus.functions if f.devfn == spec["devfn"]), None)
        if function is None:
            raise SupervisorError(f"no PCI function {spec['devfn']:#x} on the machine")
        module, _, name = spec["entry"].partition(":")
        entry: Callable[..., Any] = getattr(importlib.import_module(module), name)
        entry(bus, function, **sockets, **spec["kwargs"])
        return 0
    except BaseException:
        logging.getLogger(spec["name"]).exception("driver %s failed", spec["name"])
        return 1
    finally:
        bus.close()


def main(parent: int, fd: int, guest_elf: str) -> None:
    from ..machine.machine import die_with_parent
    die_with_parent()                       # here, not between fork and exec in a threaded parent
    if os.getppid() != parent:              # it died before the line above
        return
    from pathlib import Path

    from ..proxy.abi import load_abi
    load_abi(Path(guest_elf))               # cached: every child starts with it read
    sock = socket.socket(fileno=fd)
    sock.send(pickle.dumps(("ready", os.getpid())))
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 64)
        except ConnectionError:
            return
        if not data:
            return                          # the supervisor is gone
        request = pickle.loads(data)
        if request[0] == "preload":
            try:
                importlib.import_module(request[1])
                reply: tuple[str, str] = ("loaded", request[1])
            except Exception as exc:        # the supervisor raises it, naming the module
                reply = ("failed", f"{type(exc).__name__}: {exc}")
            sock.send(pickle.dumps(reply))
        elif request[0] == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    die_with_parent()
                    if os.getppid() == 1:   # the zygote died before the line above
                        os._exit(code)
                    sock.close()
                    for number in (signal.SIGINT, signal.SIGTERM):
                        signal.signal(number, signal.SIG_DFL)
                    code = driver_main(request[1], fds)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            for f in fds:
                os.close(f)
            sock.send(pickle.dumps(("pid", pid)))
        elif request[0] == "reap":
            try:
                _, status = os.waitpid(request[1], 0)
            except ChildProcessError:
                status = -1
            sock.send(pickle.dumps(("status", status)))


def start(argv: list[str]) -> None:
    """The zygote process's entry: ``python -c`` runs this, not ``-m``, which would import
    this module a second time as __main__ beside the copy harness.processes already holds."""
    # A Ctrl-C or a SIGTERM sent to the whole process group (`timeout`, a cancelled CI job)
    # is the supervisor's to handle; the zygote ends with it (PDEATHSIG, its socket's end).
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    main(int(argv[0]), int(argv[1]), argv[2])

START = "import sys; from harness.processes.zygote import start; start(sys.argv[1:])"
