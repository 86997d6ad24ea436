"""The e1000 echo service: its answers without a machine (checked by a decoder of the
test's own, not dpkt's), the host's stream against a loopback echo, then both through
QEMU: a host stream through the user-mode network's port forwarding across a driver
that dies and a fresh one that takes over, and ARP, ICMP and bad frames on a wire."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import dpkt
import pytest

from drivers.e1000 import E1000, TxRingFull
from drivers.e1000.descriptors import RX_DD, RxDesc
from drivers.e1000.driver import DESC_SIZE, DEVICE, VENDOR
from drivers.e1000.regs import Reg
from harness.services.echo import RECV_WAIT, SEND_WAIT, EchoCounters, EchoResponder, serve_echo
from harness.access import PciFunction
from harness.tools.bench.e1000 import wire
from harness.machine import MachineSpec
from harness.services.netstream import UdpEchoStream, free_udp_port, udp_forward
from harness.proxy import ProxyMachine

MAC = bytes.fromhex("525400ec0001")
PEER_MAC = bytes.fromhex("525400ec00fe")
ADDRESS, PEER = "10.0.2.15", "10.0.2.2"


# ---- frames built with dpkt, replies read by hand ----

def ip_frame(proto: int, data: dpkt.Packet | bytes, src: str = PEER, dst: str = ADDRESS, dst_mac: bytes = MAC) -> bytes:
    packet = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, data=data)
    return bytes(dpkt.ethernet.Ethernet(dst=dst_mac, src=PEER_MAC, type=dpkt.ethernet.ETH_TYPE_IP, data=packet))


def udp_frame(payload: bytes, sport: int = 40000, dport: int = 7, **where: Any) -> bytes:
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    u.ulen = len(u)
    return ip_frame(dpkt.ip.IP_PROTO_UDP, u, **where)


def ping_frame(ident: int, seq: int, payload: bytes, **where: Any) -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload)
    return ip_frame(dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=echo), **where)


def arp_request(target: str, sender: str = PEER, sender_mac: bytes = PEER_MAC) -> bytes:
    arp = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REQUEST, sha=sender_mac, spa=socket.inet_aton(sender),
                       tha=b"\0" * 6, tpa=socket.inet_aton(target))
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=sender_mac, type=dpkt.ethernet.ETH_TYPE_ARP, data=arp))


def sums_to_ones(data: bytes) -> bool:
    """RFC 1071, written out: data that carries its own checksum sums to 0xffff."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def read_ip_reply(frame: bytes, proto: int) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """Ethernet destination and source, IP source and destination, and the IP payload of a
    reply, checking its headers on the way (the Ethernet type, a 20-byte IPv4 header with
    a right checksum, the protocol, a total length that fits the frame)."""
    dst, src, ethertype = struct.unpack_from(">6s6sH", frame)
    assert ethertype == 0x0800
    ver_ihl, _, total, _, _, ttl, p, _, ip_src, ip_dst = struct.unpack_from(">BBHHHBBH4s4s", frame, 14)
    assert ver_ihl == 0x45 and p == proto and ttl > 0
    assert sums_to_ones(frame[14:34]), "IP header checksum"
    assert 14 + total <= len(frame)
    return dst, src, ip_src, ip_dst, frame[34:14 + total]


def read_udp_reply(frame: bytes) -> tuple[bytes, bytes, int, int, bytes]:
    """The same, then the UDP ports and payload, checking the length and the checksum
    (over the pseudo-header, which a UDP checksum covers)."""
    dst, _, ip_src, ip_dst, datagram = read_ip_reply(frame, 17)
    sport, dport, length, checksum = struct.unpack_from(">HHHH", datagram)
    assert length == len(datagram)
    assert checksum != 0, "the reply carries a checksum"
    assert sums_to_ones(ip_src + ip_dst + struct.pack(">BBH", 0, 17, length) + datagram), "UDP checksum"
    return dst, ip_dst, sport, dport, datagram[8:]


# ---- the responder, without a machine ----

def test_a_datagram_comes_back_to_its_sender_byte_exact_with_right_checksums(rng: random.Random) -> None:
    responder = EchoResponder(MAC, ADDRESS, 7)
    for size in (0, 1, 17, 18, 1472):              # 18: the smallest frame that needs no padding
        payload = rng.randbytes(size)
        dst, ip_dst, sport, dport, echoed = read_udp_reply(responder.answer(udp_frame(payload, sport=5555)) or b"")
        assert (dst, ip_dst, sport, dport, echoed) == (PEER_MAC, socket.inet_aton(PEER), 7, 5555, payload)
    assert responder.counters == EchoCounters(echoed=5)


def test_a_datagram_padded_to_the_minimum_frame_is_echoed_without_the_padding() -> None:
    frame = udp_frame(b"hi")
    assert len(frame) < 60
    reply = EchoResponder(MAC).answer(frame + b"\0" * (60 - len(frame)))
    assert read_udp_reply(reply or b"")[4] == b"hi"


def test_arp_requests_for_our_address_and_only_those_are_answered() -> None:
    responder = EchoResponder(MAC, ADDRESS)
    reply = responder.answer(arp_request(ADDRESS))
    assert reply is not None
    dst, src, ethertype, hrd, pro, hln, pln, op, sha, spa, tha, tpa = struct.unpack(">6s6sHHHBBH6s4s6s4s", reply[:42])
    assert (dst, src, ethertype) == (PEER_MAC, MAC, 0x0806)
    assert (hrd, pro, hln, pln, op) == (1, 0x0800, 6, 4, 2)
    assert (sha, spa, tha, tpa) == (MAC, socket.inet_aton(ADDRESS), PEER_MAC, socket.inet_aton(PEER))
    assert responder.answer(arp_request("10.0.2.16")) is None                  # someone else
    assert responder.answer(arp_request(ADDRESS, sender=ADDRESS)) is None      # someone else claiming ours
    assert responder.counters == EchoCounters(arp_replies=1, ignored=2)


def test_the_announcement_is_a_gratuitous_arp_to_everyone() -> None:
    frame = EchoResponder(MAC, ADDRESS).announcement()
    dst, src, _, _, _, _, _, op, sha, spa, _, tpa = struct.unpack(">6s6sHHHBBH6s4s6s4s", frame[:42])
    assert (dst, src, op, sha) == (b"\xff" * 6, MAC, 1, MAC)
    assert spa == tpa == socket.inet_aton(ADDRESS)


def test_an_icmp_echo_request_gets_its_reply(rng: random.Random) -> None:
    responder = EchoResponder(MAC, ADDRESS)
    payload = rng.randbytes(56)
    dst, _, ip_src, ip_dst, message = read_ip_reply(responder.answer(ping_frame(0x1234, 7, payload)) or b"", 1)
    assert (dst, ip_src, ip_dst) == (PEER_MAC, socket.inet_aton(ADDRESS), socket.inet_aton(PEER))
    assert message[:2] == b"\0\0"                                                # echo reply, code 0
    assert struct.unpack_from(">HH", message, 4) == (0x1234, 7) and message[8:] == payload
    assert sums_to_ones(message), "ICMP checksum"
    assert responder.counters == EchoCounters(pings=1)


def damaged(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value):]


def damaged_ip_header(frame: bytes, offset: int, value: bytes) -> bytes:
    """``frame`` with a field of its IP header changed and the header checksum made right
    again (over as much of the header as the frame holds), so only the change is wrong."""
    frame = damaged(frame, offset, value)
    header = damaged(frame[14:14 + (frame[14] & 0xF) * 4], 10, b"\0\0")
    header += b"\0" * (len(header) % 2)
    total = sum(struct.unpack(f">{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return damaged(frame, 24, struct.pack(">H", ~total & 0xFFFF))


def bad_frames(mac: bytes = MAC, address: str = ADDRESS) -> dict[str, bytes]:
    """Frames to ``mac`` and ``address`` that break a rule, each named for the rule."""
    good_udp = udp_frame(b"x" * 40, dst=address, dst_mac=mac)
    good_ping = ping_frame(1, 1, b"y" * 40, dst=address, dst_mac=mac)
    return {
        "IP header checksum": damaged(good_udp, 24, b"\x12\x34"),
        "UDP checksum": damaged(good_udp, 40, b"\x12\x34"),
        "ICMP checksum": damaged(good_ping, 36, b"\x12\x34"),
        "IP total length past the frame": damaged_ip_header(good_udp, 16, struct.pack(">H", 1400)),
        "IP total length inside its header": damaged_ip_header(good_udp, 16, struct.pack(">H", 12)),
        "IP header length past the frame": damaged_ip_header(good_udp[:40], 14, b"\x4f"),
        "IP version 6 in an IPv4 ethertype": damaged_ip_header(good_udp, 14, b"\x65"),
        "UDP length longer than the datagram": damaged(good_udp, 38, struct.pack(">H", 400)),
        "an echo request without its identifier": ip_frame(dpkt.ip.IP_PROTO_ICMP, b"\x08\x00\xf7\xff",
                                                           dst=address, dst_mac=mac),
        "ARP for another hardware type": damaged(arp_request(address), 14, b"\x00\x06"),
        "ARP cut short": arp_request(address)[:30],
        "an IPv4 ethertype and no header": good_udp[:20],
    }


# A NIC pads a frame shorter than 60 bytes with zeros; this one then reads as a
# well-formed ARP request for 0.0.0.0.
PADDED_GOOD = {"ARP cut short"}


def test_malformed_frames_are_counted_and_never_answered() -> None:
    responder = EchoResponder(MAC, ADDRESS)
    for rule, frame in bad_frames().items():
        before = responder.counters.malformed
        assert responder.answer(frame) is None, rule
        assert responder.counters.malformed == before + 1, rule
        padded = frame + b"\0" * (60 - len(frame))
        assert responder.answer(padded) is None, rule
        assert responder.counters.malformed == before + 1 + (rule not in PADDED_GOOD), f"{rule}, padded"
    assert responder.counters == EchoCounters(malformed=2 * len(bad_frames()) - len(PADDED_GOOD),
                                              ignored=len(PADDED_GOOD))


def test_frames_for_someone_else_are_ignored_not_malformed() -> None:
    responder = EchoResponder(MAC, ADDRESS, 7)
    others = [udp_frame(b"x", dport=8), udp_frame(b"x", dst="10.0.2.16"), udp_frame(b"x", dst="255.255.255.255"),
              ip_frame(dpkt.ip.IP_PROTO_TCP, dpkt.tcp.TCP(sport=1, dport=7)),
              ip_frame(dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHOREPLY,
                                                             data=dpkt.icmp.ICMP.Echo(id=1, seq=1))),
              bytes(dpkt.ethernet.Ethernet(dst=MAC, src=PEER_MAC, type=0x86DD, data=b"\x60" + b"\0" * 39))]
    fragment = dpkt.ip.IP(src=socket.inet_aton(PEER), dst=socket.inet_aton(ADDRESS), p=17, mf=1,
                          data=b"\0" * 16)
    others.append(bytes(dpkt.ethernet.Ethernet(dst=MAC, src=PEER_MAC, type=0x0800, data=fragment)))
    assert [responder.answer(f) for f in others] == [None] * len(others)
    assert responder.counters == EchoCounters(ignored=len(others))


def test_random_damage_is_answered_or_counted_never_raised(rng: random.Random) -> None:
    responder = EchoResponder(MAC, ADDRESS)
    good = [udp_frame(rng.randbytes(rng.randint(0, 200))), ping_frame(1, 2, rng.randbytes(20)),
            arp_request(ADDRESS), *bad_frames().values()]
    frames = 0
    for _ in range(5000):
        frame = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        frame = frame[:rng.randint(0, len(frame))] if rng.random() < 0.3 else frame
        reply = responder.answer(bytes(frame))
        frames += 1
        if reply is not None and reply[12:14] == b"\x08\x00":
            assert sums_to_ones(reply[14:34]), "every IP reply has a right header checksum"
    assert responder.counters.received == frames


class FakeNic:
    """Frames to hand out, what was sent, and every wait the loop asked for."""

    def __init__(self, frames: Sequence[bytes] = (), ring: int = 1000) -> None:
        self.mac = MAC
        self.inbox = list(frames)
        self.sent: list[bytes] = []
        self.waits: list[float] = []
        self.ring = ring                    # how many frames a send can take

    def send(self, frames: Sequence[bytes], timeout: float = 1.0) -> int:
        self.waits.append(timeout)
        taken = list(frames[:self.ring])
        self.sent += taken
        if len(taken) < len(frames):
            raise TxRingFull("full", len(taken))
        return len(taken)

    def recv(self, max_frames: int = 256, timeout: float = 0.0) -> list[bytes]:
        self.waits.append(timeout)
        out, self.inbox = self.inbox[:max_frames], self.inbox[max_frames:]
        return out


def test_the_loop_announces_beats_on_every_pass_and_never_asks_for_a_long_wait() -> None:
    nic = FakeNic([udp_frame(bytes([i])) for i in range(100)] + [b"garbage"])
    beats = []
    counters = serve_echo(nic, until=lambda: len(beats) >= 5, beat=lambda: beats.append(1))
    assert len(beats) == 5                              # two passes take the frames, three find none
    assert nic.sent[0] == EchoResponder(MAC).announcement()
    assert [read_udp_reply(f)[4] for f in nic.sent[1:]] == [bytes([i]) for i in range(100)]
    assert counters == EchoCounters(echoed=100, malformed=1, announcements=1)
    assert max(nic.waits) <= max(RECV_WAIT, SEND_WAIT) <= 0.025     # so a pass takes well under 50 ms


def test_answers_a_full_transmit_ring_cannot_take_are_counted_and_the_loop_goes_on() -> None:
    nic = FakeNic([udp_frame(bytes([i])) for i in range(64)], ring=10)
    passes = []
    counters = serve_echo(nic, until=lambda: len(passes) >= 3, beat=lambda: passes.append(1))
    assert counters.echoed == 64 and counters.unsent == 54 and len(nic.sent) == 11   # the announcement too


# ---- the stream, against a loopback echo that misbehaves on purpose ----

def test_the_stream_reports_gaps_duplicates_corruption_and_order() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.1)
    done = threading.Event()
    held: list[tuple[bytes, tuple[str, int]]] = []

    def echo() -> None:
        while not done.is_set():
            try:
                data, peer = server.recvfrom(2048)
            except socket.timeout:
                continue
            seq = int.from_bytes(data[:8], "big")
            if 100 <= seq < 150 or seq == 300:
                continue                                    # lost
            if seq == 200:
                held.append((data, peer))                   # late: after 201
                continue
            if seq == 20:
                data = data[:-1] + bytes([data[-1] ^ 1])    # corrupted (and so never echoed)
            server.sendto(data, peer)
            if seq == 10:
                server.sendto(data, peer)                   # twice
            if seq == 201:
                server.sendto(*held.pop())

    thread = threading.Thread(target=echo)
    thread.start()
    try:
        stream = UdpEchoStream(server.getsockname()[1], interval=0.0005, count=400, sizes=(8, 300)).start()
        stream.wait_until(lambda s: s.sent == 400, 30, "400 datagrams sent")
        report = stream.stop(drain=0.5)
    finally:
        done.set()
        thread.join()
        server.close()
    assert (report.sent, report.echoed, report.lost) == (400, 400 - 52, 52)
    assert [(g.first, g.last) for g in report.gaps] == [(20, 20), (100, 149), (300, 300)]
    assert report.lost_numbers() == [20, *range(100, 150), 300]
    assert all(g.start <= g.end for g in report.gaps) and report.gaps[1].count == 50
    assert (report.duplicates, report.corrupted, report.reordered) == (1, 1, 1)


# ---- through QEMU ----

SERVICE_RX_ENTRIES = 1024
STREAM_SLOT, WIRE_SLOT = 0x10, 0x11     # PCI slots: which e1000 is which, whatever the enumeration order
WIRE_ADDRESS = "192.168.77.2"


class EchoNet:
    """One machine, two e1000s: one on the user-mode network, whose host port forwards to
    10.0.2.15:7, and one on a wire to a host socket, for frames the test makes itself."""

    def __init__(self, pm: ProxyMachine, host_port: int, wire_host: socket.socket, wire_port: int) -> None:
        self.pm, self.host_port = pm, host_port
        self.wire_host, self.wire_port = wire_host, wire_port

    def function(self, slot: int) -> PciFunction:
        return next(f for f in self.pm.bus.find_all(vendor=VENDOR, device=DEVICE) if f.dev == slot)

    def open(self, slot: int) -> E1000:
        """A fresh driver, as a restarted driver process makes one: open the device and
        bring it up from reset (the MAC comes from the EEPROM again). The receive ring holds
        more than the second of traffic QEMU's e1000 holds back after a bring-up (echo.py)."""
        return E1000(self.pm.bus, self.pm.bus.open(self.function(slot)), rx_entries=SERVICE_RX_ENTRIES)


@pytest.fixture(scope="module")
def echo_net(proxy_machine_factory_module) -> Iterator[EchoNet]:
    host_port = free_udp_port()
    wire_host, wire_port, wire_netdev = wire()

    def configure(spec: MachineSpec) -> None:
        # Not restrict=on: libslirp then drops every UDP datagram from the guest, replies to
        # a forwarded port too. The service only answers, so its traffic stays on loopback.
        spec.netdev("user", "net0", hostfwd=udp_forward(host_port, ADDRESS, 7))
        spec.device("e1000", netdev="net0", mac="52:54:00:ec:00:01", addr=f"{STREAM_SLOT:#x}")
        spec.netdev("socket", "net1", **wire_netdev)
        spec.device("e1000", netdev="net1", mac="52:54:00:ec:00:02", addr=f"{WIRE_SLOT:#x}")

    yield EchoNet(proxy_machine_factory_module(configure, name="echo"), host_port, wire_host, wire_port)
    wire_host.close()


class Service:
    """serve_echo on a NIC in a thread of the test process, as the driver's process will run
    it; ``stop()`` ends it and returns its counters, raising what the loop raised."""

    def __init__(self, nic: E1000, **where: object) -> None:
        self.nic = nic
        self.counters = EchoCounters()
        self.beats = 0
        self.last_beat: float | None = None
        self.longest_between_beats = 0.0    # s: a figure for people, never asserted on
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._beat = threading.Condition()
        self._thread = threading.Thread(target=self._run, kwargs=where, name="echo-service", daemon=True)
        self._thread.start()

    def _run(self, **where: object) -> None:
        try:
            serve_echo(self.nic, until=self._stop.is_set, beat=self._on_beat, counters=self.counters,
                       **where)  # type: ignore[arg-type]
        except BaseException as exc:        # handed to the test by stop()
            self.error = exc
        finally:
            with self._beat:
                self._beat.notify_all()

    def _on_beat(self) -> None:
        now = time.perf_counter()
        if self.last_beat is not None:
            self.longest_between_beats = max(self.longest_between_beats, now - self.last_beat)
        self.last_beat = now
        with self._beat:
            self.beats += 1
            self._beat.notify_all()

    def wait_serving(self, timeout: float = 30) -> None:
        """Until the loop has made its first pass (it has announced itself and is receiving)."""
        with self._beat:
            assert self._beat.wait_for(lambda: self.beats > 0 or not self._thread.is_alive(), timeout)
        assert self.error is None, self.error

    def wait_echoed(self, count: int, timeout: float = 60) -> None:
        """Until the service has echoed ``count`` datagrams: its NIC is taking frames."""
        with self._beat:
            assert self._beat.wait_for(lambda: self.counters.echoed >= count or not self._thread.is_alive(),
                                       timeout), f"no {count} echoes within {timeout:g} s: {self.counters}"
        assert self.error is None, self.error

    def stop(self, timeout: float = 30) -> EchoCounters:
        """End the loop (again: nothing) and return its counters, raising what it raised."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the echo loop did not come back to its stop check"
        if self.error is not None:
            raise self.error
        return self.counters


def abandon(nic: E1000) -> None:
    """What a killed driver process leaves behind: no register write, no goodbye. The
    harness revokes its channel (the proxy drops its interrupt, turns bus mastering off
    and unmaps its DMA), and the host forgets the process's objects."""
    nic.dev.close()
    if nic.irq is not None:
        nic.irq.close()


@pytest.mark.qemu
def test_500_datagrams_through_the_user_network_come_back_byte_exact(echo_net: EchoNet) -> None:
    nic = echo_net.open(STREAM_SLOT)
    service = Service(nic)
    try:
        service.wait_serving()
        # paced by the echoes as well as by the clock: however slow the host makes the
        # service, no more than 32 wait for it anywhere, so none is dropped for room
        with UdpEchoStream(echo_net.host_port, count=500, window=32) as stream:
            stream.wait_until(lambda s: s.sent == 500, 120, "500 datagrams sent")
        report = stream.stop()
        counters = service.stop()
    finally:
        service.stop()
        nic.close()
    print(f"\n500 datagrams (seed {stream.seed}): {report}\nservice: {counters}, "
          f"{service.beats} beats, at most {service.longest_between_beats * 1000:.1f} ms apart")
    assert (report.sent, report.echoed, report.lost, report.gaps) == (500, 500, 0, ())
    assert (report.duplicates, report.corrupted, report.reordered) == (0, 0, 0)
    assert counters.echoed == 500 and counters.malformed == 0 and counters.unsent == 0


@pytest.mark.qemu
def socket_drops(port: int) -> int:
    """Datagrams the host's kernel dropped at the UDP socket bound to ``port`` on loopback
    (QEMU's user network forwarding it), its count in /proc/net/udp: on a loaded host QEMU
    may not read its socket for longer than the socket's buffer lasts."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[-1])
    raise AssertionError(f"no UDP socket bound to port {port}")


def test_the_stream_resumes_after_the_driver_dies_and_a_fresh_one_takes_over(echo_net: EchoNet) -> None:
    """The stream keeps its pace throughout. Whatever it loses must lie between the newest
    echo before the driver died and the first echo from the new one, apart from datagrams
    the host's kernel dropped before QEMU read them (counted by the kernel)."""
    dropped_before = socket_drops(echo_net.host_port)
    nic: E1000 | None = echo_net.open(STREAM_SLOT)
    service = Service(nic)
    try:
        service.wait_serving()
        with UdpEchoStream(echo_net.host_port) as stream:
            stream.wait_until(lambda s: s.echoed >= 300, 120, "300 echoes before the driver dies")
            before = service.stop()
            newest_before = stream.highest_echoed      # nothing up to here may be lost: all sent while it ran
            abandon(nic)
            nic = None
            died_at = stream.sent
            stream.wait_until(lambda s: s.sent >= died_at + 250, 60, "250 datagrams sent while it is down")
            nic = echo_net.open(STREAM_SLOT)
            service = Service(nic)
            service.wait_serving()
            service.wait_echoed(1)
            first_echo_at = stream.sent                # every datagram from here on must come back
            stream.wait_until(lambda s: s.highest_echoed >= first_echo_at + 300, 120, "300 echoes after it")
        report = stream.stop()
        after = service.stop()
    finally:
        service.stop()
        if nic is not None:
            nic.close()
    lost = report.lost_numbers()
    dropped_by_host = socket_drops(echo_net.host_port) - dropped_before
    print(f"\ndown from datagram {died_at} (newest echo {newest_before}), first echo of the new driver by "
          f"{first_echo_at} (seed {stream.seed}; the host's kernel dropped {dropped_by_host} at QEMU's socket):"
          f"\n{report}\nbefore: {before}\nafter: {after}")
    assert report.corrupted == report.duplicates == 0
    assert report.sent == report.echoed + report.lost and report.echoed > 600
    outside = [n for n in lost if not newest_before < n < first_echo_at]
    assert len(outside) <= dropped_by_host, f"losses outside the down window: {outside[:20]}"
    assert before.echoed + after.echoed >= report.echoed, "every echo the host saw, one of the two services sent"
    assert before.malformed == after.malformed == 0 and before.unsent == after.unsent == 0


def wire_frames(mac: bytes, count: int) -> list[bytes]:
    """``count`` distinct UDP frames from a peer on the wire to the NIC with ``mac``."""
    return [udp_frame(bytes([n]) * 64, src="192.168.77.1", dst=WIRE_ADDRESS, dst_mac=mac) for n in range(count)]


def receive_until(nic: E1000, last: bytes, passes: int = 50) -> list[bytes]:
    """What ``nic`` receives until ``last`` is among it (at most ``passes`` waits of a second)."""
    got: list[bytes] = []
    for _ in range(passes):
        if last in got:
            break
        got += nic.recv(timeout=1.0)
    return got


@pytest.mark.qemu
def test_a_frame_that_waited_for_a_killed_driver_leaves_the_fresh_ring_alone(echo_net: EchoNet) -> None:
    """QEMU's e1000 takes CTRL.RST as a no-op: a NIC whose driver was killed still receives
    through the old head and tail. A frame that waited in QEMU while the NIC could not DMA
    must not land in the fresh driver's ring when bus mastering comes back (over the ring's
    null descriptors it marked every one done, and the driver could then wait for good on
    one the head never reached): every descriptor done lies behind the head, and frames sent
    afterwards arrive in order."""
    host, to_nic = echo_net.wire_host, ("127.0.0.1", echo_net.wire_port)
    old = echo_net.open(WIRE_SLOT)
    frames = wire_frames(old.mac, 5)
    host.sendto(frames[0], to_nic)
    assert old.recv(1, timeout=30) == [frames[0]]      # past the hold after its RCTL write: it receives
    abandon(old)
    host.sendto(frames[1], to_nic)                      # waits in QEMU: the NIC may not DMA
    nic = echo_net.open(WIRE_SLOT)
    try:
        ring = nic.rx_ring.view
        done = [i for i in range(nic.rx_n) if ring[i * DESC_SIZE + RxDesc.status.offset] & RX_DD]
        head = nic.regs.read32(Reg.RDH)                 # after the ring: a descriptor is done before the head moves
        assert all(i < head for i in done), f"{len(done)} descriptors done, head at {head}"
        for frame in frames[2:]:
            host.sendto(frame, to_nic)
        got = receive_until(nic, frames[-1])
    finally:
        nic.close()
    assert [f for f in got if f != frames[1]] == frames[2:]


@pytest.mark.qemu
def test_frames_left_in_the_ring_are_not_received_after_a_reset(echo_net: EchoNet) -> None:
    """A bring-up on a NIC already in use gives every descriptor back as not done: the
    frames the NIC had written but nobody had taken are gone, not received again."""
    host, to_nic = echo_net.wire_host, ("127.0.0.1", echo_net.wire_port)
    nic = echo_net.open(WIRE_SLOT)
    try:
        frames = wire_frames(nic.mac, 6)
        for frame in frames[:3]:
            host.sendto(frame, to_nic)
        for _ in range(300):                            # in the ring (after the NIC's hold), left there
            if nic.regs.read32(Reg.RDH) == 3:
                break
            time.sleep(0.1)
        assert nic.regs.read32(Reg.RDH) == 3
        nic.reset_and_init()
        for frame in frames[3:]:
            host.sendto(frame, to_nic)
        got = receive_until(nic, frames[-1])
    finally:
        nic.close()
    assert got == frames[3:]


@pytest.mark.qemu
def test_arp_icmp_udp_and_bad_frames_on_a_wire(echo_net: EchoNet, rng: random.Random) -> None:
    """Frames the test makes, through a real NIC: QEMU's user-mode network does not pass a
    ping from the host to the guest, so ICMP is checked here, on a wire to a host socket."""
    host, to_nic = echo_net.wire_host, ("127.0.0.1", echo_net.wire_port)
    host.settimeout(30)
    nic = echo_net.open(WIRE_SLOT)
    service = Service(nic, address=WIRE_ADDRESS)
    bad = {rule: frame for rule, frame in bad_frames(nic.mac, WIRE_ADDRESS).items() if rule not in PADDED_GOOD}
    payload, data = rng.randbytes(56), rng.randbytes(1000)
    try:
        service.wait_serving()
        announcement = host.recv(2048)
        for frame in [*bad.values(), arp_request(WIRE_ADDRESS, "192.168.77.1"),
                      ping_frame(0x4857, 3, payload, src="192.168.77.1", dst=WIRE_ADDRESS, dst_mac=nic.mac),
                      udp_frame(data, sport=1234, src="192.168.77.1", dst=WIRE_ADDRESS, dst_mac=nic.mac)]:
            host.sendto(frame, to_nic)
        arp, ping, udp = (host.recv(2048) for _ in range(3))
        counters = service.stop()
    finally:
        service.stop()
        nic.close()
    assert announcement[:14] == b"\xff" * 6 + nic.mac + b"\x08\x06"
    assert announcement[28:32] == announcement[38:42] == socket.inet_aton(WIRE_ADDRESS)
    assert arp[:6] == PEER_MAC and arp[20:22] == b"\0\x02"                            # an ARP reply, to the asker
    assert arp[22:42] == nic.mac + socket.inet_aton(WIRE_ADDRESS) + PEER_MAC + socket.inet_aton("192.168.77.1")
    dst, _, ip_src, ip_dst, message = read_ip_reply(ping, 1)
    assert (dst, ip_src, ip_dst) == (PEER_MAC, socket.inet_aton(WIRE_ADDRESS), socket.inet_aton("192.168.77.1"))
    assert message[:2] == b"\0\0" and message[4:8] == struct.pack(">HH", 0x4857, 3) and message[8:] == payload
    assert sums_to_ones(message), "ICMP checksum"
    assert read_udp_reply(udp) == (PEER_MAC, socket.inet_aton("192.168.77.1"), 7, 1234, data)
    assert counters.malformed == len(bad) == len(bad_frames()) - len(PADDED_GOOD)
    assert (counters.arp_replies, counters.pings, counters.echoed) == (1, 1, 1)
