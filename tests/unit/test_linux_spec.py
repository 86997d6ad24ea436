"""The Linux guest's kernel command line, without QEMU: the TSC rate handed over under TCG."""

from pathlib import Path

import pytest

from harness.machine import linux as linux_module
from harness.machine.linux import LinuxImage, host_tsc_khz

CPU = """processor\t: {n}
flags\t\t: fpu tsc msr {flags}
bogomips\t: {mips}

"""


def cpuinfo(tmp_path: Path, *cpus: tuple[str, str]) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text("".join(CPU.format(n=n, flags=flags, mips=mips) for n, (flags, mips) in enumerate(cpus)))
    return path


def test_the_host_tsc_rate_is_read_from_the_bogomips_of_a_constant_tsc(tmp_path: Path) -> None:
    steady = "constant_tsc nonstop_tsc"
    assert host_tsc_khz(cpuinfo(tmp_path, (steady, "5192.27"), (steady, "5192.27"))) == 2_596_135


@pytest.mark.parametrize("cpus", [
    (("constant_tsc", "5192.27"),),                                        # may stop in deep sleep
    (("nonstop_tsc", "5192.27"),),                                         # may change with the clock
    (("constant_tsc nonstop_tsc", "5192.27"), ("constant_tsc nonstop_tsc", "4800.00")),   # CPUs disagree
    (("constant_tsc nonstop_tsc", "12.50"),),                              # no TSC runs at 6 MHz
], ids=["not-nonstop", "not-constant", "cpus-disagree", "implausible"])
def test_no_rate_where_the_host_does_not_vouch_for_one(tmp_path: Path, cpus: tuple[tuple[str, str], ...]) -> None:
    assert host_tsc_khz(cpuinfo(tmp_path, *cpus)) is None


def test_no_rate_without_a_cpuinfo(tmp_path: Path) -> None:
    assert host_tsc_khz(tmp_path / "missing") is None


def test_the_rate_goes_on_the_command_line_under_tcg_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux_module, "host_tsc_khz", lambda: 2_596_135)
    image = LinuxImage(kernel=Path("/k"), initrd=Path("/i"), release="6.1", prompt="# ", modules=())
    assert "tsc_early_khz=2596135" in image.spec(accel="tcg").append.split()
    assert "tsc_early_khz" not in image.spec(accel="kvm").append, "KVM's guests have kvmclock"
    counted = image.spec(accel="tcg", icount_shift=0)
    assert "tsc_early_khz" not in counted.append and counted.icount_shift == 0, "-icount's TSC counts instructions"
    monkeypatch.setattr(linux_module, "host_tsc_khz", lambda: None)
    assert "tsc_early_khz" not in image.spec(accel="tcg").append


def test_acpi_is_off_under_tcg_unless_an_intx_only_device_is_driven(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux_module, "host_tsc_khz", lambda: 2_596_135)
    image = LinuxImage(kernel=Path("/k"), initrd=Path("/i"), release="6.1", prompt="# ",
                       modules=("e1000", "ahci", "virtio_blk"))
    assert "acpi=off" in image.spec(accel="tcg").append.split()
    assert "acpi=off" in image.spec(accel="tcg", modules=("ahci", "virtio_blk")).append.split(), "both have MSI"
    assert "acpi=off" not in image.spec(accel="tcg", modules=("e1000",)).append, "only ACPI routes its INTx"
    assert "acpi=off" not in image.spec(accel="tcg", net="unix:/w").append, "a wire is an e1000"
    assert "acpi=off" not in image.spec(accel="kvm").append
    monkeypatch.setattr(linux_module, "host_tsc_khz", lambda: None)
    assert "acpi=off" in image.spec(accel="tcg", icount_shift=0).append.split(), "-icount's PIT calibration is exact"
    assert "acpi=off" not in image.spec(accel="tcg").append, "the TSC's calibration may need ACPI's timers"
    monkeypatch.setattr(linux_module, "host_tsc_khz", lambda: 2_596_135)
    assert "acpi=off" not in image.spec(accel="tcg", acpi=True).append, "a device of the user's that needs INTx"
    assert "acpi=off" in image.spec(accel="tcg", modules=("e1000",), acpi=False).append.split()
    assert "acpi=off" in image.spec(accel="kvm", acpi=False).append.split()


def test_a_linux_boot_has_no_huge_pages_and_its_restores_have_them(tmp_path: Path) -> None:
    from harness.machine.saved import SavedMachine
    image = LinuxImage(kernel=Path("/k"), initrd=Path("/i"), release="6.1", prompt="# ", modules=())
    booted = image.spec(accel="tcg")
    assert booted.huge_pages is False
    assert SavedMachine(booted, tmp_path).restore_spec().huge_pages is True


def test_only_a_machine_that_loads_modules_boots_the_initramfs_that_carries_them() -> None:
    image = LinuxImage(kernel=Path("/k"), initrd=Path("/i"), release="6.1", prompt="# ",
                       modules=("e1000", "virtio_blk", "ext4"), disk_modules=("virtio_blk", "ext4"),
                       initrd_modules=Path("/im"))
    assert image.spec(accel="tcg").initrd == Path("/i")
    assert image.spec(accel="tcg", modules=("e1000",)).initrd == Path("/im")
    assert image.spec(accel="tcg", net="unix:/w").initrd == Path("/im"), "a wire's e1000 is a module"
    assert image.spec(accel="tcg", disk="nbd+unix:///?socket=/s").initrd == Path("/im"), "so is a disk's virtio_blk"
    older = LinuxImage(kernel=Path("/k"), initrd=Path("/i"), release="6.1", prompt="# ", modules=("e1000",))
    assert older.spec(accel="tcg", modules=("e1000",)).initrd == Path("/i"), "an image built before the split"
