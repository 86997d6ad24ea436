"""The baseline nobody here wrote: Linux's own ahci and e1000 drivers, in the same machine.

``bench ahci --peer linux`` and ``bench e1000 --peer linux`` boot the Linux
guest that ``make images`` built (Debian's kernel, busybox) with the same
disk image on the same backend, or the same NIC on the same kind of socket
netdev, and measure it with tools of the kernel's or of the plainest kind:

- disk: ``blockread`` (images/peer/blockread.c), ``pread`` with O_DIRECT one
  request at a time through the kernel's block layer and ahci driver: random
  4 KiB reads at queue depth 1 (its own generator, uniform over the disk like
  the bench's; the image sits in the host's page cache, so which blocks does not
  matter) and sequential 128 KiB reads. Busybox has no fio, and no queue depth
  32 is measured for Linux.
- transmit: the kernel's packet generator (``pktgen``), 60- and 1514-byte frames.
  Receive is not measured: nothing in the guest could pace the host's feeder.

Each run is timed on the host around the shell command that does the work (the
console's own round trip, ``peer_call_ms``, is measured and reported), and the
work is checked: blockread exits 0 only after every read was whole, pktgen must
report every frame sent and the interface's counter must have moved by at least
that many. Three runs; the figure is their median.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

from ...machine.linux import linux
from ...machine import Machine

RUNS = 3
PKTGEN = "/proc/net/pktgen"


def timed(m: Machine, command: str, timeout: float = 300.0) -> tuple[float, str]:
    """Seconds a shell command took in the guest, timed on the host, and its output; it must succeed."""
    assert m.console is not None
    t0 = time.perf_counter_ns()
    output, status = m.console.run(command, timeout=timeout)
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    if status:
        raise RuntimeError(f"the Linux peer's {command!r} failed ({status}): {output[-500:]}")
    return elapsed, output


def call_ms(m: Machine) -> float:
    """The console's own round trip (a command that does nothing), in ms: part of every figure."""
    return round(statistics.median(timed(m, "true")[0] for _ in range(5)) * 1000, 2)


def blockread(m: Machine, device: str, count: int, seq: int, seed: int) -> tuple[float, float]:
    """Random 4 KiB reads at QD1 (IOPS) and sequential 128 KiB reads (MB/s) of ``device`` by
    ``blockread`` (images/peer/blockread.c), each checked for whole reads."""
    elapsed, out = timed(m, f"blockread {device} rand4k {count} {seed}")
    assert f"read {count} bytes" in out, out
    iops = count / elapsed
    elapsed, out = timed(m, f"blockread {device} seq128k {seq}")
    assert f"read {seq} bytes" in out, out
    return iops, seq * 128 / 1024 / elapsed


def disk(accel: str, image: Path, drive: dict[str, object], count: int, seq: int) -> dict[str, object]:
    """Random 4 KiB reads at QD1 and sequential 128 KiB reads through Linux's ahci driver."""
    guest = linux()
    spec = guest.spec(accel=accel, modules=("ahci", "sd_mod"))
    spec.drive(file=str(image), **drive)
    spec.device("ide-hd", drive=str(drive["id"]), bus="ide.0")
    with Machine(spec, name="peer-linux-disk") as m:
        guest.wait_ready(m)
        runs: dict[str, list[float]] = {"randread_4k_qd1_iops": [], "seqread_128k_mbps": []}
        for run in range(RUNS):
            iops, mbps = blockread(m, "/dev/sda", count, seq, seed=run + 1)
            runs["randread_4k_qd1_iops"].append(iops)
            runs["seqread_128k_mbps"].append(mbps)
        return {"results": {f"peer_linux_{k}": round(statistics.median(v), 3) for k, v in runs.items()},
                "runs": {f"peer_linux_{k}": [round(x, 1) for x in v] for k, v in runs.items()},
                "call_ms": call_ms(m), "release": guest.release, "tool": "blockread (O_DIRECT pread, QD1)"}


def transmit(accel: str, netdev: dict[str, object], counts: dict[str, int]) -> dict[str, object]:
    """Frames per second that Linux's e1000 driver sends for pktgen, 60 and 1514 bytes."""
    guest = linux()
    spec = guest.spec(accel=accel, modules=("e1000", "pktgen"))
    spec.netdev("socket", "net0", **netdev)
    spec.device("e1000", netdev="net0", mac="52:54:00:be:ec:0a")
    with Machine(spec, name="peer-linux-tx") as m:
        guest.wait_ready(m)
        timed(m, f"ip link set eth0 up && echo rem_device_all > {PKTGEN}/kpktgend_0 "
                  f"&& echo 'add_device eth0' > {PKTGEN}/kpktgend_0")
        carrier = timed(m, "i=0; until [ \"$(cat /sys/class/net/eth0/carrier)\" = 1 ] || [ $i -ge 100 ]; "
                            "do sleep 0.1; i=$((i + 1)); done; cat /sys/class/net/eth0/carrier")[1]
        if carrier.strip() != "1":
            raise RuntimeError("the Linux peer's e1000 link did not come up within 10 s")
        runs: dict[str, list[float]] = {f"tx_pps_{wire}": [] for wire in counts}
        for _ in range(RUNS):
            for wire, count in counts.items():
                length = 60 if wire == "64" else 1514
                timed(m, f"cd {PKTGEN} && echo 'count {count}' > eth0 && echo 'pkt_size {length}' > eth0 "
                          f"&& echo 'delay 0' > eth0 && echo 'dst 10.0.0.2' > eth0 "
                          f"&& echo 'dst_mac 02:00:00:00:00:02' > eth0 && cd /")
                before = int(timed(m, "cat /sys/class/net/eth0/statistics/tx_packets")[1])
                elapsed, _ = timed(m, f"echo start > {PKTGEN}/pgctrl")
                sent = int(timed(m, "cat /sys/class/net/eth0/statistics/tx_packets")[1]) - before
                result = timed(m, f"cat {PKTGEN}/eth0")[1]
                done = re.search(r"Result: OK: \d+\(c\d+\+d\d+\) usec, (\d+) ", result)
                if not done or int(done.group(1)) != count or sent < count:
                    raise RuntimeError(f"pktgen did not send {count} frames (the interface counted {sent}): "
                                       f"{result[-300:]}")
                runs[f"tx_pps_{wire}"].append(count / elapsed)
        return {"results": {f"peer_linux_{k}": round(statistics.median(v), 3) for k, v in runs.items()},
                "runs": {f"peer_linux_{k}": [round(x, 1) for x in v] for k, v in runs.items()},
                "call_ms": call_ms(m), "release": guest.release, "tool": "pktgen"}
