"""``hwharness net``: the Python e1000 driver on QEMU's user-mode network (DHCP, ARP, ICMP)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from drivers.e1000 import E1000
from ...machine import Option, RuntimeFile, random_mac
from ...proxy import ProxyMachine, proxy_spec
from ...services.netstack import Host
from .common import iommu_of, say


def net_machine(accel: str, iommu: bool | None, name: str = "net") -> tuple[ProxyMachine, RuntimeFile]:
    """A proxy machine whose e1000 sits on QEMU's user-mode network, its traffic dumped to a pcap."""
    spec = proxy_spec(accel=accel, iommu=iommu)
    spec.netdev("user", "net0")
    spec.device("e1000", netdev="net0", mac=random_mac())
    pcap = RuntimeFile("net0.pcap")
    spec.options.append(Option("object", "filter-dump", {"id": "dump0", "netdev": "net0", "file": pcap}))
    return ProxyMachine(spec, name=name), pcap


def ping_report(pm: ProxyMachine, count: int) -> Iterator[str]:
    """A DHCP lease, the gateway's MAC address and ``count`` pings of it, a line each as it comes."""
    nic = E1000.open(pm.bus)
    try:
        host = Host(nic)
        lease = host.dhcp()
        yield f"lease: {lease.address}"
        yield f"netmask {lease.netmask}, dns {lease.dns}, {lease.seconds} s from {lease.server}"
        yield f"gateway: {lease.router} at {host.resolve(lease.router).hex(':')}"
        for seq in range(count):
            yield f"echo reply from {lease.router}: seq={seq} time={host.ping(lease.router, seq) * 1000:.3f} ms"
    finally:
        nic.close()


def cmd_net(args: argparse.Namespace) -> int:
    machine, pcap = net_machine(args.accel, iommu_of(args))
    with machine as pm:
        for line in ping_report(pm, args.count):
            say(line)
        if args.pcap:
            Path(args.pcap).write_bytes(pm.machine.path(pcap).read_bytes())
            say(f"pcap: {args.pcap}")
    return 0
