"""An AHCI disk served over the block protocol (:mod:`harness.services.block`), for clients in other processes.

:class:`PortBackend` makes a :class:`~drivers.ahci.driver.Port` the server's backend: a
turn's writes go as NCQ commands (WRITE FPDMA QUEUED, 32 in flight) straight from DMA
memory, then one FLUSH CACHE EXT acknowledges them all. :func:`serve_disk` is what
the driver's process runs: open the HBA, take its first disk, serve it until killed.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable, Sequence

from ..access import Bus, DmaBuffer, PciFunction
from .block import MAX_REQUEST_BYTES, BlockServer
from ..errors import DeviceNotFound

from drivers.ahci.driver import Ahci, DiskError, Port

log = logging.getLogger(__name__)

# DMA memory a batch of writes is copied into: four full-size requests at a time; a turn with
# more is written in several queued calls, all before the turn's one flush.
STAGING_BYTES = 4 * MAX_REQUEST_BYTES


class PortBackend:
    """A disk on an AHCI port as a :class:`~harness.services.block.BlockServer` backend."""

    def __init__(self, hba: Ahci, port: Port) -> None:
        self.hba, self.port = hba, port
        self.sector_size = port.sector_size
        self.size = port.size
        self.staging = hba.dev.dma_alloc(STAGING_BYTES) if port.queue_depth else None

    def read(self, lba: int, count: int) -> bytes:
        return self.port.read(lba, count)

    def write(self, lba: int, data: bytes) -> None:
        self.port.write(lba, data)

    def write_many(self, items: Sequence[tuple[int, bytes]]) -> None:
        """Items that do not overlap (the server's promise: NCQ may apply them in any order),
        copied into DMA memory and written queued, as many at a time as the staging area holds."""
        if self.staging is None:                # a disk without NCQ: one command at a time
            for lba, data in items:
                self.port.write(lba, data)
            return
        queue: list[tuple[int, DmaBuffer]] = []
        used = 0
        for lba, data in items:
            if used + len(data) > self.staging.size:
                self.port.write_queued_from(queue)
                queue, used = [], 0
            view = self.staging.view[used:used + len(data)]
            view[:] = data
            queue.append((lba, DmaBuffer(self.staging.phys + used, view)))
            used += len(data)
        if queue:
            self.port.write_queued_from(queue)

    def flush(self) -> None:
        self.port.flush()

    def close(self) -> None:
        if self.staging is not None:
            self.hba.dev.dma_free(self.staging)
            self.staging = None


def serve_disk(bus: Bus, listener: socket.socket, beat: Callable[[], None] | None = None,
               until: Callable[[], bool] | None = None) -> None:
    """Open the AHCI controller on ``bus``, take its first disk and serve it to the clients
    of ``listener`` (bound and listening, kept by the caller) until the process is killed,
    or until ``until()`` is true. A device error fails the request it came from; anything
    else (the proxy gone, a crash) ends the server, for its supervisor to start another."""
    hba = Ahci.open(bus)
    try:
        disks = hba.disks()
        if not disks:
            raise DeviceNotFound("the AHCI controller has no ATA disk on any port")
        backend = PortBackend(hba, disks[0])
        try:
            log.info("serving port %d (%d bytes) on %s", disks[0].index, backend.size, listener.getsockname())
            server = BlockServer(backend, listener, beat, request_errors=(DiskError,))
            server.serve(until or (lambda: False))
        finally:
            backend.close()
    finally:
        hba.close()


def disk_driver(bus: Bus, function: PciFunction, listener: socket.socket) -> None:
    """The disk as a supervised driver process (``Supervisor.run("harness.services.disk:disk_driver",
    ahci, sockets={"listener": listener})``): serve until the process is killed, beating as it goes."""
    serve_disk(bus, listener, beat=getattr(bus, "beat", None))
