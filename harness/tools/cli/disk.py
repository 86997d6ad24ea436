"""``hwharness disk``: a FAT image on the AHCI or NVMe controller, read through the Python driver."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

import fs.errors

from drivers.ahci import Ahci
from drivers.nvme import Nvme
from ...devices.fat import DriverFatFS
from ...errors import BadInput, HarnessError
from ...machine import MachineSpec
from ...proxy import ProxyMachine, on_fastest_aio, proxy_spec
from .common import disk_image, iommu_of, say


@contextlib.contextmanager
def disk_machine(accel: str, image: Path, iommu: bool | None, snapshot: bool = False, name: str = "disk",
                 bus: str = "ahci", ioeventfd: bool = False, image_format: str = "raw") -> Iterator[ProxyMachine]:
    """A started proxy machine with ``image`` (of ``image_format``: see common.image_format) on
    the first port of q35's built-in AHCI controller, or as namespace 1 of an NVMe controller
    (``bus="nvme"``; ``ioeventfd``: the driver rings its I/O queues' doorbells itself, see
    MachineSpec.nvme), on QEMU's io_uring backend where it has one (on_fastest_aio).
    With ``snapshot`` writes go to a throwaway overlay (QEMU's ide-hd refuses read-only drives)."""
    disk_image(str(image))

    def spec_for(aio: str) -> MachineSpec:
        spec = proxy_spec(accel=accel, iommu=iommu)
        drive = {"file": str(image.resolve()), "format": image_format, "snapshot": snapshot, "aio": aio}
        if bus == "nvme":
            spec.nvme([drive], **({"ioeventfd": "on"} if ioeventfd else {}))
        else:
            spec.drive(id="disk0", **drive, **{"if": "none"})
            spec.device("ide-hd", drive="disk0", bus="ide.0")
        return spec
    with contextlib.ExitStack() as stack:
        yield on_fastest_aio(stack, name, spec_for)[0]


def check_fat_path(image: Path, path: str, command: str) -> None:
    """Read the image's FAT on the host and check ``path`` on it, before a machine boots."""
    with contextlib.closing(DriverFatFS.open_image(str(image))) as fat:
        if not fat.exists(path):
            raise BadInput(f"{image}: there is no {path} on this FAT filesystem "
                           f"(`hwharness disk ls {image}` lists what is)")
        if command == "cat" and fat.isdir(path):
            raise BadInput(f"{image}: {path} is a directory (`hwharness disk ls {image} {path}` lists it)")


def open_disk(pm: ProxyMachine, bus: str, image: Path) -> tuple[Any, Any]:
    """The controller and its first disk (an AHCI port or an NVMe namespace): the same block API."""
    controller = Nvme.open(pm.bus) if bus == "nvme" else Ahci.open(pm.bus)
    try:
        if not controller.disks():
            raise HarnessError(f"the {bus} controller found no disk (QEMU was given {image})")
        return controller, controller.disks()[0]
    except BaseException:
        controller.close()
        raise


def print_identity(identity: Any, disk: Any, bus: str) -> None:
    say(f"model: {identity.model}")
    say(f"serial: {identity.serial}")
    say(f"firmware: {identity.firmware}")
    say(f"capacity: {identity.sectors} sectors of {disk.sector_size} bytes ({disk.size} bytes)")
    if bus == "nvme":
        say(f"namespace {identity.nsid} of {identity.controller.namespaces}, largest transfer "
            f"{identity.controller.max_transfer} bytes, deallocate: {identity.controller.dsm}")
    else:
        say(f"lba48: {identity.lba48}, ncq: {identity.ncq} (queue depth {identity.queue_depth})")


def list_or_read(disk: Any, image: Path, args: argparse.Namespace) -> None:
    """``disk ls``: a directory's entries (or one file's); ``disk cat``: a file's bytes to stdout."""
    fat = DriverFatFS(disk, read_only=True, name=str(image))
    try:
        if args.disk_command == "ls":
            entries = ([fat.getinfo(args.dir, namespaces=["details"])] if fat.isfile(args.dir)
                       else fat.scandir(args.dir, namespaces=["details"]))
            for entry in entries:
                kind = "<DIR>" if entry.is_dir else f"{entry.size:>10}"
                say(f"{kind:>10}  {entry.name}")
        else:
            sys.stdout.buffer.write(fat.readbytes(args.path))
            sys.stdout.flush()
    except fs.errors.ResourceError as exc:     # what the host saw and the driver did not
        raise BadInput(f"{image}: {exc}") from exc
    finally:
        fat.close()


def cmd_disk(args: argparse.Namespace) -> int:
    image = disk_image(args.image)
    if args.disk_command != "identify":
        check_fat_path(image, args.dir if args.disk_command == "ls" else args.path, args.disk_command)
    with disk_machine(args.accel, image, iommu_of(args), snapshot=True, bus=args.bus) as pm:
        controller, disk = open_disk(pm, args.bus, image)
        try:
            identity = disk.identify()
            if args.disk_command == "identify":
                print_identity(identity, disk, args.bus)
            else:
                list_or_read(disk, image, args)
        finally:
            controller.close()
    return 0
