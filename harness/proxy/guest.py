"""The proxy guest's ELF: built from its C and assembler sources on first use, into a cache.

The sources are ``guests/proxy`` in a checkout, or the copy an installed
package carries (``harness/proxy/guest-src``, put there by setup.py). Either
way the build goes to ``$XDG_CACHE_HOME/hwharness/guest-<hash of the
sources>`` (``~/.cache`` by default; ``HWHARNESS_CACHE`` overrides the
whole directory), so a changed source gets its own build and an unchanged one
is never rebuilt. The system's gcc, binutils and make do the building, as the
guest's Makefile says; concurrent callers (pytest-xdist workers) take a lock
and build once.

``make guest`` builds it ahead of time and prints the ELF's path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import AbiError

log = logging.getLogger(__name__)

CHECKOUT_SOURCES = Path(__file__).resolve().parents[2] / "guests" / "proxy"
PACKAGED_SOURCES = Path(__file__).resolve().parent / "guest-src"
SOURCE_PATTERNS = ("*.c", "*.h", "*.S", "*.ld", "Makefile")
TOOLS = {"gcc": "gcc", "ld": "binutils", "objcopy": "binutils", "make": "make"}
ELF_NAME = "proxy.elf"


def guest_sources() -> Path:
    """Where the guest's sources are: the checkout's, else the installed package's."""
    for candidate in (CHECKOUT_SOURCES, PACKAGED_SOURCES):
        if (candidate / "Makefile").is_file():
            return candidate
    raise AbiError(f"the proxy guest's sources are in neither {CHECKOUT_SOURCES} nor {PACKAGED_SOURCES}: "
                   f"reinstall hwharness")


def source_files(sources: Path) -> list[Path]:
    """The files the guest is built from, in a stable order."""
    return sorted({f for pattern in SOURCE_PATTERNS for f in sources.glob(pattern) if f.is_file()})


def sources_hash(sources: Path) -> str:
    """A digest of every source file's name and bytes: the build's cache key."""
    digest = hashlib.sha256()
    for f in source_files(sources):
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    explicit = os.environ.get("HWHARNESS_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hwharness"


def missing_tools() -> list[str]:
    """The build tools that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def build(sources: Path, target: Path) -> None:
    """Run the guest's Makefile from ``sources`` into ``target`` (made fresh, then renamed into place)."""
    missing = missing_tools()
    if missing:
        packages = sorted({TOOLS[t] for t in missing})
        raise AbiError(f"building the proxy guest needs {', '.join(missing)}, which this machine lacks: "
                       f"apt-get install {' '.join(packages)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # make writes its objects into BUILD; the sources stay untouched (they may be read-only)
        done = subprocess.run(["make", "-s", "-C", str(sources), f"BUILD={scratch}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise AbiError(f"building the proxy guest from {sources} failed (make exit {done.returncode})\n"
                           + (done.stdout + done.stderr).strip()[-3000:])
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _elf_for(sources: Path, key: str) -> Path:
    target = cache_root() / f"guest-{key}"
    elf = target / ELF_NAME
    if elf.is_file():
        return elf
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f"guest-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # another process may be building the same sources
        if not elf.is_file():
            log.info("building the proxy guest from %s into %s", sources, target)
            build(sources, target)
    return elf


def guest_elf(sources: Path | None = None) -> Path:
    """The proxy guest's ELF (symbols and DWARF) built from ``sources`` (the current ones by
    default: another checkout's guests/proxy for a bench that compares guests), building it
    if needed. Its bootable copy is ``harness.proxy.bus.boot_image(elf)``."""
    sources = sources or guest_sources()
    return _elf_for(sources, sources_hash(sources))

