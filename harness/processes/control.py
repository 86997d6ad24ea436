"""The owner's control socket: how another process attaches to a driver slot.

The process that owns the machine (``serve(pm)``, or ``hwharness
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
then it still maps the window; a slot that cannot be taken back (the proxy
does not answer) is never lent again.

Devices can be reserved (``reserve(devfns) -> token``): a reserved device is
opened only by a process that said the token in its hello, and such a
process opens nothing else. The supervisor reserves each driver's device, so
a driver gone bad cannot take another driver's device while it restarts.

Messages are a little-endian u32 length and a JSON object; a reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": kind, "message": text}``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import select
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import AccessDenied, AttachRefused, HarnessError

if TYPE_CHECKING:
    from ..proxy.admin import ProxyAdmin
    from ..proxy.machine import ProxyMachine

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
    for fd in fds:                      # recvmsg gives them inheritable: a child must not keep a window
        os.set_inheritable(fd, False)
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
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ConnectionError(f"a control message that is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ConnectionError("a control message that is not an object")
    return message, fds


@dataclass
class Holder:
    """A process that holds a slot, and what it opened there: ring -> (devfn or None, domain base;
    rings sharing a domain have the same),
    and the devices it is opening (claimed before the proxy grants them, so no one else can)."""
    pid: int
    slot: int
    pidfd: int                                      # opened at connect: the PID cannot be reused under us
    token: str | None = None
    rings: dict[int, tuple[int | None, int]] = field(default_factory=dict)
    opening: set[int] = field(default_factory=set)  # devfns

    def holds(self, devfn: int) -> bool:
        return devfn in self.opening or any(d == devfn for d, _ in self.rings.values())


def serve(pm: "ProxyMachine", address: str | None = None) -> "ControlServer":
    """Let other processes attach to ``pm``'s driver slots (``harness.attach``): the
    machine's control server, started on first call; it stops when the machine does."""
    for service in pm.services:
        if isinstance(service, ControlServer):
            return service
    control = ControlServer(pm.admin, address)
    pm.services.append(control)
    return control


class ControlServer:
    """Lends the machine's driver slots to other processes; see the module's docstring."""

    def __init__(self, admin: "ProxyAdmin", address: str | None = None) -> None:
        if not admin.slots:
            raise AttachRefused("this machine has no driver slots (proxy_spec(slots=...))")
        self.admin = admin
        self.address = address or f"@hwharness-control-{os.getpid()}-{next(_serial)}"   # printable
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(unix_address(self.address))
        self._listener.listen(16)
        self._lock = threading.Condition()
        self.holders: dict[int, Holder] = {}           # slot -> its holder
        self._draining: set[int] = set()               # revoked, waiting for the holder's exit
        self._revoking: set[int] = set()               # let go of, its channels not revoked yet
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._connections: set[socket.socket] = set()
        self._reserved: dict[str, frozenset[int]] = {}  # token -> the devfns only its holder may open
        self._threads = [threading.Thread(target=self._accept_loop, name="hwharness-control", daemon=True)]
        self._threads[0].start()

    # ---- what the owner asks ----

    def reserve(self, devfns: Iterable[int]) -> str:
        """Reserve these PCI functions for whoever attaches with the token returned."""
        token = secrets.token_hex(16)
        with self._lock:
            self._reserved[token] = frozenset(devfns)
        return token

    def unreserve(self, token: str) -> None:
        with self._lock:
            self._reserved.pop(token, None)

    def holder_of(self, devfn: int) -> Holder | None:
        with self._lock:
            for h in self.holders.values():
                if h.holds(devfn):
                    return h
        return None

    def slot_of(self, pid: int) -> int | None:
        with self._lock:
            return next((n for n, h in self.holders.items() if h.pid == pid), None)

    def wait_free(self, slot: int, timeout: float) -> bool:
        """Wait until ``slot`` may be lent again (its last holder gone and its window cleared)."""
        with self._lock:
            return self._lock.wait_for(lambda: slot not in self.holders and slot not in self._draining, timeout)

    def wait_revoked(self, slot: int, timeout: float) -> bool:
        """Wait until ``slot``'s last holder is gone and its channels are revoked: its devices
        may be opened in another slot (before, the revoke could turn their bus mastering off
        under the next holder). Sooner than wait_free, which also waits for the window's clearing."""
        with self._lock:
            return self._lock.wait_for(lambda: slot not in self.holders and slot not in self._revoking, timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()             # a hello waiting for a slot gives up now
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
            self._threads = [self._threads[0], *(p for p in self._threads[1:] if p.is_alive()), t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        holder: Holder | None = None
        try:
            pidfd = os.pidfd_open(pid)          # now, while the PID is surely the peer's
        except OSError:
            conn.close()
            return
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
                    if message.get("op") == "hello":
                        if holder is not None:
                            raise ValueError("this connection already holds a slot")
                        holder, reply, lent = self._lend(pid, pidfd, message)
                    else:
                        reply, lent = self._handle(message, holder)
                except Exception as exc:        # a bad request is answered, and the connection goes on
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
            os.close(pidfd)

    def _handle(self, message: dict[str, Any], holder: Holder | None) -> tuple[dict[str, Any], list[int]]:
        op = message.get("op")
        if holder is None:
            raise ValueError(f"{op!r} before hello")
        admin, n = self.admin, holder.slot
        if op in ("open_pci", "open_pci_sharing"):
            devfn = int(message["devfn"])
            function = next((f for f in admin.bus.functions if f.devfn == devfn), None)
            if function is None:
                raise ValueError(f"no PCI function {devfn:#x} on this machine")
            dma_size = message.get("dma_size")
            if dma_size is not None and not isinstance(dma_size, int):
                raise ValueError(f"dma_size {dma_size!r} is not a whole number of bytes")
            with self._lock:                    # claimed here, granted outside the lock
                if op == "open_pci_sharing":    # a domain this holder has: its own devices share
                    sharing = int(message["ring"])
                    base = holder.rings.get(sharing, (None, 0))[1]
                    if not base:
                        raise ValueError(f"slot {n} has no open ring {sharing} with a DMA domain")
                self._may_open(holder, devfn, function)
                holder.opening.add(devfn)
            try:
                if op == "open_pci_sharing":
                    ring, size = admin.grant_pci_sharing(function, sharing, slot=n), 0
                else:
                    ring, base, size = admin.grant_pci(function, dma_size, slot=n)
            finally:
                with self._lock:
                    holder.opening.discard(devfn)
            with self._lock:
                holder.rings[ring] = (devfn, base)
            return {"ok": True, "ring": ring, "domain_base": base, "domain_size": size}, []
        if op == "open_ports":
            if holder.token is not None:
                raise AttachRefused("a driver with reserved devices opens those only")
            ring = admin.grant_ports(int(message["base"]), int(message["count"]), slot=n)
            with self._lock:
                holder.rings[ring] = (None, 0)
            return {"ok": True, "ring": ring}, []
        if op == "close":
            ring = int(message["ring"])
            with self._lock:
                if ring not in holder.rings:
                    raise ValueError(f"slot {n} has no open ring {ring}")
                _, base = holder.rings.pop(ring)
                if any(b == base for _, b in holder.rings.values()):
                    base = 0                    # another of its devices still DMAs there
            admin.revoke(ring, base, slot=n)
            return {"ok": True}, []
        raise ValueError(f"no such control operation: {op!r}")

    def _may_open(self, holder: Holder, devfn: int, function: object) -> None:
        """Refuse a device another process holds, the owner holds, or that is reserved for
        someone else; and a token's holder anything not reserved for it."""
        other = self.holder_of(devfn)
        if other is not None:
            raise AttachRefused(f"{function} is held by process {other.pid} (slot {other.slot})")
        if devfn in self.admin.bus.owned.values():
            raise AttachRefused(f"{function} is held by the machine's owner (process {os.getpid()})")
        mine = self._reserved.get(holder.token or "", frozenset())
        if holder.token is not None and devfn not in mine:
            raise AttachRefused(f"{function} is not among the devices reserved for this driver")
        if devfn not in mine and any(devfn in devfns for devfns in self._reserved.values()):
            raise AttachRefused(f"{function} is reserved for another driver")

    def _lend(self, pid: int, pidfd: int, hello: dict[str, Any]) -> tuple[Holder, dict[str, Any], list[int]]:
        wait, token = float(hello.get("wait", 0.0)), hello.get("token")
        if not 0 <= wait <= 3600:
            raise ValueError(f"wait {wait} is not 0 to 3600 seconds")
        with self._lock:
            if token is not None and token not in self._reserved:
                raise AttachRefused("no devices are reserved under that token")
            free = lambda: [s.n for s in self.admin.slots if s.n not in self.holders and s.n not in self._draining]  # noqa: E731
            if not self._lock.wait_for(lambda: bool(free()) or self._closed, wait):
                raise AttachRefused(f"every driver slot of this machine is taken "
                                    f"({len(self.admin.slots)}, held by processes "
                                    f"{sorted(h.pid for h in self.holders.values())})")
            if self._closed:
                raise AttachRefused("the machine's owner is shutting down")
            n = free()[0]
            holder = self.holders[n] = Holder(pid, n, pidfd, token)
        slot, m = self.admin.slots[n - 1], self.admin.machine
        log.info("slot %d lent to process %d", n, pid)
        reply = {"ok": True, "slot": n, "guest_elf": str(self.admin.abi.path),
                 "qemu_pid": m.process.pid if m.process else 0,
                 "vectors": len(slot.handles.host_fds), "size": slot.handles.size}
        return holder, reply, slot.handles.lendable_fds()

    def _release(self, holder: Holder) -> None:
        """Revoke at once; clear and lend again once the holder's process is gone. A slot
        that cannot be taken back stays out of use: lending it would hand its last driver's
        channels and memory to the next."""
        n = holder.slot
        with self._lock:
            self.holders.pop(n, None)
            self._draining.add(n)
            self._revoking.add(n)
        taken_back = False
        try:
            try:
                if self.admin.machine.alive():
                    self.admin.revoke_slot(n)
            finally:
                with self._lock:
                    self._revoking.discard(n)
                    self._lock.notify_all()
            if holder.pid != os.getpid():       # the owner itself maps every window anyway
                self._wait_exit(holder.pidfd)
            if self.admin.machine.alive() and not self._closed:
                self.admin.renew_slot(n)
                taken_back = True
        except HarnessError as exc:
            log.error("slot %d: could not take it back from process %d, and it stays out of use: %s",
                      n, holder.pid, exc)
        finally:
            with self._lock:
                if taken_back or self._closed:
                    self._draining.discard(n)
                self._lock.notify_all()
            if taken_back:
                log.info("slot %d back from process %d", n, holder.pid)

    def _wait_exit(self, pidfd: int) -> None:
        while not self._closed:
            ready, _, _ = select.select([pidfd, self._wake_r], [], [])
            if pidfd in ready:
                return
