"""MachineSpec → argv, without QEMU."""

from pathlib import Path

import pytest

from harness.machine.spec import Endpoints, MachineSpec, build_argv, resolve_accel


def endpoints(tmp_path: Path, **kw: str) -> Endpoints:
    return Endpoints(workdir=tmp_path, qmp="\0qmp", serial_log=tmp_path / "serial.log", **kw)


def test_argv_carries_the_spec(tmp_path: Path) -> None:
    spec = MachineSpec(kernel=Path("/k.elf"), memory_mb=256, ivshmem_size=1 << 20)
    spec.netdev("user", "n0", restrict=True)
    spec.device("e1000", netdev="n0", mac="52:54:00:00:00:01")
    dbg = spec.chardev_file("dbg")
    argv = build_argv(spec, "tcg", endpoints(tmp_path, ivshmem="\0ivs"))
    line = " ".join(argv)
    assert argv[:5] == ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg"]
    assert "-m 256M" in line and "-kernel /k.elf" in line and "-no-reboot" in line
    assert "-netdev user,id=n0,restrict=on" in line
    assert "-device e1000,netdev=n0,mac=52:54:00:00:00:01" in line
    assert f"-chardev file,id=dbg,path={tmp_path / dbg.name}" in line
    assert "socket,id=hwh-ivshmem,path=ivs,abstract=on" in line
    assert "socket,id=hwh-qmp,path=qmp,abstract=on,server=on,wait=off" in line
    assert "-S" not in argv


def test_qtest_machines_start_stopped_and_refuse_kvm(tmp_path: Path) -> None:
    spec = MachineSpec(qtest=True)
    argv = build_argv(spec, "tcg", endpoints(tmp_path, qtest="\0qt"))
    assert "-S" in argv and "chardev:qtest" in argv
    with pytest.raises(ValueError):
        build_argv(spec, "kvm", endpoints(tmp_path, qtest="\0qt"))


def test_accel_choice() -> None:
    assert resolve_accel("tcg") == "tcg"
    assert resolve_accel("auto") in ("kvm", "tcg")
    with pytest.raises(ValueError):
        resolve_accel("hvf")
