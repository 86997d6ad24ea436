"""The FAT layer over pyfatfs, on host image files made by mkfs.fat and mtools (no QEMU):
names and bytes as mtools reads them, lookups without case, and images that are not FAT."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import pytest

from harness.devices.fat import DriverFatFS, NotFatFilesystem
from tests.fatimages import have_tools, make_image, mtools_listing, mtools_read, tree


def listing(fat: DriverFatFS, directory: str = "/") -> set[str]:
    """Every path under ``directory`` as the layer shows it, directories ending in ``/``."""
    out = set()
    for info in fat.scandir(directory):
        path = f"{directory.rstrip('/')}/{info.name}"
        if info.is_dir:
            out.add(path + "/")
            out |= listing(fat, path)
        else:
            out.add(path)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, dict[str, bytes | None]]]:
    missing = have_tools()
    if missing:
        pytest.fail(f"{missing} is not installed: run `make deps` (dosfstools, mtools)", pytrace=False)
    root = tmp_path_factory.mktemp("fat")
    files = tree(random.Random(1))
    return {bits: (make_image(root / f"fat{bits}.img", bits, files, root), files) for bits in (12, 16, 32)}


@pytest.fixture(params=(12, 16, 32), ids=lambda bits: f"FAT{bits}")
def image(request: pytest.FixtureRequest, images) -> Iterator[tuple[DriverFatFS, Path, dict[str, bytes | None]]]:
    path, files = images[request.param]
    fat = DriverFatFS.open_image(str(path))
    assert fat.fs.fat_type == request.param, "pyfatfs agrees with mkfs.fat on the FAT size"
    yield fat, path, files
    fat.close()


def test_every_name_is_listed_as_mtools_lists_it(image) -> None:
    fat, path, files = image
    theirs = mtools_listing(path)
    assert listing(fat) == theirs
    # and the names that are stored in capitals with the lowercase flags are shown in lowercase
    assert {"/deep/", "/low.TXT", "/README.md", "/deep/Nested/third/"} <= theirs


def test_every_file_reads_byte_exact_as_mtools_reads_it(image) -> None:
    fat, path, files = image
    for name, data in files.items():
        if data is not None:
            assert fat.readbytes(f"/{name}") == data == mtools_read(path, f"/{name}"), name


def test_lookups_ignore_case_and_accept_the_short_alias(image) -> None:
    fat, _, files = image
    for name, data in files.items():
        for spelled in (name.upper(), name.lower(), name.swapcase()):
            if data is None:
                assert fat.isdir(f"/{spelled}"), spelled
            else:
                assert fat.readbytes(f"/{spelled}") == data, spelled
    assert fat.readbytes("/DEEP/NESTED/MIXEDC~1.TXT") == files["deep/Nested/MixedCase.Txt"]
    assert fat.getinfo("/DEEP/nested").name == "Nested"


def test_missing_paths_and_wrong_kinds_are_named_as_given(image) -> None:
    import fs.errors
    fat, _, _ = image
    with pytest.raises(fs.errors.ResourceNotFound, match="/Deep/nothing"):
        fat.readbytes("/Deep/nothing")
    with pytest.raises(fs.errors.FileExpected, match="/DEEP"):
        fat.readbytes("/DEEP")
    with pytest.raises(fs.errors.DirectoryExpected, match="/readme.MD"):
        fat.listdir("/readme.MD")


def test_images_that_are_not_fat_are_refused_with_the_reason(tmp_path: Path, images) -> None:
    fat16, _ = images[16]
    cases = {
        "empty.img": (b"", "not a FAT filesystem: .* is 0 bytes"),
        "random.img": (random.randbytes(1 << 20), "not a FAT filesystem: .* no boot sector signature"),
        "truncated.img": (fat16.read_bytes()[:1 << 20], "truncated FAT filesystem: .* holds 1048576 bytes"),
        # a boot sector signature, and nothing else of FAT's: pyfatfs's own complaint, in our words
        "signed.img": (bytes(510) + b"\x55\xaa" + bytes(1 << 20), "not a FAT filesystem: .*signed.img: "),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(NotFatFilesystem, match=message):
            DriverFatFS.open_image(str(tmp_path / name))
