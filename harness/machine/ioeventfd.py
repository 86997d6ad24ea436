"""QEMU's ioeventfds taken into a driver's process: a doorbell the driver rings itself.

QEMU can turn a guest's write to a device register into a signal on an eventfd
(``memory_region_add_eventfd``, an *ioeventfd*; under TCG QEMU's own memory
dispatch does it, ``softmmu/memory.c``) and handle the register later in its main
loop, where the eventfd is polled. NVMe's doorbells are such registers on
QEMU's ``nvme`` with ``ioeventfd=on`` once the driver configured shadow doorbells
(``hw/nvme/ctrl.c``): the new value is in memory, the eventfd only says "look".
A driver holding a duplicate of that eventfd (``pidfd_getfd(2)``) rings the
doorbell with one ``write(2)``, without the proxy guest: no trip through a ring,
and no vCPU that must be awake to carry it.

QEMU does not say which eventfd is which register. A device makes its eventfds
when its driver asks for them (NVMe: a queue created), so the driver watches
QEMU's descriptor table across that request (:func:`new_eventfds`), one watcher
at a time per QEMU (drivers in other processes wait their turn); where it finds
other than it expected it rings through the proxy as before.

Taking a descriptor needs ptrace rights over QEMU, as any process of QEMU's
own user has where Yama does not restrict it (or as root).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import time
from typing import Iterator

log = logging.getLogger(__name__)

SYS_PIDFD_GETFD = 438           # the same number on every architecture (Linux 5.6)
EVENTFD_LINK = "anon_inode:[eventfd]"
WATCH_WAIT = 10.0               # seconds a watcher waits for another process's watch to end

_libc = ctypes.CDLL(None, use_errno=True)


def descriptors(pid: int, link: str) -> set[int]:
    """Process ``pid``'s descriptors whose /proc link reads ``link`` (``EVENTFD_LINK``,
    ``"anon_inode:[io_uring]"``)."""
    found = set()
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):      # closed meanwhile
            if os.readlink(f"{directory}/{name}") == link:
                found.add(int(name))
    return found


def eventfds(pid: int) -> set[int]:
    """Process ``pid``'s descriptors that are eventfds."""
    return descriptors(pid, EVENTFD_LINK)


def take(pid: int, fd: int) -> int:
    """A duplicate of process ``pid``'s descriptor ``fd`` in this process (close it when done)."""
    pidfd = os.pidfd_open(pid)
    try:
        taken = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if taken < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"pidfd_getfd of QEMU's descriptor {fd}: {os.strerror(errno)}")
        return int(taken)
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def new_eventfds(pid: int | None, expected: int) -> Iterator[list[int]]:
    """The eventfds process ``pid`` (QEMU) opens while the block runs, taken into this
    process: the list yielded is filled as the block ends, in QEMU's descriptor order,
    with exactly ``expected`` descriptors or none (another number, none to take, no
    right to take them: the caller rings the other way). The caller closes them."""
    found: list[int] = []
    if not expected or not pid:
        yield found
        return
    with _watching(pid):
        try:
            before = eventfds(pid)
        except OSError as exc:
            log.info("QEMU's descriptors cannot be read (%s): no ioeventfds", exc)
            yield found
            return
        yield found
        try:
            new = sorted(eventfds(pid) - before)
        except OSError as exc:
            log.info("QEMU's descriptors cannot be read (%s): no ioeventfds", exc)
            return
    if len(new) != expected:
        log.info("QEMU opened %d eventfds, not %d: no ioeventfds", len(new), expected)
        return
    try:
        for fd in new:
            found.append(take(pid, fd))
    except OSError as exc:
        log.info("QEMU's eventfds cannot be taken (%s): no ioeventfds", exc)
        for fd in found:
            os.close(fd)
        found.clear()


@contextlib.contextmanager
def _watching(pid: int) -> Iterator[None]:
    """Hold the watch over QEMU ``pid``'s descriptors: a name in the abstract Unix socket
    namespace, which one socket at a time may bind and which goes with its process, so a
    killed driver leaves nothing to clean up."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deadline = time.monotonic() + WATCH_WAIT
    try:
        while True:
            try:
                lock.bind(f"\0hwharness-ioeventfd-watch-{pid}")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        yield
    finally:
        lock.close()
