"""FAT12, FAT16 and FAT32 images made by mkfs.fat and mtools, read through the AHCI driver
on one booted machine (a disk on each of four ports), compared with what mtools reads."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import pytest

from drivers.ahci import Ahci
from harness.devices.fat import DriverFatFS, NotFatFilesystem
from harness.machine import MachineSpec
from tests.fatimages import have_tools, make_image, mtools_listing, mtools_read, tree
from tests.unit.test_fat import listing

pytestmark = pytest.mark.qemu

FAT_SIZES = (12, 16, 32)


@pytest.fixture(scope="module")
def disks(proxy_machine_factory_module, tmp_path_factory) -> Iterator[dict[object, tuple]]:
    """{12|16|32: (port, image, files), "random": (port, image, None)}, on one machine."""
    missing = have_tools()
    if missing:
        pytest.fail(f"{missing} is not installed: run `make deps` (dosfstools, mtools)", pytrace=False)
    root = tmp_path_factory.mktemp("fat-disks")
    files = tree(random.Random(2))
    images: dict[object, tuple[Path, dict | None]] = {
        bits: (make_image(root / f"fat{bits}.img", bits, files, root), files) for bits in FAT_SIZES}
    noise = root / "random.img"
    noise.write_bytes(random.randbytes(4 << 20))
    images["random"] = (noise, None)

    def configure(spec: MachineSpec) -> None:
        for port, (image, _) in enumerate(images.values()):
            spec.drive(id=f"disk{port}", file=str(image), format="raw", snapshot=True, **{"if": "none"})
            spec.device("ide-hd", drive=f"disk{port}", bus=f"ide.{port}")

    pm = proxy_machine_factory_module(configure, name="fat")
    hba = Ahci.open(pm.bus)
    ports = {p.index: p for p in hba.disks()}
    yield {key: (ports[i], image, content) for i, (key, (image, content)) in enumerate(images.items())}
    hba.close()


@pytest.fixture(params=FAT_SIZES, ids=lambda bits: f"FAT{bits}")
def fat(request: pytest.FixtureRequest, disks) -> Iterator[tuple[DriverFatFS, Path, dict]]:
    port, image, files = disks[request.param]
    fat = DriverFatFS(port, read_only=True)
    assert fat.fs.fat_type == request.param
    yield fat, image, files
    fat.close()


def test_the_tree_through_the_driver_is_the_tree_mtools_lists(fat) -> None:
    ours, image, _ = fat
    assert listing(ours) == mtools_listing(image)


def test_every_file_through_the_driver_is_byte_exact(fat) -> None:
    ours, image, files = fat
    for name, data in files.items():
        if data is not None:
            path = f"/{name}"
            assert ours.readbytes(path.upper()) == mtools_read(image, path) == data, name


def test_a_disk_without_fat_is_refused_by_name(disks) -> None:
    port, _, _ = disks["random"]
    with pytest.raises(NotFatFilesystem, match="not a FAT filesystem: the disk has no boot sector signature"):
        DriverFatFS(port, read_only=True)
