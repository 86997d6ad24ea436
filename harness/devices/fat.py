"""A FAT filesystem on a driver's block device (or any image), through pyfatfs.

pyfatfs (1.1) reads and writes FAT12, FAT16 and FAT32 with long names, but
two things every other FAT implementation does it leaves out; this module
adds them as a thin layer and otherwise leaves the work to pyfatfs:

- Names are looked up case-insensitively (Windows, Linux's vfat, mtools):
  ``/deep/readme.txt`` finds ``DEEP/README.TXT``. pyfatfs compares exactly.
- A short name is shown as Linux's vfat and mtools show it, honouring the
  lowercase flags Windows NT introduced in the reserved byte of the
  directory entry (``DIR_NTRes``): mtools stores ``mmd ::/deep`` as ``DEEP``
  with the lowercase-base flag and no long name, and it is ``deep``
  everywhere but in pyfatfs. A long name, where there is one, wins.

And an image that is not a FAT filesystem, or is cut short, is refused when
it is opened, with :class:`NotFatFilesystem`, rather than later with one of
pyfatfs's internal errors.
"""

from __future__ import annotations

import datetime
import functools
import io
import struct
from typing import Any, BinaryIO, Callable, TypeVar

import fs.errors
from fs.base import FS
from fs.info import Info
from fs.path import normpath
from pyfatfs.FATDirectoryEntry import FATDirectoryEntry
from pyfatfs.PyFat import PyFat
from pyfatfs.PyFatFS import PyFatFS
from pyfatfs._exceptions import NotAnLFNEntryException, PyFATException

from ..errors import BadInput

from .block import BlockDevice, BlockFile

# DIR_NTRes bits (Windows NT and later; Linux fs/fat: CASE_LOWER_BASE, CASE_LOWER_EXT): the
# 8.3 name is stored in capitals and shown with its base or extension in lowercase.
LOWER_BASE = 0x08
LOWER_EXT = 0x10
BOOT_SECTOR = 512


class NotFatFilesystem(BadInput):
    """The image holds no FAT filesystem, or only part of one."""


def shown_name(entry: FATDirectoryEntry) -> str:
    """The name as Linux's vfat and mtools show it: the long name, else the 8.3 name with
    the lowercase flags applied."""
    try:
        return str(entry.get_long_name())
    except NotAnLFNEntryException:
        pass
    base, dot, ext = entry.get_short_name().partition(".")
    if entry.ntres & LOWER_BASE:
        base = base.lower()
    if entry.ntres & LOWER_EXT:
        ext = ext.lower()
    return base + dot + ext


def find_entry(directory: FATDirectoryEntry, name: str) -> FATDirectoryEntry | None:
    """The entry of ``directory`` called ``name``, compared without case against its shown,
    long and 8.3 names (``MIXEDC~1.TXT`` finds ``MixedCase.Txt``, as in vfat); None if none is."""
    wanted = name.casefold()
    dirs, files, _ = directory.get_entries()
    for entry in dirs + files:
        names = {shown_name(entry), entry.get_short_name()}
        if any(n.casefold() == wanted for n in names):
            return entry
    return None


def check_image(fp: BinaryIO, name: str) -> None:
    """Refuse, with a reason, what cannot be a whole FAT filesystem, before pyfatfs parses it."""
    size = fp.seek(0, io.SEEK_END)
    fp.seek(0)
    boot = fp.read(BOOT_SECTOR)
    if len(boot) < BOOT_SECTOR:
        raise NotFatFilesystem(f"not a FAT filesystem: {name} is {size} bytes, less than one boot sector")
    if boot[510:512] != b"\x55\xaa":
        raise NotFatFilesystem(f"not a FAT filesystem: {name} has no boot sector signature (55 aa at byte 510)")
    bytes_per_sector, = struct.unpack_from("<H", boot, 11)
    total16, = struct.unpack_from("<H", boot, 19)
    total32, = struct.unpack_from("<I", boot, 32)
    described = bytes_per_sector * (total16 or total32)
    if described > size:
        raise NotFatFilesystem(f"truncated FAT filesystem: {name} holds {size} bytes, "
                               f"its boot sector describes {described}")


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _found_case_insensitively(method: _Method) -> _Method:
    """Wrap a PyFatFS method taking a path: pass it the path as pyfatfs spells it, and
    name the path as the caller spelled it in the errors."""
    @functools.wraps(method)
    def wrapper(self: "DriverFatFS", path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, self.stored_path(path), *args, **kwargs)
        except fs.errors.ResourceError as exc:
            raise type(exc)(path) from None
    return wrapper  # type: ignore[return-value]


class DriverFatFS(PyFatFS):
    """PyFatFS over a block device (every sector goes through the driver) or an open image file,
    with case-insensitive lookups and names shown as vfat shows them."""

    def __init__(self, device: BlockDevice | BinaryIO, read_only: bool = False, name: str = "the disk") -> None:
        FS.__init__(self)                   # PyFatFS.__init__ insists on a path; the rest is the same
        self.preserve_case = True
        self._mounted = False
        fp: BinaryIO = device if hasattr(device, "seek") else BlockFile(device, writable=not read_only)  # type: ignore[arg-type,assignment]
        check_image(fp, name)
        self.fs = PyFat(lazy_load=True)
        try:
            self.fs.set_fp(fp)
        except (PyFATException, struct.error, ValueError, KeyError) as exc:
            self.fs.is_read_only = True     # so that closing it writes nothing
            raise NotFatFilesystem(f"not a FAT filesystem: {name}: {exc}") from exc
        self._mounted = True
        self.tz = datetime.datetime.now(datetime.timezone.utc).astimezone().tzinfo

    @classmethod
    def open_image(cls, path: str) -> "DriverFatFS":
        """The FAT filesystem in a host image file, read-only (to check an image on the host)."""
        image = open(path, "rb")
        try:
            return cls(image, read_only=True, name=path)
        except BaseException:
            image.close()
            raise

    def close(self) -> None:
        if self._mounted:
            super().close()
        else:                               # refused when opened: nothing of pyfatfs's to close
            FS.close(self)

    def stored_path(self, path: str) -> str:
        """``path`` with each component that exists spelled as pyfatfs matches it (its long name,
        else its 8.3 name); components that do not exist (a file about to be made) stay as given."""
        entry = self.fs.root_dir
        parts = [p for p in normpath(path).split("/") if p]
        stored = []
        for i, part in enumerate(parts):
            found = find_entry(entry, part) if entry.is_directory() else None
            if found is None:
                stored += parts[i:]
                break
            stored.append(repr(found))
            entry = found
        return "/" + "/".join(stored)

    exists = _found_case_insensitively(PyFatFS.exists)
    getsize = _found_case_insensitively(PyFatFS.getsize)
    gettype = _found_case_insensitively(PyFatFS.gettype)
    create = _found_case_insensitively(PyFatFS.create)
    makedir = _found_case_insensitively(PyFatFS.makedir)
    removedir = _found_case_insensitively(PyFatFS.removedir)
    removetree = _found_case_insensitively(PyFatFS.removetree)
    remove = _found_case_insensitively(PyFatFS.remove)
    openbin = _found_case_insensitively(PyFatFS.openbin)
    opendir = _found_case_insensitively(PyFatFS.opendir)
    setinfo = _found_case_insensitively(PyFatFS.setinfo)

    @_found_case_insensitively
    def getinfo(self, path: str, namespaces: Any = None) -> Info:
        info = PyFatFS.getinfo(self, path, namespaces)
        raw = dict(info.raw)
        if path.strip("/"):
            raw["basic"] = dict(raw["basic"], name=shown_name(self.fs.root_dir.get_entry(path)))
        return Info(raw)

    @_found_case_insensitively
    def listdir(self, path: str) -> list[str]:
        directory = self._get_dir_entry(path)
        if not directory.is_directory():
            raise fs.errors.DirectoryExpected(path)
        dirs, files, _ = directory.get_entries()
        return [shown_name(e) for e in dirs + files]
