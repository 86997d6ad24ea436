"""A driver process's side of a driver slot: ``attach(address) -> AttachedBus``.

The bus is the same access API the owner has (devices, regions, batches,
interrupts, DMA), over the one slot window the owner lent: its rings, its
pool, its eventfds. Opening and closing devices are asked of the owner over
the control connection (:mod:`.control`); everything else goes straight to
the proxy through the window.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import threading
from pathlib import Path
from typing import Any

from ..access import PciFunction
from ..errors import AccessDenied, AttachRefused, MachineError
from ..proxy.abi import load_abi
from ..proxy.bus import WindowBus
from ..proxy.channel import ProxyChannel
from .control import recv_message, send_message, unix_address
from ..proxy.window import SharedWindow

log = logging.getLogger(__name__)


class OwnerLink:
    """The control connection: one request at a time, any thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(unix_address(address))
        except OSError as exc:
            self.sock.close()
            raise AttachRefused(f"no machine owner listens at {address!r}: {exc}") from None
        self._lock = threading.Lock()

    def call(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            try:
                send_message(self.sock, message)
                reply, fds = recv_message(self.sock)
            except OSError as exc:
                raise MachineError(f"the machine's owner went away: {exc}") from None
        if reply is None:
            raise MachineError("the machine's owner went away (its control connection closed)")
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            kind, text = reply.get("error"), reply.get("message", "")
            if kind == "refused":
                raise AttachRefused(text)
            if kind == "denied":
                raise AccessDenied(text, 0)
            if kind == "memory":
                raise MemoryError(text)
            raise ValueError(text)
        return reply, fds

    def gone(self) -> bool:
        """Has the owner hung up? (Nothing else arrives unasked.)"""
        with self._lock:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            try:
                return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

    def close(self) -> None:
        self.sock.close()


class RemoteMachine:
    """The machine as a driver process sees it: alive while QEMU runs and its owner answers."""

    argv: list[str] = []
    console: Any = None

    def __init__(self, link: OwnerLink, qemu_pid: int) -> None:
        self.link = link
        self.qemu_pid = qemu_pid
        try:
            self._pidfd: int | None = os.pidfd_open(qemu_pid)
        except (ProcessLookupError, OSError):
            self._pidfd = None

    def alive(self) -> bool:
        if self._pidfd is None or select.select([self._pidfd], [], [], 0)[0]:
            return False
        return not self.link.gone()

    def check_alive(self) -> None:
        if not self.alive():
            raise MachineError(f"the machine (QEMU process {self.qemu_pid}) or its owner is gone")

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class SlotHandles:
    """A slot window as lent: the mapping, the eventfds the guest rings, the one that kicks it."""

    def __init__(self, fds: list[int], vectors: int, size: int) -> None:
        if len(fds) != vectors + 2:
            for fd in fds:
                os.close(fd)
            raise MachineError(f"the owner lent {len(fds)} descriptors, not {vectors + 2}")
        memfd, *self.host_fds, self._kick = fds
        try:
            self.memory = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        os.close(memfd)                     # the mapping holds the memory

    def kick_guest(self, vector: int = 0) -> None:
        os.eventfd_write(self._kick, 1)

    def close(self) -> None:
        try:
            self.memory.close()
        except BufferError:
            log.debug("slot window still exported; leaving the mapping to the GC")
        for fd in (*self.host_fds, self._kick):
            os.close(fd)
        self.host_fds = []


class AttachedBus(WindowBus):
    """Devices through one driver slot. ``beat()`` tells a supervisor the driver is alive."""

    def __init__(self, link: OwnerLink, hello: dict[str, Any], fds: list[int], ready_timeout: float) -> None:
        self.link = link
        self.slot = int(hello["slot"])
        self.handles = SlotHandles(fds, int(hello["vectors"]), int(hello["size"]))
        self.machine = RemoteMachine(link, int(hello["qemu_pid"]))
        try:
            abi = load_abi(Path(hello["guest_elf"]))
            super().__init__(SharedWindow(self.handles, abi, self.machine, holds_crash=False), ready_timeout)
        except BaseException:
            self.machine.close()
            self.handles.close()
            raise

    def open_channel(self, function: PciFunction, dma_size: int | None = None) -> ProxyChannel:
        dma_size = self.check_domain_size(function, dma_size)
        reply, _ = self.link.call({"op": "open_pci", "devfn": function.devfn, "dma_size": dma_size})
        return self._opened(reply["ring"], str(function), reply["domain_base"], reply["domain_size"])

    def _grant_sharing(self, function: PciFunction, ring: int) -> int:
        reply, _ = self.link.call({"op": "open_pci_sharing", "devfn": function.devfn, "ring": ring})
        return int(reply["ring"])

    def open_ports(self, base: int, count: int) -> ProxyChannel:
        reply, _ = self.link.call({"op": "open_ports", "base": base, "count": count})
        return self._opened(reply["ring"], f"ports {base:#x}+{count}")

    def close_channel(self, ch: ProxyChannel) -> None:
        self._open.pop(ch.index, None)
        if self.machine.alive():
            self.link.call({"op": "close", "ring": ch.index})

    def beat(self) -> None:
        """Count one heartbeat in the slot window, where the supervisor looks."""
        w = self.window
        w.u64[w.heartbeat_idx] = (w.u64[w.heartbeat_idx] + 1) & (2**64 - 1)

    def close(self) -> None:
        super().close()
        self.machine.close()
        self.link.close()
        self.handles.close()


def attach(address: str, wait: float = 0.0, ready_timeout: float = 10.0, token: str | None = None) -> AttachedBus:
    """Attach to the machine whose owner serves at ``address``: a free driver slot is lent to
    this process (waiting up to ``wait`` seconds for one), and its bus returned.
    AttachRefused if there is none, or the owner will not have us. ``token``: the devices
    the owner reserved under it (``ControlServer.reserve``) are this process's to open,
    and nothing else is."""
    link = OwnerLink(address)
    try:
        hello, fds = link.call({"op": "hello", "wait": wait, "token": token})
        return AttachedBus(link, hello, fds, ready_timeout)
    except BaseException:
        link.close()
        raise
