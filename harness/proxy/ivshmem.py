"""The ivshmem server, played by the harness itself.

QEMU's ``ivshmem-doorbell`` device connects to a Unix socket and expects a
server to hand it the shared memory and the peers' eventfds
(docs/specs/ivshmem-spec.rst). Each message is one little-endian int64,
file descriptors ride along with SCM_RIGHTS:

1. the protocol version, 0;
2. the client's own peer id;
3. -1 with the shared-memory fd;
4. for every other peer, one message per vector: that peer's id with the
   eventfd the client rings to reach it;
5. one message per vector with the client's own id and its own eventfds,
   which the server signals to raise that MSI-X vector in the guest.

The client's own eventfds are handed over only for the vectors the host
really raises (``kick_vectors``, 1 by default: the proxy takes one kick
vector per window). Without KVM's irqfd, QEMU watches each of them in its
main loop (``qemu_set_fd_handler``), and every iteration of that loop polls
every one of them: 40 per window made each main-loop wake-up (a disk
completion, a host kick) cost tens of microseconds, and four idle driver
slots made an AHCI command three times slower. QEMU accepts fewer of a
peer's eventfds than the device has vectors; a vector without one is never
raised. The other peer's eventfds (the ones the guest rings) are
ioeventfds, which QEMU never polls: all of them are sent.

The harness is peer ``host_peer`` (0): the guest rings it by writing
``(host_peer << 16) | vector`` to the Doorbell register. The shared memory
is a memfd, so nothing is ever left in /dev/shm.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import logging

from ..machine.machine import accept_once, listen

log = logging.getLogger(__name__)

GUEST_PEER = 1


class IvshmemServer:
    """Owns the shared memory and the eventfds of one machine's ivshmem-doorbell."""

    def __init__(self, size: int, host_peer: int = 0, vectors: int = 1, name: str = "hwharness-ivshmem",
                 kick_vectors: int = 1) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ivshmem size must be a power of two, not {size}")
        if not 1 <= kick_vectors <= vectors:
            raise ValueError(f"an ivshmem window's guest has 1 to {vectors} kick vectors, not {kick_vectors}")
        self.size = size
        self.host_peer = host_peer
        self.vectors = vectors
        self._memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self._memfd, size)
        # Sealed at its size: whoever holds the fd (a driver process it is lent to) cannot
        # shrink it under QEMU's and the owner's mappings (SIGBUS) or grow it to eat memory.
        fcntl.fcntl(self._memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.memory = mmap.mmap(self._memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # host_fds: the guest rings these (we read them); guest_fds: we write these to kick it,
        # only as many as we use (see the module's docstring: QEMU's main loop polls each).
        self.host_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(vectors)]
        self.guest_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(kick_vectors)]
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None

    def listen(self, address: str) -> None:
        """Listen on `address` (a Unix path; a leading NUL makes it abstract)."""
        self._listener = listen(address)

    def accept(self, timeout: float) -> None:
        """Accept QEMU's connection and run the whole handshake."""
        assert self._listener is not None, "listen() first"
        self._client = accept_once(self._listener, timeout)
        self._listener = None
        self._send(0)
        self._send(GUEST_PEER)
        self._send(-1, self._memfd)
        for fd in self.host_fds:
            self._send(self.host_peer, fd)
        for fd in self.guest_fds:
            self._send(GUEST_PEER, fd)
        log.debug("ivshmem handshake done: %d bytes, %d vectors", self.size, self.vectors)

    def _send(self, value: int, fd: int | None = None) -> None:
        assert self._client is not None
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))] if fd is not None else []
        self._client.sendmsg([struct.pack("<q", value)], ancillary)

    def lendable_fds(self) -> list[int]:
        """What a driver process needs to hold this window: the memory, the eventfds the
        guest rings (to wait on), and the one that kicks the guest."""
        return [self._memfd, *self.host_fds, self.guest_fds[0]]

    def kick_guest(self, vector: int = 0) -> None:
        """Raise MSI-X `vector` in the guest."""
        os.eventfd_write(self.guest_fds[vector], 1)

    def close(self) -> None:
        """Release everything; the memfd's pages go when QEMU's mapping goes too."""
        for s in (self._listener, self._client):
            if s is not None:
                s.close()
        self._listener = self._client = None
        try:
            self.memory.close()
        except BufferError:
            # Someone still holds a memoryview of the window; the mapping goes with it.
            log.debug("shared window still exported; leaving the mapping to the GC")
        for fd in (*self.host_fds, *self.guest_fds, self._memfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.host_fds, self.guest_fds, self._memfd = [], [], -1
