"""``hwharness bench nvme``: the Python NVMe driver against an in-guest C loop, same machine, same run.

Random 4 KiB reads one at a time (QD1), 32 in flight on one queue pair, 32
in flight on each of two queue pairs (each side drives both queues in turns
from one thread), sequential 128 KiB reads, and random 4 KiB writes at
QD32. Both sides run the same requests (drawn once per round on the host), with
one doorbell batch per round, and check no data; QEMU's ``query-blockstats``
must count exactly the operations each run was given. Measured as ``paired.py``
describes.

Each side has a controller of its own in the one machine, its namespace on an
image file made the same way (random bytes, read back into the host's page
cache): the Python driver as it comes, on a controller as ``MachineSpec.nvme``
makes it (the guest carries the doorbells), the Python driver with
``ioeventfds=True`` on one with QEMU's ioeventfds on (keys ``ioeventfd_...``: it
rings its doorbells itself, the vCPU halted), and the C loop on one with plain
register doorbells, on queue pairs a Python driver created there. An ioeventfd slows the C loop as it slows Python one command at a
time: QEMU then takes the doorbell in its main loop (the C loop on an ioeventfd
controller, one quiet run: QD1 15.6 k against 18.3 k IOPS, QD32 150 k against 175 k).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from drivers.nvme import Namespace, Nvme, QueuePair, QueueState
from drivers.nvme.regs import Nvm

from ...access import DmaBuffer
from ...errors import MachineError
from ...machine import MachineSpec
from ...proxy import ProxyBus, ProxyMachine, on_fastest_aio, proxy_spec, raw
from .ahci import DISK_BYTES, _disk_image
from .paired import Run, Workload, clock_figures, run_rounds
from .requests import RequestList

log = logging.getLogger(__name__)

# One controller per side, in this order: the Python driver as machines get it, the Python
# driver with QEMU's ioeventfds on, the C loop with plain doorbells
SIDES = ("python", "ioeventfd", "native")
DRIVES = tuple(f"nvme{k}-ns1" for k in range(len(SIDES)))
QUEUE_FIELDS = ["sq", "cq", "prp_lists", "entries", "depth", "sq_doorbell", "cq_doorbell", "tail", "head",
                "phase", "acked", "sq_shadow", "cq_shadow"]
LOOP_FIELDS = ["requests", "timeout_us", "nqueues", "nsid", "opcode", "blocks", "block_size", "count", "done",
               "errors"]
QUICK = dict(count=256, rounds=1)
BY_READS, BY_WRITES = "QEMU's query-blockstats rd_operations", "QEMU's query-blockstats wr_operations"


class NativeNvmeLoop:
    """guests/proxy/native.c's queue loop on queue pairs the Python driver created. It takes
    each queue's state (tail, head, phase) over and hands it back, so both sides share them."""

    def __init__(self, bus: ProxyBus, nvme: Nvme, max_count: int) -> None:
        self.bus, self.nvme, self.abi = bus, nvme, bus.abi
        self.dev = nvme.dev
        self.block = self.dev.dma_alloc(self.abi.sizeof("proxy_nvme_loop"), 64)
        self.requests = RequestList(self.dev, self.abi, max_count)
        self._loop = self.abi.packer("proxy_nvme_loop", LOOP_FIELDS)
        self._queue = self.abi.packer("proxy_nvme_queue", QUEUE_FIELDS)
        self._queues_at = self.abi.offsetof("proxy_nvme_loop", "queues")
        self._queue_size = self.abi.sizeof("proxy_nvme_queue")
        self._loop_at = self.abi.offsetof("proxy_nvme_loop", LOOP_FIELDS[0])

    def close(self) -> None:
        self.dev.dma_free(self.block)
        self.requests.free()

    def prepare(self, ns: Namespace, requests: Sequence[tuple[int, DmaBuffer]], blocks: int, depth: int,
                queues: Sequence[QueuePair], opcode: int = Nvm.READ) -> Run:
        """Lay out ``requests`` (lba, buffer), request i for queue i % len(queues); the
        returned run completes them all and returns how many completed without error."""
        self.requests.fill(requests)
        self._loop.pack_into(self.block.view, self._loop_at, self.requests.phys, 8_000_000, len(queues), ns.nsid,
                             opcode, blocks, ns.sector_size, len(requests), 0, 0)

        def run() -> int:
            lent = [q.state() for q in queues]      # the queues as the Python driver left them
            for k, state in enumerate(lent):
                self._lend(k, state, min(depth, queues[k].depth))
            try:
                raw.native_loop(self.nvme.dev.channel, self.abi.PROXY_OP_NVME_LOOP, self.block.phys, "native nvme loop")
            finally:
                for k, state in enumerate(lent):    # and back, whatever happened
                    queues[k].resume(self._taken_back(k, state))
            fields = dict(zip(LOOP_FIELDS, self._loop.unpack_from(self.block.view, self._loop_at)))
            if fields["errors"]:
                raise RuntimeError(f"the native nvme loop saw {fields['errors']} errors in {fields['done']} commands")
            return int(fields["done"])
        return run

    def _queue_at(self, k: int) -> int:
        """Where queue k's fields start in the block."""
        return self._queues_at + k * self._queue_size + self.abi.offsetof("proxy_nvme_queue", QUEUE_FIELDS[0])

    def _lend(self, k: int, state: QueueState, depth: int) -> None:
        """Queue k's place and state into the loop's block, ``depth`` commands in flight at most."""
        values = [depth if name == "depth" else getattr(state, name) for name in QUEUE_FIELDS]
        self._queue.pack_into(self.block.view, self._queue_at(k), *values)

    def _taken_back(self, k: int, lent: QueueState) -> QueueState:
        """Queue k as the loop left it: ``lent`` with the indices it moved."""
        fields = dict(zip(QUEUE_FIELDS, self._queue.unpack_from(self.block.view, self._queue_at(k))))
        return dataclasses.replace(lent, tail=fields["tail"], head=fields["head"], phase=fields["phase"],
                                   acked=fields["acked"])


def machine(stack: contextlib.ExitStack, accel: str, images: Sequence[Path], iommu: bool | None = None,
            ioeventfd: Sequence[bool] = ()) -> tuple[ProxyMachine, str]:
    """A machine with an NVMe controller per image (``nvme0``, ``nvme1``, ...; ``ioeventfd[k]``
    turns QEMU's ioeventfds on for controller k), each namespace on the fastest disk backend
    QEMU has (on_fastest_aio)."""
    def spec(aio: str) -> MachineSpec:
        spec = proxy_spec(accel=accel, iommu=iommu)
        for k, image in enumerate(images):
            extra = {"ioeventfd": "on"} if k < len(ioeventfd) and ioeventfd[k] else {}
            spec.nvme([{"file": str(image), "format": "raw", "aio": aio}], id=f"nvme{k}",
                      serial=f"HWH-NVME-{k + 1}", **extra)
        return spec
    return on_fastest_aio(stack, "bench-nvme", spec)


def counted(pm: ProxyMachine, key: str) -> int:
    """Operations QEMU's block layer has completed on every side's namespace (rd_ or
    wr_operations): a run moves only its own side's."""
    found = {drive: int(entry["stats"][key]) for entry in pm.machine.qmp("query-blockstats")
             for drive in DRIVES if entry.get("device") == drive or entry.get("qdev", "").endswith(drive)}
    if len(found) != len(DRIVES):
        raise MachineError(f"query-blockstats lacks a drive of {DRIVES}")
    return sum(found.values())


class NvmeBench:
    """The bench's controllers (one per side: SIDES), namespaces, buffers and native loop on
    ``pm``, and its workloads: each side's setup draws the round's requests, or takes those
    the other side drew."""

    def __init__(self, stack: contextlib.ExitStack, pm: ProxyMachine, count: int) -> None:
        self.pm, self.count = pm, count
        self.controllers: dict[str, Nvme] = {}
        for k, side in enumerate(SIDES):
            controller = Nvme.open(pm.bus, k, queues=2, ioeventfds=side == "ioeventfd")
            stack.callback(controller.close)
            self.controllers[side] = controller
        if self.controllers["ioeventfd"].queues[0].eventfds is None:
            raise MachineError("QEMU's ioeventfds could not be taken from its process (see harness.machine.ioeventfd)")
        self.ns = {side: c.namespaces()[0] for side, c in self.controllers.items()}
        # each side's buffers in its controller's domain; the data are moved, not looked at
        self.small = {side: [c.dev.dma_alloc(4096) for _ in range(128)] for side, c in self.controllers.items()}
        self.big = {side: c.dev.dma_alloc(128 << 10) for side, c in self.controllers.items()}
        stack.callback(lambda: [c.dev.dma_free(b) for side, c in self.controllers.items()
                                for b in self.small[side] + [self.big[side]]])
        self.loop = NativeNvmeLoop(pm.bus, self.controllers["native"], count)
        stack.callback(self.loop.close)
        self.rng = random.Random(1)
        self.blocks = (DISK_BYTES >> 12) - 1      # 4 KiB blocks, LBAs 8-aligned
        self.queued = count // 64 * 64
        self.seq = min(count, (DISK_BYTES >> 17) - 1)
        self.drawn: dict[str, list[int]] = {}

    def workloads(self) -> list[Workload]:
        """The five workloads with the Python driver as machines get it, then with its
        doorbells as ioeventfds (keys ``ioeventfd_...``), each against the C loop."""
        count, queued, seq = self.count, self.queued, self.seq
        first, second = self.controllers["native"].queues
        reads = dict(counter=self.reads, counted_by=BY_READS)
        workloads = []
        for side, prefix in (("python", ""), ("ioeventfd", "ioeventfd_")):
            workloads += [
                Workload(f"{prefix}randread_4k_qd1_iops", self.python_qd1(side, prefix + "qd1"),
                         self.native(prefix + "qd1", count, 8, 1, [first]), count, **reads),
                Workload(f"{prefix}randread_4k_qd32_iops", self.python_queued(side, prefix + "qd32"),
                         self.native(prefix + "qd32", queued, 8, 32, [first]), queued, **reads),
                Workload(f"{prefix}randread_4k_qd32x2_iops", self.python_two_queues(side, prefix + "qd32x2"),
                         self.native(prefix + "qd32x2", queued, 8, 32, [first, second]), queued, **reads),
                Workload(f"{prefix}seqread_128k_mbps", self.python_seq(side),
                         self.native("seq", seq, 256, 1, [first]), seq, scale=128 / 1024, **reads),
                Workload(f"{prefix}randwrite_4k_qd32_iops", self.python_queued(side, prefix + "w32", write=True),
                         self.native(prefix + "w32", queued, 8, 32, [first], Nvm.WRITE), queued,
                         counter=self.writes, counted_by=BY_WRITES),
            ]
        return workloads

    def reads(self) -> int:
        return counted(self.pm, "rd_operations")

    def writes(self) -> int:
        return counted(self.pm, "wr_operations")

    # ---- the requests ----

    def same(self, key: str, n: int, side: str) -> list[tuple[int, DmaBuffer]]:
        """The round's requests, into ``side``'s buffers: their blocks drawn by whichever side
        goes first, handed to the other. Distinct blocks: queued writes to one block would
        have no order (the driver refuses them)."""
        drawn = self.drawn
        lbas = drawn.pop(key) if key in drawn else drawn.setdefault(
            key, [block * 8 for block in self.rng.sample(range(self.blocks), n)])
        small = self.small[side]
        return [(lba, small[i % len(small)]) for i, lba in enumerate(lbas)]

    def sequential(self, side: str) -> list[tuple[int, DmaBuffer]]:
        return [(i * 256, self.big[side]) for i in range(self.seq)]

    # ---- the Python side: each returns a setup, which returns the timed run ----

    def python_qd1(self, side: str, key: str) -> Callable[[], Run]:
        def setup() -> Run:
            requests, ns = self.same(key, self.count, side), self.ns[side]

            def go() -> int:
                for lba, buffer in requests:
                    ns.read_into(lba, [buffer])
                return len(requests)
            return go
        return setup

    def python_queued(self, side: str, key: str, write: bool = False) -> Callable[[], Run]:
        def setup() -> Run:
            requests, ns = self.same(key, self.queued, side), self.ns[side]

            def go() -> int:
                (ns.write_queued_from if write else ns.read_queued_into)(requests, depth=32)
                return len(requests)
            return go
        return setup

    def python_two_queues(self, side: str, key: str) -> Callable[[], Run]:
        def setup() -> Run:
            requests = self.same(key, self.queued, side)
            ns, queues = self.ns[side], self.controllers[side].queues

            def go() -> int:        # request i on queue i % 2, as the native loop splits them
                ns.read_queued_into(requests, depth=32, queues=queues)
                return len(requests)
            return go
        return setup

    def python_seq(self, side: str) -> Callable[[], Run]:
        def setup() -> Run:
            ns, big, seq = self.ns[side], self.big[side], self.seq

            def go() -> int:
                for i in range(seq):
                    ns.read_into(i * 256, [big])
                return seq
            return go
        return setup

    # ---- the native side ----

    def native(self, key: str, n: int, blocks: int, depth: int, queues: Sequence[QueuePair],
               opcode: int = Nvm.READ) -> Callable[[], Run]:
        return lambda: self.loop.prepare(self.ns["native"], self.sequential("native") if key == "seq"
                                         else self.same(key, n, "native"), blocks, depth, queues, opcode)


def run(accel: str, count: int = 2000, rounds: int = 9, quick: bool = False,
        iommu: bool | None = None) -> dict[str, object]:
    """Python and native take turns, workload by workload, as ``paired.run_rounds`` does."""
    if quick:
        count, rounds = QUICK["count"], QUICK["rounds"]
    with tempfile.TemporaryDirectory(prefix="hwharness-bench-") as tmp, contextlib.ExitStack() as stack:
        images = [Path(tmp) / f"{side}.img" for side in SIDES]
        for image in images:        # made alike: a copy (copy_file_range) took random writes
            _disk_image(image)      # at twice the rate of the file written here (86-100 k IOPS
                                    # against 38-57 k, either side)
        pm, aio = machine(stack, accel, images, iommu, ioeventfd=[side == "ioeventfd" for side in SIDES])
        accel = pm.machine.accel
        if accel == "kvm" and not quick:     # the guest is emulated here: keep the run short
            count = min(count, 500)
        bench = NvmeBench(stack, pm, count)
        figures = clock_figures(pm, bench.controllers["python"].dev.channel.guest_time)
        result = run_rounds([bench.workloads()], rounds, [pm])
    return {"benchmark": "nvme", "accel": {"python": accel, "native": accel}, "aio": aio, "quick": quick,
            **figures, **result}
