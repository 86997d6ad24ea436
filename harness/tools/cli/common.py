"""What several commands use: printing for a person, the checks of input files, JSON output.

Light on purpose: ``hwharness --help`` imports it, and nothing that boots.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import BadInput, HarnessError

if TYPE_CHECKING:
    import argparse

    from ...proxy import ProxyMachine

log = logging.getLogger("hwharness")


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class CheckFailed(HarnessError):
    """A command's own check failed (the bytes received differ from those sent, say): exit 1."""


def iommu_of(args: "argparse.Namespace") -> bool | None:
    """What every proxy_spec of the command is given: False for ``--no-iommu``, else None
    (proxy_spec's default, which HWHARNESS_IOMMU=0 turns off)."""
    return False if getattr(args, "no_iommu", False) else None


def readable_file(path: str, what: str) -> Path:
    """``path`` if it names a regular file this process can read; BadInput naming it otherwise."""
    file = Path(path)
    if not file.exists():
        raise BadInput(f"{what} {path}: no such file")
    if file.is_dir():
        raise BadInput(f"{what} {path}: is a directory, not a file")
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise BadInput(f"{what} {path}: cannot be read ({exc.strerror})") from exc
    return file


QCOW2_MAGIC = b"QFI\xfb"                 # a qcow2 image's first bytes (QEMU's docs/interop/qcow2.txt)
# The qcow2 header's fields looked at here (docs/interop/qcow2.txt), big-endian: version,
# backing_file_offset, crypt_method, incompatible_features (version 3) and its bits
QCOW2_HEADER = struct.Struct(">4sIQ16xI36xQ")
QCOW2_CORRUPT, QCOW2_EXTERNAL_DATA = 1 << 1, 1 << 2


def image_format(image: Path, asked: str | None = None) -> str:
    """What QEMU opens ``image`` as: ``raw`` (its bytes are the disk) or ``qcow2`` (the disk
    it holds), as ``asked``; not asked, raw unless the image starts with a qcow2 header, which
    is refused: the format is not guessed from bytes that a client of a raw export may have
    written there. Served as raw, a qcow2 file's container would be the disk, and a client's
    writes would wreck it. A qcow2 image that is encrypted, marked corrupt, or names another
    file (a backing file, an external data file) is refused: QEMU would open that file too."""
    with open(image, "rb") as f:
        head = f.read(QCOW2_HEADER.size)
    qcow2 = head.startswith(QCOW2_MAGIC)
    if asked == "raw" or (asked is None and not qcow2):
        return "raw"
    if not qcow2:
        raise BadInput(f"image {image}: is not a qcow2 image (no qcow2 header); --format raw serves its bytes")
    if asked is None:
        raise BadInput(f"image {image}: starts with a qcow2 header; --format qcow2 serves the disk it holds, "
                       "--format raw its bytes (not guessed: a client of a raw export can write such a header)")
    if len(head) < QCOW2_HEADER.size:
        raise BadInput(f"image {image}: a qcow2 header cut short ({len(head)} bytes)")
    _, version, backing, crypt, incompatible = QCOW2_HEADER.unpack(head)
    features = incompatible if version >= 3 else 0
    if backing or features & QCOW2_EXTERNAL_DATA:
        raise BadInput(f"image {image}: names another file ({'a backing file' if backing else 'an external data file'}), "
                       f"which QEMU would open too; serve a standalone image (`qemu-img convert -O qcow2 {image} NEW`)")
    if crypt or features & QCOW2_CORRUPT:
        raise BadInput(f"image {image}: is {'encrypted' if crypt else 'marked corrupt (`qemu-img check -r all`)'}")
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BadInput(f"image {image}: a qcow2 image is checked with qemu-img, which is not installed (`make deps`)")
    try:
        done = subprocess.run([qemu_img, "info", "--output=json", "-f", "qcow2", str(image.resolve())],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise BadInput(f"image {image}: qemu-img took over 60 s to read its header") from None
    if done.returncode:
        raise BadInput(f"image {image}: qemu-img cannot open it as qcow2 ({done.stderr.strip()}); "
                       "--format raw serves its bytes")
    return "qcow2"


def unix_socket(path: str, what: str, start: str) -> None:
    """Refuse a Unix socket path where nothing can be listening (nothing there, or not a
    socket), before a machine boots: QEMU would boot a disk-less machine and stop late, or
    (a stream wire) boot one whose NIC stays unplugged. ``start`` says what would listen.
    Only looked at, never connected to: a probe would be qemu-nbd's one client, or take the
    wire's one connection."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInput(f"{what}: nothing at {path} (start {start} first)") from None
    except OSError as exc:
        raise BadInput(f"{what}: {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise BadInput(f"{what}: {path} is not a socket (start {start} there)")


def disk_image(path: str) -> Path:
    """A readable, non-empty image file (QEMU would attach an empty one as a disk of no sectors)."""
    image = readable_file(path, "image")
    if image.stat().st_size == 0:
        raise BadInput(f"image {path}: is empty (0 bytes); a disk image holds at least one 512-byte sector")
    return image


def device_table(pm: "ProxyMachine") -> None:
    say(f"{'BDF':8} {'ID':10} {'class':7} BARs")
    for f in pm.bus.functions:
        bars = ", ".join(f"{b.index}:{'io' if b.is_io else 'mem'} {b.base:#x}+{b.size:#x}" for b in f.bars)
        say(f"{f.bdf:8} {f.vendor:04x}:{f.device:04x}  {f.class_code:02x}{f.subclass:02x}{f.prog_if:02x}  {bars}")


def write_json(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", path)


def print_json(result: dict, path: str | None, left_out: str) -> None:
    """A bench's result on stdout without its bulky ``left_out`` list, and whole at ``path``."""
    say(json.dumps({k: v for k, v in result.items() if k != left_out}, indent=2))
    write_json(result, path)
