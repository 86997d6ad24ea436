"""A disk served over NBD (:mod:`harness.services.nbd`) by its Python driver, for clients in
other processes and other machines: an AHCI port or an NVMe namespace.

:class:`DiskBackend` makes either the server's device: a turn's writes go queued
(AHCI NCQ WRITE FPDMA QUEUED, or NVMe Writes, 32 in flight) straight from DMA memory,
then one device flush (FLUSH CACHE EXT, NVMe Flush) covers every FUA write and FLUSH
of the turn; a turn's reads go queued too (READ FPDMA QUEUED, NVMe Reads) into DMA
memory, each read one command (or a few: NVMe's MDTS) however long, and the server
sends their data from there (sendmsg, no copy in Python); TRIM is the NVMe namespace's
Dataset Management deallocate, where the controller has it. :func:`serve_disk` is
what the driver's process runs: open the controller, take its first disk, serve it
until killed; :func:`disk_driver` is that as a supervised driver entry; :class:`DiskService` runs it supervised on a listener it
owns and tells who serves (what ``hwharness serve disk`` prints).

nbdkit was weighed against this small server and not taken: the listening socket must
be the supervisor's (it outlives each driver process, so clients reconnect to the next
driver), while the device must be held by the driver process, which the supervisor
forks from its zygote with the slot's descriptors. nbdkit owns its listening socket
(or takes one by socket activation, at its own start) and runs the plugin inside its
own process: to keep the socket across driver deaths nbdkit would have to be the
long-lived process and reach the driver through yet another protocol of ours, or be
restarted with the driver and lose the socket-activation handoff's simplicity. The
server here is a few hundred lines in the driver's process, one thread, group commit
with the device's own queued commands, and the heartbeat in its loop.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Iterator, Literal, Sequence

from ..access import Bus, DmaBuffer, PciFunction
from ..errors import DeviceNotFound
from ..processes.zygote import mark
from .nbd import BEAT_BYTES, MAX_PAYLOAD, TURN_REQUESTS, Address, NbdServer

log = logging.getLogger(__name__)

Controller = Literal["ahci", "nvme"]
CONTROLLERS: tuple[Controller, ...] = ("ahci", "nvme")
# Each controller's driver package, imported by open_controller and find_controller when first
# asked for; the service has its supervisor's zygote import it once, so that a restarted driver
# does not spend its first ~10-30 ms importing it again.
DRIVER_MODULES: dict[Controller, str] = {"ahci": "drivers.ahci.driver", "nvme": "drivers.nvme"}

# DMA memory a batch of writes is copied into: four full-size requests at a time; a turn with
# more is written in several queued calls, all before the turn's one flush.
STAGING_BYTES = 4 * MAX_PAYLOAD
# Every command's buffer starts on a page: NVMe's PRPs must (an offset into a page is allowed
# in the first entry only, and then the data may not run into a second page unaligned).
PAGE = 4096
# DMA memory a batch of reads lands in: all of one read_many call, each read page-aligned.
READ_STAGING_BYTES = BEAT_BYTES + TURN_REQUESTS * PAGE
DSM_MAX_BLOCKS = 0xFFFFFFFF             # one NVMe Dataset Management range


class DiskBackend:
    """A disk (an AHCI :class:`~drivers.ahci.driver.Port` or an NVMe
    :class:`~drivers.nvme.Namespace`) as an :class:`~harness.services.nbd.NbdServer`
    device; ``dev`` is its controller's opened PCI device (whose DMA memory it borrows)."""

    def __init__(self, dev, disk) -> None:  # type: ignore[no-untyped-def]
        self.dev, self.disk = dev, disk
        self.sector_size = disk.sector_size
        self.size = disk.size
        # One queued command moves at most this (NVMe: MDTS; AHCI: a request, any size).
        self.per_command = getattr(disk, "max_transfer", MAX_PAYLOAD)
        self.staging = dev.dma_alloc(STAGING_BYTES) if disk.queue_depth else None
        self.read_staging: DmaBuffer | None = dev.dma_alloc(READ_STAGING_BYTES)
        # Requests come when the clients send them: the proxy guest halts after each
        # instead of spinning on a core the next one's threads need (Channel.guest_spin).
        dev.channel.guest_spin = 0.0
        controller = getattr(disk, "controller", None)
        self.trim: Callable[[int, int], None] | None = (
            self._deallocate if controller is not None and controller.identity.dsm else None)

    def read(self, lba: int, count: int) -> bytes:
        return self.disk.read(lba, count)

    def write(self, lba: int, data: bytes) -> None:
        self.disk.write(lba, data)

    def write_many(self, items: Sequence[tuple[int, bytes]]) -> None:
        """Items that do not overlap (the server's promise: queued writes may land in any order),
        copied into DMA memory and written queued, as many at a time as the staging area holds."""
        if self.staging is None:                # a disk without command queueing: one at a time
            for lba, data in items:
                self.disk.write(lba, data)
            return
        queue: list[tuple[int, DmaBuffer]] = []
        used = 0
        for lba, data in items:
            for start in range(0, len(data), self.per_command):
                piece = data[start:start + self.per_command]
                if used + len(piece) > self.staging.size:
                    self.disk.write_queued_from(queue)
                    queue, used = [], 0
                buffer = _slice(self.staging, used, len(piece))
                buffer.view[:] = piece
                queue.append((lba + start // self.sector_size, buffer))
                used = _page_up(used + len(piece))
        if queue:
            self.disk.write_queued_from(queue)

    def read_many(self, items: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Reads of (lba, count), at most ``BEAT_BYTES`` and ``TURN_REQUESTS`` in all, issued
        together (queued where the disk queues; one command alone as a plain DMA read, without
        the queue's bookkeeping); their data as views of DMA memory, valid until the next call."""
        assert self.read_staging is not None, "read_many after close()"
        queue: list[tuple[int, DmaBuffer]] = []
        views: list[memoryview] = []
        used = 0
        for lba, count in items:
            nbytes = count * self.sector_size
            if used + nbytes > self.read_staging.size:
                raise ValueError(f"reads of more than {self.read_staging.size} bytes in one batch")
            for start in range(0, nbytes, self.per_command):
                queue.append((lba + start // self.sector_size,
                              _slice(self.read_staging, used + start, min(self.per_command, nbytes - start))))
            views.append(self.read_staging.view[used:used + nbytes])
            used = _page_up(used + nbytes)
        if len(queue) > 1 and self.disk.queue_depth:
            self.disk.read_queued_into(queue)
        else:
            for lba, buffer in queue:
                self.disk.read_into(lba, [buffer])
        return views

    def flush(self) -> None:
        self.disk.flush()

    def _deallocate(self, lba: int, count: int) -> None:
        ranges = [(lba + i, min(DSM_MAX_BLOCKS, count - i)) for i in range(0, count, DSM_MAX_BLOCKS)]
        for i in range(0, len(ranges), 256):    # 256 ranges a command
            self.disk.deallocate(ranges[i:i + 256])

    def close(self) -> None:
        for buffer in (self.staging, self.read_staging):
            if buffer is not None:
                self.dev.dma_free(buffer)
        self.staging = self.read_staging = None


def _page_up(offset: int) -> int:
    return -(-offset // PAGE) * PAGE


def _slice(buffer: DmaBuffer, offset: int, nbytes: int) -> DmaBuffer:
    """``nbytes`` of ``buffer`` from ``offset``: one command's DMA memory."""
    return DmaBuffer(buffer.phys + offset, buffer.view[offset:offset + nbytes])


def find_controller(bus: Bus, controller: Controller) -> PciFunction:
    """The first AHCI HBA (QEMU's ICH9) or NVMe controller on ``bus``."""
    if controller == "ahci":
        from drivers.ahci.driver import DEVICE, VENDOR
        return bus.find(vendor=VENDOR, device=DEVICE)
    if controller == "nvme":
        from drivers.nvme.pci import CLASS_STORAGE, SUBCLASS_NVM
        return bus.find(class_code=CLASS_STORAGE, subclass=SUBCLASS_NVM)
    raise ValueError(f"controller {controller!r} is not one of {CONTROLLERS}")


def open_controller(bus: Bus, controller: Controller, function: PciFunction):  # type: ignore[no-untyped-def]
    """The AHCI HBA or NVMe controller at ``function``, opened, and the exceptions its
    device failures raise."""
    if controller == "ahci":
        from drivers.ahci.driver import DMA_SIZE, Ahci, DiskError
        device = bus.open(function, dma_size=DMA_SIZE)
        mark("opened")
        return Ahci(bus, device), (DiskError,)
    from drivers.nvme import Nvme, NvmeError
    from drivers.nvme.pci import DMA_SIZE as NVME_DMA_SIZE
    device = bus.open(function, dma_size=NVME_DMA_SIZE)
    mark("opened")
    # where the machine gives the controller ioeventfds (serve disk's does), the driver rings them
    return Nvme(bus, device, ioeventfds=True), (NvmeError,)


def serve_disk(bus: Bus, listener: socket.socket, beat: Callable[[], None] | None = None,
               until: Callable[[], bool] | None = None, controller: Controller = "ahci",
               function: PciFunction | None = None, read_only: bool = False) -> None:
    """Open the ``controller`` ("ahci" or "nvme") at ``function`` (default: the first on ``bus``),
    take its first disk (port or namespace) and serve it over NBD to the clients of
    ``listener`` (bound and listening, kept by the caller) until the process is killed, or
    until ``until()`` is true. A device error fails the request it came from (EIO);
    anything else (the proxy gone, a crash) ends the server, for its supervisor to start another."""
    hba, device_errors = open_controller(bus, controller, function or find_controller(bus, controller))
    mark("controller")
    try:
        disks = hba.disks()
        if not disks:
            raise DeviceNotFound(f"the {controller} controller has no disk")
        backend = DiskBackend(hba.dev, disks[0])
        mark("disk")
        try:
            log.info("serving %s disk %r (%d bytes%s) on %s", controller, disks[0], backend.size,
                     ", read-only" if read_only else "", listener.getsockname())
            server = NbdServer(backend, listener, beat, request_errors=device_errors, read_only=read_only, mark=mark)
            server.serve(until or (lambda: False))
        finally:
            backend.close()
    finally:
        hba.close()


def disk_driver(bus: Bus, function: PciFunction, listener: socket.socket, controller: Controller = "ahci",
                read_only: bool = False) -> None:
    """The disk as a supervised driver process (``Supervisor.run("harness.services.disk:disk_driver",
    function, sockets={"listener": listener}, controller="nvme")``): serve until the process is
    killed, beating as it goes."""
    serve_disk(bus, listener, beat=getattr(bus, "beat", None), controller=controller, function=function,
               read_only=read_only)


# ---- the service: a listener, a supervised driver, and what to tell a person ----


def listen(spec: str) -> tuple[socket.socket, Address, str]:
    """A listening socket for ``spec``, ``unix:PATH`` or ``tcp:HOST:PORT`` (port 0: any free one):
    the socket, the address a client connects to, and its NBD URI."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(rest)
        listener.listen(64)
        return listener, rest, f"nbd+unix:///?socket={os.path.abspath(rest)}"
    host, _, port = rest.rpartition(":")
    if kind == "tcp" and host and port.isdigit():
        host = host.strip("[]")
        listener = socket.create_server((host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        backlog=64)
        bound = listener.getsockname()[1]
        return listener, (host, bound), f"nbd://{'[' + host + ']' if ':' in host else host}:{bound}/"
    raise ValueError(f"{spec!r} is not unix:PATH or tcp:HOST:PORT")


class DiskService:
    """The proxy machine's disk served over NBD by a supervised driver process.

    ``DiskService(pm, controller, nbd="unix:/tmp/disk.sock", read_only=False)`` binds the
    listener (the supervisor's: it outlives every driver process) and starts the driver;
    ``uri`` is the export's NBD URI and ``address`` what :class:`~harness.services.nbd.NbdClient`
    takes. ``starts()`` yields one line per driver start, restarts with their cause and time
    (``hwharness serve disk`` prints them until Ctrl-C). ``standby``: the supervisor keeps a
    second driver process ready, so that a restart pays no fork nor attach (a driver slot
    more). ``close()`` stops the driver and the supervisor and removes a Unix socket file.
    """

    def __init__(self, pm, controller: Controller = "ahci", nbd: str | None = None,  # type: ignore[no-untyped-def]
                 read_only: bool = False, hang_timeout: float = 1.0, standby: bool = True) -> None:
        from ..processes.supervisor import Supervisor
        if controller not in CONTROLLERS:
            raise ValueError(f"controller {controller!r} is not one of {CONTROLLERS}")
        self.controller, self.read_only = controller, read_only
        self.nbd = nbd or f"unix:{pm.machine.workdir}/disk.sock"
        self.listener, self.address, self.uri = listen(self.nbd)
        self.supervisor = None
        try:
            self.supervisor = Supervisor(pm, hang_timeout=hang_timeout, preload=[DRIVER_MODULES[controller]])
            self.driver = self.supervisor.run("harness.services.disk:disk_driver", find_controller(pm.bus, controller),
                                              sockets={"listener": self.listener}, controller=controller,
                                              read_only=read_only, standby=standby)
        except BaseException:
            self.close()
            raise

    def starts(self, timeout: float = 60.0, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """One line per driver start, as it serves: the first, then each restart with its cause
        and time from death to serving again, until ``stop()`` is true (looked at every 0.1 s).
        A driver that does not serve within ``timeout`` raises SupervisorError."""
        what = f"{self.controller} disk{' (read-only)' if self.read_only else ''} at {self.uri}"
        yield from self.driver.starts(f"serving {what}", timeout, stop)

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        self.listener.close()
        if isinstance(self.address, str) and not self.address.startswith("\0"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DiskService":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
