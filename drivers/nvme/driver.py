"""NVMe driver: controller bring-up, the admin queue, I/O queue pairs in DMA memory, namespaces.

Queues live in DMA memory the host has mapped, so Python writes submission
entries and reads completion entries itself, at host speed; the guest only
carries the doorbell writes, one batch per round: the completion queue's head
and the submission queue's tail, then a guest-side poll of the phase bit of the
next completion entry, in the same round trip (so the guest stays busy, as an
in-kernel driver's would, instead of dozing off between doorbells). With
interrupts, each queue waits for its own MSI-X vector instead. Every error status becomes an :class:`NvmeError` naming the
command, its status code type and code, and its LBA.

Threads: one queue pair serves one thread at a time; several threads may each
drive their own queue pair (the doorbell writes share the device's channel
and take turns under a lock).
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from harness.access import Access, Bus, Deadline, Device, DmaBuffer, Irq, IrqMode, Kind, Space
from harness.errors import DeviceTimeout, HarnessError, InterruptTimeout

from .regs import (CQ_IEN, CQ_PC, CQE, CQE_STATUS_WORD, CQE_WORDS, CC_IOCQES_SHIFT, CC_IOSQES_SHIFT,
                   CQE_SIZE_LOG2, DOORBELL_BASE, DSM_DEALLOCATE, DSM_RANGE, FEATURE_NUMBER_OF_QUEUES, ID_CTRL_FR,
                   ID_CTRL_MDTS, ID_CTRL_MN, ID_CTRL_NN, ID_CTRL_ONCS, ID_CTRL_SN, ID_CTRL_VWC, ID_NS, ID_NS_LBAF,
                   ONCS_DSM, PAGE, SQ_PC, SQE, SQE_SIZE_LOG2, STATUS_NAMES, Admin, Cc, Cns, Csts, Nvm, Reg,
                   cap_dstrd, cap_mpsmin, cap_mqes, cap_timeout)

log = logging.getLogger(__name__)

CLASS_STORAGE, SUBCLASS_NVM, PROG_IF_NVME = 0x01, 0x08, 0x02
ADMIN_ENTRIES = 32
IO_ENTRIES = 64                     # per I/O queue: 63 commands in flight
PRP_LIST_ENTRIES = PAGE // 8        # one list page per command: 2 MiB at most
COMMAND_TIMEOUT = 5.0               # seconds a command may take
COPY_BUDGET = 4 << 20               # bytes of DMA buffers read_queued holds at once
GUEST_WAIT = 100e-6                 # one guest-side wait for a completion: short, so queues sharing
                                    # the device's channel take turns


DMA_SIZE = 16 << 20                     # the controller's DMA domain: its queues, PRP lists, callers' buffers

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


@dataclass(frozen=True)
class ControllerIdentity:
    model: str
    serial: str
    firmware: str
    namespaces: int             # NN: the highest namespace ID
    max_transfer: int           # bytes one command may move (MDTS), capped by this driver's PRP lists
    dsm: bool                   # Dataset Management (deallocate) supported
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


def parse_controller(data: bytes, page: int) -> ControllerIdentity:
    """Identify Controller (5.15.2.1). MDTS is in units of the minimum page, 0 for no limit."""
    text = lambda s: data[s].decode("ascii", "replace").strip()  # noqa: E731
    mdts = data[ID_CTRL_MDTS]
    limit = PRP_LIST_ENTRIES * PAGE
    return ControllerIdentity(model=text(ID_CTRL_MN), serial=text(ID_CTRL_SN), firmware=text(ID_CTRL_FR),
                              namespaces=struct.unpack_from("<I", data, ID_CTRL_NN)[0],
                              max_transfer=min(limit, page << mdts) if mdts else limit,
                              dsm=bool(struct.unpack_from("<H", data, ID_CTRL_ONCS)[0] & ONCS_DSM),
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
@dataclass
class Command:
    opcode: int
    nsid: int = 0
    pages: Sequence[int] = ()       # the data's physical pages, first may be offset (PRPs)
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    name: str = ""
    lba: int | None = None


class QueuePair:
    """A submission queue and its completion queue, with their doorbells and (optionally) a vector.

    Commands go in with :meth:`run`: up to ``depth`` in flight, each round one
    doorbell batch. A full submission queue waits for completions: a command
    goes in only when one of the queue's command identifiers is free, and there
    are fewer of those than entries."""

    def __init__(self, controller: "Nvme", qid: int, entries: int, irq: Irq | None) -> None:
        self.controller, self.qid, self.entries, self.irq = controller, qid, entries, irq
        dev = controller.dev
        self.sq = dev.dma_alloc(entries << SQE_SIZE_LOG2)
        self.cq = dev.dma_alloc(entries << CQE_SIZE_LOG2)
        self.prp_lists = dev.dma_alloc((entries - 1) * PAGE)     # command identifier k's list at page k
        self._cq_words = self.cq.view.cast("H")
        self._prp_words = self.prp_lists.view.cast("Q")
        self.tail = self.head = 0
        self.acked = 0                  # the head the controller was last told: entries it may reuse
        self.phase = 1                  # the controller writes entries with this phase until it wraps
        self.broken = False
        regs, stride = controller.regs, controller.doorbell_stride
        cq_doorbell = regs.access(Kind.WRITE, DOORBELL_BASE + (2 * qid + 1) * stride, 4, 0)   # completion queue head
        sq_doorbell = regs.access(Kind.WRITE, DOORBELL_BASE + 2 * qid * stride, 4, 0)         # submission queue tail
        self._doorbells = controller.dev.channel.prepare([cq_doorbell, sq_doorbell])
        # Every access a round may need, built once: the hot path only picks them.
        self._head_writes = [Access(Kind.WRITE, Space.MMIO, cq_doorbell.addr, 4, v) for v in range(entries)]
        self._tail_writes = [Access(Kind.WRITE, Space.MMIO, sq_doorbell.addr, 4, v) for v in range(entries)]
        status = self.cq.phys + CQE_STATUS_WORD * 2
        self._phase_polls = [[Access(Kind.POLL, Space.DMA, status + (i << CQE_SIZE_LOG2), 2, 0, 1, phase, GUEST_WAIT)
                              for i in range(entries)] for phase in (0, 1)]
        self.rung_tail = 0              # the tail the controller was last told
        self.submitted = 0              # commands given to the controller (diagnostics and tests)
        self.most_in_flight = 0
        self._bounce: DmaBuffer | None = None

    @property
    def depth(self) -> int:
        """Commands this queue keeps in flight at most: one entry always stays empty."""
        return self.entries - 1

    def _ring(self) -> None:
        """Both doorbells in one batch: the entries reaped so far, and the new tail."""
        with self.controller.doorbell_lock:
            self._doorbells.run({0: self.head, 1: self.tail})
        self.acked, self.rung_tail = self.head, self.tail

    def _ring_and_wait(self) -> None:
        """The doorbells that moved, then a guest-side wait (at most GUEST_WAIT) until the next
        completion entry carries the controller's phase: one round trip."""
        head, tail = self.head, self.tail
        accesses = []
        if head != self.acked:
            accesses.append(self._head_writes[head])
        if tail != self.rung_tail:
            accesses.append(self._tail_writes[tail])
        accesses.append(self._phase_polls[self.phase][head])
        try:
            with self.controller.doorbell_lock:
                self.controller.dev.channel.execute(accesses)
        except DeviceTimeout:
            pass                        # not yet: the caller's deadline decides
        self.acked, self.rung_tail = head, tail

    def resume(self, tail: int, head: int, phase: int, acked: int) -> None:
        """Take the queue back after another driver (the in-guest loop) used it, in the state
        it left: it rang every tail it wrote, and the head ``acked``."""
        if not (0 <= tail < self.entries and 0 <= head < self.entries and 0 <= acked < self.entries
                and phase in (0, 1)):
            raise ValueError(f"queue {self.qid}: no such state: tail {tail}, head {head}, phase {phase}, "
                             f"acked {acked}")
        self.tail, self.head, self.phase, self.acked = tail, head, phase, acked
        self.rung_tail = tail

    def bounce(self, size: int) -> DmaBuffer:
        """The queue's own buffer for copying reads and writes, at least ``size`` bytes."""
        if self._bounce is None or self._bounce.size < size:
            if self._bounce is not None:
                self.controller.dev.dma_free(self._bounce)
                self._bounce = None
            self._bounce = self.controller.dev.dma_alloc(size)
        return self._bounce

    def _place(self, cid: int, command: Command) -> None:
        """The submission entry at the tail, with its PRPs (4.3): PRP1 the first page, PRP2 the
        second, or the address of this identifier's list page holding the rest."""
        pages = command.pages
        prp1 = pages[0] if pages else 0
        if len(pages) <= 2:
            prp2 = pages[1] if len(pages) == 2 else 0
        else:
            base = cid * PRP_LIST_ENTRIES
            self._prp_words[base:base + len(pages) - 1] = memoryview(
                struct.pack(f"<{len(pages) - 1}Q", *pages[1:])).cast("Q")
            prp2 = self.prp_lists.phys + cid * PAGE
        SQE.pack_into(self.sq.view, self.tail << SQE_SIZE_LOG2, command.opcode, 0, cid, command.nsid, 0, 0, 0,
                      prp1, prp2, command.cdw10, command.cdw11, command.cdw12, 0, 0, 0)
        self.tail = self.tail + 1 if self.tail + 1 < self.entries else 0

    def _completed(self) -> bool:
        return (self._cq_words[self.head * CQE_WORDS + CQE_STATUS_WORD] & 1) == self.phase

    def _wait(self, deadline: Deadline) -> None:
        """Until the next completion entry is the controller's: guest-side waits, or the vector."""
        while not self._completed():
            if self.irq is None:
                self._ring_and_wait()
            else:
                try:
                    self.irq.wait(deadline.remaining)
                except InterruptTimeout:
                    pass
            if deadline.expired and not self._completed():
                raise DeviceTimeout(f"a completion on queue {self.qid}", 0, 0)

    def run(self, commands: Sequence[Command], depth: int | None = None,
            on_done: Callable[[int, int], None] | None = None, timeout: float = COMMAND_TIMEOUT) -> list[int]:
        """Run every command, keeping up to ``depth`` in flight; returns each one's result dword.

        ``on_done(index, result)`` runs as each completes. Failed commands do not stop the
        others: once all have ended, the first failure raises NvmeError with ``failed``
        listing every failed index. A command that does not complete within ``timeout``
        of the last progress raises NvmeError and leaves the queue unusable."""
        if self.broken:
            raise NvmeError(f"queue {self.qid}", None, None, detail="an earlier command never completed")
        if depth is not None and depth < 1:
            raise ValueError(f"a queue depth is at least 1, not {depth}")
        depth = min(depth or self.depth, self.depth)
        total = len(commands)
        results = [0] * total
        failures: list[tuple[int, int, int]] = []
        owner = [-1] * self.depth                   # command identifier -> index of its command
        free = list(range(depth - 1, -1, -1))
        try:
            return self._rounds(commands, depth, on_done, timeout, results, failures, owner, free)
        except BaseException:
            if not self.broken and any(i >= 0 for i in owner):  # interrupted with commands in flight
                self._drain(owner, timeout)
            raise

    def _drain(self, owner: list[int], timeout: float) -> None:
        """Reap the completions of the commands still in flight (``owner`` >= 0), whatever
        they say, so that the next call starts from a quiet queue; or mark it unusable."""
        deadline = Deadline(timeout)
        try:
            while any(i >= 0 for i in owner):
                self._ring()
                self._wait(deadline)
                while self._completed():
                    cid = CQE.unpack_from(self.cq.view, self.head << CQE_SIZE_LOG2)[4]
                    self._advance()
                    if cid < len(owner):
                        owner[cid] = -1
            self._ring()
        except BaseException as exc:
            self.broken = True
            log.warning("queue %d: commands of an interrupted call did not end (%s); the queue is unusable",
                        self.qid, exc)

    def _advance(self) -> None:
        self.head = self.head + 1 if self.head + 1 < self.entries else 0
        if self.head == 0:
            self.phase ^= 1

    def _rounds(self, commands: Sequence[Command], depth: int, on_done: Callable[[int, int], None] | None,
                timeout: float, results: list[int], failures: list[tuple[int, int, int]], owner: list[int],
                free: list[int]) -> list[int]:
        """The rounds of :meth:`run`: fill free identifiers, one doorbell batch, wait, reap."""
        total = len(commands)
        following = in_flight = 0
        unrung = False
        while following < total or in_flight:
            while free and following < total:       # every free identifier takes a command
                cid = free.pop()
                self._place(cid, commands[following])
                owner[cid] = following
                following += 1
                in_flight += 1
                self.submitted += 1
                unrung = True
            self.most_in_flight = max(self.most_in_flight, in_flight)
            # The completion queue must hold every command in flight, counting entries
            # reaped but not yet given back; otherwise the controller waits for the head.
            if unrung or (self.head - self.acked) % self.entries + in_flight > self.depth:
                if self.irq is None and not self._completed():
                    self._ring_and_wait()
                else:
                    self._ring()
                unrung = False
            deadline = Deadline(timeout)
            try:
                self._wait(deadline)
            except DeviceTimeout:
                self.broken = True
                pending = sorted(i for i in owner if i >= 0)
                raise NvmeError(commands[pending[0]].name if pending else f"queue {self.qid}", None, None,
                                commands[pending[0]].lba if pending else None, failed=pending,
                                detail=f"no completion within {timeout:g} s") from None
            while self._completed():                # reap every entry the controller has posted
                result, _, _, _, cid, status = CQE.unpack_from(self.cq.view, self.head << CQE_SIZE_LOG2)
                self._advance()
                index = owner[cid] if cid < len(owner) else -1
                if index < 0:
                    self.broken = True
                    raise NvmeError(f"queue {self.qid}", None, None, detail=f"a completion for unknown command {cid}")
                owner[cid] = -1
                free.append(cid)
                in_flight -= 1
                if status >> 1:
                    failures.append((index, status >> 9 & 7, status >> 1 & 0xFF))
                else:
                    results[index] = result
                    if on_done is not None:
                        on_done(index, result)
        if failures:
            index, sct, sc = failures[0]
            raise NvmeError(commands[index].name, sct, sc, commands[index].lba,
                            failed=[i for i, _, _ in failures], of=total)
        return results

    def execute(self, command: Command, timeout: float = COMMAND_TIMEOUT) -> int:
        """One command exactly as given, unchecked (the device judges it); its result dword."""
        return self.run([command], timeout=timeout)[0]

    def free(self) -> None:
        for buf in (self.sq, self.cq, self.prp_lists) + ((self._bounce,) if self._bounce else ()):
            self.controller.dev.dma_free(buf)


class Nvme:
    """The controller: reset, enable, the admin queue, I/O queue pairs and namespaces.

    ``queues`` I/O queue pairs are created (one per worker thread); with
    ``interrupts`` each completion queue gets its own MSI-X vector (the admin
    queue vector 0, I/O queue n vector n)."""

    def __init__(self, bus: Bus, device: Device, queues: int = 1, interrupts: bool = False,
                 entries: int = IO_ENTRIES) -> None:
        self.bus, self.dev, self.regs = bus, device, device.bar(0)
        self.doorbell_lock = threading.Lock()
        self.queues: list[QueuePair] = []
        self.irqs: list[Irq] = []
        self.admin: QueuePair | None = None
        self.cap = self.regs.read64(Reg.CAP)
        self.timeout = max(cap_timeout(self.cap), 0.5)
        self.doorbell_stride = cap_dstrd(self.cap)
        self.page = cap_mpsmin(self.cap)
        if self.page != PAGE:
            raise NvmeError("controller setup", None, None, detail=f"needs {PAGE}-byte pages, not {self.page}")
        most = 3 if interrupts else 16      # with interrupts: the admin queue's vector and one each
        if not 1 <= queues <= most or not 2 <= entries <= cap_mqes(self.cap):
            raise ValueError(f"1 to {most} I/O queues of 2 to {cap_mqes(self.cap)} entries, not {queues} of {entries}")
        device.enable_decoding()
        try:
            if interrupts:
                self.irqs = device.irqs(IrqMode.MSIX, 1 + queues)
            self._enable()
            self.identity = parse_controller(self._identify(Cns.CONTROLLER), self.page)
            self._create_io_queues(queues, entries, interrupts)
            self._namespaces = [self._namespace(nsid) for nsid in self._active_namespaces()]
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, bus: Bus, **kwargs: object) -> "Nvme":
        """The first NVMe controller on the bus."""
        function = next((f for f in bus.find_all(class_code=CLASS_STORAGE, subclass=SUBCLASS_NVM)
                         if f.prog_if == PROG_IF_NVME), None)
        if function is None:
            raise LookupError("no NVMe controller (class 01 08 02) on the bus")
        return cls(bus, bus.open(function, dma_size=DMA_SIZE), **kwargs)  # type: ignore[arg-type]

    # ---- bring-up (7.6.1) ----

    def _until(self, mask: int, value: int, what: str) -> None:
        """Poll CSTS guest-side until ``(CSTS & mask) == value`` within CAP.TO; a fatal status ends it."""
        deadline = Deadline(self.timeout)
        while True:
            try:        # the proxy's polls are short (a second here): CAP.TO may be 127 s
                self.regs.poll32(Reg.CSTS, mask | Csts.CFS, value, min(1.0, deadline.remaining))
                return
            except DeviceTimeout as exc:
                if exc.last_value & Csts.CFS or deadline.expired:
                    detail = "controller fatal status" if exc.last_value & Csts.CFS else f"timed out waiting for {what}"
                    raise NvmeError("controller setup", None, None,
                                    detail=f"{detail} (CSTS {exc.last_value:#x})") from exc

    def _disable(self) -> None:
        """CC.EN to 0 and wait for CSTS.RDY to follow, within CAP.TO: the controller resets (7.3.2)."""
        cc = self.regs.read32(Reg.CC)
        if cc & Cc.EN:
            self.regs.write32(Reg.CC, cc & ~Cc.EN)
        self._until(Csts.RDY, 0, "CSTS.RDY to clear")

    def _enable(self) -> None:
        self._disable()                 # reset first: queues a killed driver left running stop
        self.dev.enable_dma()
        self.admin = QueuePair(self, 0, ADMIN_ENTRIES, self.irqs[0] if self.irqs else None)
        self.regs.write32(Reg.AQA, (ADMIN_ENTRIES - 1) << 16 | (ADMIN_ENTRIES - 1))
        self.regs.write64(Reg.ASQ, self.admin.sq.phys)
        self.regs.write64(Reg.ACQ, self.admin.cq.phys)
        # NVM command set, 4 KiB pages, round robin, 64-byte and 16-byte entries
        self.regs.write32(Reg.CC, SQE_SIZE_LOG2 << CC_IOSQES_SHIFT | CQE_SIZE_LOG2 << CC_IOCQES_SHIFT | Cc.EN)
        self._until(Csts.RDY, Csts.RDY, "CSTS.RDY")

    def _identify(self, cns: int, nsid: int = 0) -> bytes:
        buf = self.dev.dma_alloc(PAGE)
        try:
            assert self.admin is not None
            self.admin.execute(Command(Admin.IDENTIFY, nsid, [buf.phys], cdw10=cns, name=f"IDENTIFY CNS {cns}"))
            return bytes(buf.view)
        finally:
            self.dev.dma_free(buf)

    def _create_io_queues(self, count: int, entries: int, interrupts: bool) -> None:
        assert self.admin is not None
        granted = self.admin.execute(Command(Admin.SET_FEATURES, cdw10=FEATURE_NUMBER_OF_QUEUES,
                                             cdw11=(count - 1) << 16 | (count - 1), name="SET FEATURES queues"))
        if min(granted & 0xFFFF, granted >> 16) + 1 < count:
            raise NvmeError("SET FEATURES queues", None, None, detail=f"the controller granted {granted:#x}")
        for qid in range(1, count + 1):
            qp = QueuePair(self, qid, entries, self.irqs[qid] if interrupts else None)
            size = (entries - 1) << 16 | qid
            # Without MSI-X the controller takes vector 0 only (QEMU refuses others), and polls
            vector = qid << 16 | CQ_IEN if interrupts else 0
            try:
                self.admin.execute(Command(Admin.CREATE_IO_CQ, pages=[qp.cq.phys], cdw10=size, cdw11=vector | CQ_PC,
                                           name=f"CREATE I/O CQ {qid}"))
            except BaseException:
                qp.free()
                raise
            self.queues.append(qp)          # from here on close() deletes it
            self.admin.execute(Command(Admin.CREATE_IO_SQ, pages=[qp.sq.phys], cdw10=size, cdw11=qid << 16 | SQ_PC,
                                       name=f"CREATE I/O SQ {qid}"))

    def _active_namespaces(self) -> list[int]:
        data = self._identify(Cns.ACTIVE_NAMESPACES)
        ids = struct.unpack("<1024I", data)
        return [nsid for nsid in ids[:ids.index(0) if 0 in ids else 1024]]

    def _namespace(self, nsid: int) -> "Namespace":
        return Namespace(self, parse_namespace(nsid, self._identify(Cns.NAMESPACE, nsid), self.identity),
                         self.queues[0])

    # ---- what users see ----

    def namespaces(self) -> list["Namespace"]:
        """Every active namespace, bound to I/O queue pair 1 (``ns.on(queue)`` for another)."""
        return list(self._namespaces)

    def disks(self) -> list["Namespace"]:
        """The namespaces, under the name the AHCI driver uses for its block devices."""
        return self.namespaces()

    def close(self) -> None:
        """Delete the I/O queues, shut the controller down (7.6.2), give everything back."""
        try:
            if self.admin is not None and not self.admin.broken:
                for qp in self.queues:
                    try:
                        self.admin.execute(Command(Admin.DELETE_IO_SQ, cdw10=qp.qid, name=f"DELETE I/O SQ {qp.qid}"))
                        self.admin.execute(Command(Admin.DELETE_IO_CQ, cdw10=qp.qid, name=f"DELETE I/O CQ {qp.qid}"))
                    except NvmeError as exc:
                        log.warning("closing queue %d: %s", qp.qid, exc)
                cc = self.regs.read32(Reg.CC)
                self.regs.write32(Reg.CC, cc | Cc.SHN_NORMAL)
                self._until(Csts.SHST_MASK, Csts.SHST_COMPLETE, "shutdown to complete")
            if self.admin is not None:
                self._disable()
        finally:
            for qp in self.queues + ([self.admin] if self.admin else []):
                qp.free()
            self.queues, self.admin = [], None
            for irq in self.irqs:
                irq.close()
            self.dev.close()


class Namespace:
    """One namespace: a block device with the AHCI Port's API, on one queue pair."""

    def __init__(self, controller: Nvme, identity: NamespaceIdentity, queue: QueuePair) -> None:
        self.controller, self.identity, self.queue = controller, identity, queue
        self.nsid = identity.nsid
        self.sector_size = identity.sector_size
        self.max_transfer = controller.identity.max_transfer

    def __repr__(self) -> str:
        return f"<Namespace {self.nsid} on queue {self.queue.qid}>"

    def on(self, queue: QueuePair) -> "Namespace":
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

    def _pages(self, buffers: Sequence[DmaBuffer]) -> tuple[list[int], int]:
        """The PRP pages of ``buffers`` in order, and their bytes. Each buffer starts on a page;
        all but the last are whole pages (so the pages chain with no gaps); whole blocks in all."""
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
        count = nbytes // self.sector_size
        name = "READ" if opcode == Nvm.READ else "WRITE"
        return Command(opcode, self.nsid, pages, cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32, cdw12=count - 1,
                       name=f"{name} ns {self.nsid} {lba}+{count}", lba=lba)

    def _bounce_buffer(self) -> DmaBuffer:
        return self.queue.bounce(self.max_transfer)

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
        bounce, per = self._bounce_buffer(), self.max_transfer // self.sector_size
        out = bytearray()
        for start in range(0, count, per):
            n = min(per, count - start)
            nbytes = n * self.sector_size
            self.queue.run([self._io(Nvm.READ, lba + start, range(bounce.phys, bounce.phys + nbytes, PAGE), nbytes)])
            out += bounce.view[:nbytes]
        return bytes(out)

    def write(self, lba: int, data: bytes) -> None:
        """Whole blocks at ``lba``, split into transfers of at most MDTS. Checked first."""
        if not data or len(data) % self.sector_size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.sector_size}-byte blocks")
        count = len(data) // self.sector_size
        self._check(lba, count)
        bounce, per = self._bounce_buffer(), self.max_transfer // self.sector_size
        for start in range(0, count, per):
            n = min(per, count - start)
            nbytes = n * self.sector_size
            bounce.view[:nbytes] = data[start * self.sector_size:start * self.sector_size + nbytes]
            self.queue.run([self._io(Nvm.WRITE, lba + start, range(bounce.phys, bounce.phys + nbytes, PAGE),
                                     nbytes)])

    def flush(self) -> None:
        """Flush (6.8): what was written is on the medium."""
        self.queue.run([Command(Nvm.FLUSH, self.nsid, name=f"FLUSH ns {self.nsid}")])

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
        buf = self.controller.dev.dma_alloc(PAGE)
        try:
            for i, (lba, count) in enumerate(ranges):
                DSM_RANGE.pack_into(buf.view, i * DSM_RANGE.size, 0, count, lba)
            self.queue.run([Command(Nvm.DATASET_MANAGEMENT, self.nsid, [buf.phys], cdw10=len(ranges) - 1,
                                    cdw11=DSM_DEALLOCATE, name=f"DEALLOCATE ns {self.nsid}", lba=ranges[0][0])])
        finally:
            self.controller.dev.dma_free(buf)

    def read_queued_into(self, requests: Sequence[tuple[int, DmaBuffer]], depth: int | None = None) -> None:
        """Reads of (lba, buffer), up to ``depth`` in flight (default: the queue's). A failed
        read raises NvmeError after the others have completed; ``failed`` names it."""
        self.queue.run(self._queue_of(Nvm.READ, requests), depth)

    def write_queued_from(self, requests: Sequence[tuple[int, DmaBuffer]], depth: int | None = None) -> None:
        """Writes of (lba, buffer), queued. They may reach the medium in any order: overlaps are refused."""
        commands = self._queue_of(Nvm.WRITE, requests)
        spans = sorted((lba, lba + b.size // self.sector_size) for lba, b in requests)
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
            raise ValueError("queued writes overlap: the device may apply them in any order")
        self.queue.run(commands, depth)

    def read_queued(self, requests: Sequence[tuple[int, int]], depth: int | None = None) -> list[bytes]:
        """Queued reads of (lba, blocks), through buffers of the driver's; the data in request order."""
        for lba, count in requests:
            self._check(lba, count)
            if count * self.sector_size > self.max_transfer:
                raise ValueError(f"a queued read moves at most {self.max_transfer} bytes (MDTS)")
        out: list[bytes] = []
        failure: NvmeError | None = None
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
                failure = failure or exc
                failed += [start + i for i in exc.failed]
                out += [b""] * (end - start)
            start = end
        if failure is not None:
            raise NvmeError(failure.command, failure.sct, failure.sc, failure.lba, failed=failed, of=len(requests))
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
        commands = []
        for lba, buffer in requests:
            pages, nbytes = self._pages([buffer])
            self._check(lba, nbytes // self.sector_size)
            commands.append(self._io(opcode, lba, pages, nbytes))
        return commands
