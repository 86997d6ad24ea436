"""``hwharness bench e1000``: the Python e1000 driver against an in-guest C loop, same NIC, same run.

The NIC sits on a socket netdev whose far end is a UDP socket on the host's
loopback. Transmit: frames go out through the ring until ``count`` are done.
Receive: the host feeds frames at the rate the receiver drains them (a window
of frames in flight, so no socket buffer on the way overflows) and the
receiver is timed from its first frame to its last. "64" and "1514" are
frame sizes on the wire: the driver hands 60 and 1514 bytes to the NIC,
which adds the FCS to the first and not to the second's budget (a 1514-byte
frame is the largest without FCS).
"""

from __future__ import annotations

import logging
import socket
import statistics
import threading
import time
from typing import Callable

from drivers.e1000 import E1000
from drivers.e1000.driver import BUFFER_SIZE
from drivers.e1000.regs import Reg

from ..machine import MachineSpec
from ..proxy import ProxyBus, ProxyMachine, proxy_spec

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = 33
GUEST_LOOP_TIMEOUT = 8.0    # seconds; under the host's 10 s request deadline
RCTL_QUIET = 1.1            # QEMU's e1000 refuses to receive for 1 s (virtual) after an RCTL write
WINDOW = 64                 # receive: frames in flight; QEMU's own UDP socket holds ~212 KB of skbs
LOOP_FIELDS = ["ring_phys", "timeout_us", "entries", "frame_len", "count", "tail_reg", "flush_reg",
               "next", "clean", "done"]


def host_socket() -> socket.socket:
    """A UDP socket on loopback with a buffer big enough for a burst of full frames."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    except PermissionError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.bind(("127.0.0.1", 0))
    return s


class NativeLoop:
    """The in-guest C loops (guests/proxy/native.c) on a driver's rings: the baseline."""

    def __init__(self, bus: ProxyBus, nic: E1000) -> None:
        self.bus, self.nic, self.abi = bus, nic, bus.abi
        self.block = bus.dma_alloc(self.abi.sizeof("proxy_nic_loop"), 64)
        self._pack = self.abi.packer("proxy_nic_loop", LOOP_FIELDS)
        done = self.abi.offsetof("proxy_nic_loop", "done")
        self.done = self.block.view[done:done + 4].cast("I")     # progress, as the guest goes

    def close(self) -> None:
        self.done.release()
        self.bus.dma_free(self.block)

    def _run(self, op: int, ring: int, entries: int, frame_len: int, count: int, next_: int, clean: int,
             tail_reg: int) -> tuple[int, int, int, int]:
        self._pack.pack_into(self.block.view, 0, ring, int(GUEST_LOOP_TIMEOUT * 1e6), entries, frame_len, count,
                             tail_reg, Reg.STATUS, next_, clean, 0)
        cycles = self.nic.dev.channel.control(op, self.block.phys, 0, "native loop")
        fields = dict(zip(LOOP_FIELDS, self._pack.unpack_from(self.block.view, 0)))
        return cycles, fields["next"], fields["clean"], fields["done"]

    def tx(self, frame: bytes, count: int) -> float:
        """Send ``frame`` ``count`` times from the guest; frames per second by the guest's clock."""
        nic = self.nic
        nic.flush_tx(30)
        for i in range(nic.tx_n):                   # every slot holds the frame, as the Python path leaves it
            nic.tx_bufs.view[i * BUFFER_SIZE:i * BUFFER_SIZE + len(frame)] = frame
        cycles, nic.tx_tail, nic.tx_clean, done = self._run(
            self.abi.PROXY_OP_NIC_TX_LOOP, nic.tx_ring.phys, nic.tx_n, len(frame), count, nic.tx_tail,
            nic.tx_clean, Reg.TDT)
        nic.flush_tx(30)
        if done != count:
            raise RuntimeError(f"the native transmit loop sent {done} of {count}")
        return count / (cycles / self.bus.tsc_hz)

    def rx(self, count: int) -> float:
        """Receive ``count`` frames in the guest (someone else feeds them); frames per second."""
        nic = self.nic
        cycles, nic.rx_next, _, done = self._run(
            self.abi.PROXY_OP_NIC_RX_LOOP, nic.rx_ring.phys, nic.rx_n, 0, count, nic.rx_next, 0, Reg.RDT)
        if done != count:
            raise RuntimeError(f"the native receive loop got {done} of {count}")
        return count / (cycles / self.bus.tsc_hz)


class Rig:
    """The machine, the driver, its native twin, and the host end of the wire."""

    def __init__(self, pm: ProxyMachine, host: socket.socket, qemu_port: int) -> None:
        self.pm, self.host, self.qemu_port = pm, host, qemu_port
        self.nic = E1000.open(pm.bus, interrupts=False)
        self.native = NativeLoop(pm.bus, self.nic)
        time.sleep(RCTL_QUIET)                      # or the first receive measures QEMU's timer
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        self.host.settimeout(0.1)
        while not self._stop.is_set():
            try:
                self.host.recv(2048)
            except TimeoutError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._drainer.join(2)
        self.native.close()
        self.nic.close()

    def python_tx(self, frame: bytes, count: int) -> float:
        batch = [frame] * min(self.nic.tx_n - 1, count)
        start = time.perf_counter()
        sent = 0
        while sent < count:
            sent += self.nic.send(batch[:count - sent], timeout=10)
        self.nic.flush_tx(30)
        return count / (time.perf_counter() - start)

    def _feed(self, frame: bytes, count: int, received: Callable[[], int]) -> threading.Thread:
        def feeder() -> None:
            sent = 0
            while sent < count and not self._stop.is_set():
                if sent - received() < WINDOW:
                    self.host.sendto(frame, ("127.0.0.1", self.qemu_port))
                    sent += 1
                else:
                    time.sleep(0)
        thread = threading.Thread(target=feeder, daemon=True)
        thread.start()
        return thread

    def python_rx(self, frame: bytes, count: int) -> float:
        got = [0]
        feeder = self._feed(frame, count, lambda: got[0])
        first = None
        while got[0] < count:
            frames = self.nic.recv(256, timeout=10)
            if not frames:
                raise RuntimeError(f"receive stalled at {got[0]} of {count}")
            if first is None:
                first = time.perf_counter()
            got[0] += len(frames)
        feeder.join(10)
        return (count - 1) / (time.perf_counter() - first)

    def native_rx(self, frame: bytes, count: int) -> float:
        feeder = self._feed(frame, count, lambda: self.native.done[0])
        pps = self.native.rx(count)
        feeder.join(10)
        return pps


def frame_of(size: int, dst: bytes) -> bytes:
    """A frame of ``size`` bytes to ``dst``, local experimental EtherType 0x88B5."""
    return (dst + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(range(256)) * 6)[:size]


def run(accel: str, count_64: int = 20000, count_1514: int = 5000, rounds: int = 5) -> dict[str, object]:
    """Python and native take turns, for ``rounds`` rounds; each figure is the median of its
    rounds, each ratio the median of the rounds' Python-to-native ratios (on two shared
    cores either side alone swings by a third from run to run, a pair far less)."""
    host = host_socket()
    probe = host_socket()
    qemu_port = probe.getsockname()[1]
    probe.close()
    spec: MachineSpec = proxy_spec(accel=accel)
    spec.netdev("socket", "net0", udp=f"127.0.0.1:{host.getsockname()[1]}", localaddr=f"127.0.0.1:{qemu_port}")
    spec.device("e1000", netdev="net0", mac="52:54:00:be:ec:01")
    samples: dict[str, list[float]] = {}
    with ProxyMachine(spec, name="bench-e1000") as pm:
        accel = pm.machine.accel
        rig = Rig(pm, host, qemu_port)
        try:
            if accel == "kvm":          # the guest is emulated here: keep the run short
                count_64, count_1514, rounds = min(count_64, 2000), min(count_1514, 1000), min(rounds, 3)
            # All the transmit rounds, then all the receive rounds: a receive leaves QEMU
            # busy with the socket for a while, and transmit measured just after it suffers.
            for way in ("tx", "rx"):
                for round_ in range(rounds):
                    for wire, length, count in (("64", 60, count_64), ("1514", 1514, count_1514)):
                        if way == "tx":
                            out = frame_of(length, b"\x02\x00\x00\x00\x00\x02")
                            pair = (lambda: rig.python_tx(out, count), lambda: rig.native.tx(out, count))
                        else:
                            inbound = frame_of(length, rig.nic.mac)
                            pair = (lambda: rig.python_rx(inbound, count), lambda: rig.native_rx(inbound, count))
                        samples.setdefault(f"{way}_pps_{wire}", []).append(pair[0]())
                        samples.setdefault(f"native_{way}_pps_{wire}", []).append(pair[1]())
                    log.info("%s round %d of %d done", way, round_ + 1, rounds)
        finally:
            rig.close()
    host.close()
    r = {k: statistics.median(v) for k, v in samples.items()}
    for way, wire in (("tx", "64"), ("tx", "1514"), ("rx", "64"), ("rx", "1514")):
        key = f"{way}_pps_{wire}"
        r[f"ratio_{way}_{wire}"] = statistics.median(p / n for p, n in zip(samples[key], samples[f"native_{key}"]))
    return {"benchmark": "e1000", "accel": accel, "results": {k: round(v, 3) for k, v in r.items()},
            "rounds": {k: [round(x, 1) for x in v] for k, v in samples.items()}}


# ---- interrupt throttling: packets per second against interrupt latency ----

ITR_SETTINGS = (0, 196, 488, 1953)      # in 256 ns units: off, ~50 us, ~125 us, ~500 us


def itr_sweep(accel: str, frames: int = 3000, triggers: int = 200) -> dict[str, object]:
    """For each ITR setting: interrupt latency of back-to-back device interrupts (ICS writes),
    and interrupt-driven receive throughput with the interrupts it took.

    The e1000 keeps QEMU's interrupt mitigation on here: that is the throttle being measured.
    """
    from .stats import pct
    host = host_socket()
    probe = host_socket()
    qemu_port = probe.getsockname()[1]
    probe.close()
    spec = proxy_spec(accel=accel)
    spec.netdev("socket", "net0", udp=f"127.0.0.1:{host.getsockname()[1]}", localaddr=f"127.0.0.1:{qemu_port}")
    spec.device("e1000", netdev="net0", mac="52:54:00:be:ec:02")
    out: dict[str, object] = {}
    with ProxyMachine(spec, name="bench-itr") as pm:
        accel = pm.machine.accel
        nic = E1000.open(pm.bus, interrupts=True)
        irq = nic.irq
        assert irq is not None
        time.sleep(RCTL_QUIET)
        try:
            inbound = frame_of(60, nic.mac)
            for itr in ITR_SETTINGS:
                nic.set_itr(itr)
                entry = []
                for _ in range(triggers):
                    nic.regs.write32(Reg.ICS, 0x80)
                    start = nic.dev.channel.last_start_tsc
                    event = irq.wait(5)
                    entry.append((event.guest_tsc - start) / pm.bus.tsc_hz * 1e6)
                    nic.regs.read32(Reg.ICR)
                    irq.ack()
                entry.sort()
                before = irq.delivered
                got = 0
                sent = [0]

                def feeder() -> None:
                    while sent[0] < frames:
                        if sent[0] - got < WINDOW:
                            host.sendto(inbound, ("127.0.0.1", qemu_port))
                            sent[0] += 1
                        else:
                            time.sleep(0)
                thread = threading.Thread(target=feeder, daemon=True)
                thread.start()
                start_t = time.perf_counter()
                while got < frames:
                    batch = nic.recv(256, timeout=10)
                    if not batch:
                        raise RuntimeError(f"receive stalled at {got} of {frames}")
                    got += len(batch)
                elapsed = time.perf_counter() - start_t
                thread.join(10)
                out[f"itr_{itr}"] = {
                    "itr_us": round(itr * 0.256, 1),
                    "irq_latency_p50_us": round(pct(entry, 0.5), 2),
                    "irq_latency_p99_us": round(pct(entry, 0.99), 2),
                    "rx_pps": round(frames / elapsed),
                    "irqs_per_1000_frames": round(1000 * (irq.delivered - before) / frames, 1),
                }
                log.info("ITR %d: %s", itr, out[f"itr_{itr}"])
        finally:
            nic.close()
    host.close()
    return {"benchmark": "e1000_itr", "accel": accel, "results": out}
