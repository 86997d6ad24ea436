"""Build the Linux guest from Debian packages: a kernel QEMU boots directly and an initramfs we write.

Run by ``make images`` (``python3 linux_guest.py OUTDIR``). Steps, each cached under
``OUTDIR/cache`` so a second run only rewrites the small outputs:

1. ``apt-get download`` linux-image-amd64's kernel package and busybox-static (no
   install, no root beyond apt's own cache; CI runs ``apt-get update`` first).
2. ``dpkg-deb -x`` each into the cache.
3. The ELF ``vmlinux`` out of Debian's ``vmlinuz``: the bzImage carries it as an xz
   stream. It has a PVH entry note, so QEMU boots it with ``-kernel`` and skips the
   real-mode setup and the self-decompression, the slowest part of a TCG boot
   (see QEMU-FACTS.md).
4. Uncompressed newc initramfs images (nothing to decompress at boot either), written here
   rather than by cpio(1) so that owners, times and order are fixed and no extra
   package is needed: ``initramfs.cpio`` with busybox and its applet links, ``/init`` and
   the programs, and ``initramfs-modules.cpio``, the same with the modules the project's
   tests use and a ``modules.dep`` for busybox ``modprobe`` appended (machines that load
   modules boot it).
5. ``root.ext4``: a root filesystem for a virtio-blk disk (``LinuxImage.spec(disk=URI,
   root=True)``): busybox, the same programs and the same ``init``, made by ``mkfs.ext4 -d``
   (e2fsprogs); rebuilt only when what goes in changes.
6. ``manifest.json``: kernel release, package versions, the shell prompt, the modules a
   disk needs; the harness reads it (``harness.machine.linux``), so none of these is typed twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from elftools.elf.elffile import ELFFile

KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
# Modules for the project's tests, with everything they depend on (from each module's .modinfo).
# A disk served over NBD is a virtio-blk disk; its root filesystem is ext4, whose checksums
# need crc32c (a soft dependency, which .modinfo's depends= does not list).
DISK_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
# pktgen, the kernel's packet generator: the peer baseline of `bench e1000 --peer linux`;
# bridge: Linux's own bridge, the peer of `bench forward`.
MODULES = ("e1000", "ahci", "sd_mod", "vfat", "nls_cp437", "nls_ascii", "nls_utf8",
           "pktgen", "bridge") + DISK_MODULES
ROOT_IMAGE = "root.ext4"
ROOT_MB = 64                           # room for the tests' files
# Programs of the project's own, built static with the system's gcc: name in /bin -> source
PROGRAMS = {"blockread": Path(__file__).resolve().parent / "peer" / "blockread.c"}
PROMPT = "hwh-linux# "
APT_ENV = {**os.environ, "LC_ALL": "C"}   # apt-cache's "Candidate:" is translated otherwise
XZ_MAGIC = b"\xfd7zXZ\x00"
XEN_ELFNOTE_PHYS32_ENTRY = 18          # the PVH entry point note QEMU looks for

INIT = """#!/bin/sh
# hwharness Linux guest: mount what busybox needs, load requested modules, switch to the root
# disk hwh_root names if any, a shell on the console. The initramfs's /init and the root
# image's /sbin/init (run by switch_root, with /dev already mounted and hwh_root unset).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# /dev/null is there once devtmpfs is (busybox-static has no mountpoint applet; a test is a builtin)
[ -e /dev/null ] || mount -t devtmpfs dev /dev
mount -a    # /etc/fstab: one process for proc, sysfs and /tmp
read up idle < /proc/uptime
echo "hwh-linux: init at $up s"
IFS=,    # split the list by the shell itself: no pipe, no subshell, no tr process
for m in $hwh_modules; do modprobe "$m" || echo "hwh-linux: modprobe $m failed"; done
unset IFS
if [ -n "$hwh_root" ]; then
    # the disk appears once virtio_blk has probed it (and QEMU's NBD client has its size)
    n=0; while [ ! -b "$hwh_root" ] && [ $n -lt 600 ]; do usleep 50000; n=$((n+1)); done
    if mount -t ext4 "$hwh_root" /newroot; then
        echo "hwh-linux: root is $hwh_root"
        umount /tmp /sys /proc
        mount --move /dev /newroot/dev
        unset hwh_root hwh_modules
        exec switch_root /newroot /sbin/init
    fi
    echo "hwh-linux: cannot mount $hwh_root as the root; staying in the initramfs"
fi
# The console answers programs (Console.run), not a person: without its echo busybox's shell
# reads each line whole instead of editing it a key at a time (a read, an echo and a redraw
# per key), and a boot's first command under TCG answers in ~9 ms instead of ~29.
# hwh_echo=1 (`hwharness boot`) keeps it for a person at the terminal.
[ -n "$hwh_echo" ] || stty -echo
export PS1='%(prompt)s'
# The console as controlling terminal (job control, Ctrl-C); a shell that exits gets a new one.
while true; do setsid cttyhack sh; done
"""


# What init's `mount -a` mounts (busybox's mount reads /etc/fstab).
FSTAB = """proc /proc proc defaults 0 0
sys /sys sysfs defaults 0 0
tmp /tmp tmpfs defaults 0 0
"""


def log(msg: str) -> None:
    sys.stderr.write(f"linux_guest: {msg}\n")


def apt_download(package: str, cache: Path) -> Path:
    """The package's .deb in ``cache``, downloaded unless already there."""
    version = subprocess.run(["apt-cache", "policy", package], check=True, capture_output=True,
                             text=True, env=APT_ENV).stdout
    candidate = next(line.split(":", 1)[1].strip() for line in version.splitlines()
                     if line.strip().startswith("Candidate:"))
    if candidate == "(none)":
        raise SystemExit(f"apt knows no {package}: run `apt-get update` (as root) first")
    found = []
    for deb in cache.glob(f"{package}_*.deb"):
        if deb_field(deb, "Version") == candidate:
            found.append(deb)
        else:                                   # superseded: drop it and its extracted tree
            log(f"removing superseded {deb.name}")
            shutil.rmtree(cache / deb.stem, ignore_errors=True)
            deb.unlink()
    if found:
        return found[0]
    log(f"apt-get download {package}={candidate}")
    subprocess.run(["apt-get", "download", "-q", f"{package}={candidate}"], cwd=cache, check=True, env=APT_ENV)
    return next(p for p in cache.glob(f"{package}_*.deb") if deb_field(p, "Version") == candidate)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True,
                          text=True).stdout.strip()


def extract(deb: Path, cache: Path) -> Path:
    """``dpkg-deb -x`` into a directory named after the .deb (kept for the next run)."""
    root = cache / deb.stem
    if not (root / ".extracted").exists():
        log(f"dpkg-deb -x {deb.name}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".extracted").touch()
    return root


def kernel_package(cache: Path) -> Path:
    """The versioned kernel package that linux-image-amd64 depends on."""
    meta = apt_download(KERNEL_META, cache)
    depends = deb_field(meta, "Depends")
    name = next(d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-"))
    return apt_download(name, cache)


def vmlinux_from_bzimage(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage's xz payload, checked for a PVH entry note."""
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        raise SystemExit("no xz payload in vmlinuz: this kernel was compressed differently")
    elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[start:])
    notes = [n for seg in ELFFile(io.BytesIO(elf)).iter_segments() if seg.header.p_type == "PT_NOTE"
             for n in seg.iter_notes()]
    if not any(n["n_name"] == "Xen" and n["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY for n in notes):
        raise SystemExit("the kernel has no PVH entry note (CONFIG_PVH): QEMU cannot boot it as an ELF")
    return elf


def module_depends(ko: Path) -> list[str]:
    with ko.open("rb") as f:
        info = ELFFile(f).get_section_by_name(".modinfo").data().split(b"\0")
    deps = next((e[len(b"depends="):].decode() for e in info if e.startswith(b"depends=")), "")
    return [d for d in deps.split(",") if d]


def module_closure(moddir: Path, wanted: tuple[str, ...]) -> dict[str, tuple[Path, list[str]]]:
    """name -> (path relative to moddir, its dependencies), for ``wanted`` and all they need."""
    by_name = {p.stem.replace("-", "_"): p for p in (moddir / "kernel").rglob("*.ko")}
    out: dict[str, tuple[Path, list[str]]] = {}
    todo = [w.replace("-", "_") for w in wanted]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        if name not in by_name:
            raise SystemExit(f"module {name} is not in the kernel package (built in, or misspelt?)")
        deps = [d.replace("-", "_") for d in module_depends(by_name[name])]
        out[name] = (by_name[name].relative_to(moddir), deps)
        todo += deps
    return out


def load_order(name: str, closure: dict[str, tuple[Path, list[str]]]) -> list[str]:
    """``name`` and everything it needs, each after what it needs."""
    order: list[str] = []

    def visit(n: str) -> None:
        if n not in order:
            for d in closure[n][1]:
                visit(d)
            order.append(n)
    visit(name)
    return order


class Newc:
    """A cpio archive in the kernel's "newc" format (Documentation/driver-api/early-userspace)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 300000

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.data += b"070701" + b"".join(b"%08x" % v for v in fields) + encoded
        self.data += b"\0" * (-len(self.data) % 4) + body
        self.data += b"\0" * (-len(self.data) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def close(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def build_program(source: Path, cache: Path) -> bytes:
    """``source`` compiled static (it runs in a guest with no libc), rebuilt when it changes."""
    out = cache / source.stem
    if not out.exists() or out.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(source)], check=True)
    return out.read_bytes()


class Tree:
    """A directory filled through :class:`Newc`'s interface, for ``mkfs.ext4 -d``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        (self.root / name).write_bytes(body)
        (self.root / name).chmod(mode)

    def symlink(self, name: str, target: str) -> None:
        os.symlink(target, self.root / name)


def userland(archive: "Newc | Tree", busybox_root: Path, programs: dict[str, bytes], init: str) -> None:
    """What the initramfs and the root image both hold: the directories, busybox and its
    applet links, the project's programs, and the init script at ``init``."""
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root", "lib"):
        archive.dir(d)
    busybox = busybox_root / "bin" / "busybox"
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        if applet != "bin/busybox" and applet != init:
            archive.symlink(applet, "/bin/busybox")
    archive.file(init, (INIT % {"prompt": PROMPT}).encode(), 0o755)
    archive.file("etc/fstab", FSTAB.encode())
    for name, binary in programs.items():
        archive.file(f"usr/bin/{name}", binary, 0o755)


def root_image(busybox_root: Path, programs: dict[str, bytes], out: Path, cache: Path) -> None:
    """``out``, an ext4 filesystem of ``ROOT_MB`` MiB with the guest's userland and ``/sbin/init``,
    made by ``mkfs.ext4 -d``; remade only when what goes in changes (a hash beside it says)."""
    inputs = hashlib.sha256(INIT.encode() + FSTAB.encode() + (busybox_root / "bin" / "busybox").read_bytes()
                            + b"".join(programs[n] for n in sorted(programs)) + b"%d" % ROOT_MB).hexdigest()
    stamp = out.with_name(out.name + ".inputs")
    if out.exists() and stamp.exists() and stamp.read_text() == inputs:
        return
    tree = cache / "root-tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    userland(Tree(tree), busybox_root, programs, init="sbin/init")
    tmp = out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    log(f"mkfs.ext4 -d {tree} {tmp.name} ({ROOT_MB} MiB)")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "hwh-root", "-E", "root_owner=0:0", "-d", str(tree),
                    str(tmp), f"{ROOT_MB}M"], check=True)
    os.replace(tmp, out)
    stamp.write_text(inputs)
    shutil.rmtree(tree)


def initramfs(busybox_root: Path, programs: dict[str, bytes]) -> bytes:
    """The initramfs a machine without modules boots: busybox, init and the programs."""
    archive = Newc()
    userland(archive, busybox_root, programs, init="init")
    archive.dir("newroot")
    archive.chardev("dev/console", 5, 1)
    return archive.close()


def modules_archive(kernel_root: Path, release: str) -> bytes:
    """MODULES and their dependencies with a ``modules.dep`` for busybox ``modprobe``: an
    archive appended to the initramfs for machines that load modules. The kernel unpacks
    concatenated archives in turn; a boot without modules skips unpacking their 6 MB
    (~9 M guest instructions, 4 % of a boot to init)."""
    archive = Newc()
    for d in ("lib/modules", f"lib/modules/{release}"):
        archive.dir(d)
    moddir = kernel_root / "lib" / "modules" / release
    closure = module_closure(moddir, MODULES)
    made = {f"lib/modules/{release}"}
    dep_lines = []
    for name, (rel, deps) in sorted(closure.items()):
        parts = rel.parts
        for i in range(1, len(parts)):
            d = f"lib/modules/{release}/" + "/".join(parts[:i])
            if d not in made:
                archive.dir(d)
                made.add(d)
        archive.file(f"lib/modules/{release}/{rel}", (moddir / rel).read_bytes())
        # depmod's format: every dependency, direct or not, the ones to load first last
        dep_lines.append(f"{rel}: " + " ".join(str(closure[d][0]) for d in reversed(load_order(name, closure)[:-1])))
    archive.file(f"lib/modules/{release}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    return archive.close()


def write_if_changed(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def main(outdir: Path) -> None:
    cache = outdir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    kernel_deb = kernel_package(cache)
    busybox_deb = apt_download(BUSYBOX, cache)
    kernel_root, busybox_root = extract(kernel_deb, cache), extract(busybox_deb, cache)
    release = next((kernel_root / "lib" / "modules").iterdir()).name
    write_if_changed(outdir / "vmlinux", vmlinux_from_bzimage((kernel_root / "boot" / f"vmlinuz-{release}").read_bytes()))
    programs = {name: build_program(source, cache) for name, source in PROGRAMS.items()}
    base = initramfs(busybox_root, programs)
    write_if_changed(outdir / "initramfs.cpio", base)
    write_if_changed(outdir / "initramfs-modules.cpio", base + modules_archive(kernel_root, release))
    root_image(busybox_root, programs, outdir / ROOT_IMAGE, cache)
    manifest = {
        "release": release,
        "packages": {deb_field(d, "Package"): deb_field(d, "Version") for d in (kernel_deb, busybox_deb)},
        "modules": sorted(module_closure(kernel_root / "lib" / "modules" / release, MODULES)),
        "disk_modules": list(DISK_MODULES),
        "root": ROOT_IMAGE,
        "prompt": PROMPT,
        "programs": sorted(PROGRAMS),
        "kernel": "vmlinux",
        "initrd": "initramfs.cpio",
        "initrd_modules": "initramfs-modules.cpio",
    }
    write_if_changed(outdir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    log(f"Linux {release} ready in {outdir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "linux"))
