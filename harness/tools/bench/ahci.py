"""``hwharness bench ahci``: the Python AHCI driver against an in-guest C loop, same port, same run.

Random 4 KiB reads one at a time (queue depth 1), random 4 KiB reads with NCQ
keeping 32 in flight, and sequential 128 KiB reads. Both sides read the same
4 KiB-aligned LBAs (drawn once per round on the host) into the same DMA
buffers, make the same register writes per command and round, and check no
data; QEMU's ``query-blockstats`` must count exactly the reads each run was
given. Where they wait differs: the loop polls PxCI or PxIS guest-side, the
driver watches the FIS the HBA writes into host-mapped memory
(docs/benchmarks.md has the table). Measured as ``paired.py`` describes.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from pathlib import Path
from typing import Sequence

from drivers.ahci import Ahci
from drivers.ahci.driver import TABLE_SIZE, Port

from ...access import DmaBuffer
from ...errors import MachineError
from ...machine import MachineSpec
from ...proxy import ProxyBus, ProxyMachine, ProxyWindows, on_fastest_aio, proxy_spec, raw
from .paired import Run, Workload, add_peer, clock_figures, run_rounds
from .requests import RequestList

DISK_BYTES = 256 << 20
DRIVE = "disk0"
LOOP_FIELDS = ["command_list", "tables", "requests", "timeout_us", "table_size", "port_offset", "sectors", "count",
               "depth", "done", "errors"]
QUICK = dict(count=256, rounds=1)


class NativeDiskLoop:
    """guests/proxy/native.c's read loop on a port the Python driver set up."""

    def __init__(self, bus: ProxyBus, port: Port, max_count: int) -> None:
        self.bus, self.port, self.abi = bus, port, bus.abi
        self.dev = port.hba.dev
        self.block = self.dev.dma_alloc(self.abi.sizeof("proxy_disk_loop"), 64)
        self.requests = RequestList(self.dev, self.abi, max_count)
        self._pack = self.abi.packer("proxy_disk_loop", LOOP_FIELDS)

    def close(self) -> None:
        self.dev.dma_free(self.block)
        self.requests.free()

    def prepare(self, requests: Sequence[tuple[int, DmaBuffer]], sectors: int, depth: int) -> Run:
        """Lay out ``requests`` (lba, buffer) and the slots' headers; the returned run
        reads them all and returns how many completed."""
        self.requests.fill(requests)
        for slot in range(depth):               # the driver's own commands; the loop sets LBAs and addresses
            self.port.lay_out_read(slot, sectors, requests[0][1].phys, queued=depth > 1)
        self._pack.pack_into(self.block.view, 0, self.port.command_list.phys, self.port.tables.phys,
                             self.requests.phys, 8_000_000, TABLE_SIZE, self.port.base, sectors, len(requests),
                             depth, 0, 0)
        channel = self.port.hba.dev.channel

        def run() -> int:
            raw.native_loop(channel, self.abi.PROXY_OP_DISK_READ_LOOP, self.block.phys, "native disk loop")
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


def machine(stack: contextlib.ExitStack, accel: str, image: Path, iommu: bool | None = True,
            name: str = "bench-ahci") -> tuple[ProxyMachine, str]:
    """A machine with the disk on the AHCI controller's first port. The image is not
    locked: a second machine (the other IOMMU setting) reads it too."""
    def spec_for(aio: str) -> MachineSpec:
        spec = proxy_spec(accel=accel, iommu=iommu)
        spec.drive(file=str(image), format="raw", id=DRIVE, aio=aio, **{"if": "none", "file.locking": "off"})
        spec.device("ide-hd", drive=DRIVE, bus="ide.0")
        return spec
    return on_fastest_aio(stack, name, spec_for)


class DiskRig:
    """One machine's disk, its DMA buffers and its native loop: the sides of every workload.
    Reads land in buffer i % 128 (QD1: buffer 0): the data are moved, not looked at."""

    def __init__(self, stack: contextlib.ExitStack, pm: ProxyMachine, count: int) -> None:
        self.pm = pm
        hba = Ahci.open(pm.bus)
        stack.callback(hba.close)
        self.disk = hba.disks()[0]
        dev = hba.dev
        self.small = [dev.dma_alloc(4096) for _ in range(128)]
        self.big = dev.dma_alloc(128 << 10)
        stack.callback(lambda: [dev.dma_free(b) for b in self.small + [self.big]])
        self.native = NativeDiskLoop(pm.bus, self.disk, count)
        stack.callback(self.native.close)

    def requests(self, lbas: Sequence[int], spread: bool) -> list[tuple[int, DmaBuffer]]:
        return [(lba, self.small[i % len(self.small)] if spread else self.small[0]) for i, lba in enumerate(lbas)]

    def python_one_by_one(self, lbas: Sequence[int], big: bool = False) -> Run:
        disk, buffers = self.disk, [self.big] if big else [self.small[0]]

        def go() -> int:
            for lba in lbas:
                disk.read_into(lba, buffers)
            return len(lbas)
        return go

    def python_queued(self, lbas: Sequence[int]) -> Run:
        requests = self.requests(lbas, True)

        def go() -> int:
            self.disk.read_queued_into(requests)
            return len(requests)
        return go

    def native_one_by_one(self, lbas: Sequence[int], big: bool = False) -> Run:
        if big:
            return self.native.prepare([(lba, self.big) for lba in lbas], 256, 1)
        return self.native.prepare(self.requests(lbas, False), 8, 1)

    def native_queued(self, lbas: Sequence[int]) -> Run:
        return self.native.prepare(self.requests(lbas, True), 8, 32)

    def reads_counted(self) -> int:
        """Read commands QEMU's block layer has completed on the bench's drive."""
        for entry in self.pm.machine.qmp("query-blockstats"):
            if entry.get("device") == DRIVE:
                return int(entry["stats"]["rd_operations"])
        raise MachineError(f"query-blockstats has no drive {DRIVE!r}")


class Draw:
    """Each round's LBAs: drawn by whichever side goes first, handed to the other."""

    def __init__(self, blocks: int) -> None:
        self.rng, self.blocks = random.Random(1), blocks
        self.drawn: dict[str, list[int]] = {}

    def __call__(self, key: str, n: int) -> list[int]:
        if key in self.drawn:
            return self.drawn.pop(key)
        lbas = self.drawn[key] = [self.rng.randrange(self.blocks) * 8 for _ in range(n)]   # 4 KiB-aligned
        return lbas


def workloads(a: DiskRig, b: DiskRig, draw: Draw, count: int, native: bool) -> list[Workload]:
    """The three workloads, ``a``'s Python driver against ``b``'s native loop (``native``) or
    against ``b``'s Python driver (the IOMMU's cost: the same driver on two machines)."""
    queued, seq = count // 32 * 32, min(count, (DISK_BYTES >> 17) - 1)
    sequential = [i * 256 for i in range(seq)]
    if native:
        other = (lambda: b.native_one_by_one(draw("qd1", count)), lambda: b.native_queued(draw("qd32", queued)),
                 lambda: b.native_one_by_one(sequential, big=True))
    else:
        other = (lambda: b.python_one_by_one(draw("qd1", count)), lambda: b.python_queued(draw("qd32", queued)),
                 lambda: b.python_one_by_one(sequential, big=True))
    out = [Workload("randread_4k_qd1_iops", lambda: a.python_one_by_one(draw("qd1", count)), other[0], count),
           Workload("randread_4k_qd32_iops", lambda: a.python_queued(draw("qd32", queued)), other[1], queued),
           Workload("seqread_128k_mbps", lambda: a.python_one_by_one(sequential, big=True), other[2], seq,
                    scale=128 / 1024)]
    if native:                                  # one machine: its block layer counts both sides
        for w in out:
            w.counter, w.counted_by = a.reads_counted, "QEMU's query-blockstats rd_operations"
    return out


def run(accel: str, count: int = 2000, rounds: int = 15, quick: bool = False, iommu: bool | None = None,
        iommu_cost: bool = True, peer: str | None = None) -> dict[str, object]:
    """Python and native take turns, workload by workload, as ``paired.run_rounds`` does; then
    (``iommu_cost``) the Python driver with the IOMMU on against the same with it off, on
    two machines, the same way; then (``peer="linux"``) Linux's own driver on the same disk."""
    if quick:
        count, rounds = QUICK["count"], QUICK["rounds"]
    iommu = proxy_spec(accel=accel, iommu=iommu).plugin(ProxyWindows).iommu      # the caller's choice, or the default
    with tempfile.TemporaryDirectory(prefix="hwharness-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        _disk_image(image)
        with contextlib.ExitStack() as stack:
            pm, aio = machine(stack, accel, image, iommu)
            accel = pm.machine.accel
            if accel == "kvm" and not quick:     # the guest is emulated here: keep the run short
                count = min(count, 500)
            rig = DiskRig(stack, pm, count)
            draw = Draw((DISK_BYTES >> 12) - 1)
            figures = clock_figures(pm, rig.disk.hba.dev.channel.guest_time)
            result = run_rounds([workloads(rig, rig, draw, count, native=True)], rounds, [pm])
            if iommu_cost:
                other_pm, _ = machine(stack, accel, image, not iommu, name="bench-ahci-other")
                other = DiskRig(stack, other_pm, count)
                on, off = (rig, other) if iommu else (other, rig)
                cost = run_rounds([workloads(on, off, draw, count, native=False)], rounds, [pm, other_pm],
                                  sides=("iommu_on", "iommu_off"))
                result["iommu_cost"] = min(v for k, v in cost["results"].items() if k.startswith("ratio_"))
                result["iommu_rounds"] = cost
            iommu = pm.bus.iommu
        if peer == "linux":
            from . import peer_linux
            drive = {"format": "raw", "id": DRIVE, "aio": aio, "if": "none", "file.locking": "off"}
            linux = peer_linux.disk(accel, image, drive, count, min(count, (DISK_BYTES >> 17) - 1))
            add_peer(result, linux)
    return {"benchmark": "ahci", "accel": {"python": accel, "native": accel}, "aio": aio, "quick": quick,
            "iommu": iommu, **figures, **result}
