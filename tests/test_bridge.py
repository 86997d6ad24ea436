"""The e1000 bridge: a Linux machine online only through a Python driver process that
forwards between two NICs of a proxy machine, and that may be killed under its TCP."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness.access import Deadline
from harness.errors import AccessDenied, BadRequest
from harness.machine import Machine
from harness.machine.linux import wire_nic
from harness.proxy import raw
from harness.services.bridge import STATS_SECONDS, Bridge, BridgeService, Counters, bridge_devices, bridge_nics, bridge_spec
from harness.tools.bench.e1000 import RCTL_QUIET
from harness.tools.bench.forward import BLOCK_FIELDS, SINK_MAC, Generator, Wires, download_through_kills, frame_of, http_files
from tests.test_cli import kill_its_qemu

pytestmark = pytest.mark.qemu

SMALL, LARGE = 300 << 10, 4 << 20           # bytes of the files the guest fetches


@pytest.fixture(scope="module")
def files() -> Iterator[tuple[int, dict[str, str]]]:
    """A host HTTP server on loopback (the guest reaches it as 10.0.2.2): its port, and
    each file's sha256."""
    with http_files({"small": SMALL, "large": LARGE}) as served:
        yield served


@pytest.fixture
def bridged(proxy_machine_factory, linux_machine_factory) -> Iterator[tuple[BridgeService, Machine]]:
    """The bridge serving, and a Linux machine on its wire with a lease."""
    workdir = Path(tempfile.mkdtemp(prefix="hwh-wire-"))      # a Unix socket path is short
    wire = f"unix:{workdir}/wire"
    pm = proxy_machine_factory(lambda spec: bridge_spec(spec, wire), name="bridge")
    with BridgeService(pm, wire) as service:
        service.driver.wait_serving(60)
        linux = linux_machine_factory(lambda spec: wire_nic(spec, wire), modules=("e1000",), name="online")
        yield service, linux
    shutil.rmtree(workdir)


def fetch(linux: Machine, port: int, name: str, timeout: float = 300.0) -> str:
    """wget a file from the host's HTTP server through 10.0.2.2; its sha256 as the guest computes it."""
    out, status = linux.console.run(f"wget -q -O /tmp/{name} http://10.0.2.2:{port}/{name} && "
                                    f"sha256sum /tmp/{name}", timeout=timeout)
    assert status == 0, out
    return out.split()[0]


def test_the_proxy_forwards_natively_only_to_a_nic_in_the_same_dma_domain(proxy_machine_factory) -> None:
    """``PROXY_OP_NIC_FORWARD_LOOP`` names its peer NIC by ring: one opened into a DMA domain
    of its own is refused (AccessDenied) before anything else about the request is looked
    at; the same peer opened into the caller's domain gets past that check, to the next
    (BadRequest: the block's rings are all zero)."""
    def two_nics(spec):  # type: ignore[no-untyped-def]
        spec.netdev("user", "wan", restrict=True)
        spec.netdev("user", "lan", restrict=True)
        return bridge_devices(spec, "wan", "lan")
    pm = proxy_machine_factory(two_nics, name="forward-domain")
    abi = pm.bus.abi
    wan_function, lan_function = bridge_nics(pm.bus)
    wan = pm.bus.open(wan_function, dma_size=1 << 20)
    block = wan.dma_alloc(abi.sizeof("proxy_nic_forward"), 64)
    packer = abi.packer("proxy_nic_forward", BLOCK_FIELDS)
    op = abi.PROXY_OP_NIC_FORWARD_LOOP

    def forward_to(peer) -> None:  # type: ignore[no-untyped-def]
        fields = dict.fromkeys(BLOCK_FIELDS, 0) | {"peer": peer.channel.index, "batch": 1}
        packer.pack_into(block.view, abi.offsetof("proxy_nic_forward", BLOCK_FIELDS[0]), *fields.values())
        raw.native_loop(wan.channel, op, block.phys, "native forward loop")

    lan = pm.bus.open(lan_function, dma_size=1 << 20)
    with pytest.raises(AccessDenied):
        forward_to(lan)
    lan.close()
    lan = pm.bus.open(lan_function, share_domain_with=wan)
    with pytest.raises(BadRequest):
        forward_to(lan)


def test_every_frame_offered_is_forwarded_or_counted_once_as_missed(proxy_machine_factory, tmp_path) -> None:
    """More frames than the wan ring holds, offered at once on a stream wire: QEMU's e1000
    takes what its ring has room for and may drop the rest (counted in MPC, which QEMU
    does not clear on read); whatever it did, the frames a host sink counts on the lan wire
    are the bridge's forwarded count, and forwarded plus missed plus dropped for a full
    transmit ring is what was offered, however many times the bridge read the NICs' counters
    meanwhile."""
    offered = 600
    with contextlib.ExitStack() as stack:
        wires = Wires(stack)
        pm = proxy_machine_factory(lambda spec: (wires.add_to(spec, "wan", "lan"),
                                                 bridge_devices(spec, "wan", "lan"))[1], name="overrun")
        wires.connect()
        bridge = Bridge(pm.bus, *bridge_nics(pm.bus))
        stack.callback(bridge.close)
        assert [nic.dev.channel.guest_spin for nic in (bridge.wan, bridge.lan)] == [0, 0], \
            "the proxy guest spins on after the bridge's tail writes"
        counters = Counters.create(tmp_path / "counters")
        stack.callback(counters.close)
        time.sleep(RCTL_QUIET)                      # QEMU's e1000 takes nothing for 1 s after RCTL
        burst = Generator(wires.source, frame_of(60, SINK_MAC), offered, wires.sink.count, window=offered)
        burst.start()                               # every frame in one send: QEMU reads them at once
        overall = Deadline(60)
        last = [-1, Deadline(0)]                    # the sink's count, and when to call it quiet

        def until() -> bool:
            """Once the sink has seen nothing new for a few counter reads."""
            assert not overall.expired, f"the bridge still moved frames after 60 s: {counters.snapshot()}"
            if wires.sink.count[0] != last[0]:
                last[:] = [wires.sink.count[0], Deadline(4 * STATS_SECONDS)]
            return last[1].expired
        bridge.run(counters, until=until)
        burst.join(10)
        bridge.count_missed(counters)
        c = counters.snapshot()
        assert wires.sink.count[0] == c["wan_to_lan_frames"]
        assert c["wan_to_lan_bytes"] == 60 * c["wan_to_lan_frames"], c    # each length moved with its buffer
        # A slow machine (an emulating KVM) may also find the lan's transmit ring full: the
        # bridge drops and counts those. Every frame is in exactly one of the three.
        assert c["wan_to_lan_frames"] + c["dropped_wan_missed"] + c["dropped_lan_tx_full"] == offered, c
        assert c["dropped_lan_missed"] == 0, c


def test_a_linux_machine_gets_a_lease_and_a_file_through_the_bridge(bridged, linux_image, files) -> None:
    service, linux = bridged
    port, sums = files
    address = linux_image.dhcp(linux)
    assert address.startswith("10.0.2."), address
    assert fetch(linux, port, "small") == sums["small"]
    c = service.counters()
    assert c["wan_to_lan_bytes"] >= SMALL and c["lan_to_wan_frames"] > 0
    assert service.driver.restarts == []


def test_a_download_survives_two_kills_and_a_stop_of_the_bridge(bridged, linux_image, files) -> None:
    """The bridge is SIGKILLed at a quarter and at half of the download (by bytes it forwarded
    to the guest) and SIGSTOPped at three quarters (the supervisor finds it hung and kills
    it): the download completes and its sha256 is right."""
    service, linux = bridged
    port, sums = files
    linux_image.dhcp(linux)
    got = download_through_kills(service, linux, port, "large", LARGE,
                                 [signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP])
    causes = [r["cause"] for r in got.restarts]
    assert causes[:2] == ["killed by SIGKILL"] * 2 and causes[2].startswith("hung"), causes
    assert [r.cause for r in service.driver.restarts] == causes
    assert got.sha256 == sums["large"]


def test_serve_net_and_run_net_from_the_command_line(linux_accel: str, linux_image) -> None:
    """``hwharness serve net --wire unix:PATH`` prints the wire and its driver; ``hwharness
    run --net unix:PATH -- CMD`` boots Linux on that wire, where udhcpc gets a lease;
    Ctrl-C stops the bridge cleanly."""
    workdir = Path(tempfile.mkdtemp(prefix="hwh-wire-"))
    wire = f"unix:{workdir}/wire"
    serve = subprocess.Popen([sys.executable, "-m", "harness", "serve", "net", "--accel", linux_accel, "--wire", wire],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen, deadline = [], Deadline(120)
        while not any(line.startswith("driver pid") for line in seen) and not deadline.expired:
            if select.select([serve.stdout], [], [], deadline.remaining)[0]:
                seen.append(serve.stdout.readline())
        assert any(wire in line and "forwarding" in line for line in seen), seen
        run = subprocess.run([sys.executable, "-m", "harness", "run", "--accel", linux_accel, "--net", wire, "--",
                              "ifconfig eth0 up && udhcpc -i eth0 -n -q -s /bin/true"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "lease of 10.0.2." in run.stdout, run.stdout + run.stderr
        serve.send_signal(signal.SIGINT)
        rest, _ = serve.communicate(timeout=60)
        assert serve.returncode == 0 and "stopping; wan_to_lan_frames" in rest, rest
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        shutil.rmtree(workdir)


def test_a_qemu_killed_under_serve_net_is_an_error_and_its_wire_goes(hwharness_accel: str) -> None:
    """The bridge machine's QEMU dies (killed here, by its PID): `serve net` says so in one
    line and exits 1, and the wire's socket, which a killed QEMU cannot remove, goes too (a
    second `serve net` on the same path refuses one that is there)."""
    workdir = Path(tempfile.mkdtemp(prefix="hwh-wire-"))
    wire = workdir / "wire"
    # a machine whose QEMU died keeps its files for a look: here, removed with the rest
    serve = subprocess.Popen([sys.executable, "-m", "harness", "serve", "net", "--accel", hwharness_accel,
                              "--wire", f"unix:{wire}"], env={**os.environ, "TMPDIR": str(workdir)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        assert any(line.startswith("driver pid") for line in serve.stdout), serve.stderr.read()   # type: ignore[union-attr]
        kill_its_qemu(serve)
        assert not wire.exists(), "the wire's socket is removed"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        shutil.rmtree(workdir)
