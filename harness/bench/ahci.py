"""``hwharness bench ahci``: the Python AHCI driver against an in-guest C loop, same port, same run.

Random 4 KiB reads one at a time (queue depth 1), random 4 KiB reads with NCQ
keeping 32 in flight, and sequential 128 KiB reads. Both sides read the same
4 KiB-aligned LBAs (drawn once per round on the host) into the same DMA
buffers, make the same register accesses per command and round, and check no
data; QEMU's ``query-blockstats`` must count exactly the reads each run was
given. Measured as ``paired.py`` describes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import struct
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from drivers.ahci import Ahci
from drivers.ahci.driver import TABLE_SIZE, Port
from drivers.ahci.regs import Ata

from ..access import DmaBuffer
from ..errors import MachineError
from ..proxy import ProxyBus, ProxyMachine, proxy_spec
from .paired import Run, Workload, clock_figures, run_rounds

log = logging.getLogger(__name__)

DISK_BYTES = 256 << 20
DRIVE = "disk0"
LOOP_FIELDS = ["command_list", "tables", "requests", "timeout_us", "table_size", "port_offset", "sectors", "count",
               "depth", "done", "errors"]
REQUEST = struct.Struct("<QQ")          # struct proxy_disk_request: lba, phys
QUICK = dict(count=256, rounds=1)


class NativeDiskLoop:
    """guests/proxy/native.c's read loop on a port the Python driver set up."""

    def __init__(self, bus: ProxyBus, port: Port, max_count: int) -> None:
        self.bus, self.port, self.abi = bus, port, bus.abi
        self.dev = port.hba.dev
        self.block = self.dev.dma_alloc(self.abi.sizeof("proxy_disk_loop"), 64)
        self.requests = self.dev.dma_alloc(max_count * REQUEST.size, 64)
        self._pack = self.abi.packer("proxy_disk_loop", LOOP_FIELDS)

    def close(self) -> None:
        self.dev.dma_free(self.block)
        self.dev.dma_free(self.requests)

    def prepare(self, requests: Sequence[tuple[int, DmaBuffer]], sectors: int, depth: int) -> Run:
        """Lay out ``requests`` (lba, buffer) and the slots' headers; the returned run
        reads them all and returns how many completed."""
        if len(requests) * REQUEST.size > self.requests.size:
            raise ValueError(f"{len(requests)} requests do not fit the native loop's list")
        for i, (lba, buffer) in enumerate(requests):
            REQUEST.pack_into(self.requests.view, i * REQUEST.size, lba, buffer.phys)
        command = Ata.READ_FPDMA_QUEUED if depth > 1 else Ata.READ_DMA_EXT
        for slot in range(depth):               # headers and PRD sizes, as the Python path sets them
            self.port._prepare(slot, command, 0, sectors, regions=[(requests[0][1].phys, sectors * 512)])
        self._pack.pack_into(self.block.view, 0, self.port.command_list.phys, self.port.tables.phys,
                             self.requests.phys, 8_000_000, TABLE_SIZE, self.port.base, sectors, len(requests),
                             depth, 0, 0)
        channel = self.port.hba.dev.channel

        def run() -> int:
            channel.control(self.abi.PROXY_OP_DISK_READ_LOOP, self.block.phys, 0, "native disk loop")
            fields = dict(zip(LOOP_FIELDS, self._pack.unpack_from(self.block.view, 0)))
            if fields["errors"]:
                self.port.recover()
                raise RuntimeError(f"the native disk loop failed after {fields['done']} commands")
            return int(fields["done"])
        return run


def _disk_image(path: Path) -> None:
    """A disk of random bytes, read once so the host's page cache holds it: both sides
    then read from memory, and neither pays for the first touch of a sparse file."""
    with open(path, "wb") as f:
        for _ in range(DISK_BYTES >> 20):
            f.write(random.randbytes(1 << 20))
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def machine(stack: contextlib.ExitStack, accel: str, image: Path, name: str = "bench-ahci") -> tuple[ProxyMachine, str]:
    """A machine with the disk on QEMU's io_uring backend where QEMU has one: its
    thread pool, the fallback, adds worker threads that fight the vCPU for two cores,
    and both sides' figures then swing by twofold from run to run."""
    for aio in ("io_uring", "threads"):
        spec = proxy_spec(accel=accel)
        spec.drive(file=str(image), format="raw", id=DRIVE, aio=aio, **{"if": "none"})
        spec.device("ide-hd", drive=DRIVE, bus="ide.0")
        try:
            return stack.enter_context(ProxyMachine(spec, name=name)), aio
        except MachineError as exc:
            if aio == "threads":
                raise
            log.warning("QEMU refused aio=io_uring (%s); the disk uses its thread pool", str(exc).splitlines()[0])
    raise AssertionError("unreachable")


def reads_counted(pm: ProxyMachine) -> int:
    """Read commands QEMU's block layer has completed on the bench's drive."""
    for entry in pm.machine.qmp("query-blockstats"):
        if entry.get("device") == DRIVE:
            return int(entry["stats"]["rd_operations"])
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
            hba = Ahci.open(pm.bus)
            stack.callback(hba.close)
            disk = hba.disks()[0]
            bus = pm.bus
            # Reads land in buffer i % 128: the data are not looked at, only moved.
            dev = hba.dev
            small = [dev.dma_alloc(4096) for _ in range(128)]
            big = dev.dma_alloc(128 << 10)
            stack.callback(lambda: [dev.dma_free(b) for b in small + [big]])
            native = NativeDiskLoop(bus, disk, count)
            stack.callback(native.close)
            rng = random.Random(1)
            blocks = (DISK_BYTES >> 12) - 1     # 4 KiB blocks, LBAs 8-aligned
            queued = count // 32 * 32
            seq = min(count, (DISK_BYTES >> 17) - 1)
            figures = clock_figures(pm, disk.hba.dev.channel.guest_time)

            def random_reads(n: int, spread: bool) -> list[tuple[int, DmaBuffer]]:
                return [(rng.randrange(blocks) * 8, small[i % len(small)] if spread else small[0]) for i in range(n)]

            drawn: dict[str, list[tuple[int, DmaBuffer]]] = {}

            def same_lbas(key: str, make: Callable[[], list[tuple[int, DmaBuffer]]]) -> list[tuple[int, DmaBuffer]]:
                """The round's requests: drawn by whichever side goes first, handed to the other."""
                return drawn.pop(key) if key in drawn else drawn.setdefault(key, make())

            def python_qd1() -> Run:
                requests = same_lbas("qd1", lambda: random_reads(count, False))
                def go() -> int:
                    for lba, buffer in requests:
                        disk.read_into(lba, [buffer])
                    return len(requests)
                return go

            def python_qd32() -> Run:
                requests = same_lbas("qd32", lambda: random_reads(queued, True))
                def go() -> int:
                    disk.read_queued_into(requests)
                    return len(requests)
                return go

            def python_seq() -> Run:
                def go() -> int:
                    for i in range(seq):
                        disk.read_into(i * 256, [big])
                    return seq
                return go

            workloads = [
                Workload("randread_4k_qd1_iops", python_qd1,
                         lambda: native.prepare(same_lbas("qd1", lambda: random_reads(count, False)), 8, 1),
                         count),
                Workload("randread_4k_qd32_iops", python_qd32,
                         lambda: native.prepare(same_lbas("qd32", lambda: random_reads(queued, True)), 8, 32),
                         queued),
                Workload("seqread_128k_mbps", python_seq,
                         lambda: native.prepare([(i * 256, big) for i in range(seq)], 256, 1),
                         seq, scale=128 / 1024),
            ]
            for w in workloads:
                w.counter, w.counted_by = (lambda: reads_counted(pm)), "QEMU's query-blockstats rd_operations"
            result = run_rounds([workloads], rounds, pm)
    return {"benchmark": "ahci", "accel": {"python": accel, "native": accel}, "aio": aio, "quick": quick,
            **figures, **result}
