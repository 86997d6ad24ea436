"""The owner's control socket: how another process attaches to a driver slot.

The process that owns the machine (``ProxyMachine.serve()``, or ``hwharness
boot --serve``) listens on a private Unix socket in the abstract namespace
(``@hwharness-control-...``: nothing on disk to leave behind; only processes of the owner's own user are
let in, by SO_PEERCRED). A process that connects is lent one free driver
slot: the slot window's memfd and eventfds arrive over SCM_RIGHTS, and
nothing else. It then asks the owner to open devices into its slot; the
owner checks that nobody else holds them and has the proxy grant them there.

When the connection ends (the driver exited, was killed, or hung up), the
slot's channels are revoked at once: interrupts detached, bus mastering off,
domains unmapped and invalidated. The window is cleared and the slot given
out again only after the process that held it has exited, because until
then it still maps the window.

Messages are a little-endian u32 length and a JSON object; a reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": kind, "message": text}``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AccessDenied, AttachRefused, HarnessError

if TYPE_CHECKING:
    from .bus import ProxyBus

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 16
MAX_FDS = 64
_serial = itertools.count(1)


def unix_address(text: str) -> str:
    """A Unix socket address as people write it: a path, or ``@name`` for the abstract
    namespace (as ``ss`` prints it), into what ``bind``/``connect`` take."""
    return "\0" + text[1:] if text.startswith("@") else text


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    frame = struct.pack("<I", len(data)) + data
    if fds:
        socket.send_fds(sock, [frame], fds)
    else:
        sock.sendall(frame)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at the end of the stream."""
    head, fds, _, _ = socket.recv_fds(sock, 4, MAX_FDS)
    if not head:
        return None, fds
    while len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            raise ConnectionError("the control connection ended inside a message")
        head += more
    size, = struct.unpack("<I", head)
    if size > MAX_MESSAGE:
        raise ConnectionError(f"a control message of {size} bytes")
    body = b""
    while len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            raise ConnectionError("the control connection ended inside a message")
        body += more
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ConnectionError("a control message that is not an object")
    return message, fds


@dataclass
class Holder:
    """A process that holds a slot, and what it opened there: ring -> (devfn or None, domain base)."""
    pid: int
    slot: int
    rings: dict[int, tuple[int | None, int]] = field(default_factory=dict)
    attached_at: float = field(default_factory=time.monotonic)


class ControlServer:
    """Lends the machine's driver slots to other processes; see the module's docstring."""

    def __init__(self, bus: "ProxyBus", address: str | None = None) -> None:
        if not bus.slots:
            raise AttachRefused("this machine has no driver slots (proxy_spec(slots=...))")
        self.bus = bus
        self.address = address or f"@hwharness-control-{os.getpid()}-{next(_serial)}"   # printable
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(unix_address(self.address))
        self._listener.listen(16)
        self._lock = threading.Condition()
        self.holders: dict[int, Holder] = {}           # slot -> its holder
        self._draining: set[int] = set()               # revoked, waiting for the holder's exit
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self.on_release: list[Callable[[int, int], None]] = []    # (slot, pid), once a slot is free again
        self._connections: set[socket.socket] = set()
        self._threads = [threading.Thread(target=self._accept_loop, name="hwharness-control", daemon=True)]
        self._threads[0].start()

    # ---- what the owner asks ----

    def holder_of(self, devfn: int) -> Holder | None:
        with self._lock:
            for h in self.holders.values():
                if any(d == devfn for d, _ in h.rings.values()):
                    return h
        return None

    def slot_of(self, pid: int) -> int | None:
        with self._lock:
            return next((n for n, h in self.holders.items() if h.pid == pid), None)

    def wait_free(self, slot: int, timeout: float) -> bool:
        """Wait until ``slot`` may be lent again (its last holder gone and its window cleared)."""
        with self._lock:
            return self._lock.wait_for(lambda: slot not in self.holders and slot not in self._draining, timeout)

    def close(self) -> None:
        self._closed = True
        os.write(self._wake_w, b"x")
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self._connections:      # a holder's thread waits in recv: wake it
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads[1:]:
            t.join(2.0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- serving ----

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), name="hwharness-control-peer", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        holder: Holder | None = None
        with self._lock:
            self._connections.add(conn)
        try:
            if uid != os.getuid():
                send_message(conn, {"ok": False, "error": "refused",
                                    "message": f"process {pid} runs as uid {uid}, the machine's owner as {os.getuid()}"})
                return
            while not self._closed:
                message, fds = recv_message(conn)
                for fd in fds:          # nobody sends us descriptors
                    os.close(fd)
                if message is None:
                    return
                try:
                    reply, lent = self._handle(message, pid, holder)
                    if message.get("op") == "hello":
                        holder = self.holders.get(reply["slot"])
                except (HarnessError, ValueError, MemoryError, KeyError, TypeError) as exc:
                    kind = ("refused" if isinstance(exc, AttachRefused) else "denied" if isinstance(exc, AccessDenied)
                            else "memory" if isinstance(exc, MemoryError) else "invalid")
                    reply, lent = {"ok": False, "error": kind, "message": str(exc)}, []
                send_message(conn, reply, lent)
        except (ConnectionError, OSError, ValueError) as exc:
            log.info("control connection of process %d ended: %s", pid, exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()
            if holder is not None:
                self._release(holder)

    def _handle(self, message: dict[str, Any], pid: int, holder: Holder | None) -> tuple[dict[str, Any], list[int]]:
        op = message.get("op")
        if op == "hello":
            if holder is not None:
                raise ValueError("this connection already holds a slot")
            return self._lend(pid, float(message.get("wait", 0.0)))
        if holder is None:
            raise ValueError(f"{op!r} before hello")
        bus, n = self.bus, holder.slot
        if op == "open_pci":
            devfn = int(message["devfn"])
            function = next((f for f in bus.functions if f.devfn == devfn), None)
            if function is None:
                raise ValueError(f"no PCI function {devfn:#x} on this machine")
            with self._lock:
                other = self.holder_of(devfn)
                if other is not None:
                    raise AttachRefused(f"{function} is held by process {other.pid} (slot {other.slot})")
                if devfn in bus.owned.values():
                    raise AttachRefused(f"{function} is held by the machine's owner (process {os.getpid()})")
                ring, base, size = bus.grant_pci(function, message.get("dma_size"), slot=n)
                holder.rings[ring] = (devfn, base)
            return {"ok": True, "ring": ring, "domain_base": base, "domain_size": size}, []
        if op == "open_ports":
            ring = bus.grant_ports(int(message["base"]), int(message["count"]), slot=n)
            holder.rings[ring] = (None, 0)
            return {"ok": True, "ring": ring}, []
        if op == "close":
            ring = int(message["ring"])
            if ring not in holder.rings:
                raise ValueError(f"slot {n} has no open ring {ring}")
            _, base = holder.rings.pop(ring)
            bus.revoke(ring, base, slot=n)
            return {"ok": True}, []
        raise ValueError(f"no such control operation: {op!r}")

    def _lend(self, pid: int, wait: float) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            free = lambda: [s.n for s in self.bus.slots if s.n not in self.holders and s.n not in self._draining]  # noqa: E731
            if not self._lock.wait_for(lambda: bool(free()) or self._closed, wait):
                raise AttachRefused(f"every driver slot of this machine is taken "
                                    f"({len(self.bus.slots)}, held by processes "
                                    f"{sorted(h.pid for h in self.holders.values())})")
            if self._closed:
                raise AttachRefused("the machine's owner is shutting down")
            n = free()[0]
            self.holders[n] = Holder(pid, n)
        slot, m = self.bus.slots[n - 1], self.bus.machine
        log.info("slot %d lent to process %d", n, pid)
        return ({"ok": True, "slot": n, "guest_elf": str(self.bus.abi.path), "qemu_pid": m.process.pid if m.process else 0,
                 "vectors": len(slot.handles.host_fds), "size": slot.handles.size},
                slot.handles.lendable_fds())

    def _release(self, holder: Holder) -> None:
        """Revoke at once; clear and lend again once the holder's process is gone."""
        n = holder.slot
        with self._lock:
            self.holders.pop(n, None)
            self._draining.add(n)
        try:
            if self.bus.machine.alive():
                self.bus.revoke_slot(n)
            if holder.pid != os.getpid():       # the owner itself maps every window anyway
                self._wait_exit(holder.pid)
            if self.bus.machine.alive() and not self._closed:
                self.bus.renew_slot(n)
        except HarnessError as exc:
            log.warning("slot %d: could not take it back from process %d: %s", n, holder.pid, exc)
        finally:
            with self._lock:
                self._draining.discard(n)
                self._lock.notify_all()
            for callback in self.on_release:
                callback(n, holder.pid)
            log.info("slot %d back from process %d", n, holder.pid)

    def _wait_exit(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            while not self._closed:
                ready, _, _ = select.select([pidfd, self._wake_r], [], [])
                if pidfd in ready:
                    return
        finally:
            os.close(pidfd)
