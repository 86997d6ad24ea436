"""``hwharness serve disk``: an image on the proxy machine's AHCI or NVMe controller, served over
NBD by its supervised Python driver until Ctrl-C, for any NBD client (``hwharness boot --disk``,
qemu-img, nbdinfo, the kernel's nbd-client)."""

from __future__ import annotations

import argparse
import os

from ...errors import BadInput
from ...services.disk import DiskService, listen
from .boot import CaughtSigint
from .common import disk_image, iommu_of, say
from .disk import disk_machine


def check_nbd(spec: str) -> None:
    """Refuse an ``--nbd`` that cannot be listened on, before a machine boots: bind it (the one
    parser of ``unix:PATH`` and ``tcp:HOST:PORT``, the service's) and let it go again."""
    try:
        listener, address, _ = listen(spec)
    except ValueError as exc:
        raise BadInput(f"--nbd {spec}: not unix:PATH or tcp:HOST:PORT") from exc
    except OSError as exc:
        raise BadInput(f"--nbd {spec}: cannot listen there ({exc.strerror})") from exc
    listener.close()
    if isinstance(address, str):
        os.unlink(address)


def cmd_serve(args: argparse.Namespace) -> int:
    image = disk_image(args.image)
    if args.nbd:
        check_nbd(args.nbd)
    with CaughtSigint() as sigint:
        # --read-only: the export refuses writes, and QEMU writes nothing either (a throwaway
        # overlay), so the image may be read by others meanwhile
        with disk_machine(args.accel, image, iommu_of(args), snapshot=args.read_only, name="serve",
                          bus=args.bus) as pm:
            with DiskService(pm, args.bus, nbd=args.nbd, read_only=args.read_only) as service:
                say(service.uri)
                for line in service.starts(timeout=args.timeout, stop=sigint.caught):
                    say(line)
                say("stopping")
    return 0
