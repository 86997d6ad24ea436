"""The Linux guest from Debian packages: console, fail-fast, snapshots, and real drivers cross-checked."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time

import pytest

from harness.errors import GuestHang, GuestPanic, GuestReset, QemuExited, SnapshotError
from harness.machine.linux import IMAGES
from harness.machine.saved import SavedMachine, save_booted

pytestmark = pytest.mark.qemu


def test_run_returns_output_and_exit_status(linux_machine, linux_image) -> None:
    console = linux_machine.console
    assert console.run("echo $((6*7))") == ("42", 0)
    assert console.run("false") == ("", 1)
    assert console.run("exit_with() { return $1; }; exit_with 7") == ("", 7)
    assert console.run("echo out; echo err >&2") == ("out\nerr", 0)
    assert console.run("uname -r") == (linux_image.release, 0)
    assert console.run("cd /sys; pwd")[0] == "/sys"
    assert console.run("pwd")[0] == "/sys", "commands run in the same shell"
    out, status = console.run("if then")
    assert status == 2 and "syntax error" in out, "a syntax error is a status, not a stuck prompt"
    assert console.run("echo still answering") == ("still answering", 0)


def test_run_parses_output_interleaved_with_printk_noise(linux_machine) -> None:
    console = linux_machine.console
    console.run("(while true; do echo '<2>hwh-noise' > /dev/kmsg; done) &")
    for i in range(30):
        # the pause makes room for kernel lines inside the output, not only around it
        assert console.run(f"echo $(({i}*7)); usleep 20000; echo line-{i}") == (f"{i * 7}\nline-{i}", 0)
    # The parse had something to survive: kernel lines printed inside the framed output.
    framed = re.findall(r"hwh[0-9a-f]{8}B[ \d.]*\r?\n(.*?)hwh[0-9a-f]{8}E", console.text(), re.DOTALL)
    assert sum("hwh-noise" in f for f in framed) >= 5, "the noise never landed inside a command's output"


def test_linux_sees_the_pci_devices_qmp_reports(linux_machine) -> None:
    out, status = linux_machine.console.run(
        "for d in /sys/bus/pci/devices/*; do echo ${d##*/} $(cat $d/vendor) $(cat $d/device); done")
    assert status == 0
    seen = {tuple(line.split()) for line in out.splitlines()}
    expected = set()
    for bus in linux_machine.qmp("query-pci"):
        for dev in bus["devices"]:
            bdf = f"0000:{dev['bus']:02x}:{dev['slot']:02x}.{dev['function']}"
            expected.add((bdf, f"0x{dev['id']['vendor']:04x}", f"0x{dev['id']['device']:04x}"))
    assert seen == expected and len(seen) >= 4


def test_a_file_written_after_a_snapshot_is_gone_after_restore(linux_machine) -> None:
    console = linux_machine.console
    console.run("echo before > /tmp/kept")
    linux_machine.snapshot("mine")
    console.run("echo after > /tmp/kept; echo new > /tmp/added")
    assert console.run("cat /tmp/kept /tmp/added") == ("after\nnew", 0)
    linux_machine.restore("mine")
    assert console.run("cat /tmp/kept") == ("before", 0)
    out, status = console.run("cat /tmp/added")
    assert status == 1 and "No such file" in out
    with pytest.raises(SnapshotError, match="no snapshot named 'never-taken'"):
        linux_machine.restore("never-taken")


def test_fifty_restores_in_a_row_all_answer(linux_machine) -> None:
    linux_machine.snapshot("ready")
    for i in range(50):
        linux_machine.restore("ready")
        token = os.urandom(4).hex()
        assert linux_machine.console.run(f"echo {token}-{i}") == (f"{token}-{i}", 0)


def test_machines_restored_at_once_never_see_each_others_writes(linux_saved, linux_machine, tmp_path) -> None:
    other = linux_saved.restore(name="other", artifacts_root=tmp_path)
    try:
        assert linux_machine.process.pid != other.process.pid
        linux_machine.console.run("echo first > /tmp/who")
        other.console.run("echo second > /tmp/who")
        assert linux_machine.console.run("cat /tmp/who") == ("first", 0)
        assert other.console.run("cat /tmp/who") == ("second", 0)
    finally:
        other.shutdown()
    again = linux_saved.restore(name="again", artifacts_root=tmp_path)
    try:
        out, status = again.console.run("cat /tmp/who")
        assert status == 1 and "No such file" in out, "the saved machine is as it was"
    finally:
        again.shutdown()


def test_a_restore_takes_the_qemu_standing_by_and_another_stands_up(linux_saved, tmp_path) -> None:
    # a handle of its own on the session's saved files, so the session's own standby is left alone
    saved = SavedMachine(linux_saved.spec, linux_saved.directory, linux_saved.disks)
    saved.stand_by(name="standing", artifacts_root=tmp_path)
    try:
        first = saved.standing_by
        assert first is not None and first.alive()
        m = saved.restore(name="standing", artifacts_root=tmp_path)
        try:
            assert m.process.pid == first.process.pid, "the restore is the QEMU that stood by"
            assert m.qmp("query-status")["status"] == "running"
            m.console.run("echo taken > /tmp/who")
            second = saved.standing_by
            assert second is not None and second.alive() and second.process.pid != m.process.pid
            other = saved.restore(name="other", artifacts_root=tmp_path)
            try:
                assert other.process.pid != second.process.pid, "another name's restore starts its own QEMU"
                assert saved.standing_by is second
            finally:
                other.shutdown()
        finally:
            m.shutdown()
        # one that died waiting is not handed out: the restore starts a QEMU of its own
        os.kill(second.process.pid, signal.SIGKILL)
        second.process.wait(10)
        again = saved.restore(name="standing", artifacts_root=tmp_path)
        try:
            assert again.process.pid != second.process.pid
            out, status = again.console.run("cat /tmp/who")
            assert status == 1 and "No such file" in out, "each restore starts from the saved state"
        finally:
            again.shutdown()
        third = saved.standing_by
        assert third is not None and third.alive()
    finally:
        saved.stand_down()
    assert saved.standing_by is None
    assert third.exitcode() is not None and not third.workdir.exists(), "stood down: killed, its directory gone"


def test_machines_restored_side_by_side_each_run_their_own_guest(linux_saved, tmp_path) -> None:
    """restore_many starts every QEMU before it waits for the first: each is a process of its
    own, running (QMP says so), with its own RAM."""
    machines = linux_saved.restore_many(3, name="many", artifacts_root=tmp_path)
    try:
        assert len({m.process.pid for m in machines}) == 3
        for i, m in enumerate(machines):
            assert m.qmp("query-status")["status"] == "running"
            m.console.run(f"echo {i} > /tmp/who")
        for i, m in enumerate(machines):
            assert m.console.run("cat /tmp/who") == (str(i), 0)
    finally:
        for m in machines:
            m.shutdown()
    assert not any(m.alive() for m in machines)


def test_restores_of_a_machine_with_a_disk_each_write_their_own(linux_accel, linux_image, tmp_path) -> None:
    spec = linux_image.spec(accel=linux_accel, modules=("ahci", "sd_mod", "vfat"))
    spec.drive(file=str(IMAGES / "fat16.img"), format="raw", id="disk0", **{"if": "none"})
    spec.device("ide-hd", drive="disk0", bus="ide.0")
    image_before = hashlib.sha256((IMAGES / "fat16.img").read_bytes()).hexdigest()
    remount = "echo 3 > /proc/sys/vm/drop_caches; umount /mnt; mount -t vfat /dev/sda /mnt && cat /mnt/who"

    def ready(m):
        linux_image.wait_ready(m)
        assert m.console.run("for i in $(seq 100); do [ -e /sys/block/sda ] && break; sleep 0.1; done; "
                             "mkdir /mnt && mount -t vfat /dev/sda /mnt && echo saved > /mnt/who && sync",
                             timeout=60)[1] == 0
    with save_booted(spec, ready, root=tmp_path, artifacts_root=tmp_path) as saved:
        machines = [saved.restore(name=f"disk{i}", artifacts_root=tmp_path) for i in range(2)]
        try:
            for i, m in enumerate(machines):
                assert m.console.run("cat /mnt/who") == ("saved", 0)
                assert m.console.run(f"echo mine{i} > /mnt/who && sync")[1] == 0
            for i, m in enumerate(machines):
                assert m.console.run(remount) == (f"mine{i}", 0), "read back from its own disk"
        finally:
            for m in machines:
                m.shutdown()
        m = saved.restore(name="disk-again", artifacts_root=tmp_path)
        try:
            assert m.console.run(remount) == ("saved", 0), "the saved disk is as it was"
        finally:
            m.shutdown()
    assert hashlib.sha256((IMAGES / "fat16.img").read_bytes()).hexdigest() == image_before


def test_a_panic_raises_guest_panic_long_before_the_timeout(linux_machine) -> None:
    t0 = time.monotonic()
    with pytest.raises(GuestPanic) as failure:
        linux_machine.console.run("echo c > /proc/sysrq-trigger", timeout=60)
    assert time.monotonic() - t0 < 30, "the panic should end the wait, not the 60 s timeout"
    assert "sysrq triggered crash" in failure.value.console, "the error quotes the console"
    assert linux_machine.failed and linux_machine.workdir.exists(), "the artifacts are kept"
    assert "sysrq triggered crash" in (linux_machine.workdir / "serial.log").read_text()
    linux_machine.failed = False      # expected: the next test restores this machine


def test_a_stopped_cpu_raises_guest_hang_saying_paused(linux_machine) -> None:
    console = linux_machine.console
    console.sendline('sleep 1; echo wo""ke')     # the echo of the typed line does not say "woke"
    linux_machine.qmp("stop")
    with pytest.raises(GuestHang, match="query-status: paused") as failure:
        console.expect("woke", timeout=60, quiet=2)
    assert failure.value.status == "paused"
    linux_machine.failed = False


def test_a_reboot_raises_guest_reset(linux_machine) -> None:
    # -no-reboot turns the guest's reset into QEMU's exit; QMP's SHUTDOWN event says why.
    with pytest.raises(GuestReset):
        linux_machine.console.run("echo b > /proc/sysrq-trigger", timeout=60)
    linux_machine.failed = False


def test_qemu_killed_during_a_command_raises_qemu_exited(linux_machine) -> None:
    linux_machine.console.sendline("sleep 30")
    os.kill(linux_machine.process.pid, signal.SIGKILL)       # our own QEMU, by its PID
    with pytest.raises(QemuExited, match="QEMU exited"):
        linux_machine.console.expect("never", timeout=60)
    linux_machine.failed = False


# ---- Linux's own drivers against the same emulated hardware our Python drivers drive ----

@pytest.fixture(scope="module")
def devices_machine(linux_machine_factory_module):
    def configure(spec):
        spec.netdev("user", "net0")
        spec.device("e1000", netdev="net0")
        spec.drive(file=str(IMAGES / "fat16.img"), format="raw", id="disk0", snapshot=True, **{"if": "none"})
        spec.device("ide-hd", drive="disk0", bus="ide.0")      # q35's built-in AHCI, port 0
    return linux_machine_factory_module(configure, modules=("e1000", "ahci", "sd_mod", "vfat"),
                                        name="linux-devices")


def test_linux_e1000_and_udhcpc_get_the_lease_our_driver_gets(devices_machine, proxy_machine_factory) -> None:
    from drivers.e1000 import E1000
    from harness.services.netstack import Host
    out, status = devices_machine.console.run(
        "ip link set eth0 up && udhcpc -i eth0 -n -q -f -s /bin/true 2>&1", timeout=60)
    assert status == 0, out
    linux = re.search(r"lease of (\S+) obtained from (\S+), lease time (\d+)", out)
    assert linux, out

    def net(spec):
        spec.netdev("user", "net0")
        spec.device("e1000", netdev="net0")
    pm = proxy_machine_factory(net, name="dhcp-python")
    nic = E1000.open(pm.bus)
    try:
        lease = Host(nic).dhcp()
    finally:
        nic.close()
    assert (linux.group(1), linux.group(2), int(linux.group(3))) == (str(lease.address), str(lease.server),
                                                                      lease.seconds)


def test_linux_ahci_reads_the_fat_image_byte_exact(devices_machine) -> None:
    console = devices_machine.console
    out, status = console.run("for i in $(seq 100); do [ -e /sys/block/sda/size ] && break; sleep 0.1; done; "
                              "cat /sys/block/sda/size", timeout=60)
    assert status == 0, out
    block = next(b for b in devices_machine.qmp("query-block") if b["device"] == "disk0")
    assert int(out) * 512 == block["inserted"]["image"]["virtual-size"]
    assert console.run("mkdir -p /mnt && mount -t vfat -o ro /dev/sda /mnt")[1] == 0
    out, status = console.run("sha256sum /mnt/random.bin /mnt/docs/readme.txt")
    assert status == 0, out
    sums = dict(reversed(line.split()) for line in out.splitlines())
    files = IMAGES / "files"
    assert sums["/mnt/random.bin"] == hashlib.sha256((files / "random.bin").read_bytes()).hexdigest()
    assert sums["/mnt/docs/readme.txt"] == hashlib.sha256((files / "docs" / "readme.txt").read_bytes()).hexdigest()


def test_eight_machines_booted_at_once_each_answer_on_their_own_console(linux_accel, linux_image, tmp_path) -> None:
    from contextlib import ExitStack
    from harness.machine import Machine
    with ExitStack() as stack:
        machines = []
        for i in range(8):                  # launched from this thread: QEMU dies with the thread that forks it
            m = Machine(linux_image.spec(accel=linux_accel, append=f"hwh_id=m{i}"), name=f"par{i}",
                        artifacts_root=tmp_path)
            stack.enter_context(m)
            machines.append(m)
        for m in machines:
            linux_image.wait_ready(m, timeout=300)
        for i, m in enumerate(machines):
            # init's environment carries the id its own command line gave it: no console crossed over
            assert m.console.run("echo $hwh_id") == (f"m{i}", 0)
        assert len({m.workdir for m in machines}) == 8
        assert len({m.endpoints.serial for m in machines}) == 8


def test_dmesg_through_run_keeps_the_boot_log(linux_machine, linux_image) -> None:
    # dmesg prints lines shaped like the kernel's own console lines; only live ones are noise.
    out, status = linux_machine.console.run("dmesg | head -3")
    assert status == 0
    assert out.startswith("[    0.000000] Linux version " + linux_image.release), out


def test_booted_and_restored_consoles_alike_do_not_echo_typed_lines(linux_machine, devices_machine) -> None:
    """init turns the echo off before the shell starts, so a booted machine, the saved one
    and every restore of it have it off: the same terminal whichever way the test got its
    machine (`hwharness boot` keeps it for a person: test_linux_cli.py)."""
    for m in (linux_machine, devices_machine):
        out, status = m.console.run("stty -a")
        assert status == 0 and re.search(r"(^|\s)-echo(\s|$)", out) and re.search(r"(^|\s)icanon(\s|$)", out), out


def test_init_mounts_each_filesystem_once(linux_machine) -> None:
    """init's /dev check and its `mount -a` (the image's /etc/fstab), as the guest's own
    /proc/mounts lists them."""
    out, status = linux_machine.console.run("cut -d' ' -f2,3 /proc/mounts")
    assert status == 0
    mounts = [tuple(line.split()) for line in out.splitlines()]
    for mount in (("/dev", "devtmpfs"), ("/proc", "proc"), ("/sys", "sysfs"), ("/tmp", "tmpfs")):
        assert mounts.count(mount) == 1, out
