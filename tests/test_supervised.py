"""Real drivers in supervised processes, killed while they serve: the e1000 echo service
under a stream from the host, the AHCI disk under clients writing through the block
protocol. What survives is checked from outside: the host's stream, the image file."""

from __future__ import annotations

import os
import signal
from typing import Iterator

import pytest

from drivers.e1000.driver import DEVICE as E1000_DEVICE, VENDOR as E1000_VENDOR
from harness.machine import MachineSpec
from harness.netstream import UdpEchoStream, free_udp_port, udp_forward
from harness.proxy import ProxyMachine
from harness.supervisor import Supervisor

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def echo_machine(proxy_machine_factory_module) -> Iterator[tuple[ProxyMachine, int]]:
    port = free_udp_port()

    def configure(spec: MachineSpec) -> None:
        spec.netdev("user", "net0", hostfwd=udp_forward(port))
        spec.device("e1000", netdev="net0")
    yield proxy_machine_factory_module(configure, name="echo"), port


def test_an_e1000_driver_killed_ten_times_and_the_stream_resumes_each_time(echo_machine) -> None:
    """A UDP stream from the host through QEMU's user network to the echo service in a
    driver process, SIGKILLed ten times: after each restart the stream comes back, and
    every datagram lost lies in a window when the driver was down."""
    pm, port = echo_machine
    kills = 10 if pm.machine.accel == "tcg" else 2         # the emulating KVM: 100x slower
    windows: list[tuple[int, int]] = []                     # (newest echo before the kill, first sent after)
    with Supervisor(pm) as sup, UdpEchoStream(port) as stream:
        driver = sup.run("drivers.e1000.echo:echo_driver", pm.bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE))
        driver.wait_serving(60)
        stream.wait_until(lambda s: s.echoed >= 100, 120, "100 echoes before the first kill")
        for n in range(1, kills + 1):
            newest = stream.highest_echoed
            os.kill(driver.pid, signal.SIGKILL)             # our driver process, by its PID
            driver.wait_serving(60, after=n)
            echoed = stream.echoed
            stream.wait_until(lambda s: s.echoed > echoed, 60, f"an echo after restart {n}")
            first = stream.sent                             # every datagram from here on must come back
            windows.append((newest, first))
            stream.wait_until(lambda s: s.highest_echoed >= first + 100, 60, f"100 echoes after restart {n}")
        report = stream.stop()
    lost = report.lost_numbers()
    per_window = [sum(1 for x in lost if lo < x < hi) for lo, hi in windows]
    print(f"\n{report}\nrestarts (ms): {[round(r.ms) for r in driver.restarts]}\nlost per restart: {per_window}")
    assert [r.cause for r in driver.restarts] == ["killed by SIGKILL"] * kills
    assert report.corrupted == report.duplicates == 0
    assert report.sent == report.echoed + report.lost
    assert sum(per_window) == len(lost), "datagrams lost while the driver was serving"
