"""``hwharness serve disk|net``: a supervised Python driver serving a real operating system until
Ctrl-C, a line per driver start (restarts with their cause).

``serve disk``: an image on the proxy machine's AHCI or NVMe controller, over NBD, for any NBD
client (``hwharness boot --disk``, qemu-img, nbdinfo, the kernel's nbd-client). ``serve net``:
the machine's two e1000s bridged, QEMU's user network on one and a wire another machine's NIC
joins (``hwharness boot --net``) on the other."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import tempfile
from typing import Callable, Iterator

from ...errors import BadInput
from ...machine.linux import wire_path
from ...proxy import ProxyMachine, proxy_spec
from ...services.bridge import BridgeService, bridge_spec
from ...services.disk import DiskService, listen
from .boot import CaughtStop
from .common import disk_image, image_format, iommu_of, say
from .disk import disk_machine


def cmd_serve(args: argparse.Namespace) -> int:
    return serve_net(args) if args.serve_command == "net" else serve_disk(args)


def report(starts: Callable[..., Iterator[str]], stop: CaughtStop, **kwargs: object) -> None:
    """Print each driver start until Ctrl-C or SIGTERM."""
    for line in starts(stop=stop.caught, **kwargs):
        say(line)


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


def serve_disk(args: argparse.Namespace) -> int:
    image = disk_image(args.image)
    image_kind = image_format(image, args.format)
    if args.nbd:
        check_nbd(args.nbd)
    with CaughtStop() as stop:
        # --read-only: the export refuses writes, and QEMU writes nothing either (a throwaway
        # overlay), so the image may be read by others meanwhile. An NVMe export's driver rings
        # its doorbells itself (ioeventfds): a Linux client's 4 KiB reads 1.9 -> 2.6 k IOPS.
        with disk_machine(args.accel, image, iommu_of(args), snapshot=args.read_only, name="serve",
                          bus=args.bus, ioeventfd=True, image_format=image_kind) as pm:
            with DiskService(pm, args.bus, nbd=args.nbd, read_only=args.read_only) as service:
                say(service.uri)
                report(service.starts, stop, timeout=args.timeout)
                say("stopping")
    return 0


def serve_net(args: argparse.Namespace) -> int:
    scratch = None
    if args.wire is None:                       # a Unix socket's path is short: not the machine's files
        scratch = tempfile.mkdtemp(prefix="hwh-wire-")
        wire = f"unix:{scratch}/wire"
    else:
        wire, path = args.wire, wire_path(args.wire)
        if os.path.exists(path):
            raise BadInput(f"--wire {wire}: {path} exists; remove it or give another path")
    try:
        with CaughtStop() as stop:
            spec = bridge_spec(proxy_spec(accel=args.accel, iommu=iommu_of(args)), wire)
            with ProxyMachine(spec, name="serve-net", keep_artifacts=True) as pm, \
                    BridgeService(pm, wire) as service:
                say(f"bridge up under {pm.machine.accel}: the wire is {wire} (hwharness boot --net {wire}); "
                    f"files in {pm.machine.workdir}")
                say("Ctrl-C to stop.")
                report(service.starts, stop)
                say("stopping; " + ", ".join(f"{name} {value}" for name, value in service.counters().items()))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        elif os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)     # QEMU's, as nothing was there before: one killed leaves it behind
    return 0
