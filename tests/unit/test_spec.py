"""MachineSpec → argv, without QEMU."""

from pathlib import Path

import pytest

from harness.machine.accel import choose_auto, resolve_accel
from harness.machine.spec import Endpoints, MachineSpec, build_argv
from harness.proxy import ProxyWindows, load_abi
from harness.proxy.guest import guest_elf
from harness.qtest import qtest_spec


def endpoints(tmp_path: Path) -> Endpoints:
    return Endpoints(workdir=tmp_path, qmp="\0qmp", serial="\0serial", serial_log=tmp_path / "serial.log",
                     tag="\0m")


def test_argv_carries_the_spec(tmp_path: Path) -> None:
    spec = MachineSpec(kernel=Path("/k.elf"), memory_mb=256)
    spec.plugins.append(ProxyWindows(load_abi(guest_elf()), 1 << 20, slots=0, iommu=False))
    spec.netdev("user", "n0", restrict=True)
    spec.device("e1000", netdev="n0", mac="52:54:00:00:00:01")
    dbg = spec.chardev_file("dbg")
    argv = build_argv(spec, "tcg", endpoints(tmp_path))
    line = " ".join(argv)
    assert argv[:5] == ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg"]
    assert "-m 256M" in line and "-kernel /k.elf" in line and "-no-reboot" in line
    assert "-netdev user,id=n0,restrict=on" in line
    assert "-device e1000,netdev=n0,mac=52:54:00:00:00:01" in line
    assert f"-chardev file,id=dbg,path={tmp_path / dbg.name}" in line
    assert "socket,id=hwh-ivshmem,path=m-ivshmem,abstract=on" in line
    assert "socket,id=hwh-qmp,path=qmp,abstract=on,server=on,wait=off" in line
    assert "-chardev socket,id=hwh-serial,path=serial,abstract=on -serial chardev:hwh-serial" in line
    assert "-S" not in argv


def test_qtest_machines_start_stopped_and_refuse_kvm(tmp_path: Path) -> None:
    spec = qtest_spec()
    argv = build_argv(spec, "tcg", endpoints(tmp_path))
    assert "-S" in argv and "chardev:qtest" in argv
    with pytest.raises(ValueError):
        build_argv(spec, "kvm", endpoints(tmp_path))


def test_accel_choice() -> None:
    assert resolve_accel("tcg") == "tcg"
    assert resolve_accel("kvm") == "kvm"          # forced stays forced, whatever the host
    assert resolve_accel("auto") in ("kvm", "tcg")
    with pytest.raises(ValueError):
        resolve_accel("hvf")


def fake_host(tmp_path: Path, flags: str, modules: tuple[str, ...], kvm: bool = True) -> dict[str, Path]:
    """A /dev/kvm stand-in (a file we may open read-write, or none), a cpuinfo and a /sys/module."""
    device = tmp_path / "kvm"
    if kvm:
        device.write_bytes(b"")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    sysmod = tmp_path / "module"
    for m in ("kvm",) + modules:
        (sysmod / m).mkdir(parents=True)
    return {"device": device, "cpuinfo": cpuinfo, "modules": sysmod}


@pytest.mark.parametrize("flags, modules, kvm, expected, why", [
    ("vmx", ("kvm_intel",), True, "kvm", "vmx"),
    ("svm", ("kvm_amd",), True, "kvm", "svm"),
    ("hypervisor", ("kvm_pvm",), True, "tcg", "kvm_pvm"),          # these CI machines
    ("vmx", ("kvm_pvm",), True, "tcg", "kvm_pvm"),                 # the module wins over the flag
    ("hypervisor", (), True, "tcg", "neither vmx nor svm"),
    ("vmx", ("kvm_intel",), False, "tcg", "cannot be opened"),
])
def test_auto_picks_kvm_only_where_it_is_hardware_backed(tmp_path: Path, flags: str, modules: tuple[str, ...],
                                                         kvm: bool, expected: str, why: str) -> None:
    choice = choose_auto(**fake_host(tmp_path, flags, modules, kvm))
    assert choice.accel == expected
    assert why in choice.reason


def test_auto_on_this_host_follows_the_evidence() -> None:
    # Independent evidence read here, not through choose_auto: a kvm_pvm host, or one without
    # vmx/svm, must get tcg (the "auto picks TCG on this kind of host").
    flags = Path("/proc/cpuinfo").read_text().split()
    emulated = Path("/sys/module/kvm_pvm").exists() or not ({"vmx", "svm"} & set(flags))
    if emulated:
        assert resolve_accel("auto") == "tcg"
    else:
        assert resolve_accel("auto") in ("kvm", "tcg")   # kvm when /dev/kvm also opens
