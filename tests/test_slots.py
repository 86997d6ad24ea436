"""Drivers in processes of their own: driver slots, attaching, isolation, the supervisor.

Each driver process holds one slot window and nothing else; what it could
have reached is checked from outside it: the owner's own view of every window
and QEMU's view of guest memory (QMP pmemsave).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import drivers.edu as edu
from drivers.e1000.driver import DEVICE as E1000_DEVICE, VENDOR as E1000_VENDOR
from harness.tools.bench.e1000 import wire
from harness.errors import AccessDenied, AttachRefused, BadRequest, SupervisorError
from harness.machine import MachineSpec
from harness.proxy import ProxyMachine, raw
from harness.proxy.ring import Ring
from harness.processes import attach, serve
from harness.processes.supervisor import Supervisor
from tests.test_dma import memory, proxy_code

pytestmark = pytest.mark.qemu

MAC = "52:54:00:5a:07:01"
RAL0 = 0x5400               # the e1000's first receive address, low half (8254x 13.4.62)
MAC_LOW = int.from_bytes(bytes.fromhex(MAC.replace(":", ""))[:4], "little")   # what RAL0 holds


@pytest.fixture(scope="module")
def rig(proxy_machine_factory_module, tmp_path_factory) -> Iterator[tuple[ProxyMachine, socket.socket, int, Path]]:
    host, qemu_port, netdev = wire()

    def configure(spec: MachineSpec) -> None:
        spec.device("edu", dma_mask=0xFFFFFFFF)
        spec.netdev("socket", "net0", **netdev)
        spec.device("e1000", netdev="net0", mac=MAC)
    pm = proxy_machine_factory_module(configure, name="slots")
    assert len(pm.admin.slots) == 4, "a proxy machine has four driver slots unless asked otherwise"
    yield pm, host, qemu_port, tmp_path_factory.mktemp("slots")
    host.close()


def wait_for(path: Path, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"nothing in {path} within {timeout:g} s"
        time.sleep(0.01)
    return json.loads(path.read_text())


def until(done, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Spin on ``done()`` (no sleeping: the moment matters), for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"


def holder(address: str, vendor: int, device: int, register: int = 0) -> tuple[subprocess.Popen, dict]:
    """A process of its own that attaches and holds a device (tests/slot_drivers.py: hold)."""
    p = subprocess.Popen([sys.executable, "-m", "tests.slot_drivers", address, hex(vendor), hex(device), hex(register)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, json.loads(p.stdout.readline())


def release(p: subprocess.Popen) -> None:
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.wait(30) == 0


def test_two_processes_attach_at_once_and_a_held_device_is_refused(rig) -> None:
    pm = rig[0]
    control = serve(pm)
    nic_holder, nic = holder(control.address, E1000_VENDOR, E1000_DEVICE, RAL0)
    edu_holder, card = holder(control.address, edu.VENDOR, edu.DEVICE)
    try:
        assert {nic["slot"], card["slot"]} <= {1, 2, 3, 4} and nic["slot"] != card["slot"]
        assert card["register"] == 0x010000ED                   # edu's identification register
        assert nic["register"] == MAC_LOW
        assert {h.pid for h in control.holders.values()} == {nic["pid"], card["pid"]}
        third, refused = holder(control.address, E1000_VENDOR, E1000_DEVICE)
        assert third.wait(30) == 0
        assert refused["error"] == "AttachRefused" and f"held by process {nic['pid']}" in refused["message"]
        for p in (nic_holder, edu_holder):                       # both still work
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("work\n")
            p.stdin.flush()
            assert json.loads(p.stdout.readline())["register"] in (nic["register"], card["register"])
        # the machine's owner may not take a device a driver process holds either
        with pytest.raises(AccessDenied):
            pm.bus.open(pm.bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE))
        # let the NIC go: it can be attached again, and comes back with bus mastering off
        release(nic_holder)
        again, nic2 = holder(control.address, E1000_VENDOR, E1000_DEVICE, RAL0)
        assert "error" not in nic2, nic2
        assert not nic2["command"] & 0x4, "bus mastering survived the last holder"
        release(again)
    finally:
        for p in (nic_holder, edu_holder):
            if p.poll() is None:
                release(p)
    assert all(control.wait_free(n, 10.0) for n in range(1, 5))


def test_a_full_machine_refuses_another_attach(rig) -> None:
    pm = rig[0]
    control = serve(pm)
    held = [attach(control.address) for _ in range(4)]
    try:
        assert sorted(b.slot for b in held) == [1, 2, 3, 4]
        with pytest.raises(AttachRefused, match="every driver slot"):
            attach(control.address)
    finally:
        for b in held:
            b.close()
    assert all(control.wait_free(n, 10.0) for n in range(1, 5))


def test_a_slot_is_lent_again_only_once_its_last_holder_has_exited(rig) -> None:
    """A process that hangs up still maps the window: the slot waits for it to exit."""
    control = serve(rig[0])
    code = ("import sys; from harness.processes.attached import attach; "
            f"b = attach({control.address!r}); print(b.slot, flush=True); b.close(); sys.stdin.readline()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    slot = int(p.stdout.readline())
    assert not control.wait_free(slot, 1.0), "the slot was lent again while its holder still mapped it"
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(30) == 0
    assert control.wait_free(slot, 10.0)
    assert rig[0].admin.slots[slot - 1].heartbeat == 0 and rig[0].admin.slots[slot - 1].window.field("slot") == slot


def test_a_vandal_driver_reaches_nothing_outside_its_slot(rig, rng: random.Random) -> None:
    """A driver process writes every byte of its mapping and aims its NIC's DMA all over the
    4 GiB; another slot's driver keeps working, and nothing outside the vandal's slot changes."""
    pm, _, qemu_port, scratch = rig
    bus, abi = pm.bus, pm.abi
    secret = os.urandom(16).hex()                      # the keeper's witness starts with it
    own = bus.dma.alloc(64 << 10)                      # the owner's own DMA memory
    own.view[:] = bytes.fromhex(secret[::-1]) + rng.randbytes(own.size - 16)
    own_before = bytes(own.view)
    code, code_size = proxy_code(pm)
    window_phys = bus.window.field("window_phys")
    table = abi.offsetof("proxy_shared", "devices")
    table_before = bytes(bus.window.mem[table:table + abi.sizeof("proxy_pci_device") * abi.PROXY_MAX_DEVICES])
    code_before = memory(pm, code, code_size, scratch)
    keeper_report, vandal_report = scratch / "keeper.json", scratch / "vandal.json"
    # What is tested is confinement, not liveness: the vandal beats once per target, and a
    # target's frame through the user network can take over a second on a loaded 2-core host.
    with Supervisor(pm, hang_timeout=30.0) as sup:
        keeper = sup.run("tests.slot_drivers:keeper", bus.find(vendor=edu.VENDOR, device=edu.DEVICE),
                         marker=secret, out=str(keeper_report))
        keeper.wait_serving(60)
        kept = wait_for(keeper_report)
        others = [s for s in pm.admin.slots if s.n != kept["slot"]]    # the vandal's is one of them: not yet known
        idle_before = {s.n: window_hash(pm, s) for s in others}
        witness_before = memory(pm, kept["witness"], kept["size"], scratch)
        count = 400 if pm.machine.accel == "tcg" else 40      # the emulating KVM: 100x slower
        targets = [own.phys, window_phys, window_phys + abi.offsetof("proxy_shared", "rings"), window_phys + table,
                   kept["witness"], code, *(s.phys + abi.PROXY_DMA_OFFSET for s in others)]
        targets += [rng.randrange(0, 1 << 32) & ~63 for _ in range(count)]
        targets = [t for t in targets if not 0xFEE00000 <= t < 0xFEF00000]   # MSIs: see the README
        beats = pm.admin.slots[kept["slot"] - 1].heartbeat
        vandal = sup.run("tests.slot_drivers:vandal", bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE),
                         restart=False, qemu_port=qemu_port, targets=targets, markers=[secret, secret[::-1]],
                         out=str(vandal_report))
        deadline = time.monotonic() + 600
        while vandal.state != "dead":
            assert time.monotonic() < deadline, "the vandal never finished"
            time.sleep(0.05)
        assert vandal.deaths == ["exited with status 0"], vandal.deaths
        assert vandal.slot is not None and sup.control.wait_free(vandal.slot, 30)
        done = wait_for(vandal_report)
        assert done["found"] == [], "a driver process found another's memory in its mapping"
        assert done["landed"] == [] and done["faults"] > count * 0.9, done
        # the keeper kept working throughout, and still does
        assert keeper.deaths == [] and keeper.state == "serving"
        assert pm.admin.slots[kept["slot"] - 1].heartbeat > beats
        time.sleep(0.5)
        assert keeper.deaths == []
        # nothing outside the vandal's slot changed, and its slot is clean for the next driver
        assert memory(pm, kept["witness"], kept["size"], scratch) == witness_before
        idle = [s for s in others if s.n != vandal.slot]
        assert len(idle) == 2 and {s.n: window_hash(pm, s) for s in idle} == {s.n: idle_before[s.n] for s in idle}
        left = pm.admin.slots[vandal.slot - 1]
        assert left.heartbeat == 0 and left.window.field("slot") == vandal.slot
        assert left.window.mem[abi.PROXY_DMA_OFFSET:].count(0) == left.size - abi.PROXY_DMA_OFFSET
    assert bytes(own.view) == own_before
    assert bytes(bus.window.mem[table:table + len(table_before)]) == table_before
    assert memory(pm, code, code_size, scratch) == code_before
    assert bus.window.state == abi.PROXY_STATE_READY
    bus.dma.free(own)


def window_hash(pm: ProxyMachine, slot) -> str:  # type: ignore[no-untyped-def]
    """A slot window's bytes, but for the word where the proxy says it sleeps (every window's)."""
    at = pm.abi.offsetof("proxy_shared", "guest_sleeping")
    return hashlib.sha256(bytes(slot.window.mem[:at]) + bytes(slot.window.mem[at + 4:])).hexdigest()


def test_the_supervisor_restarts_a_killed_or_hung_driver(rig, rng: random.Random) -> None:
    pm = rig[0]
    with Supervisor(pm, hang_timeout=1.0) as sup:
        driver = sup.run("tests.slot_drivers:reader", pm.bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE))
        driver.wait_serving(60)
        signals = [signal.SIGKILL, signal.SIGSTOP, signal.SIGKILL, signal.SIGSEGV]
        for n, sig in enumerate(signals, 1):
            victim = driver.pid
            os.kill(victim, sig)                       # our own driver process, by its PID
            driver.wait_serving(60, after=n)
            assert driver.pid != victim
        causes = [r.cause for r in driver.restarts]
        assert causes[0] == causes[2] == "killed by SIGKILL"
        assert causes[1].startswith("hung: no heartbeat")
        assert causes[3] == "killed by SIGSEGV"


def test_a_killed_zygote_ends_supervision_with_its_reason_and_stop_cleans_up(rig) -> None:
    """Someone kills the zygote (the OOM killer, a stray kill by PID): its driver processes go
    with it and none can be started again. Whoever waits is told why, the supervisor stops
    watching instead of retrying in a loop, and stop() still leaves no process behind."""
    pm = rig[0]
    sup = Supervisor(pm, hang_timeout=1.0)
    try:
        driver = sup.run("tests.slot_drivers:reader", pm.bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE))
        driver.wait_serving(60)
        pids = (sup.zygote.process.pid, driver.pid)
        os.kill(sup.zygote.process.pid, signal.SIGKILL)     # our own child, by its PID
        with pytest.raises(SupervisorError, match="the zygote is gone"):
            driver.wait_serving(60, after=1)
        sup._watcher.join(60)
        assert not sup._watcher.is_alive(), "the supervisor watches on"
        assert driver.state == "dead"
    finally:
        sup.stop()
    deadline = time.monotonic() + 20
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, f"process {pid} outlived its zygote"
            time.sleep(0.05)
    with Supervisor(pm) as again:                       # the slot and the device are free again
        again.run("tests.slot_drivers:reader", pm.bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE)).wait_serving(60)


ORPHAN_SCRIPT = """
import os, sys, time
from harness.proxy import ProxyMachine, proxy_spec
from harness.processes.supervisor import Supervisor
spec = proxy_spec(accel=sys.argv[1])
spec.device("edu")
pm = ProxyMachine(spec).__enter__()
sup = Supervisor(pm)
d = sup.run("tests.slot_drivers:reader", pm.bus.find(vendor=0x1234, device=0x11e8))
d.wait_serving(60)
print(pm.machine.process.pid, sup.zygote.process.pid, d.pid, flush=True)
time.sleep(600)
"""


def test_killing_the_supervisor_leaves_no_process_and_no_socket(hwharness_accel: str) -> None:
    owner = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, hwharness_accel], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, "the supervisor never came up"
    qemu, zygote, driver = map(int, line.split())
    owner.kill()                                       # SIGKILL: no clean-up runs in it
    owner.wait()
    deadline = time.monotonic() + 20
    for pid in (qemu, zygote, driver):
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, f"process {pid} outlived its supervisor"
            time.sleep(0.05)
    # A process's leader shows "Z" while its other threads still tear down and hold its files,
    # so its sockets may outlive that moment by a little: each must be gone by the deadline.
    marks = (f"hwharness-{owner.pid}-", f"hwharness-control-{owner.pid}-")
    while any(mark in (sockets := Path("/proc/net/unix").read_text()) for mark in marks):
        assert time.monotonic() < deadline, f"a socket outlived its supervisor: {sockets}"
        time.sleep(0.05)


def test_the_control_socket_answers_nonsense_and_serves_on(rig) -> None:
    """Requests before hello, unknown ones, rings not held, bad sizes, a message that is not
    JSON: each gets an error reply or ends only its own connection."""
    from harness.processes.control import recv_message, send_message, unix_address
    control = serve(rig[0])

    def ask(sock: socket.socket, message: dict) -> dict:
        send_message(sock, message)
        reply, fds = recv_message(sock)
        assert reply is not None and not fds
        return reply

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(unix_address(control.address))
        assert "before hello" in ask(s, {"op": "open_pci", "devfn": 0})["message"]
        assert ask(s, {"op": "hello", "wait": float("inf")})["error"] == "invalid"
        assert ask(s, {"op": "hello", "token": "made-up"})["error"] == "refused"
    bus = attach(control.address)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:    # a second, raw connection
            s.connect(unix_address(control.address))
            send_message(s, {"op": "hello"})
            hello, fds = recv_message(s)
            try:                                # the lent memfd is sealed at its size
                assert hello is not None and hello["ok"] and os.fstat(fds[0]).st_size == hello["size"]
                for size in (0, hello["size"] * 2):
                    with pytest.raises(PermissionError):
                        os.ftruncate(fds[0], size)
            finally:
                for fd in fds:
                    os.close(fd)
            assert ask(s, {"op": "close", "ring": 2})["error"] == "invalid"
            assert ask(s, {"op": "close", "ring": -1})["error"] == "invalid"
            assert ask(s, {"op": "reboot"})["error"] == "invalid"
            assert ask(s, {"op": "open_pci", "devfn": 0x9999})["error"] == "invalid"
            assert ask(s, {"op": "open_pci", "devfn": e1000_devfn(rig[0]), "dma_size": 1.5})["error"] == "invalid"
            assert ask(s, {"op": "open_pci", "devfn": 0})["error"] == "denied"      # 00:00.0, the host bridge
            s.sendall(struct.pack("<I", 5) + b"{nope")                         # not JSON: this connection ends
            assert s.recv(1) == b""
        with bus.open(bus.find(vendor=edu.VENDOR, device=edu.DEVICE)) as card:   # the other is unharmed
            assert card.bar(0).read32(0) == 0x010000ED
    finally:
        bus.close()
    assert all(control.wait_free(n, 10.0) for n in range(1, 5))


def e1000_devfn(pm: ProxyMachine) -> int:
    return pm.bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE).devfn


def test_a_reserved_device_is_its_drivers_alone(rig) -> None:
    control = serve(rig[0])
    token = control.reserve([e1000_devfn(rig[0])])
    stranger, owner = attach(control.address), attach(control.address, token=token)
    try:
        with pytest.raises(AttachRefused, match="reserved for another driver"):
            stranger.open(stranger.find(vendor=E1000_VENDOR, device=E1000_DEVICE))
        with pytest.raises(AttachRefused, match="not among the devices reserved"):
            owner.open(owner.find(vendor=edu.VENDOR, device=edu.DEVICE))
        with owner.open(owner.find(vendor=E1000_VENDOR, device=E1000_DEVICE)) as nic:
            assert nic.bar(0).read32(RAL0) == MAC_LOW
    finally:
        stranger.close()
        owner.close()
        control.unreserve(token)
    assert all(control.wait_free(n, 10.0) for n in range(1, 5))


def test_the_proxy_checks_the_window_of_every_admin_request(rig) -> None:
    """Admin requests naming a window the machine lacks, or slot 0, are refused; a slot's ring
    cannot make admin requests at all."""
    pm = rig[0]
    bus, abi = pm.bus, pm.abi
    edu_fn = bus.find(vendor=edu.VENDOR, device=edu.DEVICE)
    for op, addr, window in ((abi.PROXY_OP_OPEN_PCI, edu_fn.devfn, 5), (abi.PROXY_OP_OPEN_ISA, 0xE9, 9),
                             (abi.PROXY_OP_CLOSE, 1, 5), (abi.PROXY_OP_CLOSE, 0, 0),
                             (abi.PROXY_OP_SLOT_REVOKE, 0, 0), (abi.PROXY_OP_SLOT_REVOKE, 5, 0),
                             (abi.PROXY_OP_SLOT_READY, 0, 0), (abi.PROXY_OP_SLOT_READY, 7, 0)):
        with pytest.raises(BadRequest):
            pm.admin.request(op, addr, 1, f"op {op} on window {window}", window=window)
    attached = attach(serve(pm).address)
    try:
        with attached.open(edu_fn) as card:
            with pytest.raises(AccessDenied):
                raw.request(card.channel, abi.PROXY_OP_SLOT_REVOKE, 1, 0, "a slot's ring asks for an admin op")
            with pytest.raises(AccessDenied):
                raw.request(card.channel, abi.PROXY_OP_OPEN_PCI, edu_fn.devfn, 0, "and another",
                            expect=attached.slot)
            assert card.bar(0).read32(0) == 0x010000ED
    finally:
        attached.close()


def test_a_long_batch_yields_its_turn_to_the_other_rings(rig) -> None:
    """One channel publishes a batch that takes the guest a second or more (256 repeated
    reads); a single read on another channel, made after it, is answered while that batch
    is still being served, not after it."""
    pm = rig[0]
    bus, abi = pm.bus, pm.abi
    reads = 10_000 if pm.machine.accel == "tcg" else 100        # the emulating KVM: 100x slower
    with bus.open(bus.find(vendor=edu.VENDOR, device=edu.DEVICE)) as card, \
            bus.open(bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE)) as nic:
        ring = card.channel.ring
        ident = card.function.bars[0].base
        for i in range(ring.size):                      # published, not waited for
            ring.write(ring.head + i, abi.PROXY_OP_MMIO_REPEAT, 4, 0, 0, ident, reads, 0, 0)
        head = ring.publish(ring.size)
        until(lambda: ring.served != (head - ring.size) & 0xFFFFFFFF, "the guest begins the batch")
        ral = nic.bar(0).read32(RAL0)
        still_serving = ring.served != head
        ring.wait(head, 600, "the long batch")
        statuses = [ring.status(i) for i in range(ring.size)]
    assert ral == MAC_LOW
    assert still_serving, "the read waited for the whole batch"
    assert statuses == [abi.PROXY_STATUS_OK] * len(statuses)


def test_a_ring_closed_while_its_batch_waits_for_its_turn_runs_none_of_it_when_opened_again(rig) -> None:
    """A long batch yields its turn, and a request published after it waits behind it; the
    channel is closed before the batch is done. The channel opened next on that ring runs
    neither the batch's rest nor that request: it starts past both."""
    pm = rig[0]
    bus, abi = pm.bus, pm.abi
    reads = 10_000 if pm.machine.accel == "tcg" else 100        # the emulating KVM: 100x slower
    card = bus.open(bus.find(vendor=edu.VENDOR, device=edu.DEVICE))
    ring, index = card.channel.ring, card.channel.index
    ident = card.function.bars[0].base
    seq, n = ring.head, ring.size - 1
    for i in range(n):
        ring.write(seq + i, abi.PROXY_OP_MMIO_REPEAT, 4, 0, 0, ident, reads, 0, 0)
    ring.publish(n)
    ring.write(seq + n, abi.PROXY_OP_NOP, 0, 0, 0, 0, 0, 0, 0)
    ring.publish(1)
    until(lambda: ring.served != seq, "the guest yields the long batch")
    card.close()
    assert (ring.served - seq) & 0xFFFFFFFF < n, "the batch was done before its channel closed"
    again = bus.open(bus.find(vendor=edu.VENDOR, device=edu.DEVICE))
    try:
        assert again.channel.index == index, "the test needs the same ring opened again"
        assert again.channel.ring.head == (seq + n + 1) & 0xFFFFFFFF
        assert again.bar(0).read32(0) == 0x010000ED
        assert not ring.taken_up(seq + n - 1), "the closed channel's batch ran on"
        assert not ring.taken_up(seq + n), "what waited behind the batch ran"
    finally:
        again.close()


def test_boot_serve_lets_a_second_terminal_attach(hwharness_accel: str) -> None:
    """`hwharness boot --serve` as the README shows it: the address it prints is attached to
    from here, the e1000 read through the slot, and Ctrl-C (SIGINT) stops it cleanly."""
    boot = subprocess.Popen([sys.executable, "-m", "harness", "boot", "--serve", "--accel", hwharness_accel],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert boot.stdout is not None
        address = None
        for line in boot.stdout:
            if "harness.attach(" in line:
                address = line.split("harness.attach(")[1].split(")")[0].strip("'")
                break
        assert address, "boot --serve never printed an address"
        bus = attach(address)
        try:
            with bus.open(bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE)) as nic:
                assert nic.bar(0).read32(0x8) & 0x2, "STATUS says link up (8254x 13.4.2)"
        finally:
            bus.close()
        boot.send_signal(signal.SIGINT)
        assert boot.wait(60) == 0
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()


def test_a_port_channel_takes_only_the_irqs_of_its_devices(rig) -> None:
    """The i8042's ports come with IRQs 1 and 12, and no others: a driver holding them cannot
    watch another device's interrupt (the RTC's 8, a printer's 7), from any window."""
    from harness.access import IrqMode
    pm = rig[0]
    attached = attach(serve(pm).address)
    try:
        for bus in (pm.bus, attached):
            ports = bus.ports(0x60, 5)
            try:
                for foreign in ((8,), (7,), (1, 8)):
                    with pytest.raises(AccessDenied):
                        ports.channel.interrupt(IrqMode.ISA, isa_irqs=foreign)
                ports.channel.interrupt(IrqMode.ISA, isa_irqs=(1, 12)).close()
            finally:
                ports.channel.close()
    finally:
        attached.close()


def test_a_poll_lends_its_turn_while_it_waits(rig) -> None:
    """One channel waits guest-side for something that never comes (a poll that will time
    out); a read on another channel, made after the poll began, is answered before the poll
    ends. A slot may not run the owner's timing loops at all."""
    pm = rig[0]
    bus, abi = pm.bus, pm.abi
    with bus.open(bus.find(vendor=edu.VENDOR, device=edu.DEVICE)) as card, \
            bus.open(bus.find(vendor=E1000_VENDOR, device=E1000_DEVICE)) as nic:
        ring = card.channel.ring
        ident = card.function.bars[0].base
        seq = ring.head
        ring.write(seq, abi.PROXY_OP_MMIO_POLL, 4, 0, 1_500_000, ident, 0, 0xFFFFFFFF, 0x12345678)
        head = ring.publish(1)
        until(lambda: ring.taken_up(seq), "the guest takes the poll up")
        ral = nic.bar(0).read32(RAL0)
        still_polling = ring.served != head
        ring.wait(head, 30, "the poll")
        status = ring.status(seq)
    assert ral == MAC_LOW
    assert still_polling, "the read waited for the poll to time out"
    assert status == abi.PROXY_STATUS_TIMEOUT
    attached = attach(serve(pm).address)
    try:
        with attached.open(attached.find(vendor=edu.VENDOR, device=edu.DEVICE)) as card:
            with pytest.raises(AccessDenied):
                raw.repeat_read(card.channel, card.bar(0).space, card.function.bars[0].base, 4, 10)
    finally:
        attached.close()



def test_an_idle_slot_is_not_looked_at_until_a_device_opens_in_it(rig) -> None:
    """While nothing is open in a slot, the proxy never looks at its window (issue 19: idle slots
    must cost nothing): a request its holder posts stays unserved, and the window is not told
    when the guest sleeps. Once the owner opens a device into the slot, that channel's ring is
    served, and the ring nobody opened is still never looked at."""
    pm = rig[0]
    bus, abi = pm.bus, pm.abi
    attached = attach(serve(pm).address)
    try:
        window = attached.window
        idle = Ring(window, 1)                          # a ring of the slot that nobody opened
        seq = idle.head
        idle.write(seq, abi.PROXY_OP_NOP, 0, 0, 0, 0, 0, 0, 0)
        head = idle.publish(1)
        until(lambda: bus.window.u32[bus.window.guest_sleeping_idx] != 0, "the guest falls asleep")
        assert window.u32[window.guest_sleeping_idx] == 0, "an idle slot was told the guest sleeps"
        assert idle.served == (head - 1) & 0xFFFFFFFF, "an idle slot's ring was looked at"
        assert not idle.taken_up(seq)
        with attached.open(bus.find(vendor=edu.VENDOR, device=edu.DEVICE)) as card:
            assert card.channel.index != idle.index
            assert card.bar(0).read32(0) == 0x010000ED
            assert not idle.taken_up(seq) and idle.served == (head - 1) & 0xFFFFFFFF, \
                "a ring nobody opened was served"
    finally:
        attached.close()
