"""The ivshmem server's handshake, played against a fake QEMU client (no QEMU)."""

from __future__ import annotations

import array
import os
import socket
import struct

from harness.proxy.ivshmem import GUEST_PEER, IvshmemServer


def handshake(server: IvshmemServer) -> list[tuple[int, int | None]]:
    """Connect as QEMU would and collect every (value, fd or None) message of the handshake."""
    address = f"\0hwharness-test-ivshmem-{os.getpid()}"
    server.listen(address)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(address)
    server.accept(5.0)
    client.settimeout(1.0)
    messages: list[tuple[int, int | None]] = []
    try:
        while True:
            fds = array.array("i")
            data, ancillary, _, _ = client.recvmsg(8, socket.CMSG_SPACE(fds.itemsize))
            if not data:
                break
            fd = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:fds.itemsize])
                    fd = fds[0]
            messages.append((struct.unpack("<q", data)[0], fd))
    except TimeoutError:
        pass
    finally:
        client.close()
    for _, fd in messages:
        if fd is not None:
            os.close(fd)
    return messages


def test_qemu_gets_every_doorbell_but_only_the_kick_vectors_of_its_own() -> None:
    """The guest may ring all 40 doorbells; QEMU is handed only the one eventfd the host
    kicks the guest with, since its main loop polls every one of the guest's own it holds."""
    server = IvshmemServer(1 << 20, vectors=40)
    try:
        messages = handshake(server)
    finally:
        server.close()
    assert [v for v, _ in messages[:3]] == [0, GUEST_PEER, -1] and messages[2][1] is not None
    host = [fd for v, fd in messages[3:] if v == server.host_peer]
    own = [fd for v, fd in messages[3:] if v == GUEST_PEER]
    assert len(host) == 40 and all(fd is not None for fd in host)
    assert len(own) == 1 and own[0] is not None
    assert len(messages) == 3 + 40 + 1
