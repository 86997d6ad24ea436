"""``hwharness bench ahci``: the Python AHCI driver against an in-guest C loop, same port, same run.

Random 4 KiB reads one at a time (queue depth 1), random 4 KiB reads with NCQ
keeping 32 in flight, and sequential 128 KiB reads. Data land in DMA buffers
and stay there: no byte passes through Python on the timed path.
"""

from __future__ import annotations

import contextlib
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

from drivers.ahci import Ahci
from drivers.ahci.driver import TABLE_SIZE, Port
from drivers.ahci.regs import Ata

from ..errors import MachineError
from ..proxy import ProxyBus, ProxyMachine, proxy_spec

log = logging.getLogger(__name__)

DISK_BYTES = 256 << 20
LOOP_FIELDS = ["command_list", "tables", "timeout_us", "table_size", "port_offset", "sectors", "count",
               "depth", "lba_span", "seed", "done", "errors"]


class NativeDiskLoop:
    """guests/proxy/native.c's read loop on a port the Python driver set up."""

    def __init__(self, bus: ProxyBus, port: Port) -> None:
        self.bus, self.port, self.abi = bus, port, bus.abi
        self.block = bus.dma_alloc(self.abi.sizeof("proxy_disk_loop"), 64)
        self._pack = self.abi.packer("proxy_disk_loop", LOOP_FIELDS)

    def close(self) -> None:
        self.bus.dma_free(self.block)

    def run(self, sectors: int, count: int, depth: int, lba_span: int, buffers: list) -> float:
        """Commands per second by the guest's clock."""
        for slot in range(depth):                   # headers and PRDs as the Python path sets them
            self.port._prepare(slot, Ata.READ_FPDMA_QUEUED if depth > 1 else Ata.READ_DMA_EXT, 0, sectors,
                               regions=[(buffers[slot].phys, sectors * 512)])
        self._pack.pack_into(self.block.view, 0, self.port.command_list.phys, self.port.tables.phys, 8_000_000,
                             TABLE_SIZE, self.port.base, sectors, count, depth, lba_span, random.getrandbits(32),
                             0, 0)
        cycles = self.port.hba.dev.channel.control(self.abi.PROXY_OP_DISK_READ_LOOP, self.block.phys, 0,
                                                   "native disk loop")
        fields = dict(zip(LOOP_FIELDS, self._pack.unpack_from(self.block.view, 0)))
        if fields["done"] != count or fields["errors"]:
            raise RuntimeError(f"the native loop completed {fields['done']} of {count}, {fields['errors']} errors")
        return count / (cycles / self.bus.tsc_hz)


def _disk_image(path: Path) -> None:
    """A disk of random bytes, read once so the host's page cache holds it: both sides
    then read from memory, and neither pays for the first touch of a sparse file."""
    with open(path, "wb") as f:
        for _ in range(DISK_BYTES >> 20):
            f.write(random.randbytes(1 << 20))
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def _machine(stack: contextlib.ExitStack, accel: str, image: Path) -> tuple[ProxyMachine, str]:
    """A machine with the disk on QEMU's io_uring backend where QEMU has one: its
    thread pool, the fallback, adds worker threads that fight the vCPU for two cores,
    and both sides' figures then swing by twofold from run to run."""
    for aio in ("io_uring", "threads"):
        spec = proxy_spec(accel=accel)
        spec.drive(file=str(image), format="raw", id="disk0", aio=aio, **{"if": "none"})
        spec.device("ide-hd", drive="disk0", bus="ide.0")
        try:
            return stack.enter_context(ProxyMachine(spec, name="bench-ahci")), aio
        except MachineError as exc:
            if aio == "threads":
                raise
            log.warning("QEMU refused aio=io_uring (%s); the disk uses its thread pool", str(exc).splitlines()[0])
    raise AssertionError("unreachable")


def run(accel: str, count: int = 2000, rounds: int = 9) -> dict[str, object]:
    """Python and native take turns, workload by workload, for ``rounds`` rounds after one
    warm-up; each figure is the median of its rounds, each ratio the median of the rounds'
    Python-to-native ratios."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="hwharness-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        _disk_image(image)
        with contextlib.ExitStack() as stack:
            pm, aio = _machine(stack, accel, image)
            accel = pm.machine.accel
            if accel == "kvm":          # the guest is emulated here: keep the run short
                count = min(count, 500)
            hba = Ahci.open(pm.bus)
            disk = hba.disks()[0]
            span = DISK_BYTES // 512 - 256
            # Queued reads land in buffer i % 128: the data are not looked at, only moved.
            small = [pm.bus.dma_alloc(4096) for _ in range(128)]
            big = [pm.bus.dma_alloc(128 << 10)]
            native = NativeDiskLoop(pm.bus, disk)
            rng = random.Random(1)
            seq = min(count, (DISK_BYTES >> 17) - 1)
            queued = count // 32 * 32

            def python_qd1() -> float:
                start = time.perf_counter()
                for _ in range(count):
                    disk.read_into(rng.randrange(span // 8) * 8, [small[0]])
                return count / (time.perf_counter() - start)

            def python_qd32() -> float:
                requests = [(rng.randrange(span // 8) * 8, small[i % len(small)]) for i in range(queued)]
                start = time.perf_counter()
                disk.read_queued_into(requests)
                return queued / (time.perf_counter() - start)

            def python_seq() -> float:
                start = time.perf_counter()
                for i in range(seq):
                    disk.read_into(i * 256, big)
                return seq * 128 / 1024 / (time.perf_counter() - start)

            workloads = {
                "randread_4k_qd1_iops": (python_qd1, lambda: native.run(8, count, 1, span, small)),
                "randread_4k_qd32_iops": (python_qd32, lambda: native.run(8, queued, 32, span, small)),
                "seqread_128k_mbps": (python_seq, lambda: native.run(256, seq, 1, 0, big * 32) * 128 / 1024),
            }
            try:
                for round_ in range(rounds + 1):
                    for key, (python, in_guest) in workloads.items():
                        figures = {key: python(), f"native_{key}": in_guest()}
                        if round_:                          # round 0 warms both up
                            for k, v in figures.items():
                                samples.setdefault(k, []).append(v)
            finally:
                native.close()
                for b in small + big:
                    pm.bus.dma_free(b)
                hba.close()
    r = {k: statistics.median(v) for k, v in samples.items()}
    # A ratio pairs each Python run with the native run right after it: on two shared
    # cores either side alone swings by twofold from round to round, a pair far less.
    for ratio, key in (("ratio_qd1", "randread_4k_qd1_iops"), ("ratio_qd32", "randread_4k_qd32_iops"),
                       ("ratio_seq", "seqread_128k_mbps")):
        r[ratio] = statistics.median(p / n for p, n in zip(samples[key], samples[f"native_{key}"]))
    return {"benchmark": "ahci", "accel": accel, "aio": aio, "results": {k: round(v, 3) for k, v in r.items()},
            "rounds": {k: [round(x, 1) for x in v] for k, v in samples.items()}}
