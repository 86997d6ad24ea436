"""Machines start, crash, die and clean up: crash reports, dead QEMU, SIGKILLed owners."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.errors import GuestCrash, MachineError
from harness.machine import Machine, MachineSpec
from harness.machine.machine import WORKDIR_PREFIX
from harness.proxy.machine import boot_image
from harness.proxy.guest import guest_elf

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("kind, mnemonic, what", [
    ("INVALID_OPCODE", "ud2", "invalid opcode"),
    ("PANIC", None, "panic"),
])
def test_guest_exception_becomes_guest_crash(proxy_machine_factory, kind: str, mnemonic: str | None,
                                             what: str) -> None:
    pm = proxy_machine_factory(name=f"crash-{kind.lower()}")
    with pytest.raises(GuestCrash) as crash:
        pm.admin.crash(kind)
    report = crash.value.report
    assert what in report
    assert "crash_on_purpose" in report          # the symbol, from the guest ELF
    assert "=>" in report                        # the faulting instruction, disassembled
    if mnemonic:
        faulting = next(line for line in report.splitlines() if line.strip().startswith("=>"))
        assert mnemonic in faulting
        assert crash.value.record["vector"] == 6
    else:
        assert "the host asked for a panic" in report
    # the machine is still there to inspect, and every later request says why it cannot run
    with pytest.raises(GuestCrash):
        pm.admin.request(pm.abi.PROXY_OP_NOP, 0, 0, "a NOP")


def test_qemu_that_dies_is_a_machine_error(proxy_machine_factory) -> None:
    pm = proxy_machine_factory(name="doomed")
    os.kill(pm.machine.process.pid, signal.SIGKILL)       # we started it; its PID is ours to end
    pm.machine.process.wait(10)
    with pytest.raises(MachineError, match="no longer running"):
        # the guest cannot answer; the wait notices QEMU is gone instead of hanging
        pm.bus.window.wait(lambda: False, timeout=30, what="a request to a dead machine", vector=0)


def test_machine_boots_any_kernel_and_waits_on_its_console(tmp_path: Path, hwharness_accel: str) -> None:
    # The proxy kernel without its shared window is just a kernel that prints and panics.
    spec = MachineSpec(kernel=boot_image(guest_elf()), accel=hwharness_accel)
    with Machine(spec, name="plain", artifacts_root=tmp_path) as m:
        m.console.wait_for(r"proxy: booting", timeout=60)
        m.console.wait_for(r"panic: proxy_init: no control window", timeout=60)
        assert m.qmp("query-status")["status"] in ("running", "paused", "guest-panicked")
        workdir = m.workdir
    assert not workdir.exists(), "a clean exit removes the machine's directory"


def test_console_wait_times_out_with_the_log(tmp_path: Path, hwharness_accel: str) -> None:
    spec = MachineSpec(kernel=boot_image(guest_elf()), accel=hwharness_accel)
    with pytest.raises(MachineError, match="never printed"):
        with Machine(spec, name="timeout", artifacts_root=tmp_path) as m:
            m.console.wait_for(r"proxy: booting", timeout=60)
            m.console.wait_for(r"never printed", timeout=0.5)
    kept = [d for d in tmp_path.iterdir() if d.name.startswith("hwharness-")]
    assert kept and (kept[0] / "serial.log").read_text().startswith("proxy: booting"), \
        "a failed machine keeps its artifacts"
    assert (kept[0] / "cmdline.txt").read_text().startswith("qemu-system-x86_64")


OWNER = textwrap.dedent("""
    import sys, time
    from harness.proxy import ProxyMachine, proxy_spec
    spec = proxy_spec(accel=sys.argv[1])
    pm = ProxyMachine(spec, name="orphan").__enter__()
    print(pm.machine.process.pid, pm.machine.workdir.name, flush=True)
    time.sleep(600)
""")


def _unix_sockets() -> str:
    return Path("/proc/net/unix").read_text()


def _left_in_shm(before: set[str], owner_pid: int) -> set[str]:
    """What appeared in /dev/shm since ``before``, apart from the directories that other live
    processes' saved machines keep there (another pytest worker may save one meanwhile)."""
    def someone_elses(name: str) -> bool:
        if not name.startswith(WORKDIR_PREFIX):
            return False
        pid = name[len(WORKDIR_PREFIX):].split("-")[0]
        return pid.isdigit() and int(pid) != owner_pid and Path(f"/proc/{pid}").exists()
    return {name for name in set(os.listdir("/dev/shm")) - before if not someone_elses(name)}


def test_sigkill_of_the_owner_takes_qemu_and_its_sockets_along(hwharness_accel: str) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    owner = subprocess.Popen([sys.executable, "-c", OWNER, hwharness_accel], stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line, "the owner process did not boot its machine"
        qemu_pid, workdir_name = line.split()
        assert workdir_name in _unix_sockets()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{qemu_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{qemu_pid}").exists(), "QEMU outlived the process that owned it"
        assert workdir_name not in _unix_sockets(), "a socket outlived its machine"
        assert not _left_in_shm(shm_before, owner.pid), "shared memory left in /dev/shm"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


@pytest.mark.kvm
def test_forced_kvm_still_runs_the_proxy_guest(proxy_machine_factory) -> None:
    # auto may well pick tcg here (see harness/machine/accel.py); a forced kvm must still work.
    from harness.machine import kvm_usable
    if not kvm_usable():
        pytest.skip("no usable /dev/kvm on this host: there is no KVM to force")
    pm = proxy_machine_factory(lambda spec: setattr(spec, "accel", "kvm"), name="forced-kvm")
    assert pm.machine.accel == "kvm"
    assert pm.machine.qmp("query-kvm") == {"enabled": True, "present": True}
    # the guest CPU ran under KVM: the proxy enumerated PCI, and QMP agrees with what it found
    qmp_ids = {(d["id"]["vendor"], d["id"]["device"]) for bus in pm.machine.qmp("query-pci") for d in bus["devices"]}
    assert {(f.vendor, f.device) for f in pm.bus.functions} == qmp_ids
