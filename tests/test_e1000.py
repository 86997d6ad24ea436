"""The e1000 driver against real peers: QEMU's user-mode network and a host socket."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import dpkt
import pytest

from drivers.e1000 import E1000, TxRingFull
from drivers.e1000.regs import Reg, Tctl
from harness.tools.bench.e1000 import host_socket, wire
from harness.machine import MachineSpec, Option, RuntimeFile
from harness.services.netstack import Host
from harness.proxy import ProxyMachine, raw

pytestmark = pytest.mark.qemu

BURST = 80              # frames the host sends before the guest catches up: more than a 64-entry ring


@pytest.fixture(scope="module")
def user_net(proxy_machine_factory_module) -> Iterator[tuple[ProxyMachine, Host, Path]]:
    pcap = RuntimeFile("user.pcap")

    def configure(spec: MachineSpec) -> None:
        spec.netdev("user", "net0")
        spec.device("e1000", netdev="net0", mac="52:54:00:ab:cd:01")
        spec.options.append(Option("object", "filter-dump", {"id": "dump0", "netdev": "net0", "file": pcap}))

    pm = proxy_machine_factory_module(configure, name="usernet")
    nic = E1000.open(pm.bus)
    yield pm, Host(nic), pm.machine.path(pcap)
    nic.close()


def test_dhcp_arp_icmp_and_udp_through_the_user_mode_network(user_net) -> None:
    pm, host, _ = user_net
    lease = host.dhcp()
    assert ipaddress.IPv4Address(lease.address) in ipaddress.IPv4Network(f"{lease.router}/{lease.netmask}",
                                                                        strict=False)
    assert lease.seconds > 0
    gateway = host.resolve(lease.router)
    assert len(gateway) == 6 and not gateway[0] & 1, "a unicast MAC for the gateway"
    rtts = [host.ping(lease.router, seq, payload=os.urandom(56)) for seq in range(5)]
    assert all(r > 0 for r in rtts)
    # a server on the host's loopback, reached through the user-mode network's forwarding
    server = host_socket()
    port = server.getsockname()[1]

    def echo() -> None:
        data, peer = server.recvfrom(2048)
        server.sendto(data[::-1], peer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    payload = os.urandom(200)
    assert host.udp_exchange(lease.router, port, payload) == payload[::-1]
    thread.join(5)
    server.close()


def test_the_filter_dump_pcap_reads_back_with_a_packet_library(user_net, tmp_path: Path) -> None:
    pm, host, pcap = user_net
    if host.lease is None:
        host.dhcp()
    host.ping(host.lease.router, 99)
    pm.machine.qmp("query-status")
    kept = tmp_path / "e1000-user.pcap"                    # the artifact
    shutil.copy(pcap, kept)
    seen = set()
    with open(kept, "rb") as f:
        for _, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            if isinstance(eth.data, dpkt.arp.ARP):
                seen.add("arp")
            elif isinstance(eth.data, dpkt.ip.IP):
                inner = eth.data.data
                if isinstance(inner, dpkt.udp.UDP) and {inner.sport, inner.dport} == {67, 68}:
                    seen.add("dhcp")
                    if inner.sport == 68:
                        assert eth.src == host.nic.mac
                if isinstance(inner, dpkt.icmp.ICMP):
                    seen.add({dpkt.icmp.ICMP_ECHO: "echo", dpkt.icmp.ICMP_ECHOREPLY: "reply"}.get(inner.type, "icmp"))
    assert {"arp", "dhcp", "echo", "reply"} <= seen


@pytest.fixture(scope="module")
def socket_net(proxy_machine_factory_module) -> Iterator[tuple[ProxyMachine, E1000, socket.socket, int]]:
    host, qemu_port, netdev = wire()

    def configure(spec: MachineSpec) -> None:
        spec.netdev("socket", "net1", **netdev)
        spec.device("e1000", netdev="net1", mac="52:54:00:ab:cd:02")

    pm = proxy_machine_factory_module(configure, name="socketnet")
    nic = E1000.open(pm.bus, rx_entries=64, tx_entries=64)    # small rings: they overflow
    yield pm, nic, host, qemu_port
    nic.close()
    host.close()


def frames_for(mac: bytes, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [mac + rng.randbytes(6) + b"\x88\xb5" + rng.randbytes(rng.randint(60, 1514) - 14) for _ in range(n)]


def test_10000_frames_each_way_arrive_exact_in_order_through_full_rings(socket_net) -> None:
    pm, nic, host, qemu_port = socket_net
    seed = random.randrange(2**32)
    # guest -> host: 10,000 frames through a 64-entry ring
    out = frames_for(b"\x02" * 6, 10_000, seed)
    received: list[bytes] = []
    host.settimeout(10)

    def drain() -> None:
        while len(received) < len(out):
            received.append(host.recv(2048))

    reader = threading.Thread(target=drain)
    reader.start()
    for i in range(0, len(out), 500):
        nic.send(out[i:i + 500], timeout=10)
    nic.flush_tx(10)
    reader.join(60)
    assert received == out, f"seed {seed}"
    # host -> guest: bursts bigger than the receive ring; QEMU holds what the ring cannot
    # take. (A burst stays well inside the default socket buffer of QEMU's own UDP
    # socket, which the host kernel would otherwise overflow before QEMU sees a thing.)
    inbound = frames_for(nic.mac, 10_000, seed + 1)
    got: list[bytes] = []
    for i in range(0, len(inbound), BURST):
        for frame in inbound[i:i + BURST]:
            host.sendto(frame, ("127.0.0.1", qemu_port))
        while len(got) < min(i + BURST, len(inbound)):
            batch = nic.recv(256, timeout=10)
            assert batch, f"frames stopped at {len(got)} (seed {seed})"
            got += batch
    assert got == inbound, f"seed {seed}"
    stats = nic.stats()
    assert stats.crc_errors == 0


def test_bad_frames_are_refused_before_anything_is_queued(socket_net) -> None:
    _, nic, _, _ = socket_net
    tail = nic.tx_tail
    for bad in ([b"x" * 1515], [b"\x02" * 60, b"x" * 13]):
        with pytest.raises(ValueError):
            nic.send(bad)
    assert nic.tx_tail == tail


def test_zero_copy_sends_from_dma_buffers_mix_with_copying_sends(socket_net) -> None:
    pm, nic, host, _ = socket_net
    nic.flush_tx()
    frames = frames_for(b"\x02" * 6, 300, random.randrange(2**32))
    buffers = []
    for frame in frames[:150]:
        buffer = nic.dev.dma_alloc(2048)
        buffer.view[:len(frame)] = frame
        buffers.append((buffer, len(frame)))
    with pytest.raises(ValueError):                            # longer than its buffer holds
        nic.send_from([(buffers[0][0], 2049)])
    with pytest.raises(ValueError):
        nic.send_from([(buffers[0][0], 13)])
    host.settimeout(10)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.extend(host.recv(2048) for _ in frames))
    reader.start()
    for i in range(0, 150, 50):                               # 64-entry ring: both forms wrap it
        nic.send_from(buffers[i:i + 50], timeout=10)
        nic.send(frames[150 + i:200 + i], timeout=10)
    nic.flush_tx(10)
    reader.join(60)
    expected = [f for i in range(0, 150, 50) for f in frames[i:i + 50] + frames[150 + i:200 + i]]
    assert received == expected
    for buffer, _ in buffers:
        nic.dev.dma_free(buffer)


def test_a_full_transmit_ring_times_out_and_spares_the_frames_in_flight(socket_net) -> None:
    pm, nic, host, _ = socket_net
    nic.flush_tx()
    tctl = nic.regs.read32(Reg.TCTL)
    nic.regs.write32(Reg.TCTL, tctl & ~Tctl.EN)               # the transmitter stops
    frames = frames_for(b"\x02" * 6, nic.tx_n - 1, 7)
    nic.send(frames)                                          # fills the ring exactly
    ring_before = bytes(nic.tx_ring.view)
    bufs_before = bytes(nic.tx_bufs.view)
    with pytest.raises(TxRingFull) as full:
        nic.send([b"\x02" * 60], timeout=0.2)
    assert full.value.sent == 0
    assert bytes(nic.tx_ring.view) == ring_before and bytes(nic.tx_bufs.view) == bufs_before
    host.settimeout(10)
    nic.regs.write32(Reg.TCTL, tctl)                          # and goes again
    nic.regs.write32(Reg.TDT, nic.tx_tail)
    assert [host.recv(2048) for _ in frames] == frames


def test_the_native_transmit_loop_sends_real_frames_and_checks_its_grant(socket_net) -> None:
    from harness.tools.bench.e1000 import NativeLoop, frame_of
    from harness.errors import AccessDenied
    pm, nic, host, _ = socket_net
    native = NativeLoop(pm.bus, nic)
    try:
        nic.stats()                             # the counters clear on read
        frame = frame_of(300, b"\x02" * 6)
        host.settimeout(10)
        assert native.tx(frame, 150) == 150     # more than the 64-entry ring holds
        assert [host.recv(2048) for _ in range(150)] == [frame] * 150
        assert nic.stats().tx_packets == 150
        with pytest.raises(AccessDenied):       # a parameter block outside the DMA pool
            raw.native_loop(nic.dev.channel, pm.bus.abi.PROXY_OP_NIC_TX_LOOP, 0x1000, "native loop")
    finally:
        native.close()


def test_the_native_receive_loop_receives_exactly_the_frames_sent(socket_net, rng: random.Random) -> None:
    from harness.tools.bench.e1000 import NativeLoop
    from drivers.e1000.driver import BUFFER_SIZE
    pm, nic, host, qemu_port = socket_net
    native = NativeLoop(pm.bus, nic)
    frames = [nic.mac + b"\x02" * 6 + b"\x88\xb5" + i.to_bytes(4, "little") + rng.randbytes(rng.randint(46, 1496))
              for i in range(300)]
    try:
        nic.stats()
        run = native.prepare_rx(len(frames))

        def feed() -> None:                     # paced by the loop's progress: no overflow anywhere
            for i, frame in enumerate(frames):
                while i - native.done[0] >= 32:
                    time.sleep(0.0005)
                host.sendto(frame, ("127.0.0.1", qemu_port))
        feeder = threading.Thread(target=feed)
        feeder.start()
        assert run() == len(frames)
        feeder.join(10)
        assert nic.stats().rx_packets == len(frames)
        assert native.last_received(len(frames[-1])) == frames[-1]
        # the ring's buffers hold the last ring-full of frames, in order
        for back in range(1, nic.rx_n + 1):
            index = (nic.rx_next - back) % nic.rx_n
            frame = frames[-back]
            assert bytes(nic.rx_bufs.view[index * BUFFER_SIZE:index * BUFFER_SIZE + len(frame)]) == frame
        assert nic.recv(256) == [], "nothing more arrived"
    finally:
        native.close()
