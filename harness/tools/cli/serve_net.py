"""``hwharness serve net [--wire unix:PATH]``: the proxy machine's two e1000s bridged by a
supervised Python driver process, a line per driver start, until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading

from ...errors import BadInput
from ...machine.linux import wire_path
from ...proxy import ProxyMachine, proxy_spec
from ...services.bridge import BridgeService, bridge_spec
from .boot import CaughtSigint
from .common import iommu_of, say


def cmd_serve(args: argparse.Namespace) -> int:
    scratch = None
    if args.wire is None:                       # a Unix socket's path is short: not the machine's files
        scratch = tempfile.mkdtemp(prefix="hwh-wire-")
        wire = f"unix:{scratch}/wire"
    else:
        wire, path = args.wire, wire_path(args.wire)
        if os.path.exists(path):
            raise BadInput(f"--wire {wire}: {path} exists; remove it or give another path")
    try:
        return serve_net(args, wire)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def serve_net(args: argparse.Namespace, wire: str) -> int:
    spec = bridge_spec(proxy_spec(accel=args.accel, iommu=iommu_of(args)), wire)
    with ProxyMachine(spec, name="serve-net", keep_artifacts=True) as pm, BridgeService(pm, wire) as service:
        say(f"bridge up under {pm.machine.accel}: the wire is {wire} (hwharness boot --net {wire}); "
            f"files in {pm.machine.workdir}")
        with CaughtSigint() as sigint:
            stopped = threading.Event()
            lines = threading.Thread(target=lambda: [say(line) for line in service.starts(stop=stopped.is_set)],
                                     daemon=True)
            lines.start()
            say("Ctrl-C to stop.")
            sigint.wait()
            stopped.set()
        c = service.counters()
        say("stopping; " + ", ".join(f"{name} {value}" for name, value in c.items()))
    return 0
