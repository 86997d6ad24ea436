"""The NVMe PCI transport (Linux's drivers/nvme/host/pci.c): controller registers, reset and
enable, the admin and I/O queue pairs in DMA memory, PRPs, doorbells, interrupts.

Queues live in DMA memory the host has mapped, so Python writes submission
entries and reads completion entries itself, at host speed. The doorbells
(the completion queue's head and the submission queue's tail, one batch per
round) go one of two ways:

- Through QEMU's ioeventfds, with ``ioeventfds=True`` where the controller has
  shadow doorbells and QEMU's ``nvme`` has ``ioeventfd=on``
  (``spec.nvme(..., ioeventfd="on")``): the value
  goes into the shadow doorbell page, and a write(2) on the doorbell's eventfd,
  taken from QEMU when the queue was created (harness.machine.ioeventfd), wakes
  QEMU's main loop to read it. The guest carries nothing and its vCPU may stay
  halted, so the machine's two cores are QEMU's main loop's and Python's: a
  queue alone spins (yielding) for its completions, then naps.
- Otherwise (the default) through the proxy guest, posted (nobody waits for them): while the
  controller works, Python naps through the time it usually takes (the cores
  are the vCPU's and QEMU's meanwhile), then polls the phase bit of the next
  completion entry itself, with no round trip. If none comes for a while, a
  guest-side poll of that phase bit takes over (a round trip, which also
  reports a posted doorbell's failure).

With interrupts, each queue waits for its own MSI-X vector instead.

Threads: one queue pair serves one thread at a time; several threads may each
drive their own queue pair (the proxied doorbell writes share the device's
channel and take turns under a lock). A spinning thread would keep the GIL from
the others for the interpreter's switch interval, so beside another queue's run
a queue only naps, with a fine timer slack.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from harness.access import (Access, Bus, Deadline, Device, DmaBuffer, Irq, IrqMode, Kind, Space, spin_until,
                            timer_slack)
from harness.errors import DeviceTimeout, InterruptTimeout

from .core import Coalescing, Command, Controller, NvmeError, failure
from .regs import (CQ_IEN, CQ_PC, CQE, CQE_STATUS_WORD, CQE_WORDS, CC_IOCQES_SHIFT, CC_IOSQES_SHIFT, CQE_SIZE_LOG2,
                   DOORBELL_BASE, PAGE, SQ_PC, SQE, SQE_SIZE_LOG2, Admin, Cc, Csts, Reg, cap_dstrd, cap_mpsmin,
                   cap_mqes, cap_timeout, cq_head_doorbell, sq_tail_doorbell)

log = logging.getLogger(__name__)

CLASS_STORAGE, SUBCLASS_NVM, PROG_IF_NVME = 0x01, 0x08, 0x02
DMA_SIZE = 16 << 20                 # the controller's DMA domain: its queues, PRP lists, callers' buffers
ADMIN_ENTRIES = 32
IO_ENTRIES = 64                     # per I/O queue: 63 commands in flight
MAX_QUEUES = 16                     # I/O queue pairs a controller here gets at most
PRP_LIST_ENTRIES = PAGE // 8        # one list page per command identifier
MAX_TRANSFER = PRP_LIST_ENTRIES * PAGE      # so one command moves 2 MiB at most
COMMAND_TIMEOUT = 5.0               # seconds a command may take
# Napping through the controller's expected time (see QueuePair._nap)
NAP_OVERSHOOT = 80e-6               # a nap ends this much late (the kernel's 50 us timer slack, the wake-up)
NAP_MOST = 1e-3                     # the longest nap: a slow spell must not put Python to sleep for long
NAP_LEARN = 1 / 16                  # how far a longer doorbell-to-completion time moves the expectation up
NAP_SHRINK = 0.5                    # the expectation after a nap that ended past the completion
GUEST_WAIT = 100e-6                 # one guest-side wait for a completion: short, so queues sharing
                                    # the device's channel take turns
# With QEMU's ioeventfds the guest carries nothing: Python waits for completions on the host alone
HOST_SPIN = 1e-3                    # a queue alone spins this long (yielding) before it naps
HOST_NAP = 20e-6                    # a nap (with a fine timer slack): short, and beside another
                                    # queue's thread the only wait
_in_runs: set[int] = set()              # the threads in a QueuePair.run, every controller's: one GIL


def _alone() -> bool:
    """Whether this thread is the only one in a queue's run (no other wants the GIL for one)."""
    return len(_in_runs) <= 1


@dataclass(frozen=True)
class QueueState:
    """A queue pair as another driver needs it to carry on where this one stopped (the
    bench's in-guest loop): where its queues and PRP list pages are (command identifier k's
    list at page k), its doorbells' offsets in BAR0, and where the queue stands: the
    submission tail, the completion head and the phase expected there, and the head the
    controller was last told (``acked``). That driver rings every tail it writes and hands
    the queue back with :meth:`QueuePair.resume`."""

    qid: int
    sq: int
    cq: int
    prp_lists: int
    entries: int
    sq_doorbell: int
    cq_doorbell: int
    tail: int
    head: int
    phase: int
    acked: int
    sq_shadow: int = 0              # where the shadow doorbells are (DMA addresses), 0 without them:
    cq_shadow: int = 0              # a value goes there before its doorbell is rung


class QueuePair:
    """A submission queue and its completion queue, with their doorbells and (optionally) a vector.

    Commands go in with :meth:`run`: up to ``depth`` in flight, each round one
    doorbell batch. A full submission queue waits for completions: a command
    goes in only when one of the queue's command identifiers is free, and there
    are fewer of those than entries.

    With shadow doorbells (the controller's ``shadow``) each doorbell's value is
    written there first; where QEMU's ioeventfds for the queue's two doorbells were
    taken (``eventfds``: completion head, submission tail), a doorbell is a signal on
    its eventfd, from this process: the guest carries none, and Python waits for
    completions on the host alone."""

    def __init__(self, controller: "Nvme", qid: int, entries: int, irq: Irq | None) -> None:
        self.controller, self.qid, self.entries, self.irq = controller, qid, entries, irq
        dev = controller.dev
        self.sq = dev.dma_alloc(entries << SQE_SIZE_LOG2)
        self.cq = dev.dma_alloc(entries << CQE_SIZE_LOG2)
        self.prp_lists = dev.dma_alloc((entries - 1) * PAGE)     # command identifier k's list at page k
        self._cq_words = self.cq.view.cast("H")
        self._prp_words = self.prp_lists.view.cast("Q")
        self.tail = self.head = 0       # the submission tail the controller may fetch up to (released)
        self.fill = 0                   # where the next entry is written: entries from the tail on are
                                        # prepared ahead, out of the controller's reach until released
        self.acked = 0                  # the head the controller was last told: entries it may reuse
        self.phase = 1                  # the controller writes entries with this phase until it wraps
        self.broken = False
        regs, stride = controller.regs, controller.doorbell_stride
        cq_doorbell = regs.access(Kind.WRITE, cq_head_doorbell(qid, stride), 4, 0)
        sq_doorbell = regs.access(Kind.WRITE, sq_tail_doorbell(qid, stride), 4, 0)
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
        self.expected = 0.0             # seconds from a doorbell batch to the next completion, as learned
        self._rung_at: float | None = None     # when the doorbells were posted, if not yet waited on
        shadow = controller.shadow              # u32s in the doorbells' layout; None without shadows
        self._shadow = shadow.view.cast("I") if shadow is not None else None
        self._shadow_head = (cq_head_doorbell(qid, stride) - DOORBELL_BASE) // 4
        self._shadow_tail = (sq_tail_doorbell(qid, stride) - DOORBELL_BASE) // 4
        self.eventfds: tuple[int, int] | None = None   # QEMU's (completion head, submission tail) ioeventfds

    @property
    def depth(self) -> int:
        """Commands this queue keeps in flight at most: one entry always stays empty."""
        return self.entries - 1

    # ---- the submission queue: entries and their PRPs (4.2, 4.3) ----

    def _prp_list(self, cid: int, pages: Sequence[int]) -> int:
        """The pages after the first into this identifier's own list page (so no two commands
        in flight share a list); its address, for PRP2."""
        base = cid * PRP_LIST_ENTRIES
        self._prp_words[base:base + len(pages) - 1] = memoryview(
            struct.pack(f"<{len(pages) - 1}Q", *pages[1:])).cast("Q")
        return self.prp_lists.phys + cid * PAGE

    def _sq_copy_cmd(self, cid: int, command: Command) -> None:
        """The submission entry at ``fill``, and ``fill`` past it (not yet released). PRP1 is
        the first page; PRP2 the second, or a list of the rest."""
        pages = command.pages
        prp1 = pages[0] if pages else 0
        if len(pages) <= 2:
            prp2 = pages[1] if len(pages) == 2 else 0
        else:
            prp2 = self._prp_list(cid, pages)
        SQE.pack_into(self.sq.view, self.fill << SQE_SIZE_LOG2, command.opcode, 0, cid, command.nsid, 0, 0, 0,
                      prp1, prp2, command.cdw10, command.cdw11, command.cdw12, 0, 0, 0)
        self.fill = self.fill + 1 if self.fill + 1 < self.entries else 0

    def _release(self, count: int) -> None:
        """The tail past ``count`` more prepared entries (told with the next doorbells)."""
        self.tail = (self.tail + count) % self.entries

    # ---- the completion queue (4.6) ----

    def _cqe_pending(self) -> bool:
        """Whether the entry at the head is the controller's: it carries the phase it writes now."""
        return (self._cq_words[self.head * CQE_WORDS + CQE_STATUS_WORD] & 1) == self.phase

    def _cqes_pending(self, most: int) -> int:
        """How many entries from the head on are the controller's (up to ``most``), counted
        from their phase bits alone: nothing is reaped."""
        words, entries, status = self._cq_words, self.entries, CQE_STATUS_WORD
        slot, phase = self.head, self.phase
        count = 0
        while count < most and (words[slot * CQE_WORDS + status] & 1) == phase:
            count += 1
            slot += 1
            if slot == entries:
                slot, phase = 0, phase ^ 1
        return count

    def _update_cq_head(self) -> None:
        """Past the entry at the head; at the end of the queue the phase the controller writes flips."""
        self.head = self.head + 1 if self.head + 1 < self.entries else 0
        if self.head == 0:
            self.phase ^= 1

    def _cq_needs_head(self, in_flight: int) -> bool:
        """Whether the controller must be told the head before it can post ``in_flight`` more:
        the completion queue holds those and the entries reaped but not given back."""
        return (self.head - self.acked) % self.entries + in_flight > self.depth

    # ---- doorbells, and waiting for the controller ----

    def _ring(self) -> None:
        """Both doorbells in one batch: the entries reaped so far, and the new tail."""
        if self.eventfds is not None:
            self._signal()
            return
        if self._shadow is not None:
            self._shadow[self._shadow_head], self._shadow[self._shadow_tail] = self.head, self.tail
        with self.controller.doorbell_lock:
            self._doorbells.run({0: self.head, 1: self.tail})
        self.acked, self.rung_tail = self.head, self.tail

    def _signal(self) -> None:
        """The doorbells that moved, through QEMU's ioeventfds: each value into its shadow
        doorbell, then its eventfd signalled (the system call orders the two); QEMU's main
        loop reads the shadow when the eventfd wakes it."""
        head, tail, shadow, (head_fd, tail_fd) = self.head, self.tail, self._shadow, self.eventfds
        if head != self.acked:
            shadow[self._shadow_head] = head
            os.eventfd_write(head_fd, 1)
        if tail != self.rung_tail:
            shadow[self._shadow_tail] = tail
            os.eventfd_write(tail_fd, 1)
        self.acked, self.rung_tail = head, tail

    def _doorbells_moved(self) -> list[Access]:
        """The doorbell writes that tell the controller what moved since it was last told."""
        head, tail, shadow = self.head, self.tail, self._shadow
        accesses = []
        if head != self.acked:
            if shadow is not None:
                shadow[self._shadow_head] = head
            accesses.append(self._head_writes[head])
        if tail != self.rung_tail:
            if shadow is not None:
                shadow[self._shadow_tail] = tail
            accesses.append(self._tail_writes[tail])
        self.acked, self.rung_tail = head, tail
        return accesses

    def _post_doorbells(self) -> None:
        """The doorbells that moved, posted: the controller goes to work, Python goes on."""
        if self.eventfds is not None:
            self._signal()
            return
        accesses = self._doorbells_moved()
        if accesses:
            with self.controller.doorbell_lock:
                self.controller.dev.channel.post(accesses)

    def _guest_wait(self) -> None:
        """A guest-side wait (at most GUEST_WAIT) until the next completion entry carries the
        controller's phase: one round trip, with any doorbells that moved in front of it."""
        accesses = self._doorbells_moved() + [self._phase_polls[self.phase][self.head]]
        try:
            with self.controller.doorbell_lock:
                self.controller.dev.channel.execute(accesses)
        except DeviceTimeout:
            pass                        # not yet: the caller's deadline decides

    def _tell(self, submitted: bool, in_flight: int) -> None:
        """Ring when the controller needs it: new entries to fetch, or completion entries to
        reuse. Polling, the doorbells are posted and the host watches the completion queue."""
        if submitted or self._cq_needs_head(in_flight):
            if self.irq is None:
                self._post_doorbells()
                # One command in flight finishes within a nap's own lateness on a quiet machine
                # (QD1 lost 15 % to naps there): only a queue that holds several naps. With
                # ioeventfds no vCPU needs the core, so a queue alone spins instead.
                nap = in_flight > 1 and (self.eventfds is None or not _alone())
                self._rung_at = time.perf_counter() if nap else None
            else:
                self._ring()

    def _nap(self, rung_at: float) -> bool:
        """Sleep through most of the time the controller is expected to take after its
        doorbells (rung at ``rung_at``: the entries prepared since took some of it); whether
        the completion came meanwhile. Python's spin holds one of the two
        cores that the vCPU and QEMU's main loop, which emulate the controller, both want
        (a spin that never yields ran QD1 at a third of the yielding one's rate); a nap
        gives it back. Short expectations (QD1 on a quiet machine) get none: a nap ends
        NAP_OVERSHOOT late."""
        nap = min(self.expected - NAP_OVERSHOOT - (time.perf_counter() - rung_at), NAP_MOST)
        if nap <= 0:
            return False
        time.sleep(nap)
        return self._cqe_pending()

    def _wait(self, deadline: Deadline) -> None:
        """Until the next completion entry is the controller's: right after doorbells a nap,
        then the host's own look at the completion queue, then guest-side waits; or the
        vector. ``expected`` follows the quick doorbell-to-completion times: a shorter one
        replaces it, a longer one moves it up a little (on a busy host most commands
        take the usual time and a few take milliseconds: those must not make every nap
        oversleep), and a nap that ends past the completion halves it."""
        rung_at, self._rung_at = self._rung_at, None
        if rung_at is not None and not self._cqe_pending():
            if self._nap(rung_at):
                self.expected *= NAP_SHRINK
                return
            self._spin_wait(deadline)
        if rung_at is not None:
            took = time.perf_counter() - rung_at
            self.expected = took if took < self.expected else self.expected + (took - self.expected) * NAP_LEARN
        self._spin_wait(deadline)

    def _spin_wait(self, deadline: Deadline) -> None:
        """Until the next completion entry is the controller's: polled, :meth:`wait_any`; or the vector."""
        if self.irq is None:
            QueuePair.wait_any([self], deadline)
            return
        while not self._cqe_pending():
            try:
                self.irq.wait(deadline.remaining)
            except InterruptTimeout:
                pass
            if deadline.expired and not self._cqe_pending():
                raise DeviceTimeout(f"a completion on queue {self.qid}", 0, 0)

    # ---- what the controller and namespaces use ----

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
        flight = InFlight(self, commands, min(depth or self.depth, self.depth), on_done)
        _in_runs.add(threading.get_ident())
        try:
            while flight.left:
                # One round: what has room goes to the controller; the next commands' entries
                # are written while it works; once completions show, the entries they make room
                # for go at once, before the completions are looked at: the controller's
                # emulation works in bursts, and would otherwise idle through the bookkeeping.
                flight.prepare(flight.depth - flight.in_flight - len(flight.prepared))
                self._tell(flight.release(0), flight.in_flight)
                if _alone():
                    # Alone: write ahead. Beside another queue's run it would hold the GIL
                    # while that thread's doorbell waits (two queue pairs at QD32: 0.88x).
                    flight.prepare(len(flight.free))
                try:
                    self._wait(Deadline(timeout))
                except DeviceTimeout:
                    self.broken = True
                    raise flight.timed_out(timeout) from None
                if flight.prepared:
                    self._tell(flight.release(self._cqes_pending(flight.in_flight)), flight.in_flight)
                flight.reap()
            if flight.failures:
                raise flight.first_failure()
        except BaseException:
            flight.unprepare()
            if not self.broken and flight.pending():     # interrupted with commands in flight
                flight.drain(timeout)
            raise
        finally:
            _in_runs.discard(threading.get_ident())
        return flight.results

    @staticmethod
    def wait_any(queues: Sequence["QueuePair"], deadline: Deadline) -> None:
        """Until one of ``queues`` (of one controller, polled, each with commands in flight) has
        a completion. Through the guest: spin, then guest-side waits on the next entry of a
        queue that rings that way (each returns within GUEST_WAIT). With QEMU's ioeventfds,
        short naps (the guest has nothing to do with it), after one spin if no other queue's
        thread wants the GIL: a spinning thread keeps it from them for the interpreter's
        switch interval (5 ms)."""
        if len(queues) == 1:
            first = queues[0]
            pending = first._cqe_pending
        else:
            first = next((queue for queue in queues if queue.eventfds is None), queues[0])
            pending = lambda: any(queue._cqe_pending() for queue in queues)  # noqa: E731
        channel = first.controller.dev.channel
        spun = False
        while not pending():
            if first.eventfds is None:
                if not spin_until(pending, channel.spin):
                    first._guest_wait()
            elif not spun and _alone():
                spun = True
                spin_until(pending, HOST_SPIN)
            else:
                with timer_slack():
                    time.sleep(HOST_NAP)
                channel.check_alive()
            if deadline.expired and not pending():
                raise DeviceTimeout(f"a completion on queue(s) {', '.join(str(q.qid) for q in queues)}", 0, 0)

    def execute(self, command: Command, timeout: float = COMMAND_TIMEOUT) -> int:
        """One command exactly as given, unchecked (the device judges it); its result dword."""
        return self.run([command], timeout=timeout)[0]

    def bounce(self, size: int) -> DmaBuffer:
        """The queue's own buffer for copying reads and writes, at least ``size`` bytes."""
        if self._bounce is None or self._bounce.size < size:
            if self._bounce is not None:
                self.controller.dev.dma_free(self._bounce)
                self._bounce = None
            self._bounce = self.controller.dev.dma_alloc(size)
        return self._bounce

    # ---- lending the queue to another driver ----

    def state(self) -> QueueState:
        """Where the queue is and where it stands, for another driver to carry on from."""
        stride, shadow = self.controller.doorbell_stride, self.controller.shadow
        sq_shadow = shadow.phys + self._shadow_tail * 4 if shadow is not None else 0
        cq_shadow = shadow.phys + self._shadow_head * 4 if shadow is not None else 0
        return QueueState(self.qid, self.sq.phys, self.cq.phys, self.prp_lists.phys, self.entries,
                          sq_tail_doorbell(self.qid, stride), cq_head_doorbell(self.qid, stride),
                          self.tail, self.head, self.phase, self.acked, sq_shadow, cq_shadow)

    def resume(self, state: QueueState) -> None:
        """Take the queue back after another driver used it, in the state it left: it rang
        every tail it wrote, and the head ``acked``."""
        tail, head, phase, acked = state.tail, state.head, state.phase, state.acked
        if not (state.qid == self.qid and 0 <= tail < self.entries and 0 <= head < self.entries
                and 0 <= acked < self.entries and phase in (0, 1)):
            raise ValueError(f"queue {self.qid}: no such state: {state}")
        self.tail, self.head, self.phase, self.acked = tail, head, phase, acked
        self.rung_tail = self.fill = tail

    def free(self) -> None:
        for buf in (self.sq, self.cq, self.prp_lists) + ((self._bounce,) if self._bounce else ()):
            self.controller.dev.dma_free(buf)
        for fd in self.eventfds or ():
            os.close(fd)
        self.eventfds = None


class InFlight:
    """The commands of one :meth:`QueuePair.run` on their way through the queue: which
    command identifier carries which command, and what has come back.

    A command is first *prepared* (its submission entry written past the tail, under a
    free identifier), then *released* (the tail moved past it, at most ``depth`` in
    flight). Every identifier of the queue may carry one, so up to ``queue.depth -
    depth`` wait prepared while ``depth`` are in flight; the submission queue never
    holds more than ``queue.depth`` either way (the entry at ``fill`` was fetched: the
    controller fetches in order, and a command not yet fetched has not completed)."""

    __slots__ = ("queue", "commands", "on_done", "depth", "results", "failures", "owner", "free", "prepared",
                 "following", "in_flight", "left")

    def __init__(self, queue: QueuePair, commands: Sequence[Command], depth: int,
                 on_done: Callable[[int, int], None] | None) -> None:
        self.queue, self.commands, self.on_done, self.depth = queue, commands, on_done, depth
        self.results = [0] * len(commands)
        self.failures: list[tuple[int, int]] = []       # (index, status word) of each failed command
        identifiers = min(queue.depth, len(commands))   # one command alone (QD1) builds lists of one
        self.owner = [-1] * identifiers                 # command identifier -> index of its command, or -1
        self.free = list(range(identifiers - 1, -1, -1))    # identifiers a command may take, lowest last
        self.prepared: deque[int] = deque()             # identifiers of prepared commands, in queue order
        self.following = 0                              # the next command to prepare
        self.in_flight = 0                              # commands released to the controller, not yet ended
        self.left = len(commands)                       # commands not yet ended

    def pending(self) -> list[int]:
        """The indices of the commands in flight."""
        return sorted(i for i in self.owner if i >= 0)

    def prepare(self, most: int) -> None:
        """Up to ``most`` free identifiers take the next commands, their entries written but not released."""
        queue, commands, owner, free, prepared = self.queue, self.commands, self.owner, self.free, self.prepared
        following = self.following
        end = min(len(commands), following + most)
        while free and following < end:
            cid = free.pop()
            queue._sq_copy_cmd(cid, commands[following])
            owner[cid] = following
            prepared.append(cid)
            following += 1
        self.following = following

    def release(self, ending: int) -> bool:
        """Release prepared commands into the room ``depth`` leaves, counting ``ending``
        commands in flight as ended already (their completions seen, not yet reaped);
        whether any went."""
        prepared = self.prepared
        count = min(len(prepared), self.depth - self.in_flight + ending)
        if count <= 0:
            return False
        for _ in range(count):
            prepared.popleft()
        queue = self.queue
        queue._release(count)
        self.in_flight += count
        queue.submitted += count
        queue.most_in_flight = max(queue.most_in_flight, self.in_flight - ending)
        return True

    def unprepare(self) -> None:
        """Take back the prepared commands: the controller was never told of them."""
        queue, owner, prepared = self.queue, self.owner, self.prepared
        while prepared:
            cid = prepared.pop()
            owner[cid] = -1
            self.free.append(cid)
        queue.fill = queue.tail

    def reap(self) -> None:
        """Every completion the controller has posted: its identifier freed, its result or failure kept."""
        queue, owner = self.queue, self.owner
        while queue._cqe_pending():
            result, _, _, _, cid, status = CQE.unpack_from(queue.cq.view, queue.head << CQE_SIZE_LOG2)
            queue._update_cq_head()
            index = owner[cid] if cid < len(owner) else -1
            if index < 0:
                queue.broken = True
                raise NvmeError(f"queue {queue.qid}", None, None, detail=f"a completion for unknown command {cid}")
            owner[cid] = -1
            self.free.append(cid)
            self.in_flight -= 1
            self.left -= 1
            if status >> 1:                         # a status code besides the phase bit
                self.failures.append((index, status))
            else:
                self.results[index] = result
                if self.on_done is not None:
                    self.on_done(index, result)

    def first_failure(self) -> NvmeError:
        """Once every command has ended: the first failure, naming every failed index."""
        index, status = self.failures[0]
        return failure(self.commands[index], status, [i for i, _ in self.failures], of=len(self.commands))

    def timed_out(self, timeout: float) -> NvmeError:
        pending = self.pending()
        first = self.commands[pending[0]] if pending else None
        return NvmeError(first.label if first else f"queue {self.queue.qid}", None, None,
                         first.lba if first else None, failed=pending, detail=f"no completion within {timeout:g} s")

    def drain(self, timeout: float) -> None:
        """Reap the completions of the commands still in flight, whatever they say, so that the
        next call starts from a quiet queue; or mark the queue unusable."""
        queue, owner = self.queue, self.owner
        deadline = Deadline(timeout)
        try:
            while any(i >= 0 for i in owner):
                queue._ring()
                queue._wait(deadline)
                while queue._cqe_pending():
                    cid = CQE.unpack_from(queue.cq.view, queue.head << CQE_SIZE_LOG2)[4]
                    queue._update_cq_head()
                    if cid < len(owner):
                        owner[cid] = -1
            queue._ring()
        except BaseException as exc:
            queue.broken = True
            log.warning("queue %d: commands of an interrupted call did not end (%s); the queue is unusable",
                        queue.qid, exc)


class Nvme(Controller):
    """The controller on PCI: reset, enable, the admin queue, I/O queue pairs; identify and
    the namespaces come from the protocol core (:class:`~drivers.nvme.core.Controller`).

    ``queues`` I/O queue pairs are created (one per worker thread); with
    ``interrupts`` each completion queue gets its own MSI-X vector (the admin
    queue vector 0, I/O queue n vector n). ``ioeventfds``: for a machine whose
    controller has them (``spec.nvme(..., ioeventfd="on")``): configure shadow
    doorbells and ring QEMU's ioeventfds from here, where they can be taken
    (else the guest rings, the values in the shadows). Not by default: on a
    controller without ioeventfds the shadows cost QEMU a DMA access or two a
    command and bring nothing (one command at a time 0.89 of plain doorbells,
    `bench compare`)."""

    transfer_limit = MAX_TRANSFER

    def __init__(self, bus: Bus, device: Device, queues: int = 1, interrupts: bool = False,
                 entries: int = IO_ENTRIES, coalesce: Coalescing | None = None,
                 ioeventfds: bool = False) -> None:
        self.bus, self.dev, self.regs = bus, device, device.bar(0)
        self.doorbell_lock = threading.Lock()
        self.queues: list[QueuePair] = []
        self.irqs: list[Irq] = []
        self.admin: QueuePair | None = None
        self.shadow: DmaBuffer | None = None        # the shadow doorbells, once configured
        self._event_indices: DmaBuffer | None = None
        self.cap = self.regs.read64(Reg.CAP)
        self.timeout = max(cap_timeout(self.cap), 0.5)
        self.doorbell_stride = cap_dstrd(self.cap)
        self.page = cap_mpsmin(self.cap)
        if self.page != PAGE:
            raise NvmeError("controller setup", None, None, detail=f"needs {PAGE}-byte pages, not {self.page}")
        most = 3 if interrupts else MAX_QUEUES     # with interrupts: the admin queue's vector and one each
        if not 1 <= queues <= most or not 2 <= entries <= cap_mqes(self.cap):
            raise ValueError(f"1 to {most} I/O queues of 2 to {cap_mqes(self.cap)} entries, not {queues} of {entries}")
        device.enable_decoding()
        try:
            if interrupts:
                self.irqs = device.irqs(IrqMode.MSIX, 1 + queues)
            self._enable()
            self.identity = self.identify_controller()
            if ioeventfds and self.identity.shadow_doorbells:
                self._configure_shadow_doorbells()
            self._create_io_queues(queues, entries, interrupts)
            if coalesce is not None:
                self.coalesce_interrupts(coalesce)
            self._namespaces = self.scan_namespaces()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, bus: Bus, index: int = 0, **kwargs: object) -> "Nvme":
        """The bus's NVMe controller ``index`` (0: the first)."""
        functions = [f for f in bus.find_all(class_code=CLASS_STORAGE, subclass=SUBCLASS_NVM)
                     if f.prog_if == PROG_IF_NVME]
        if len(functions) <= index:
            raise LookupError(f"no NVMe controller (class 01 08 02) number {index} on the bus "
                              f"({len(functions)} there)")
        return cls(bus, bus.open(functions[index], dma_size=DMA_SIZE), **kwargs)  # type: ignore[arg-type]

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

    def _configure_shadow_doorbells(self) -> None:
        """Doorbell Buffer Config (5.8, NVMe 1.3): the I/O queues' doorbell values go to a
        page of ours first (and the controller writes its event indices to another), so
        a doorbell rung without its value is enough. Rung that way on QEMU's nvme with
        ``ioeventfd=on``: there each I/O queue's doorbells get an eventfd as the queue
        is created, which the driver takes (``_create_io_queues``). A controller that
        refuses the command keeps plain doorbells."""
        assert self.admin is not None
        if (2 * MAX_QUEUES + 2) * self.doorbell_stride > PAGE:
            log.info("no shadow doorbells: a stride of %d bytes needs more than a page", self.doorbell_stride)
            return
        shadow, indices = self.dev.dma_alloc(PAGE), self.dev.dma_alloc(PAGE)
        try:
            self.admin.execute(Command(Admin.DOORBELL_BUFFER_CONFIG, pages=[shadow.phys, indices.phys],
                                       name="DOORBELL BUFFER CONFIG"))
        except BaseException as exc:
            self.dev.dma_free(shadow)
            self.dev.dma_free(indices)
            if not isinstance(exc, NvmeError):
                raise
            log.info("no shadow doorbells: %s", exc)
            return
        self.shadow, self._event_indices = shadow, indices

    def _create_io_queues(self, count: int, entries: int, interrupts: bool) -> None:
        """Create I/O Completion Queue, then Submission Queue (5.3, 5.4), for each pair; with
        shadow doorbells, QEMU's ioeventfd each one makes is taken into the queue pair."""
        assert self.admin is not None
        self.negotiate_queues(count)
        for qid in range(1, count + 1):
            qp = QueuePair(self, qid, entries, self.irqs[qid] if interrupts else None)
            size = (entries - 1) << 16 | qid
            # Without MSI-X the controller takes vector 0 only (QEMU refuses others), and polls
            vector = qid << 16 | CQ_IEN if interrupts else 0
            watch = self.shadow is not None
            try:
                with self.dev.new_eventfds(1 if watch else 0) as head_fds:
                    self.admin.execute(Command(Admin.CREATE_IO_CQ, pages=[qp.cq.phys], cdw10=size,
                                               cdw11=vector | CQ_PC, name=f"CREATE I/O CQ {qid}"))
            except BaseException:
                qp.free()
                raise
            self.queues.append(qp)          # from here on close() deletes it
            try:
                with self.dev.new_eventfds(1 if watch else 0) as tail_fds:
                    self.admin.execute(Command(Admin.CREATE_IO_SQ, pages=[qp.sq.phys], cdw10=size,
                                               cdw11=qid << 16 | SQ_PC, name=f"CREATE I/O SQ {qid}"))
            except BaseException:
                for fd in head_fds:
                    os.close(fd)
                raise
            if head_fds and tail_fds:
                qp.eventfds = (head_fds[0], tail_fds[0])
            else:
                for fd in head_fds + tail_fds:
                    os.close(fd)

    def run_spread(self, queues: Sequence[QueuePair], commands: Sequence[Command], depth: int | None = None,
                   timeout: float = COMMAND_TIMEOUT) -> list[int]:
        """Every command, command i on ``queues[i % len(queues)]``, each queue keeping up to
        ``depth`` in flight, all driven from this thread in turns (as one CPU drives several
        queues; threads would hand the GIL back and forth); each command's result dword.
        As in :meth:`QueuePair.run`, failed commands do not stop the others; then NvmeError
        names the failed command of lowest index, and ``failed`` lists every failed index of
        ``commands``, in order. A timeout leaves every queue that had commands in flight
        unusable; its ``failed`` lists their commands. Polled queues only: a queue with a
        vector waits for it in its own thread."""
        count = len(queues)
        if count == 0 or len({id(queue) for queue in queues}) < count or any(
                queue not in self.queues or queue.irq is not None for queue in queues):
            raise ValueError("run_spread takes distinct polled I/O queue pairs of this controller")
        if count == 1:
            return queues[0].run(commands, depth, timeout=timeout)
        if depth is not None and depth < 1:
            raise ValueError(f"a queue depth is at least 1, not {depth}")
        for queue in queues:
            if queue.broken:
                raise NvmeError(f"queue {queue.qid}", None, None, detail="an earlier command never completed")
        flights = [InFlight(queue, commands[k::count], min(depth or queue.depth, queue.depth), None)
                   for k, queue in enumerate(queues)]
        _in_runs.add(threading.get_ident())
        try:
            while any(flight.left for flight in flights):
                # Each round as QueuePair.run's, every queue in turn: its room filled and rung,
                # the next entries written ahead, one wait for any completion, then each queue's
                # released and reaped
                for flight in flights:
                    if flight.left:
                        flight.prepare(flight.depth - flight.in_flight - len(flight.prepared))
                        flight.queue._tell(flight.release(0), flight.in_flight)
                if _alone():
                    for flight in flights:
                        flight.prepare(len(flight.free))
                busy = [flight for flight in flights if flight.in_flight]
                for flight in busy:
                    flight.queue._rung_at = None    # the naps' expectation is one queue's: not learned here
                try:
                    QueuePair.wait_any([flight.queue for flight in busy], Deadline(timeout))
                except DeviceTimeout:
                    for flight in busy:
                        flight.queue.broken = True
                    stuck = sorted(index * count + k for k, flight in enumerate(flights) if flight in busy
                                   for index in flight.pending())
                    first = commands[stuck[0]]
                    raise NvmeError(first.label, None, None, first.lba, failed=stuck,
                                    detail=f"no completion within {timeout:g} s") from None
                for flight in busy:
                    queue = flight.queue
                    if flight.prepared:
                        queue._tell(flight.release(queue._cqes_pending(flight.in_flight)), flight.in_flight)
                    flight.reap()
            failed = sorted(index * count + k for k, flight in enumerate(flights) for index, _ in flight.failures)
            if failed:
                k, index = failed[0] % count, failed[0] // count
                status = next(status for i, status in flights[k].failures if i == index)
                raise failure(commands[failed[0]], status, failed, of=len(commands))
        except BaseException:
            for flight in flights:
                flight.unprepare()
                if not flight.queue.broken and flight.pending():
                    flight.drain(timeout)
            raise
        finally:
            _in_runs.discard(threading.get_ident())
        return [flights[i % count].results[i // count] for i in range(len(commands))]

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
            for buf in (self.shadow, self._event_indices):
                if buf is not None:
                    self.dev.dma_free(buf)
            self.shadow = self._event_indices = None
            for irq in self.irqs:
                irq.close()
            self.dev.close()
