"""The zygote: a small process that has already imported the harness and the drivers,
and forks driver processes on request, so that a restart costs a fork, not a Python
start-up (about 0.3 s of imports and 0.3 s of reading the guest's ABI here).

It is started by :class:`harness.processes.supervisor.Supervisor` and talks to it over a
SOCK_SEQPACKET pair (a message each, descriptors alongside). Requests are
pickled tuples:

- ``("spawn", spec)`` with the descriptors the driver gets: the reply is
  ``("pid", pid)``. The child runs :func:`harness.processes.supervisor.driver_main`.
- ``("reap", pid)``: the reply is ``("status", wait status)``. Children are
  reaped only when asked, so the supervisor learns how each one ended.

The zygote dies with its parent (PR_SET_PDEATHSIG), and each driver with the
zygote, so killing the supervisor, even with SIGKILL, leaves no process behind.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import sys

MAX_MESSAGE = 1 << 16


def main(parent: int, fd: int, guest_elf: str, preload: list[str]) -> None:
    from ..machine.machine import die_with_parent
    die_with_parent()                       # here, not between fork and exec in a threaded parent
    if os.getppid() != parent:              # it died before the line above
        return
    from pathlib import Path

    from ..proxy.abi import load_abi
    from .supervisor import driver_main
    load_abi(Path(guest_elf))               # cached: every child starts with it read
    for module in preload:
        importlib.import_module(module)
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
        if request[0] == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    die_with_parent()
                    if os.getppid() == 1:   # the zygote died before the line above
                        os._exit(code)
                    sock.close()
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
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


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a Ctrl-C is the supervisor's to handle
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
