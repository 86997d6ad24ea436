"""``hwharness bench ahci``: the Python AHCI driver against an in-guest C loop, same port, same run.

Random 4 KiB reads one at a time (queue depth 1), random 4 KiB reads 32 at a
time with NCQ, and sequential 128 KiB reads. Data land in DMA buffers and
stay there: no byte passes through Python on the timed path.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from pathlib import Path

from drivers.ahci import Ahci
from drivers.ahci.driver import TABLE_SIZE, Port
from drivers.ahci.regs import Ata

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


def run(accel: str, count: int = 4000) -> dict[str, object]:
    r: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hwharness-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(DISK_BYTES)
        spec = proxy_spec(accel=accel)
        spec.drive(file=str(image), format="raw", id="disk0", **{"if": "none"})
        spec.device("ide-hd", drive="disk0", bus="ide.0")
        with ProxyMachine(spec, name="bench-ahci") as pm:
            accel = pm.machine.accel
            if accel == "kvm":          # the guest is emulated here: keep the run short
                count = min(count, 500)
            hba = Ahci.open(pm.bus)
            disk = hba.disks()[0]
            span = DISK_BYTES // 512 - 256
            small = [pm.bus.dma_alloc(4096) for _ in range(32)]
            big = [pm.bus.dma_alloc(128 << 10)]
            native = NativeDiskLoop(pm.bus, disk)
            rng = random.Random(1)
            try:
                disk.read_into(0, [small[0]])                                   # warm up
                start = time.perf_counter()
                for _ in range(count):
                    disk.read_into(rng.randrange(span // 8) * 8, [small[0]])
                r["randread_4k_qd1_iops"] = count / (time.perf_counter() - start)
                r["native_randread_4k_qd1_iops"] = native.run(8, count, 1, span, small)

                start = time.perf_counter()
                for _ in range(count // 32):
                    disk.read_queued_into([(rng.randrange(span // 8) * 8, b) for b in small])
                r["randread_4k_qd32_iops"] = (count // 32 * 32) / (time.perf_counter() - start)
                r["native_randread_4k_qd32_iops"] = native.run(8, count // 32 * 32, 32, span, small)

                seq = min(count, (DISK_BYTES >> 17) - 1)
                start = time.perf_counter()
                for i in range(seq):
                    disk.read_into(i * 256, big)
                r["seqread_128k_mbps"] = seq * 128 / 1024 / (time.perf_counter() - start)
                r["native_seqread_128k_mbps"] = native.run(256, seq, 1, 0, big * 32) * 128 / 1024
            finally:
                native.close()
                for b in small + big:
                    pm.bus.dma_free(b)
                hba.close()
    r["ratio_qd1"] = r["randread_4k_qd1_iops"] / r["native_randread_4k_qd1_iops"]
    r["ratio_qd32"] = r["randread_4k_qd32_iops"] / r["native_randread_4k_qd32_iops"]
    r["ratio_seq"] = r["seqread_128k_mbps"] / r["native_seqread_128k_mbps"]
    return {"benchmark": "ahci", "accel": accel, "results": {k: round(v, 3) for k, v in r.items()}}
