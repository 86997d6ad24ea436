"""The NVMe protocol core: what a controller says whatever carries it (Linux's drivers/nvme/host/core.c).

Here: the Identify structures, the commands built for the block API, status
names (every error status becomes an :class:`NvmeError` naming the command,
its status code type and code, and its LBA), the namespace and its block API,
and the part of bring-up that is only admin commands (identify the controller,
the number of queues, the namespaces). The transport (``pci.py``: registers,
queues in DMA memory, PRPs, doorbells, interrupts) subclasses
:class:`Controller` and hands it queues that run :class:`Command` lists.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from harness.access import Device, DmaBuffer
from harness.errors import HarnessError

from .regs import (DSM_DEALLOCATE, DSM_RANGE, FEATURE_INTERRUPT_COALESCING, FEATURE_NUMBER_OF_QUEUES, ID_CTRL_FR, ID_CTRL_MDTS, ID_CTRL_MN,
                   ID_CTRL_NN, ID_CTRL_OACS, ID_CTRL_ONCS, ID_CTRL_SN, ID_CTRL_VWC, ID_NS, ID_NS_LBAF, OACS_DBBUF, ONCS_DSM, PAGE,
                   STATUS_NAMES, Admin, Cns, Nvm)

COPY_BUDGET = 4 << 20               # bytes of DMA buffers read_queued holds at once


class NvmeError(HarnessError):
    """The controller completed a command with an error status, or not at all.

    ``command`` names it, ``sct`` and ``sc`` are the status code type and code
    (None for a timeout), ``lba`` the command's first block (None if it has
    none). For queued calls ``failed`` lists the failed requests by index; the
    others completed."""

    def __init__(self, command: str, sct: int | None, sc: int | None, lba: int | None = None,
                 failed: Sequence[int] = (), detail: str = "", of: int = 1) -> None:
        self.command, self.sct, self.sc, self.lba = command, sct, sc, lba
        self.failed = list(failed)
        where = f" at LBA {lba}" if lba is not None else ""
        if sct is None or sc is None:
            text = f"{command}{where}: {detail or 'did not complete'}"
        else:
            name = STATUS_NAMES.get((sct, sc), "status")
            text = f"{command}{where}: {name} (SCT {sct:#x}, SC {sc:#04x})"
            if of > 1:
                text += f"; failed request(s) {self.failed} of {of}"
        super().__init__(text)

    @property
    def status(self) -> tuple[int | None, int | None]:
        return self.sct, self.sc


def failure(command: "Command", status: int, failed: Sequence[int] = (), of: int = 1) -> NvmeError:
    """The error for ``command``'s failed completion status word: SCT bits 9-11, SC bits 1-8."""
    return NvmeError(command.label, status >> 9 & 7, status >> 1 & 0xFF, command.lba, failed=failed, of=of)


@dataclass(frozen=True)
class Coalescing:
    """Interrupt Coalescing (5.21.1.8), for throughput: the controller may hold a completion
    queue's interrupt until ``threshold`` completions are posted or the oldest has waited
    ``time_us`` (in 100 µs steps). Admin completions are never held; ``threshold=1,
    time_us=0`` is none at all, every controller's default."""

    threshold: int = 1              # completions per interrupt, 1 to 256
    time_us: int = 0                # 0 to 25500, a multiple of 100

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= 256 or not 0 <= self.time_us <= 25500 or self.time_us % 100:
            raise ValueError(f"coalescing takes 1 to 256 completions and 0 to 25500 us in 100 us steps, "
                             f"not {self.threshold} and {self.time_us}")

    @property
    def cdw11(self) -> int:
        return self.time_us // 100 << 8 | self.threshold - 1

    @classmethod
    def of(cls, cdw11: int) -> "Coalescing":
        """What Get Features returns, decoded."""
        return cls((cdw11 & 0xFF) + 1, (cdw11 >> 8 & 0xFF) * 100)


@dataclass(frozen=True)
class ControllerIdentity:
    model: str
    serial: str
    firmware: str
    namespaces: int             # NN: the highest namespace ID
    max_transfer: int           # bytes one command may move (MDTS), capped by the transport's own limit
    dsm: bool                   # Dataset Management (deallocate) supported
    shadow_doorbells: bool      # Doorbell Buffer Config supported
    volatile_write_cache: bool
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class NamespaceIdentity:
    nsid: int
    sectors: int                # NSZE, in logical blocks
    capacity: int               # NCAP
    utilization: int            # NUSE
    sector_size: int            # of the format in use
    lba_formats: tuple[tuple[int, int], ...]    # (metadata bytes, block size) of each format
    controller: ControllerIdentity
    raw: bytes = field(repr=False)

    # The same names as AHCI's Identity, so tools print either
    @property
    def model(self) -> str:
        return self.controller.model

    @property
    def serial(self) -> str:
        return self.controller.serial

    @property
    def firmware(self) -> str:
        return self.controller.firmware


def parse_controller(data: bytes, page: int, transfer_limit: int) -> ControllerIdentity:
    """Identify Controller (5.15.2.1). MDTS is in units of the minimum page, 0 for no limit;
    ``transfer_limit`` is the most the transport moves in one command."""
    text = lambda s: data[s].decode("ascii", "replace").strip()  # noqa: E731
    mdts = data[ID_CTRL_MDTS]
    return ControllerIdentity(model=text(ID_CTRL_MN), serial=text(ID_CTRL_SN), firmware=text(ID_CTRL_FR),
                              namespaces=struct.unpack_from("<I", data, ID_CTRL_NN)[0],
                              max_transfer=min(transfer_limit, page << mdts) if mdts else transfer_limit,
                              dsm=bool(struct.unpack_from("<H", data, ID_CTRL_ONCS)[0] & ONCS_DSM),
                              shadow_doorbells=bool(struct.unpack_from("<H", data, ID_CTRL_OACS)[0] & OACS_DBBUF),
                              volatile_write_cache=bool(data[ID_CTRL_VWC] & 1), raw=data)


def parse_namespace(nsid: int, data: bytes, controller: ControllerIdentity) -> NamespaceIdentity:
    """Identify Namespace (5.15.2.2): sizes and the LBA format in use (FLBAS bits 0-3)."""
    nsze, ncap, nuse, _, nlbaf, flbas, _ = ID_NS.unpack_from(data)
    formats = []
    for i in range(nlbaf + 1):
        (word,) = struct.unpack_from("<I", data, ID_NS_LBAF + 4 * i)
        formats.append((word & 0xFFFF, 1 << (word >> 16 & 0xFF)))
    return NamespaceIdentity(nsid, nsze, ncap, nuse, formats[flbas & 0xF][1], tuple(formats), controller, data)


# A command before it is queued: what the submission entry needs, and what names it in errors.
# Slots: queued I/O builds one per request, on the hot path.
@dataclass(slots=True)
class Command:
    opcode: int
    nsid: int = 0
    pages: Sequence[int] = ()       # the data's physical pages, first may be offset (PRPs)
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    name: str = ""                  # empty for a Read or Write: ``label`` names it only when asked
    lba: int | None = None

    @property
    def label(self) -> str:
        """What names the command in errors."""
        if self.name or self.opcode not in (Nvm.READ, Nvm.WRITE) or self.lba is None:
            return self.name
        return f"{'READ' if self.opcode == Nvm.READ else 'WRITE'} ns {self.nsid} {self.lba}+{self.cdw12 + 1}"


# ---- the commands the core builds (5 admin, 6 NVM) ----

def identify_command(cns: int, nsid: int, page: int) -> Command:
    """Identify (5.15): the structure ``cns`` of namespace ``nsid`` into the page at ``page``."""
    return Command(Admin.IDENTIFY, nsid, [page], cdw10=cns, name=f"IDENTIFY CNS {cns}")


def queue_count_command(count: int) -> Command:
    """Set Features, Number of Queues (5.21.1.7): ``count`` submission and completion queues."""
    return Command(Admin.SET_FEATURES, cdw10=FEATURE_NUMBER_OF_QUEUES, cdw11=(count - 1) << 16 | (count - 1),
                   name="SET FEATURES queues")


def read_write_command(opcode: int, nsid: int, lba: int, blocks: int, pages: Sequence[int]) -> Command:
    """Read or Write (6.9, 6.15) of ``blocks`` blocks at ``lba``, through ``pages``; named
    "READ ns 1 8+8" (``Command.label``) when an error needs it, not for every command."""
    return Command(opcode, nsid, pages, lba & 0xFFFFFFFF, lba >> 32, blocks - 1, "", lba)


def flush_command(nsid: int) -> Command:
    """Flush (6.8)."""
    return Command(Nvm.FLUSH, nsid, name=f"FLUSH ns {nsid}")


def deallocate_command(nsid: int, ranges_page: int, ranges: Sequence[tuple[int, int]]) -> Command:
    """Dataset Management, deallocate (6.7) of ``ranges``, laid out at ``ranges_page`` (see :func:`pack_ranges`)."""
    return Command(Nvm.DATASET_MANAGEMENT, nsid, [ranges_page], cdw10=len(ranges) - 1, cdw11=DSM_DEALLOCATE,
                   name=f"DEALLOCATE ns {nsid}", lba=ranges[0][0])


def pack_ranges(view: memoryview, ranges: Sequence[tuple[int, int]]) -> None:
    """Dataset Management ranges (6.7, figure 364) of (lba, blocks), into ``view``."""
    for i, (lba, count) in enumerate(ranges):
        DSM_RANGE.pack_into(view, i * DSM_RANGE.size, 0, count, lba)


class Queue(Protocol):
    """What the core asks of a transport's queue pair."""

    qid: int

    @property
    def depth(self) -> int: ...
    def run(self, commands: Sequence[Command], depth: int | None = None) -> list[int]: ...
    def execute(self, command: Command) -> int: ...
    def bounce(self, size: int) -> DmaBuffer: ...


class Controller:
    """The protocol side of a controller: its identity, the queue count it grants, its
    namespaces. A transport subclass brings ``dev`` (DMA memory), the admin queue and the
    I/O queues, then calls these in order: :meth:`identify_controller`,
    :meth:`negotiate_queues`, :meth:`scan_namespaces`."""

    dev: Device
    admin: Queue | None
    queues: Sequence[Queue]
    identity: ControllerIdentity
    page: int
    transfer_limit: int             # bytes the transport moves in one command at most
    _namespaces: list["Namespace"]

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        """One Identify structure, through the admin queue."""
        assert self.admin is not None
        buf = self.dev.dma_alloc(PAGE)
        try:
            self.admin.execute(identify_command(cns, nsid, buf.phys))
            return bytes(buf.view)
        finally:
            self.dev.dma_free(buf)

    def identify_controller(self) -> ControllerIdentity:
        return parse_controller(self.identify(Cns.CONTROLLER), self.page, self.transfer_limit)

    def negotiate_queues(self, count: int) -> None:
        """Ask for ``count`` I/O queue pairs; fewer granted is an NvmeError."""
        assert self.admin is not None
        granted = self.admin.execute(queue_count_command(count))
        if min(granted & 0xFFFF, granted >> 16) + 1 < count:
            raise NvmeError("SET FEATURES queues", None, None, detail=f"the controller granted {granted:#x}")

    def coalesce_interrupts(self, setting: Coalescing) -> None:
        """Set Features, Interrupt Coalescing, and read it back with Get Features. A controller
        that refuses it raises NvmeError: QEMU 7.2's nvme answers Feature Not Changeable (and
        reports no coalescing), since its model never holds an interrupt back."""
        assert self.admin is not None
        name = "FEATURES interrupt coalescing"
        self.admin.execute(Command(Admin.SET_FEATURES, cdw10=FEATURE_INTERRUPT_COALESCING, cdw11=setting.cdw11,
                                   name=f"SET {name}"))
        kept = Coalescing.of(self.admin.execute(Command(Admin.GET_FEATURES, cdw10=FEATURE_INTERRUPT_COALESCING,
                                                        name=f"GET {name}")))
        if kept != setting:
            raise NvmeError(f"SET {name}", None, None, detail=f"set {setting}, the controller reports {kept}")

    def run_spread(self, queues: Sequence[Queue], commands: Sequence[Command], depth: int | None = None) -> list[int]:
        """Command i on ``queues[i % len(queues)]``, from one thread: the transport's to say how."""
        raise NotImplementedError(f"{type(self).__name__} cannot spread commands over queues")

    def scan_namespaces(self) -> list["Namespace"]:
        """Every active namespace (5.15.2.3, up to 1024), identified, on the first I/O queue."""
        ids = struct.unpack("<1024I", self.identify(Cns.ACTIVE_NAMESPACES))
        return [Namespace(self, parse_namespace(nsid, self.identify(Cns.NAMESPACE, nsid), self.identity),
                          self.queues[0])
                for nsid in ids[:ids.index(0) if 0 in ids else 1024]]

    # ---- what users see ----

    def namespaces(self) -> list["Namespace"]:
        """Every active namespace, bound to I/O queue pair 1 (``ns.on(queue)`` for another)."""
        return list(self._namespaces)

    def disks(self) -> list["Namespace"]:
        """The namespaces, under the name the AHCI driver uses for its block devices."""
        return self.namespaces()


class Namespace:
    """One namespace: a block device with the AHCI Port's API, on one queue pair."""

    def __init__(self, controller: Controller, identity: NamespaceIdentity, queue: Queue) -> None:
        self.controller, self.identity, self.queue = controller, identity, queue
        self.nsid = identity.nsid
        self.sector_size = identity.sector_size
        self.max_transfer = controller.identity.max_transfer

    def __repr__(self) -> str:
        return f"<Namespace {self.nsid} on queue {self.queue.qid}>"

    def on(self, queue: Queue) -> "Namespace":
        """The same namespace, its commands going through ``queue``."""
        return Namespace(self.controller, self.identity, queue)

    def identify(self) -> NamespaceIdentity:
        return self.identity

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.identity.sectors * self.sector_size

    @property
    def queue_depth(self) -> int:
        return self.queue.depth

    # ---- checks, before anything reaches the device ----

    def _check(self, lba: int, count: int) -> None:
        sectors = self.identity.sectors
        if count <= 0 or lba < 0 or lba + count > sectors:
            raise ValueError(f"blocks {lba}..{lba + count - 1} are not on namespace {self.nsid} of {sectors}")

    def _pages(self, buffers: Sequence[DmaBuffer]) -> tuple[Sequence[int], int]:
        """The PRP pages of ``buffers`` in order, and their bytes. Each buffer starts on a page;
        all but the last are whole pages (so the pages chain with no gaps); whole blocks in all."""
        if len(buffers) == 1:           # the common case, without a list
            b = buffers[0]
            phys, total = b.phys, len(b.view)
            if not (phys % PAGE or not total or total % self.sector_size or total > self.max_transfer):
                return range(phys, phys + total, PAGE), total
        pages: list[int] = []
        total = 0
        for i, b in enumerate(buffers):
            if b.phys % PAGE or (i < len(buffers) - 1 and b.size % PAGE) or not b.size:
                raise ValueError(f"buffer {i} ({b.phys:#x}+{b.size:#x}) must start on a {PAGE}-byte page, and all "
                                 "but the last must be whole pages")
            pages += range(b.phys, b.phys + b.size, PAGE)
            total += b.size
        if not buffers or total % self.sector_size:
            raise ValueError(f"buffers of {total} bytes are not whole {self.sector_size}-byte blocks")
        if total > self.max_transfer:
            raise ValueError(f"{total} bytes exceed the controller's largest transfer ({self.max_transfer}, MDTS)")
        return pages, total

    def _io(self, opcode: int, lba: int, pages: Sequence[int], nbytes: int) -> Command:
        return read_write_command(opcode, self.nsid, lba, nbytes // self.sector_size, pages)

    def _copied(self, opcode: int, lba: int, count: int, data: bytes = b"") -> bytes:
        """``count`` blocks at ``lba`` through the queue's bounce buffer, in transfers of at most
        MDTS: ``data`` copied in before each Write, or what each Read brought copied out."""
        bounce, per = self.queue.bounce(self.max_transfer), self.max_transfer // self.sector_size
        out = bytearray()
        for start in range(0, count, per):
            nbytes = min(per, count - start) * self.sector_size
            offset = start * self.sector_size
            if opcode == Nvm.WRITE:
                bounce.view[:nbytes] = data[offset:offset + nbytes]
            self.queue.run([self._io(opcode, lba + start, range(bounce.phys, bounce.phys + nbytes, PAGE), nbytes)])
            if opcode == Nvm.READ:
                out += bounce.view[:nbytes]
        return bytes(out)

    # ---- the block device ----

    def read_into(self, lba: int, buffers: Sequence[DmaBuffer]) -> None:
        """One Read straight into DMA buffers, in order; above MDTS it is refused (ValueError)."""
        pages, nbytes = self._pages(buffers)
        self._check(lba, nbytes // self.sector_size)
        self.queue.run([self._io(Nvm.READ, lba, pages, nbytes)])

    def write_from(self, lba: int, buffers: Sequence[DmaBuffer]) -> None:
        """One Write straight from DMA buffers, in order."""
        pages, nbytes = self._pages(buffers)
        self._check(lba, nbytes // self.sector_size)
        self.queue.run([self._io(Nvm.WRITE, lba, pages, nbytes)])

    def read(self, lba: int, count: int) -> bytes:
        """``count`` blocks from ``lba``, split into transfers of at most MDTS."""
        self._check(lba, count)
        return self._copied(Nvm.READ, lba, count)

    def write(self, lba: int, data: bytes) -> None:
        """Whole blocks at ``lba``, split into transfers of at most MDTS. Checked first."""
        if not data or len(data) % self.sector_size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.sector_size}-byte blocks")
        count = len(data) // self.sector_size
        self._check(lba, count)
        self._copied(Nvm.WRITE, lba, count, data)

    def flush(self) -> None:
        """Flush (6.8): what was written is on the medium."""
        self.queue.run([flush_command(self.nsid)])

    def deallocate(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Dataset Management, deallocate (6.7): (lba, blocks) ranges the host no longer needs."""
        if not self.controller.identity.dsm:
            raise ValueError("the controller does not support Dataset Management")
        if not 1 <= len(ranges) <= 256:
            raise ValueError(f"1 to 256 ranges, not {len(ranges)}")
        for lba, count in ranges:
            if count > 0xFFFFFFFF:
                raise ValueError(f"a range holds at most {0xFFFFFFFF} blocks")
            self._check(lba, count)
        dev = self.controller.dev
        buf = dev.dma_alloc(PAGE)
        try:
            pack_ranges(buf.view, ranges)
            self.queue.run([deallocate_command(self.nsid, buf.phys, ranges)])
        finally:
            dev.dma_free(buf)

    def read_queued_into(self, requests: Sequence[tuple[int, DmaBuffer]], depth: int | None = None,
                         queues: Sequence[Queue] = ()) -> None:
        """Reads of (lba, buffer), up to ``depth`` in flight (default: the queue's). A failed
        read raises NvmeError after the others have completed; ``failed`` names it. With
        ``queues``, request i goes on ``queues[i % len(queues)]``, ``depth`` in flight on
        each, all driven from this thread (the controller's ``run_spread``)."""
        self._run_queued(self._queue_of(Nvm.READ, requests), depth, queues)

    def write_queued_from(self, requests: Sequence[tuple[int, DmaBuffer]], depth: int | None = None,
                          queues: Sequence[Queue] = ()) -> None:
        """Writes of (lba, buffer), queued (``queues`` as for reads). They may reach the medium
        in any order: overlaps are refused."""
        commands = self._queue_of(Nvm.WRITE, requests)
        spans = sorted((lba, lba + b.size // self.sector_size) for lba, b in requests)
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
            raise ValueError("queued writes overlap: the device may apply them in any order")
        self._run_queued(commands, depth, queues)

    def _run_queued(self, commands: Sequence[Command], depth: int | None, queues: Sequence[Queue]) -> None:
        if queues:
            self.controller.run_spread(queues, commands, depth)
        else:
            self.queue.run(commands, depth)

    def read_queued(self, requests: Sequence[tuple[int, int]], depth: int | None = None) -> list[bytes]:
        """Queued reads of (lba, blocks), through buffers of the driver's; the data in request order."""
        for lba, count in requests:
            self._check(lba, count)
            if count * self.sector_size > self.max_transfer:
                raise ValueError(f"a queued read moves at most {self.max_transfer} bytes (MDTS)")
        out: list[bytes] = []
        first: NvmeError | None = None
        failed: list[int] = []
        start = 0
        while start < len(requests):            # a few MiB of buffers at a time: the DMA pool is shared
            end, nbytes = start, 0
            while end < len(requests) and (end == start or nbytes + requests[end][1] * self.sector_size <= COPY_BUDGET):
                nbytes += requests[end][1] * self.sector_size
                end += 1
            try:
                out += self._read_queued_part(requests[start:end], depth)
            except NvmeError as exc:            # the rest still run; the error names every failure
                if exc.sct is None:
                    raise
                first = first or exc
                failed += [start + i for i in exc.failed]
                out += [b""] * (end - start)
            start = end
        if first is not None:
            raise NvmeError(first.command, first.sct, first.sc, first.lba, failed=failed, of=len(requests))
        return out

    def _read_queued_part(self, requests: Sequence[tuple[int, int]], depth: int | None) -> list[bytes]:
        dev = self.controller.dev
        buffers: list[DmaBuffer] = []
        try:
            for _, count in requests:
                buffers.append(dev.dma_alloc(count * self.sector_size))
            self.read_queued_into([(lba, b) for (lba, _), b in zip(requests, buffers)], depth)
            return [bytes(b.view) for b in buffers]
        finally:
            for b in buffers:
                dev.dma_free(b)

    def _queue_of(self, opcode: int, requests: Sequence[tuple[int, DmaBuffer]]) -> list[Command]:
        """One command per (lba, buffer), every one checked before any is queued."""
        nsid, block, sectors, pages_of = self.nsid, self.sector_size, self.identity.sectors, self._pages
        commands = []
        for lba, buffer in requests:
            pages, nbytes = pages_of((buffer,))
            blocks = nbytes // block
            if lba < 0 or lba + blocks > sectors:
                self._check(lba, blocks)
            commands.append(read_write_command(opcode, nsid, lba, blocks, pages))
        return commands
