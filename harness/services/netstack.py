"""Just enough of an IPv4 host to use a NIC driver against real peers: DHCP, ARP, ICMP, UDP.

Frames are built and parsed with dpkt (a well-kept packet library), never by
hand. The stack runs over anything with ``send(frames)``, ``recv(max, timeout)``
and ``mac``: the e1000 driver, or a fake.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Callable

import dpkt

from ..access import Deadline
from ..devices.nic import Nic
from ..errors import HarnessError

log = logging.getLogger(__name__)

BROADCAST = b"\xff" * 6


class NetError(HarnessError):
    """A peer did not answer, or answered something else."""


@dataclass(frozen=True)
class Lease:
    address: str
    netmask: str
    router: str
    dns: str
    server: str
    seconds: int


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


def arp_frame(op: int, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str) -> bytes:
    """An ARP request (to everyone) or reply (to the target) as a whole Ethernet frame.
    A request whose target is its own sender is an announcement (RFC 5227): peers that
    keep an ARP table learn the sender from it without asking."""
    arp = dpkt.arp.ARP(op=op, sha=sender_mac, spa=ip(sender_ip), tha=target_mac, tpa=ip(target_ip))
    dst = BROADCAST if op == dpkt.arp.ARP_OP_REQUEST else target_mac
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=sender_mac, type=dpkt.ethernet.ETH_TYPE_ARP, data=arp))


class Host:
    """One IPv4 address on one NIC."""

    def __init__(self, nic: Nic) -> None:
        self.nic = nic
        self.address = "0.0.0.0"
        self.lease: Lease | None = None
        self.arp_cache: dict[str, bytes] = {}
        self.ignored = 0            # frames that were not for whoever was waiting

    # ---- plumbing ----

    def _send_ip(self, dst_mac: bytes, packet: dpkt.ip.IP) -> None:
        frame = dpkt.ethernet.Ethernet(dst=dst_mac, src=self.nic.mac, type=dpkt.ethernet.ETH_TYPE_IP, data=packet)
        self.nic.send([bytes(frame)])

    def _await(self, match: Callable[[dpkt.ethernet.Ethernet], object], timeout: float, what: str) -> object:
        """The first received frame for which ``match`` returns something; that something."""
        deadline = Deadline(timeout)
        while not deadline.expired:
            for raw in self.nic.recv(64, timeout=min(0.05, deadline.remaining)):
                eth = dpkt.ethernet.Ethernet(raw)
                self._learn(eth)
                found = match(eth)
                if found is not None:
                    return found
                self.ignored += 1
        raise NetError(f"no {what} within {timeout:g} s")

    def _learn(self, eth: dpkt.ethernet.Ethernet) -> None:
        if isinstance(eth.data, dpkt.arp.ARP) and eth.data.op in (dpkt.arp.ARP_OP_REPLY, dpkt.arp.ARP_OP_REQUEST):
            self.arp_cache[socket.inet_ntoa(eth.data.spa)] = eth.data.sha
            if eth.data.op == dpkt.arp.ARP_OP_REQUEST and socket.inet_ntoa(eth.data.tpa) == self.address:
                self._arp(dpkt.arp.ARP_OP_REPLY, eth.data.sha, socket.inet_ntoa(eth.data.spa))

    def _arp(self, op: int, target_mac: bytes, target_ip: str) -> None:
        self.nic.send([arp_frame(op, self.nic.mac, self.address, target_mac, target_ip)])

    # ---- DHCP (RFC 2131) ----

    def dhcp(self, timeout: float = 5.0) -> Lease:
        xid = random.getrandbits(32)
        offer = self._dhcp_exchange(xid, dpkt.dhcp.DHCPDISCOVER, [], dpkt.dhcp.DHCPOFFER, timeout)
        server = offer.opts[dpkt.dhcp.DHCP_OPT_SERVER_ID]
        ack = self._dhcp_exchange(xid, dpkt.dhcp.DHCPREQUEST,
                                  [(dpkt.dhcp.DHCP_OPT_REQ_IP, offer.yiaddr.to_bytes(4, "big")),
                                   (dpkt.dhcp.DHCP_OPT_SERVER_ID, server)], dpkt.dhcp.DHCPACK, timeout)
        o = ack.opts
        addr = str(ipaddress.IPv4Address(ack.yiaddr))
        self.lease = Lease(addr, socket.inet_ntoa(o.get(dpkt.dhcp.DHCP_OPT_NETMASK, b"\0" * 4)),
                           socket.inet_ntoa(o.get(dpkt.dhcp.DHCP_OPT_ROUTER, b"\0" * 4)[:4]),
                           socket.inet_ntoa(o.get(dpkt.dhcp.DHCP_OPT_DNS_SVRS, b"\0" * 4)[:4]),
                           socket.inet_ntoa(server),
                           int.from_bytes(o.get(dpkt.dhcp.DHCP_OPT_LEASE_SEC, b"\0" * 4), "big"))
        self.address = addr
        log.info("DHCP lease %s", self.lease)
        return self.lease

    def _dhcp_exchange(self, xid: int, msg: int, extra: list, want: int, timeout: float):  # type: ignore[no-untyped-def]
        request = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, xid=xid, chaddr=self.nic.mac, opts=[
            (dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([msg])), *extra,
            (dpkt.dhcp.DHCP_OPT_PARAM_REQ, bytes([dpkt.dhcp.DHCP_OPT_NETMASK, dpkt.dhcp.DHCP_OPT_ROUTER,
                                                  dpkt.dhcp.DHCP_OPT_DNS_SVRS]))])
        udp = dpkt.udp.UDP(sport=68, dport=67, data=bytes(request))
        udp.ulen = len(udp)
        self._send_ip(BROADCAST, dpkt.ip.IP(src=ip("0.0.0.0"), dst=ip("255.255.255.255"),
                                            p=dpkt.ip.IP_PROTO_UDP, data=udp))

        def reply(eth):  # type: ignore[no-untyped-def]
            udp = getattr(eth.data, "data", None)
            if isinstance(udp, dpkt.udp.UDP) and udp.dport == 68:
                d = dpkt.dhcp.DHCP(udp.data)
                d.opts = dict(d.opts)
                if d.xid == xid and d.opts.get(dpkt.dhcp.DHCP_OPT_MSGTYPE) == bytes([want]):
                    return d
            return None
        return self._await(reply, timeout, f"DHCP reply {want}")

    # ---- ARP, ICMP, UDP ----

    def resolve(self, address: str, timeout: float = 2.0) -> bytes:
        if address in self.arp_cache:
            return self.arp_cache[address]
        self._arp(dpkt.arp.ARP_OP_REQUEST, b"\0" * 6, address)

        def reply(eth):  # type: ignore[no-untyped-def]
            a = eth.data
            if isinstance(a, dpkt.arp.ARP) and a.op == dpkt.arp.ARP_OP_REPLY and socket.inet_ntoa(a.spa) == address:
                return a.sha
            return None
        mac = self._await(reply, timeout, f"ARP reply from {address}")
        self.arp_cache[address] = mac  # type: ignore[assignment]
        return mac  # type: ignore[return-value]

    def _next_hop(self, address: str) -> bytes:
        if self.lease and ipaddress.IPv4Address(address) not in ipaddress.IPv4Network(
                f"{self.lease.address}/{self.lease.netmask}", strict=False):
            return self.resolve(self.lease.router)
        return self.resolve(address)

    def ping(self, address: str, seq: int, payload: bytes = b"hwharness", timeout: float = 2.0) -> float:
        """One ICMP echo; the round-trip time in seconds."""
        ident = 0x4857
        echo = dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload)
        packet = dpkt.ip.IP(src=ip(self.address), dst=ip(address), p=dpkt.ip.IP_PROTO_ICMP,
                            data=dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=echo))
        dst = self._next_hop(address)
        start = time.perf_counter()
        self._send_ip(dst, packet)

        def reply(eth):  # type: ignore[no-untyped-def]
            icmp = getattr(eth.data, "data", None)
            if (isinstance(icmp, dpkt.icmp.ICMP) and icmp.type == dpkt.icmp.ICMP_ECHOREPLY
                    and icmp.data.id == ident and icmp.data.seq == seq):
                if icmp.data.data != payload:
                    raise NetError("an echo reply with another payload")
                return time.perf_counter()
            return None
        return self._await(reply, timeout, f"echo reply {seq} from {address}") - start  # type: ignore[operator]

    def udp_exchange(self, address: str, port: int, payload: bytes, sport: int = 40000,
                     timeout: float = 2.0) -> bytes:
        """Send one datagram and return the first reply to it."""
        udp = dpkt.udp.UDP(sport=sport, dport=port, data=payload)
        udp.ulen = len(udp)
        self._send_ip(self._next_hop(address), dpkt.ip.IP(src=ip(self.address), dst=ip(address),
                                                          p=dpkt.ip.IP_PROTO_UDP, data=udp))

        def reply(eth):  # type: ignore[no-untyped-def]
            u = getattr(eth.data, "data", None)
            if isinstance(u, dpkt.udp.UDP) and u.dport == sport and u.sport == port:
                return bytes(u.data)
            return None
        return self._await(reply, timeout, f"UDP reply from {address}:{port}")  # type: ignore[return-value]
