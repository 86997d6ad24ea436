"""Two e1000s bridged by a Python driver process: a machine online only through it.

The proxy machine has two NICs: ``wan`` on QEMU's user network (its DHCP, DNS and
10.0.2.2, the host's loopback) and ``lan`` on a ``-netdev stream`` Unix socket, the
*wire*, that another machine's NIC connects to (:func:`wire_netdev`). A supervised
driver process (:func:`bridge_driver`) opens both into one DMA domain
(``share_domain_with``, docs/dma.md) and forwards every frame received on one to
the other, in batches, without a copy: the buffer a NIC received into goes out on
the other NIC's transmit ring as it is (:class:`drivers.e1000.PacketPool`). Both NICs
are promiscuous: an L2 bridge, so the machine on the wire gets its lease and routes
from the user network itself.

The driver polls: the receive rings are in memory it maps, so a look costs no
request to the proxy. While frames come it looks again at once, and for
``SPIN_AFTER_FRAME`` after the last one, as the C loop in the guest does: a sender
that keeps a window in flight waits for every frame a nap leaves in a ring. Then
it sleeps a little longer each round (up to ``IDLE_MAX``), so an idle bridge costs
little CPU. Its counters (frames and bytes
each way, drops by cause) live in a file the service owns and every driver
process maps, so they add up across restarts and show up to a kill.

:class:`BridgeService` runs it supervised and tells who forwards (what
``hwharness serve net`` prints). The driver's death is a stall for the machine on
the wire: the supervisor starts another, which resets both NICs and forwards again;
TCP retransmits what was lost in the rings.
"""

from __future__ import annotations

import logging
import mmap
import time
from pathlib import Path
from typing import Callable, Iterator

from ..access import NAP_SLACK_NS, Bus, PciFunction, timer_slack
from ..machine import MachineSpec
from ..machine.linux import wire_netdev

log = logging.getLogger(__name__)

WAN_SLOT, LAN_SLOT = 0x6, 0x7                       # the two NICs' PCI slots: which is which
WAN_MAC, LAN_MAC = "52:54:00:b1:00:01", "52:54:00:b1:00:02"
# Rings, copy buffers (2 x 512 KiB) and the pool (2.5 MiB), for both NICs; no larger: the
# proxy maps (and on a restart unmaps) the domain page by page, the largest step of a restart.
DOMAIN_SIZE = 4 << 20
POOL_BUFFERS = 1280                                 # 2 x 256 receive + 2 x 255 in flight + slack
BATCH = 64                                          # frames taken from a ring at a time
SPIN_AFTER_FRAME = 1e-3                             # seconds the bridge looks on, unslept, after a frame
IDLE_MIN, IDLE_MAX = 50e-6, 1e-3                    # seconds an idle round sleeps after that, growing
RESTATE_ROUNDS = 64                                 # idle rounds between restating the receive tails
STATS_SECONDS = 0.25                                # how often the NICs' miss counters are read

COUNTERS = ("wan_to_lan_frames", "wan_to_lan_bytes", "lan_to_wan_frames", "lan_to_wan_bytes",
            "dropped_lan_tx_full", "dropped_wan_tx_full", "dropped_wan_missed", "dropped_lan_missed")
# The latest driver start, step by step (time.monotonic(), one clock for every process):
# in the driver's entry (forked and attached), both NICs opened into their domain, each
# NIC brought up, the forwarding loop entered, the first frame forwarded.
START_STEPS = ("entered", "nics_open", "wan_up", "lan_up", "running", "first_frame")


def bridge_spec(spec: MachineSpec, wire: str) -> MachineSpec:
    """Add the bridge's two NICs to a proxy machine's spec: ``wan`` on the user network,
    ``lan`` listening on ``wire``."""
    spec.netdev("user", "wan")
    wire_netdev(spec, "lan", wire, server=True)
    return bridge_devices(spec, "wan", "lan")


def bridge_devices(spec: MachineSpec, wan_netdev: str, lan_netdev: str) -> MachineSpec:
    """The bridge's two e1000s, where :func:`bridge_nics` finds them, on netdevs ``spec`` has."""
    spec.device("e1000", netdev=wan_netdev, addr=f"{WAN_SLOT:#x}", mac=WAN_MAC)
    spec.device("e1000", netdev=lan_netdev, addr=f"{LAN_SLOT:#x}", mac=LAN_MAC)
    return spec


def bridge_nics(bus: Bus) -> tuple[PciFunction, PciFunction]:
    """The ``wan`` and ``lan`` e1000s :func:`bridge_spec` placed."""
    from drivers.e1000.driver import DEVICE, VENDOR
    nics = {f.dev: f for f in bus.find_all(vendor=VENDOR, device=DEVICE)}
    if WAN_SLOT not in nics or LAN_SLOT not in nics:
        raise ValueError(f"the machine has no e1000s at slots {WAN_SLOT} and {LAN_SLOT} (bridge_spec adds them)")
    return nics[WAN_SLOT], nics[LAN_SLOT]


class Counters:
    """The bridge's counters (u64s) and its latest start's steps (:data:`START_STEPS`,
    doubles) in a file: one writer (the driver), any readers."""

    SIZE = 8 * (len(COUNTERS) + len(START_STEPS))

    def __init__(self, path: Path | str) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self.SIZE)
        whole = memoryview(self._map)
        self.values = whole[:8 * len(COUNTERS)].cast("Q")
        self.steps = whole[8 * len(COUNTERS):].cast("d")
        whole.release()
        self.index = {name: i for i, name in enumerate(COUNTERS)}

    @staticmethod
    def create(path: Path) -> "Counters":
        path.write_bytes(bytes(Counters.SIZE))
        return Counters(path)

    def snapshot(self) -> dict[str, int]:
        return {name: self.values[i] for i, name in enumerate(COUNTERS)}

    def mark(self, step: str) -> None:
        """The driver reached ``step`` of its start now; ``entered`` forgets the last start's."""
        if step == START_STEPS[0]:
            for i in range(len(START_STEPS)):
                self.steps[i] = 0.0
        self.steps[START_STEPS.index(step)] = time.monotonic()

    def start_steps(self) -> dict[str, float]:
        """When the latest start reached each step (0.0: not yet)."""
        return {name: self.steps[i] for i, name in enumerate(START_STEPS)}

    def close(self) -> None:
        self.values.release()
        self.steps.release()
        self._map.close()


class Bridge:
    """The two NICs opened into one DMA domain, sharing one packet pool; :meth:`run` forwards."""

    def __init__(self, bus: Bus, wan_function: PciFunction, lan_function: PciFunction,
                 mark: Callable[[str], None] = lambda step: None) -> None:
        """``mark``: told each of :data:`START_STEPS` the bring-up reaches."""
        from drivers.e1000 import E1000, PacketPool
        self.wan_function, self.lan_function = wan_function, lan_function
        wan_dev = bus.open(wan_function, dma_size=DOMAIN_SIZE)
        try:
            lan_dev = bus.open(lan_function, share_domain_with=wan_dev)
        except BaseException:
            wan_dev.close()
            raise
        mark("nics_open")
        # Frames come when the wires bring them: the proxy guest halts between the tail
        # writes instead of spinning on a core QEMU's main loop wants (Channel.guest_spin).
        for dev in (wan_dev, lan_dev):
            dev.channel.guest_spin = 0.0
        self.pool = PacketPool(wan_dev, POOL_BUFFERS)
        self.wan = E1000(bus, wan_dev, interrupts=False, pool=self.pool, promiscuous=True)
        mark("wan_up")
        self.lan = E1000(bus, lan_dev, interrupts=False, pool=self.pool, promiscuous=True)
        mark("lan_up")
        self._missed_read: dict[str, int] = {}       # count_missed: each NIC's MPC when last read

    def run(self, counters: Counters, beat: Callable[[], None] | None = None,
            until: Callable[[], bool] = lambda: False) -> None:
        """Forward until ``until()`` is true (asked once a round), counting into ``counters``.

        The naps end when asked, not up to 50 us later (the thread's timer slack is
        NAP_SLACK_NS meanwhile): frames wait in the ring for the rest of a nap, and with a
        sender that keeps a window in flight that lateness is the forwarding rate's."""
        with timer_slack(NAP_SLACK_NS):
            self._forward(counters, beat, until)

    def _forward(self, counters: Counters, beat: Callable[[], None] | None, until: Callable[[], bool]) -> None:
        wan, lan, pool = self.wan, self.lan, self.pool
        v, at = counters.values, counters.index
        ways = ((wan, lan, at["wan_to_lan_frames"], at["wan_to_lan_bytes"], at["dropped_lan_tx_full"]),
                (lan, wan, at["lan_to_wan_frames"], at["lan_to_wan_bytes"], at["dropped_wan_tx_full"]))
        idle, next_stats, spin_until = 0, time.monotonic() + STATS_SECONDS, 0.0
        counters.mark("running")
        first_frame = True
        while not until():
            moved = 0
            for src, dst, frames_at, bytes_at, full_at in ways:
                frames = src.recv_buffers(BATCH)
                got = len(frames.addresses)
                if not got:
                    continue
                sent = dst.send_buffers(frames)
                if sent < got:                          # the other ring is full: dropped here
                    pool.give(frames.addresses[sent:])
                v[frames_at] += sent
                v[bytes_at] += sum(frames.lengths[:sent])
                v[full_at] += got - sent
                moved += got
            if beat is not None:
                beat()
            if moved:
                idle, spin_until = 0, time.monotonic() + SPIN_AFTER_FRAME
                if first_frame:
                    counters.mark("first_frame")
                    first_frame = False
                continue
            if time.monotonic() < spin_until:
                continue
            idle += 1
            if idle % RESTATE_ROUNDS == 0:
                wan.restate_rx_tail()
                lan.restate_rx_tail()
            if time.monotonic() >= next_stats:          # what the NICs missed for want of descriptors
                self.count_missed(counters)
                next_stats = time.monotonic() + STATS_SECONDS
            time.sleep(min(IDLE_MAX, IDLE_MIN * idle))

    def count_missed(self, counters: Counters) -> None:
        """Add what each NIC dropped for want of a receive descriptor since the last call.

        The manual's MPC clears when read; QEMU 7.2's does not (it counts from the NIC's
        reset: reading it every 0.25 s added each drop 32 times over 8 s), so what is new
        is the rise since the last read, and a value below the last is a cleared count."""
        v, at = counters.values, counters.index
        for nic, name in ((self.wan, "dropped_wan_missed"), (self.lan, "dropped_lan_missed")):
            missed = nic.stats().missed
            last = self._missed_read.get(name, 0)
            v[at[name]] += missed - last if missed >= last else missed
            self._missed_read[name] = missed

    def close(self) -> None:
        try:
            self.lan.close()
        finally:
            self.wan.close()


def forward(bus: Bus, wan_function: PciFunction, lan_function: PciFunction, counters: Counters,
            beat: Callable[[], None] | None = None, until: Callable[[], bool] = lambda: False) -> None:
    """Open both NICs into one domain and forward until ``until()`` is true (or the process
    is killed), counting into ``counters``."""
    counters.mark("entered")
    bridge = Bridge(bus, wan_function, lan_function, counters.mark)
    log.info("forwarding between %s (wan) and %s (lan)", wan_function.bdf, lan_function.bdf)
    try:
        bridge.run(counters, beat, until)
    finally:
        bridge.close()


def bridge_driver(bus: Bus, function: PciFunction, lan: int, counters: str) -> None:
    """The bridge as a supervised driver process (``function`` is the wan NIC, ``lan`` the
    other's devfn, ``counters`` the counters' file): forward until killed, beating as it goes."""
    lan_function = next(f for f in bus.functions if f.devfn == lan)
    forward(bus, function, lan_function, Counters(counters), beat=getattr(bus, "beat", None))


class BridgeService:
    """The proxy machine's two NICs (:func:`bridge_spec`) bridged by a supervised driver.

    ``BridgeService(pm, wire)`` starts the driver; ``counters()`` reads the counters;
    ``starts()`` yields one line per driver start, restarts with their cause and time
    (``hwharness serve net`` prints them until Ctrl-C); ``close()`` stops the driver and
    the supervisor.
    """

    def __init__(self, pm, wire: str, hang_timeout: float = 1.0) -> None:  # type: ignore[no-untyped-def]
        from ..processes.supervisor import Supervisor
        self.wire = wire
        wan, lan = bridge_nics(pm.bus)
        self._counters = Counters.create(Path(pm.machine.workdir) / "bridge-counters")
        self.supervisor = None
        try:
            self.supervisor = Supervisor(pm, hang_timeout=hang_timeout)
            self.driver = self.supervisor.run("harness.services.bridge:bridge_driver", wan, also=[lan],
                                              name="bridge", lan=lan.devfn,
                                              counters=str(Path(pm.machine.workdir) / "bridge-counters"))
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The driver process forwarding now."""
        return self.driver.pid

    def counters(self) -> dict[str, int]:
        """Frames and bytes each way and drops by cause, since the service started."""
        return self._counters.snapshot()

    def start_steps(self) -> dict[str, float]:
        """When the driver's latest start reached each of :data:`START_STEPS` (0.0: not yet)."""
        return self._counters.start_steps()

    def starts(self, timeout: float = 60.0, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """One line per driver start, as it forwards; see :meth:`Driver.starts`."""
        yield from self.driver.starts(f"forwarding between the user network and {self.wire}", timeout, stop)

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        self._counters.close()

    def __enter__(self) -> "BridgeService":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
