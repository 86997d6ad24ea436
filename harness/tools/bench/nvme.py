"""``hwharness bench nvme``: the Python NVMe driver against an in-guest C loop, same queues, same run.

Random 4 KiB reads one at a time (QD1), 32 in flight on one queue pair, 32
in flight on each of two queue pairs (two Python threads; the C loop drives
both queues in turns), sequential 128 KiB reads, and random 4 KiB writes at
QD32. Both sides run the same requests (drawn once per round on the host) on
the queue pairs the Python driver created, into the same DMA buffers, with one
doorbell batch per round, and check no data; QEMU's ``query-blockstats`` must
count exactly the operations each run was given. Measured as ``paired.py``
describes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

from drivers.nvme import Namespace, Nvme, QueuePair
from drivers.nvme.regs import DOORBELL_BASE, Nvm

from ...access import DmaBuffer
from ...errors import MachineError
from ...proxy import ProxyBus, ProxyMachine, proxy_spec, raw
from .ahci import DISK_BYTES, _disk_image, on_fastest_aio
from .paired import Run, Workload, clock_figures, run_rounds
from .requests import RequestList

log = logging.getLogger(__name__)

DRIVE = "nvme0-ns1"
QUEUE_FIELDS = ["sq", "cq", "prp_lists", "entries", "depth", "sq_doorbell", "cq_doorbell", "tail", "head",
                "phase", "acked"]
LOOP_FIELDS = ["requests", "timeout_us", "nqueues", "nsid", "opcode", "blocks", "block_size", "count", "done",
               "errors"]
QUICK = dict(count=256, rounds=1)


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

    def close(self) -> None:
        self.dev.dma_free(self.block)
        self.requests.free()

    def prepare(self, ns: Namespace, requests: Sequence[tuple[int, DmaBuffer]], blocks: int, depth: int,
                queues: Sequence[QueuePair], opcode: int = Nvm.READ) -> Run:
        """Lay out ``requests`` (lba, buffer), request i for queue i % len(queues); the
        returned run completes them all and returns how many completed without error."""
        self.requests.fill(requests)
        self._loop.pack_into(self.block.view, self.abi.offsetof("proxy_nvme_loop", LOOP_FIELDS[0]),
                             self.requests.phys, 8_000_000, len(queues), ns.nsid, opcode, blocks, ns.sector_size,
                             len(requests), 0, 0)
        channel, stride = self.nvme.dev.channel, self.nvme.doorbell_stride

        def place(k: int) -> int:
            """Where queue k's fields start in the block."""
            return self._queues_at + k * self._queue_size + self.abi.offsetof("proxy_nvme_queue", QUEUE_FIELDS[0])

        def run() -> int:
            for k, q in enumerate(queues):          # the queues as the Python driver left them
                self._queue.pack_into(self.block.view, place(k), q.sq.phys, q.cq.phys, q.prp_lists.phys,
                                      q.entries, min(depth, q.depth), DOORBELL_BASE + 2 * q.qid * stride,
                                      DOORBELL_BASE + (2 * q.qid + 1) * stride, q.tail, q.head, q.phase, q.acked)
            try:
                raw.native_loop(channel, self.abi.PROXY_OP_NVME_LOOP, self.block.phys, "native nvme loop")
            finally:
                for k, q in enumerate(queues):      # and back, whatever happened
                    fields = dict(zip(QUEUE_FIELDS, self._queue.unpack_from(self.block.view, place(k))))
                    q.resume(fields["tail"], fields["head"], fields["phase"], fields["acked"])
            fields = dict(zip(LOOP_FIELDS, self._loop.unpack_from(
                self.block.view, self.abi.offsetof("proxy_nvme_loop", LOOP_FIELDS[0]))))
            if fields["errors"]:
                raise RuntimeError(f"the native nvme loop saw {fields['errors']} errors in {fields['done']} commands")
            return int(fields["done"])
        return run


def machine(stack: contextlib.ExitStack, accel: str, image: Path) -> tuple[ProxyMachine, str]:
    """A machine whose NVMe namespace is on the fastest disk backend QEMU has (see bench ahci)."""
    return on_fastest_aio(stack, "bench-nvme",
                          lambda aio: proxy_spec(accel=accel).nvme([{"file": str(image), "format": "raw", "aio": aio}]))


def counted(pm: ProxyMachine, key: str) -> int:
    """Operations QEMU's block layer has completed on the bench's namespace (rd_ or wr_operations)."""
    for entry in pm.machine.qmp("query-blockstats"):
        if entry.get("device") == DRIVE or entry.get("qdev", "").endswith(DRIVE):
            return int(entry["stats"][key])
    raise MachineError(f"query-blockstats has no drive {DRIVE!r}")


def run(accel: str, count: int = 2000, rounds: int = 9, quick: bool = False) -> dict[str, object]:
    """Python and native take turns, workload by workload, as ``paired.run_rounds`` does."""
    if quick:
        count, rounds = QUICK["count"], QUICK["rounds"]
    with tempfile.TemporaryDirectory(prefix="hwharness-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        _disk_image(image)
        with contextlib.ExitStack() as stack:
            pm, aio = machine(stack, accel, image)
            accel = pm.machine.accel
            if accel == "kvm" and not quick:     # the guest is emulated here: keep the run short
                count = min(count, 500)
            nvme = Nvme.open(pm.bus, queues=2)
            stack.callback(nvme.close)
            ns = nvme.namespaces()[0]
            first, second = nvme.queues
            bus = pm.bus
            dev = nvme.dev
            small = [dev.dma_alloc(4096) for _ in range(128)]       # the data are moved, not looked at
            big = dev.dma_alloc(128 << 10)
            stack.callback(lambda: [dev.dma_free(b) for b in small + [big]])
            loop = NativeNvmeLoop(bus, nvme, count)
            stack.callback(loop.close)
            rng = random.Random(1)
            blocks = (DISK_BYTES >> 12) - 1      # 4 KiB blocks, LBAs 8-aligned
            queued = count // 64 * 64
            seq = min(count, (DISK_BYTES >> 17) - 1)
            figures = clock_figures(pm, nvme.dev.channel.guest_time)

            def random_requests(n: int) -> list[tuple[int, DmaBuffer]]:
                """Distinct blocks: queued writes to one block would have no order (the driver refuses them)."""
                return [(block * 8, small[i % len(small)]) for i, block in enumerate(rng.sample(range(blocks), n))]

            drawn: dict[str, list[tuple[int, DmaBuffer]]] = {}

            def same(key: str, n: int) -> list[tuple[int, DmaBuffer]]:
                """The round's requests: drawn by whichever side goes first, handed to the other."""
                return drawn.pop(key) if key in drawn else drawn.setdefault(key, random_requests(n))

            def python_qd1() -> Run:
                requests = same("qd1", count)
                def go() -> int:
                    for lba, buffer in requests:
                        ns.read_into(lba, [buffer])
                    return len(requests)
                return go

            def python_queued(key: str, write: bool = False) -> Callable[[], Run]:
                def setup() -> Run:
                    requests = same(key, queued)
                    def go() -> int:
                        (ns.write_queued_from if write else ns.read_queued_into)(requests, depth=32)
                        return len(requests)
                    return go
                return setup

            def python_two_queues() -> Run:
                requests = same("qd32x2", queued)
                halves = [requests[0::2], requests[1::2]]   # as the native loop splits them
                def go() -> int:
                    errors: list[BaseException] = []
                    def worker(k: int) -> None:
                        try:
                            ns.on(nvme.queues[k]).read_queued_into(halves[k], depth=32)
                        except BaseException as exc:      # noqa: BLE001 - raised below
                            errors.append(exc)
                    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    if errors:
                        raise errors[0]
                    return len(requests)
                return go

            def python_seq() -> Run:
                def go() -> int:
                    for i in range(seq):
                        ns.read_into(i * 256, [big])
                    return seq
                return go

            def native(key: str, n: int, blocks_: int, depth: int, queues: Sequence[QueuePair],
                       opcode: int = Nvm.READ) -> Callable[[], Run]:
                return lambda: loop.prepare(ns, same(key, n) if key != "seq" else [(i * 256, big) for i in range(seq)],
                                            blocks_, depth, queues, opcode)

            def reads() -> int:
                return counted(pm, "rd_operations")

            def writes() -> int:
                return counted(pm, "wr_operations")

            by_reads, by_writes = "QEMU's query-blockstats rd_operations", "QEMU's query-blockstats wr_operations"
            workloads = [
                Workload("randread_4k_qd1_iops", python_qd1, native("qd1", count, 8, 1, [first]), count,
                         counter=reads, counted_by=by_reads),
                Workload("randread_4k_qd32_iops", python_queued("qd32"), native("qd32", queued, 8, 32, [first]),
                         queued, counter=reads, counted_by=by_reads),
                Workload("randread_4k_qd32x2_iops", python_two_queues,
                         native("qd32x2", queued, 8, 32, [first, second]), queued, counter=reads, counted_by=by_reads),
                Workload("seqread_128k_mbps", python_seq, native("seq", seq, 256, 1, [first]), seq, scale=128 / 1024,
                         counter=reads, counted_by=by_reads),
                Workload("randwrite_4k_qd32_iops", python_queued("w32", write=True),
                         native("w32", queued, 8, 32, [first], Nvm.WRITE), queued, counter=writes,
                         counted_by=by_writes),
            ]
            result = run_rounds([workloads], rounds, [pm])
    return {"benchmark": "nvme", "accel": {"python": accel, "native": accel}, "aio": aio, "quick": quick,
            **figures, **result}
