"""An echo service on one IPv4 address: ARP, ICMP echo, and UDP echo on one port.

It needs no DHCP: it takes a fixed address (QEMU's user-mode network gives the guest
10.0.2.15, its gateway is 10.0.2.2) and announces it with a gratuitous ARP when it
starts, so a peer that already knew the address from a previous driver learns the
(possibly new) NIC at once, and one that did not need not ask first.

:class:`EchoResponder` decides what a frame calls for and builds the answer; it is pure,
so tests drive it without a machine. :func:`serve_echo` is the loop around a NIC. Frames
are parsed and built with dpkt, as :mod:`harness.services.netstack` does.

A frame that cannot be parsed, or whose IP, UDP or ICMP checksum is wrong, is counted
as malformed and dropped; a well-formed frame that is not for this service (another
address, port or protocol, a fragment) is counted as ignored. Neither stops the loop.

What a service loses depends on the NIC's receive ring, because of how QEMU's e1000
behaves after a write to RCTL (which a NIC's first bring-up makes; a restarted driver
finds RCTL as it wants it and leaves it alone): for one second of the guest's clock it
takes no frame, holding what arrives in QEMU's queue, then delivers the queue at once,
and drops what the ring cannot hold at that moment (a receiver overrun). A ring of 256
loses all but 255 of that second's frames; a ring that holds a second of the traffic
(``E1000(..., rx_entries=1024)`` for 500 datagrams a second) loses none. A restart loses
what arrived while the driver was down (QEMU drops its queue when bus mastering returns).
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from typing import Callable

import dpkt

from ..access import Bus, PciFunction
from .netstack import Nic, arp_frame, ip

from drivers.e1000.driver import TxRingFull

log = logging.getLogger(__name__)

SLIRP_GUEST = "10.0.2.15"       # the address QEMU's user-mode network forwards to by default
ECHO_PORT = 7                   # RFC 862
RX_BATCH = 64                   # frames answered per pass
RECV_WAIT = 0.02                # s: the longest a pass waits for a frame ...
SEND_WAIT = 0.02                # s: ... or for transmit descriptors, so beat() comes at least every ~50 ms

_PSEUDO_HEADER = struct.Struct(">4s4sxBH")   # RFC 768: source, destination, zero, protocol, UDP length


class _Malformed(Exception):
    """A frame that claims a protocol but breaks its rules (internal: it is counted, not raised)."""


@dataclass
class EchoCounters:
    """What the service did, frame by frame. Every received frame lands in exactly one of
    ``echoed``, ``pings``, ``arp_replies``, ``ignored`` and ``malformed``."""

    echoed: int = 0             # UDP datagrams echoed
    pings: int = 0              # ICMP echo requests answered
    arp_replies: int = 0        # ARP requests for our address answered
    ignored: int = 0            # well-formed, but not for this service
    malformed: int = 0          # could not be parsed, or a checksum was wrong
    announcements: int = 0      # gratuitous ARPs sent (one per start)
    unsent: int = 0             # answers dropped because no transmit descriptor came free in time

    @property
    def received(self) -> int:
        return self.echoed + self.pings + self.arp_replies + self.ignored + self.malformed


def _checksum_ok(*parts: bytes) -> bool:
    """The Internet checksum (RFC 1071) over data that includes its checksum field sums to zero."""
    return int(dpkt.in_cksum(b"".join(parts))) == 0


class EchoResponder:
    """The answers of a host at ``address`` (dotted quad) with MAC ``mac`` that echoes UDP
    on ``port``: :meth:`answer` takes one received frame and returns the frame to send
    back, or None, counting what it did in ``counters``."""

    def __init__(self, mac: bytes, address: str = SLIRP_GUEST, port: int = ECHO_PORT,
                 counters: EchoCounters | None = None) -> None:
        self.mac, self.address, self.port = mac, address, port
        self._address = ip(address)
        self.counters = counters if counters is not None else EchoCounters()

    def announcement(self) -> bytes:
        """A gratuitous ARP request for our address (sender and target both us)."""
        return arp_frame(dpkt.arp.ARP_OP_REQUEST, self.mac, self.address, b"\0" * 6, self.address)

    def answer(self, frame: bytes) -> bytes | None:
        try:
            reply = self._answer(dpkt.ethernet.Ethernet(frame))
        except (_Malformed, dpkt.Error, struct.error, ValueError, IndexError) as exc:
            # dpkt raises its own errors, and struct's and ValueError from the headers it
            # unpacks before it checks their length
            log.debug("malformed frame (%s): %s", exc, frame[:64].hex())
            self.counters.malformed += 1
            return None
        if reply is None:
            self.counters.ignored += 1
        return reply

    def _answer(self, eth: dpkt.ethernet.Ethernet) -> bytes | None:
        if eth.type == dpkt.ethernet.ETH_TYPE_ARP:
            return self._arp(eth)
        if eth.type == dpkt.ethernet.ETH_TYPE_IP:
            return self._ip(eth)
        return None

    def _arp(self, eth: dpkt.ethernet.Ethernet) -> bytes | None:
        a = eth.data
        if not isinstance(a, dpkt.arp.ARP):
            raise _Malformed("ARP that dpkt could not parse")
        if (a.hrd, a.pro, a.hln, a.pln) != (dpkt.arp.ARP_HRD_ETH, dpkt.arp.ARP_PRO_IP, 6, 4):
            raise _Malformed(f"ARP for hardware {a.hrd} protocol {a.pro:#x} ({a.hln}- and {a.pln}-byte addresses)")
        if len(a.sha) != 6 or len(a.spa) != 4 or len(a.tpa) != 4:
            raise _Malformed("a truncated ARP packet")
        if a.op != dpkt.arp.ARP_OP_REQUEST or a.tpa != self._address or a.spa == self._address:
            return None                             # not a question for us (or someone else's announcement of it)
        self.counters.arp_replies += 1
        return arp_frame(dpkt.arp.ARP_OP_REPLY, self.mac, self.address, a.sha, socket.inet_ntoa(a.spa))

    def _ip(self, eth: dpkt.ethernet.Ethernet) -> bytes | None:
        packet = eth.data
        if not isinstance(packet, dpkt.ip.IP) or packet.v != 4:
            raise _Malformed("not an IPv4 header")
        if not _checksum_ok(packet.pack_hdr(), bytes(packet.opts)):
            raise _Malformed("a wrong IP header checksum")
        if not packet.hl * 4 <= packet.len <= len(packet):
            raise _Malformed(f"an IP packet of {len(packet)} bytes that says it has {packet.len}")
        if packet.dst != self._address:
            return None
        if packet.mf or packet.offset:
            return None                             # a fragment: the service does not reassemble
        if packet.p == dpkt.ip.IP_PROTO_UDP:
            return self._udp(eth, packet)
        if packet.p == dpkt.ip.IP_PROTO_ICMP:
            return self._icmp(eth, packet)
        return None

    def _udp(self, eth: dpkt.ethernet.Ethernet, packet: dpkt.ip.IP) -> bytes | None:
        u = packet.data
        if not isinstance(u, dpkt.udp.UDP):
            raise _Malformed("a UDP header that dpkt could not parse")
        if u.ulen != len(u):
            raise _Malformed(f"a UDP length of {u.ulen} in a {len(u)}-byte datagram")
        if u.sum and not _checksum_ok(_PSEUDO_HEADER.pack(packet.src, packet.dst, packet.p, u.ulen),
                                      u.pack_hdr(), bytes(u.data)):
            raise _Malformed("a wrong UDP checksum")   # (zero: the sender computed none)
        if u.dport != self.port:
            return None
        echo = dpkt.udp.UDP(sport=u.dport, dport=u.sport, data=bytes(u.data))
        echo.ulen = len(echo)
        self.counters.echoed += 1
        return self._reply(eth, packet, dpkt.ip.IP_PROTO_UDP, echo)

    def _icmp(self, eth: dpkt.ethernet.Ethernet, packet: dpkt.ip.IP) -> bytes | None:
        icmp = packet.data
        if not isinstance(icmp, dpkt.icmp.ICMP):
            raise _Malformed("an ICMP header that dpkt could not parse")
        if icmp.type != dpkt.icmp.ICMP_ECHO or icmp.code != 0:
            return None
        request = icmp.data
        if not isinstance(request, dpkt.icmp.ICMP.Echo):
            raise _Malformed("an echo request too short for its identifier and sequence number")
        if not _checksum_ok(icmp.pack_hdr(), request.pack_hdr(), bytes(request.data)):
            raise _Malformed("a wrong ICMP checksum")
        reply = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHOREPLY, code=0,
                               data=dpkt.icmp.ICMP.Echo(id=request.id, seq=request.seq, data=bytes(request.data)))
        self.counters.pings += 1
        return self._reply(eth, packet, dpkt.ip.IP_PROTO_ICMP, reply)

    def _reply(self, eth: dpkt.ethernet.Ethernet, packet: dpkt.ip.IP, proto: int, data: dpkt.Packet) -> bytes:
        """Back the way it came: to the sender's MAC and address, from ours. dpkt fills in
        the IP, UDP and ICMP checksums, which are left zero here."""
        out = dpkt.ip.IP(src=self._address, dst=packet.src, p=proto, ttl=64, data=data)
        return bytes(dpkt.ethernet.Ethernet(dst=eth.src, src=self.mac, type=dpkt.ethernet.ETH_TYPE_IP, data=out))


def serve_echo(nic: Nic, address: str = SLIRP_GUEST, port: int = ECHO_PORT,
               until: Callable[[], bool] = lambda: False, beat: Callable[[], None] | None = None,
               counters: EchoCounters | None = None) -> EchoCounters:
    """Answer ARP for ``address``, ICMP echo to it and UDP datagrams to ``port`` (echoed
    back to their sender) on an initialised ``nic`` until ``until()`` is true; the counters.

    It starts by announcing the address (no DHCP needed). ``beat()`` is called on every
    pass, and no pass waits longer than about 50 ms, so a supervisor can take a missing
    beat for a hung driver. ``counters`` (added to as it goes) lets a caller watch.
    Errors from the NIC itself are raised; bad frames never are.
    """
    responder = EchoResponder(nic.mac, address, port, counters)
    counts = responder.counters
    _send(nic, [responder.announcement()], counts)
    counts.announcements += 1
    log.info("echo service on %s (%s), UDP port %d", address, nic.mac.hex(":"), port)
    while not until():
        if beat is not None:
            beat()
        answers = [a for a in map(responder.answer, nic.recv(RX_BATCH, timeout=RECV_WAIT)) if a is not None]
        if answers:
            _send(nic, answers, counts)
    return counts


def _send(nic: Nic, frames: list[bytes], counts: EchoCounters) -> None:
    """Queue ``frames``, dropping (and counting) what finds no descriptor in time: a reply
    is worth less than the next beat."""
    try:
        nic.send(frames, timeout=SEND_WAIT)
    except TxRingFull as full:
        counts.unsent += len(frames) - full.sent
        log.debug("transmit ring full: dropped %d answers", len(frames) - full.sent)


def echo_driver(bus: Bus, function: PciFunction, rx_entries: int = 1024, **serve: object) -> None:
    """The service as a driver process (``Supervisor.run("harness.services.echo:echo_driver", nic)``):
    bring the NIC up, by interrupt, and serve until the process is killed. A ring of 1024
    holds the second of traffic QEMU's e1000 holds back after a first bring-up (see above)."""
    from drivers.e1000.driver import E1000
    nic = E1000(bus, bus.open(function), rx_entries=rx_entries)
    serve_echo(nic, beat=getattr(bus, "beat", None), **serve)  # type: ignore[arg-type]
