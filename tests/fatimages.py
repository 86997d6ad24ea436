"""FAT12, FAT16 and FAT32 images made by mkfs.fat and filled by mtools, and what mtools reads back;
the FAT16 image ``make images`` builds (``IMAGE``), and a check of a driver's reading of it.

The tree has what trips a FAT reader: nested directories; short names that
mtools stores in capitals with the lowercase flags (``deep``, ``low.TXT``,
``README.md``); mixed-case and long names (long-name entries); an empty file;
a file over many clusters; a directory over several clusters.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SBIN = os.pathsep.join(["/sbin", "/usr/sbin"])
IMAGE = Path(__file__).resolve().parents[1] / "images" / "fat16.img"

# mkfs.fat's FAT size -> image size in 512-byte sectors (each well inside what that FAT size allows)
SECTORS = {12: 8_000, 16: 40_000, 32: 80_000}


def tree(rng: random.Random) -> dict[str, bytes | None]:
    """Paths (``/``-separated, no leading slash) to contents; None for a directory."""
    files: dict[str, bytes | None] = {
        "deep": None,
        "deep/Nested": None,
        "deep/Nested/third": None,
        "deep/Nested/third/fourth": None,
        "UPPER.TXT": b"upper\n",
        "low.TXT": b"lower base, upper extension\n",
        "README.md": b"# upper base, lower extension\n",
        "empty.txt": b"",
        "deep/notes.txt": b"in a directory that mmd made as 'deep'\n",
        "deep/Nested/MixedCase.Txt": b"mixed case: a long-name entry\n",
        "deep/Nested/a very long file name with spaces.data": rng.randbytes(3000),
        "deep/Nested/third/fourth/random.bin": rng.randbytes(300_000),
        "many": None,
    }
    for i in range(70):                      # 70 entries of 32 bytes + long names: several clusters
        files[f"many/file number {i:03d}.txt"] = f"file {i}\n".encode()
    return files


def mtools(*args: str) -> bytes:
    return subprocess.run(list(args), check=True, capture_output=True).stdout


def make_image(path: Path, fat_bits: int, files: dict[str, bytes | None], scratch: Path) -> Path:
    """mkfs.fat a ``fat_bits`` image at ``path`` and fill it with ``files`` through mmd and mcopy."""
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + os.pathsep + SBIN)
    subprocess.run(["mkfs.fat", "-C", "-F", str(fat_bits), "-n", f"FAT{fat_bits}", str(path),
                    str(SECTORS[fat_bits] // 2)], check=True, capture_output=True, env=env)
    directories = [name for name, data in files.items() if data is None]
    if directories:
        mtools("mmd", "-i", str(path), *(f"::/{name}" for name in directories))
    by_directory: dict[str, list[str]] = {}
    for name, data in files.items():
        if data is not None:
            by_directory.setdefault(str(Path("/", name).parent), []).append(name)
    for directory, names in by_directory.items():          # one mcopy per directory
        sources = []
        for name in names:
            source = scratch / Path(name).name
            source.write_bytes(files[name])  # type: ignore[arg-type]
            sources.append(str(source))
        mtools("mcopy", "-i", str(path), *sources, f"::{directory}")
        for source in sources:
            Path(source).unlink()
    return path


def mtools_listing(image: Path) -> set[str]:
    """Every path in the image as mtools shows it (directories end in ``/``)."""
    lines = mtools("mdir", "-/", "-b", "-i", str(image), "::/").decode().splitlines()
    return {line.removeprefix("::") for line in lines if line.strip()}


def mtools_read(image: Path, path: str) -> bytes:
    return mtools("mcopy", "-n", "-i", str(image), f"::{path}", "-")


def fresh_image(directory: Path, name: str = "disk.img") -> Path:
    """A copy of ``IMAGE`` to attach (QEMU locks what it attaches; mtools reads the original)."""
    if not IMAGE.is_file():
        pytest.fail(f"{IMAGE} is missing: run `make images` (mkfs.fat and mtools build it)", pytrace=False)
    copy = directory / name
    shutil.copy(IMAGE, copy)
    return copy


def check_against_mtools(fat: Any, directories: tuple[str, ...] = ("/", "/DOCS")) -> None:
    """``fat`` (a DriverFatFS over a disk holding a copy of ``IMAGE``) lists each directory
    as mtools does and reads every file in it byte-exact."""
    for directory in directories:
        ours = sorted(fat.listdir(directory))
        theirs = sorted(line.rstrip("/").rsplit("/", 1)[1] for line in
                        mtools("mdir", "-b", "-i", str(IMAGE), f"::{directory}").decode().splitlines())
        assert ours == theirs
        for name in ours:
            path = f"{directory.rstrip('/')}/{name}"
            if fat.isfile(path):
                assert fat.readbytes(path) == mtools_read(IMAGE, path)


def have_tools() -> str | None:
    """The first missing tool, or None."""
    for tool in ("mkfs.fat", "mcopy", "mmd", "mdir"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + SBIN) is None:
            return tool
    return None
