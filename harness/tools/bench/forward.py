"""``hwharness bench forward``: the Python e1000 bridge against an in-guest C bridge and Linux's own.

A host generator offers frames on one wire and a host sink counts them on the
other. The wires are QEMU's ``-netdev stream`` on Unix sockets (what ``serve net``'s
wire is), which the machine listens on and the host connects to (:class:`Wires`). The
generator (:class:`Generator`) is a forked process that writes many length-prefixed
frames per ``send`` from one prebuilt buffer, at most ``WINDOW`` (96) frames ahead of
what the sink has counted: QEMU 7.2's e1000 drops what its receive ring has no room
for, even from a stream wire, so the window, not the wire's back-pressure, keeps every
frame (:data:`WINDOW` says how much room it leaves). (The UDP wires
before allowed only 64, QEMU's socket buffer's bound, and 64 frames in flight capped
every bridge alike near 50 k pps: the bench measured the window.) The sink
(:class:`Sink`) is another forked process that counts the frames of the bench's
EtherType into a word of shared memory. A run is timed on the host from the
generator's start to the sink's last frame, for every side alike.

- ``python``: the bridge service's own loop (:class:`~harness.services.bridge.Bridge`,
  both NICs in one DMA domain, buffers passed along without a copy), in this process.
- ``native``: the same work in C inside the proxy guest (``PROXY_OP_NIC_FORWARD_LOOP``,
  guests/proxy/native.c) on the same two NICs, the same rings and the same packet pool
  the Python bridge set up: the host hands the pool's free buffers over, the loop takes
  each received buffer off its descriptor, refills the descriptor from the pool, queues
  the buffer on the other NIC and returns sent buffers to the pool, a batch of ``BATCH``
  frames at a time both ways; the rings' state and the pool come back to Python after.
  The two are paired rounds as ``paired.py`` describes.
- ``peer_linux``: the Linux guest with two e1000s on the same kind of wires, bridged by
  the kernel's ``bridge`` module (busybox ``brctl``), measured after, in the same run.

Each side's host CPU per frame (``cpu_us_per_frame``: its QEMU's, and for the proxy
sides this process's, where the Python bridge runs or the host waits for the C one) is
what a bridge costs whatever else the host runs; frames per second say how much of the
host it got.

Every frame is accounted for (``accounting``): offered by the generator, forwarded by
the bridge, delivered to the sink, and dropped by whom (the bridge, for a full transmit
ring; a NIC, for want of a receive descriptor; anything else is ``unaccounted``).

``--kill N`` (:func:`kill_run`): a Linux machine on the bridge service's wire downloads
a file from a host HTTP server on loopback (QEMU's user network's 10.0.2.2) while the
bridge process is SIGKILLed N times and SIGSTOPped once; the download's sha256 must be
right. Each restart's time (from the signal to the new process forwarding) and the
longest stall the transfer saw (the longest time the bytes forwarded to the guest
stood still) are reported. :func:`download_through_kills` is the machinery the tests
and the demo use too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import logging
import mmap
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from drivers.e1000.regs import Reg

from ...access import Deadline
from ...errors import HarnessError
from ...machine import Machine, MachineSpec
from ...machine.accel import emulating_kvm, why_linux_does_not_boot
from ...machine.linux import linux, wire_netdev, wire_path
from ...proxy import ProxyMachine, proxy_spec, raw
from ...services.bridge import BATCH, Bridge, BridgeService, Counters, bridge_devices, bridge_nics, bridge_spec
from .e1000 import (FEEDER_DOZE, FEEDER_FAILED, FEEDER_STALL, FEEDER_STALLED, GUEST_LOOP_TIMEOUT, RCTL_QUIET, Feeder,
                    frame_of)
from .paired import ForeignLoad, Run, Workload, add_peer, clock_figures, run_rounds

log = logging.getLogger(__name__)

ETHERTYPE = b"\x88\xb5"                      # frame_of's: the sink counts these and nothing else
SINK_MAC, SOURCE_MAC = b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01"
SIZES = (("64", 60), ("1514", 1514))         # on the wire, and what the generator hands over (no FCS)
QUICK = dict(count_64=2000, count_1514=500, rounds=1)
RUN_TIMEOUT = 30.0                           # seconds a run may take before it is a stall
PEER_RUNS = 3
PORT_FIELDS = ["rx_ring", "tx_ring", "rx_entries", "tx_entries", "rx_next", "tx_tail", "tx_clean",
               "forwarded", "dropped"]
BLOCK_FIELDS = ["pool", "timeout_us", "pool_size", "pool_free", "peer", "batch", "count", "done",
                "rx_tail_reg", "tx_tail_reg", "flush_reg"]
LENGTH = struct.Struct(">I")                 # QEMU's stream netdev: each frame follows its length
# Frames in flight. A receive ring takes 255; the Python bridge holds up to a quarter ring of
# refilled descriptors back (RX_TAIL_LAG) and the tail write that gives them back is posted,
# so another quarter may wait for the proxy to serve it: 127 are the NIC's for sure. 128
# (before) left none to spare, and 1 run in 28 lost frames there (dropped_wan_missed).
WINDOW = 96
SLOW_GUEST_WINDOW = 64                       # under an emulating KVM: the proxy serves the posted
                                             # receive tails so late that 128 overran the ring
GENERATOR_BATCH = 16                         # frames the generator waits to have room for, then sends at once
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")       # /proc's unit of CPU time
ACCOUNTED = ("offered", "forwarded", "delivered", "dropped_by_bridge", "dropped_by_nic", "unaccounted")


class ForwardStalled(HarnessError):
    """The sink stopped receiving before a run's frames were all through."""


class Sink:
    """A forked process counting the bench's frames that arrive on a stream wire into a shared word."""

    def __init__(self, sock: socket.socket) -> None:
        self._memory = mmap.mmap(-1, 8)          # anonymous and shared: the child writes, we read
        words = memoryview(self._memory).cast("I")
        self.count, self._stop = words[0:1], words[1:2]
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                sock.settimeout(0.1)
                chunk, pending = bytearray(1 << 18), bytearray()
                while not self._stop[0]:
                    try:
                        n = sock.recv_into(chunk)
                    except TimeoutError:
                        continue
                    if not n:
                        break
                    pending += chunk[:n]
                    at, counted = 0, 0
                    while len(pending) - at >= LENGTH.size:   # whole frames: a length, then the frame
                        end = at + LENGTH.size + LENGTH.unpack_from(pending, at)[0]
                        if end > len(pending):
                            break
                        if pending[at + LENGTH.size + 12:at + LENGTH.size + 14] == ETHERTYPE:
                            counted += 1
                        at = end
                    del pending[:at]
                    self.count[0] += counted
                code = 0
            finally:
                os._exit(code)

    def reset(self) -> None:
        """Start counting from zero (between runs, while nothing flows)."""
        self.count[0] = 0

    def wait_for(self, count: int, timeout: float = RUN_TIMEOUT) -> int:
        """Until ``count`` frames have arrived; ForwardStalled if they do not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.count[0] < count:
            if time.monotonic() > deadline:
                raise ForwardStalled(f"the sink got {self.count[0]} of {count} frames in {timeout:g} s")
            time.sleep(0.0002)
        return self.count[0]

    def close(self) -> None:
        self._stop[0] = 1
        os.waitpid(self.pid, 0)
        self.count.release()
        self._stop.release()
        self._memory.close()


class Generator(Feeder):
    """A forked process writing ``count`` copies of a frame into a stream wire, many frames
    per ``send`` from one prebuilt buffer, at most ``window`` ahead of what the sink has
    counted (``progress``, a word of shared memory); ``join`` as :class:`Feeder`'s.

    Why a window although a stream wire pushes back: QEMU 7.2's e1000 drops a frame its
    receive ring has no room for (``e1000_receive_iov`` answers an overrun with -1, and
    the net queue counts that as delivered), and QEMU's stream netdev hands it every frame
    of a 68 KiB read at once, so only a bound on the frames in flight below the ring's size
    keeps every frame. The stream wire's own gain is that nothing before the NIC drops:
    a window of :data:`WINDOW` (UDP's was 64, bound by QEMU's socket buffer) fits in the ring."""

    def __init__(self, sock: socket.socket, frame: bytes, count: int, progress: memoryview,
                 window: int = WINDOW) -> None:
        super().__init__(sock, None, frame, count, progress, window)

    def start(self) -> None:
        self.pid = os.fork()
        if self.pid == 0:                           # the child: send, pace, and leave at once
            code = FEEDER_FAILED
            try:
                record = LENGTH.pack(len(self.frame)) + self.frame
                whole = memoryview(record * self.window)
                self.sock.settimeout(FEEDER_STALL)
                sent, seen, deadline = 0, -1, 0.0
                while sent < self.count:
                    done = self.progress[0]
                    if done != seen:
                        seen, deadline = done, time.monotonic() + FEEDER_STALL
                    room = min(self.window - (sent - done), self.count - sent)
                    if room >= min(GENERATOR_BATCH, self.count - sent):
                        view = whole[:room * len(record)]
                        while view:
                            view = view[self.sock.send(view):]
                        sent += room
                    elif time.monotonic() > deadline:
                        break
                    else:                           # the window is full: doze, free the core
                        time.sleep(FEEDER_DOZE)
                code = 0 if sent == self.count else FEEDER_STALLED
            except TimeoutError:
                code = FEEDER_STALLED
            finally:
                os._exit(code)


class Wires:
    """The generator's and the sink's ends: two ``-netdev stream`` Unix sockets the machine
    listens on (:meth:`add_to`), which the host connects to once it runs (:meth:`connect`)."""

    def __init__(self, stack: contextlib.ExitStack, window: int = WINDOW) -> None:
        self._stack = stack
        self.window = window
        workdir = Path(tempfile.mkdtemp(prefix="hwh-fwd-"))      # a Unix socket's path is short
        stack.callback(shutil.rmtree, workdir, True)
        self.source_wire, self.sink_wire = f"unix:{workdir}/source", f"unix:{workdir}/sink"

    def add_to(self, spec: MachineSpec, source_netdev: str, sink_netdev: str) -> None:
        """The two netdevs, listening, in ``spec``."""
        wire_netdev(spec, source_netdev, self.source_wire, server=True)
        wire_netdev(spec, sink_netdev, self.sink_wire, server=True)

    def connect(self) -> None:
        """Connect both ends (the machine listens on them by now) and start the sink."""
        self.source = self._stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        self.source.connect(wire_path(self.source_wire))
        sink = self._stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sink.connect(wire_path(self.sink_wire))
        self.sink = Sink(sink)
        self._stack.callback(self.sink.close)

    def offer(self, frame: bytes) -> None:
        """One frame onto the source wire, from this process (between runs)."""
        self.source.sendall(LENGTH.pack(len(frame)) + frame)

    def timed(self, length: int, count: int, forward: Callable[[], int]) -> int:
        """One run (the sink zeroed before, untimed): the generator started, ``forward()``
        (which returns what its side claims to have forwarded), then every frame at the sink."""
        generator = Generator(self.source, frame_of(length, SINK_MAC), count, self.sink.count, window=self.window)
        generator.start()
        try:
            claimed = forward()
            self.sink.wait_for(count)
        finally:
            generator.join(RUN_TIMEOUT)
        return claimed


class NativeBridge:
    """The in-guest C bridge (guests/proxy/native.c) on a :class:`Bridge`'s NICs, rings and pool."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        dev = bridge.wan.dev
        self.abi = abi = bridge.wan.bus.abi
        self.block = dev.dma_alloc(abi.sizeof("proxy_nic_forward"), 64)
        self.stack = dev.dma_alloc(8 * bridge.pool.count, 64)
        self.ports_at = abi.offsetof("proxy_nic_forward", "ports")
        self.port_size = abi.sizeof("proxy_nic_port")
        self._port = abi.packer("proxy_nic_port", PORT_FIELDS)
        self._block = abi.packer("proxy_nic_forward", BLOCK_FIELDS)
        self.block_at = abi.offsetof("proxy_nic_forward", BLOCK_FIELDS[0])

    def close(self) -> None:
        self.bridge.wan.dev.dma_free(self.block)
        self.bridge.wan.dev.dma_free(self.stack)

    def prepare(self, count: int, counters: Counters) -> Callable[[], int]:
        """Untimed: the rings' state and the pool's free buffers handed to the guest. The run
        forwards ``count`` frames in the guest, gives everything back to the Python bridge,
        adds to ``counters`` as the Python bridge would, and returns the frames forwarded."""
        b = self.bridge
        view = self.block.view
        for i, nic in enumerate((b.wan, b.lan)):
            self._port.pack_into(view, self.ports_at + i * self.port_size, nic.rx_ring.phys, nic.tx_ring.phys,
                                 nic.rx_n, nic.tx_n, nic.rx_next, nic.tx_tail, nic.tx_clean, 0, 0)
        free = b.pool.take_all()
        struct.pack_into(f"<{len(free)}Q", self.stack.view, 0, *free)
        self._block.pack_into(view, self.block_at, self.stack.phys, int(GUEST_LOOP_TIMEOUT * 1e6), b.pool.count,
                              len(free), b.lan.dev.channel.index, BATCH, count, 0, Reg.RDT, Reg.TDT, Reg.STATUS)
        channel, op = b.wan.dev.channel, self.abi.PROXY_OP_NIC_FORWARD_LOOP

        def run() -> int:
            try:
                raw.native_loop(channel, op, self.block.phys, "native forward loop")
            finally:
                self._give_back(counters)
            return self._block.unpack_from(view, self.block_at)[BLOCK_FIELDS.index("done")]
        return run

    def _give_back(self, counters: Counters) -> None:
        """The rings' state, the descriptors' buffers and the pool back to the Python bridge."""
        b, view = self.bridge, self.block.view
        fields = dict(zip(BLOCK_FIELDS, self._block.unpack_from(view, self.block_at)))
        b.pool.give(list(struct.unpack_from(f"<{fields['pool_free']}Q", self.stack.view, 0)))
        v, at = counters.values, counters.index
        for i, (nic, way, full) in enumerate(((b.wan, "wan_to_lan_frames", "dropped_lan_tx_full"),
                                              (b.lan, "lan_to_wan_frames", "dropped_wan_tx_full"))):
            port = dict(zip(PORT_FIELDS, self._port.unpack_from(view, self.ports_at + i * self.port_size)))
            nic.rx_next, nic.tx_tail, nic.tx_clean = port["rx_next"], port["tx_tail"], port["tx_clean"]
            nic.rx_untold = 0                           # the C loop writes RDT after every batch
            ring = nic.rx_ring.view
            nic.rx_held = [int.from_bytes(ring[d * 16:d * 16 + 8], "little") for d in range(nic.rx_n)]
            ring, in_flight = nic.tx_ring.view, set(_between(nic.tx_clean, nic.tx_tail, nic.tx_n))
            nic.tx_held = [int.from_bytes(ring[d * 16:d * 16 + 8], "little") if d in in_flight else 0
                           for d in range(nic.tx_n)]
            v[at[way]] += port["forwarded"]
            v[at[full]] += port["dropped"]


def _between(first: int, end: int, n: int) -> Iterator[int]:
    """Ring indices from ``first`` up to (not including) ``end``."""
    while first != end:
        yield first
        first = (first + 1) % n


def accounting(offered: int, delivered: int, counters: dict[str, int]) -> dict[str, int]:
    """Where the frames a side was offered went, from its bridge's counters."""
    forwarded = counters["wan_to_lan_frames"]
    by_bridge = counters["dropped_lan_tx_full"]
    by_nic = counters["dropped_wan_missed"]
    return {"offered": offered, "forwarded": forwarded, "delivered": delivered, "dropped_by_bridge": by_bridge,
            "dropped_by_nic": by_nic, "unaccounted": offered - delivered - by_bridge - by_nic}


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system, all its threads) a process has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuMeter:
    """Host CPU time that processes (``who`` -> pid: the machine's QEMU, the driver's
    process) spend per frame over the runs measured. Unlike frames per second it does not
    shrink when other processes take the cores: the cost of a bridge on a busy host."""

    def __init__(self, who: dict[str, int]) -> None:
        self.who, self.spent, self.frames = who, dict.fromkeys(who, 0.0), 0

    @contextlib.contextmanager
    def measuring(self, frames: int) -> Iterator[None]:
        before = {name: cpu_seconds(pid) for name, pid in self.who.items()}
        yield
        for name, pid in self.who.items():
            self.spent[name] += cpu_seconds(pid) - before[name]
        self.frames += frames

    def per_frame_us(self) -> dict[str, float]:
        per = {name: round(spent / max(1, self.frames) * 1e6, 2) for name, spent in self.spent.items()}
        return {**per, "total": round(sum(per.values()), 2)}


@dataclass
class Side:
    """One side's totals over the bench: frames offered and delivered, its counters, and
    the host CPU its QEMU and its driver's process spent on them."""
    counters: Counters
    cpu: CpuMeter
    offered: int = 0
    delivered: int = 0

    def add(self, offered: int, delivered: int) -> None:
        self.offered += offered
        self.delivered += delivered

    def accounting(self) -> dict[str, int]:
        return accounting(self.offered, self.delivered, self.counters.snapshot())


def workloads(wires: Wires, bridge: Bridge, native: NativeBridge, sides: dict[str, Side],
              counts: dict[str, int]) -> list[list[Workload]]:
    """Forwarding 64- and 1514-byte frames: the Python bridge against the C one."""
    sink = wires.sink

    def python(length: int, count: int) -> Run:
        side = sides["python"]
        forwarded_at = side.counters.index["wan_to_lan_frames"]
        deadline: list[float] = []
        sink.reset()

        def until() -> bool:
            if sink.count[0] >= count:
                return True
            if time.monotonic() > deadline[0]:
                # Where the rest went, as far as the bridge and its NICs know (drops are counted
                # there; a frame none of them counts is still in a ring or in QEMU).
                bridge.count_missed(side.counters)
                raise ForwardStalled(f"the Python bridge: the sink got {sink.count[0]} of {count} frames; "
                                     f"the bridge's counters since the bench began: {side.counters.snapshot()}")
            return False

        def forward() -> int:
            before = side.counters.values[forwarded_at]
            deadline[:] = [time.monotonic() + RUN_TIMEOUT]
            bridge.run(side.counters, until=until)
            bridge.count_missed(side.counters)
            return side.counters.values[forwarded_at] - before

        def run() -> int:
            with side.cpu.measuring(count):
                done = wires.timed(length, count, forward)
            side.add(count, sink.count[0])
            return done
        return run

    def c(length: int, count: int) -> Run:
        side = sides["native"]
        go = native.prepare(count, side.counters)
        sink.reset()

        def forward() -> int:
            done = go()
            bridge.count_missed(side.counters)
            return done

        def run() -> int:
            with side.cpu.measuring(count):
                done = wires.timed(length, count, forward)
            side.add(count, sink.count[0])
            return done
        return run

    group = []
    for name, length in SIZES:
        count = counts[name]
        group.append(Workload(f"fwd_pps_{name}", functools.partial(python, length, count),
                              functools.partial(c, length, count), count,
                              counter=lambda: sink.count[0], counted_by="the host sink (frames delivered)"))
    return [group]


def proxy_side(accel: str, iommu: bool | None, counts: dict[str, int], rounds: int) -> dict[str, object]:
    """The Python bridge and the C one on one proxy machine, paired rounds."""
    with contextlib.ExitStack() as stack:
        wires = Wires(stack, SLOW_GUEST_WINDOW if emulating_kvm(accel) else WINDOW)
        spec = proxy_spec(accel=accel, iommu=iommu)
        wires.add_to(spec, "wan", "lan")
        pm = stack.enter_context(ProxyMachine(bridge_devices(spec, "wan", "lan"), name="bench-forward"))
        wires.connect()
        wan, lan = bridge_nics(pm.bus)
        bridge = Bridge(pm.bus, wan, lan)
        stack.callback(bridge.close)
        native = NativeBridge(bridge)
        stack.callback(native.close)
        workdir = Path(pm.machine.workdir)
        assert pm.machine.process is not None
        who = {"qemu": pm.machine.process.pid, "driver": os.getpid()}
        sides = {name: Side(Counters.create(workdir / f"{name}-counters"), CpuMeter(who))
                 for name in ("python", "native")}
        for side in sides.values():
            stack.callback(side.counters.close)
        time.sleep(RCTL_QUIET)                  # or the first run measures QEMU's receive timer
        figures = clock_figures(pm, bridge.wan.dev.channel.guest_time)
        result = run_rounds(workloads(wires, bridge, native, sides, counts), rounds, [pm])
        return {"accel": pm.machine.accel, "iommu": pm.bus.iommu, **figures, **result,
                "accounting": {name: side.accounting() for name, side in sides.items()},
                "cpu_us_per_frame": {name: side.cpu.per_frame_us() for name, side in sides.items()}}


def wait_until_forwarding(wires: Wires, timeout: float = RUN_TIMEOUT) -> None:
    """Until a probe frame offered on the source wire reaches the sink: a loaded host may
    take seconds after the ports say they forward before frames really pass (and the
    generator's window would otherwise be spent on frames dropped meanwhile). Stragglers
    are let in before the sink is zeroed."""
    probe = frame_of(64, SINK_MAC)
    wires.sink.reset()
    deadline = time.monotonic() + timeout
    while wires.sink.count[0] == 0:
        if time.monotonic() > deadline:
            raise ForwardStalled(f"no probe frame crossed the bridge within {timeout:g} s")
        wires.offer(probe)
        time.sleep(0.2)
    time.sleep(0.5)
    wires.sink.reset()


def linux_bridge(accel: str, counts: dict[str, int], runs: int = PEER_RUNS) -> dict[str, object]:
    """Linux's own bridge between two e1000s (the kernel's e1000 driver), fed and counted the
    same way; the interfaces' own counters say where frames went."""
    from .peer_linux import call_ms, timed
    guest = linux()
    with contextlib.ExitStack() as stack:
        wires = Wires(stack)
        spec = guest.spec(accel=accel, modules=("e1000", "bridge"))
        wires.add_to(spec, "net0", "net1")
        for netdev, mac in (("net0", "52:54:00:b1:00:0a"), ("net1", "52:54:00:b1:00:0b")):
            spec.device("e1000", netdev=netdev, mac=mac)
        m = stack.enter_context(Machine(spec, name="peer-linux-bridge"))
        wires.connect()
        guest.wait_ready(m)
        # forward delay 0: with STP off the ports forward at once instead of learning for 15 s
        timed(m, "brctl addbr br0 && echo 0 > /sys/class/net/br0/bridge/forward_delay && brctl addif br0 eth0 && brctl addif br0 eth1 "
                 "&& ip link set eth0 up && ip link set eth1 up && ip link set br0 up")
        # each port forwards (state 3) once its e1000 has a carrier: seconds on a loaded host
        state = timed(m, "i=0; until [ \"$(cat /sys/class/net/eth0/brport/state /sys/class/net/eth1/brport/state)\" "
                         "= \"$(printf '3\\n3')\" ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done; "
                         "cat /sys/class/net/eth*/brport/state /sys/class/net/eth*/carrier")[1]
        if state.split()[:2] != ["3", "3"]:
            raise ForwardStalled(f"Linux's bridge ports are not forwarding within 30 s (states and carriers "
                                 f"{state.split()})")
        wait_until_forwarding(wires)
        stats = "rx_packets rx_dropped rx_missed_errors tx_packets tx_dropped"

        def read() -> dict[str, int]:
            out = timed(m, f"for i in eth0 eth1; do for s in {stats}; do cat /sys/class/net/$i/statistics/$s; "
                           "done; done")[1].split()
            return {f"{i}_{s}": int(v) for (i, s), v in zip(((i, s) for i in ("eth0", "eth1")
                                                              for s in stats.split()), out)}
        before = read()
        assert m.process is not None
        cpu = CpuMeter({"qemu": m.process.pid})
        runs_pps: dict[str, list[float]] = {f"fwd_pps_{name}": [] for name, _ in SIZES}
        offered = delivered = 0
        for run in range(runs + 1):             # run 0 warms up
            for name, length in SIZES:
                count = counts[name]
                wires.sink.reset()
                t0 = time.perf_counter_ns()
                with cpu.measuring(count) if run else contextlib.nullcontext():
                    wires.timed(length, count, lambda: count)
                elapsed = (time.perf_counter_ns() - t0) / 1e9
                offered += count
                delivered += wires.sink.count[0]
                if run:
                    runs_pps[f"fwd_pps_{name}"].append(count / elapsed)
        after = read()
        moved = {k: after[k] - before[k] for k in after}
        dropped_nic = moved["eth0_rx_dropped"] + moved["eth0_rx_missed_errors"]
        dropped_bridge = moved["eth1_tx_dropped"]
        return {"results": {f"peer_linux_{k}": round(statistics.median(v), 3) for k, v in runs_pps.items()},
                "runs": {f"peer_linux_{k}": [round(x, 1) for x in v] for k, v in runs_pps.items()},
                "spread": {f"peer_linux_{k}": round(max(v) / min(v), 3) for k, v in runs_pps.items()},
                "accounting": {"offered": offered, "forwarded": moved["eth1_tx_packets"], "delivered": delivered,
                               "dropped_by_bridge": dropped_bridge, "dropped_by_nic": dropped_nic,
                               "unaccounted": offered - delivered - dropped_bridge - dropped_nic,
                               "interface_counters": moved},
                "cpu_us_per_frame": cpu.per_frame_us(), "call_ms": call_ms(m), "release": guest.release, "tool": "brctl (the kernel's bridge module)"}


def run(accel: str, count_64: int = 20000, count_1514: int = 5000, rounds: int = 9, quick: bool = False,
        iommu: bool | None = None, peer: bool = True, kill: int = 0) -> dict[str, object]:
    """The Python bridge against the C one (paired rounds), then Linux's bridge; or
    (``kill``) the download under kills, :func:`kill_run`."""
    if kill:
        return kill_run(accel, kill, iommu=iommu, quick=quick)
    if quick:
        count_64, count_1514, rounds = QUICK["count_64"], QUICK["count_1514"], QUICK["rounds"]
    counts = {"64": count_64, "1514": count_1514}
    result = proxy_side(accel, iommu, counts, rounds)
    accel = str(result.pop("accel"))
    why_not = why_linux_does_not_boot(accel) if peer else "not asked for"
    if not why_not:
        peer_result = linux_bridge(accel, counts, PEER_RUNS if not quick else 1)
        result["accounting"]["peer_linux"] = peer_result.pop("accounting")     # type: ignore[index]
        result["cpu_us_per_frame"]["peer_linux"] = peer_result.pop("cpu_us_per_frame")  # type: ignore[index]
        add_peer(result, peer_result)
    else:
        result["peer"] = {"skipped": why_not}
    return {"benchmark": "forward", "accel": {"python": accel, "native": accel}, "quick": quick, **result}


# ---- the bridge killed under a Linux machine's download ----

class QuietFiles(http.server.SimpleHTTPRequestHandler):
    """Files from a directory, without a log line per request on stderr."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_files(sizes: dict[str, int], seed: int = 21) -> Iterator[tuple[int, dict[str, str]]]:
    """A host HTTP server on loopback serving files of random bytes (a Linux guest behind the
    bridge reaches it as 10.0.2.2): its port, and each file's sha256."""
    root = Path(tempfile.mkdtemp(prefix="hwh-http-"))
    rng = random.Random(seed)
    sums = {}
    for name, size in sizes.items():
        data = rng.randbytes(size)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], sums
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(root)


@dataclass
class Download:
    """What a download through the bridge saw: the guest's sha256, each restart (the signal,
    its cause as the supervisor saw it, ms from the signal to the new process serving and to
    its first forwarded frame, and each step's ms, :func:`restart_steps`), and the longest
    time no byte reached the guest."""
    sha256: str
    restarts: list[dict[str, object]]
    longest_stall_ms: float


def download_through_kills(service: BridgeService, linux_machine: Machine, port: int, name: str, size: int,
                           signals: list[signal.Signals], timeout: float = 600.0) -> Download:
    """``wget`` ``name`` (``size`` bytes) from the host's HTTP server through 10.0.2.2 while the
    bridge process gets ``signals``, one each time another equal share of the file has been
    forwarded to the guest (a SIGSTOPped driver is found hung and killed by the supervisor);
    each waits for the driver to forward again. The guest's sha256 of what it got."""
    assert linux_machine.console is not None
    wan_to_lan = service.counters
    start = wan_to_lan()["wan_to_lan_bytes"]
    stalls = StallWatch(lambda: wan_to_lan()["wan_to_lan_bytes"])
    linux_machine.console.run(f"wget -q -O /tmp/{name} http://10.0.2.2:{port}/{name} & echo started")
    driver, restarts = service.driver, []
    try:
        for n, sig in enumerate(signals, 1):
            while wan_to_lan()["wan_to_lan_bytes"] - start < n * size / (len(signals) + 1):
                time.sleep(0.005)
            killed_at = time.monotonic()
            os.kill(driver.pid, sig)
            driver.wait_serving(60, after=len(driver.restarts) + 1)
            restart = driver.restarts[-1]
            steps = restart_steps(service, killed_at, restart.died_at, driver.started_at)
            restarts.append({"signal": sig.name, "cause": restart.cause,
                             "ms": round((restart.serving_at - killed_at) * 1e3, 1),
                             "first_frame_ms": round(sum(steps.values()), 1), "steps_ms": steps})
        out, status = linux_machine.console.run(f"wait; sha256sum /tmp/{name}", timeout=timeout)
    finally:
        stalls.stop()
    if status:
        raise ForwardStalled(f"the download of {name} failed ({status}): {out[-300:]}")
    return Download(out.split()[0], restarts, round(stalls.longest * 1e3, 1))


def restart_steps(service: BridgeService, killed_at: float, died_at: float, started_at: float,
                  timeout: float = 30.0) -> dict[str, float]:
    """Where a restart's time went, once the new driver has forwarded its first frame: ms
    from the signal to the supervisor seeing the death (``noticed``), to the zygote's fork
    (``forked``), then to each of the driver's :data:`~harness.services.bridge.START_STEPS`,
    each from the step before."""
    deadline = Deadline(timeout)
    while True:
        steps = service.start_steps()
        if steps["entered"] >= died_at and steps["first_frame"]:
            break
        if deadline.expired:
            raise ForwardStalled(f"the restarted bridge forwarded no frame within {timeout:g} s: {steps}")
        time.sleep(0.005)
    times = [("noticed", died_at), ("forked", started_at), *steps.items()]
    before, out = killed_at, {}
    for name, at in times:
        out[name] = round((at - before) * 1e3, 1)
        before = at
    return out


class StallWatch:
    """The longest time a running count stood still, looked at every few milliseconds."""

    def __init__(self, count: Callable[[], int], every: float = 0.005) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(count, every), daemon=True)
        self._thread.start()

    def _watch(self, count: Callable[[], int], every: float) -> None:
        last, since = count(), time.monotonic()
        while not self._stop.wait(every):
            now, value = time.monotonic(), count()
            if value != last:
                self.longest = max(self.longest, now - since)
                last, since = value, now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


KILL_FILE = 32 << 20                    # bytes: "tens of MiB"


def kill_run(accel: str, kills: int, iommu: bool | None = None, quick: bool = False) -> dict[str, object]:
    """A Linux machine on the bridge's wire downloads a file while the bridge is SIGKILLed
    ``kills`` times and SIGSTOPped once; restart times and the longest stall."""
    why_not = why_linux_does_not_boot(accel)
    if why_not:
        raise ForwardStalled(f"bench forward --kill needs the Linux guest: {why_not}")
    size = KILL_FILE if not quick else 8 << 20
    guest = linux()
    workdir = Path(tempfile.mkdtemp(prefix="hwh-wire-"))    # a Unix socket's path is short
    wire_ = f"unix:{workdir}/wire"
    try:
        with contextlib.ExitStack() as stack:
            port, sums = stack.enter_context(http_files({"file": size}))
            pm = stack.enter_context(ProxyMachine(bridge_spec(proxy_spec(accel=accel, iommu=iommu), wire_),
                                                  name="bench-forward-kill"))
            service = stack.enter_context(BridgeService(pm, wire_))
            service.driver.wait_serving(60)
            m = stack.enter_context(Machine(guest.spec(accel=accel, net=wire_), name="bench-forward-linux"))
            guest.wait_ready(m)
            guest.dhcp(m)
            own = [os.getpid(), service.supervisor.zygote.process.pid, service.pid,
                   *(machine.process.pid for machine in (pm.machine, m) if machine.process is not None)]
            load = ForeignLoad(own)             # the driver processes count as the bench's own
            t0 = time.monotonic()
            got = download_through_kills(service, m, port, "file", size,
                                         [signal.SIGKILL] * kills + [signal.SIGSTOP])
            elapsed = time.monotonic() - t0
            load.own.append(service.pid)
            foreign = round(load.since_last(), 2)
            killed = [r for r in got.restarts if r["signal"] == "SIGKILL"]

            def p50(values: list[float]) -> float | None:
                return round(statistics.median(values), 1) if values else None
            return {"benchmark": "forward_kill", "accel": pm.machine.accel, "quick": quick,
                    "file_bytes": size, "sha256_right": got.sha256 == sums["file"],
                    "results": {"restart_p50_ms": p50([r["ms"] for r in killed]),
                                "restart_max_ms": max((r["ms"] for r in killed), default=None),
                                "first_frame_p50_ms": p50([r["first_frame_ms"] for r in killed]),
                                "longest_stall_ms": got.longest_stall_ms,
                                "download_s": round(elapsed, 2),
                                "download_mbps": round(size / elapsed / 1e6, 2)},
                    "restart_steps_p50_ms": {step: p50([r["steps_ms"][step] for r in killed])
                                             for step in (killed[0]["steps_ms"] if killed else ())},
                    "foreign_cores": foreign, "restarts": got.restarts, "counters": service.counters()}
    finally:
        shutil.rmtree(workdir)
