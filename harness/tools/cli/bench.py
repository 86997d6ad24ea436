"""``hwharness bench NAME``: run one of the benchmarks (harness/tools/bench) and write its JSON."""

from __future__ import annotations

import argparse
from typing import Any

from ...errors import BadInput
from ..bench import ahci, boot, compare, e1000, forward, instructions, nvme, restart, roundtrip, serve
from .common import iommu_of, print_json, say, write_json

BENCHES = {"roundtrip": roundtrip.run, "e1000": e1000.run, "e1000-itr": e1000.itr_sweep, "ahci": ahci.run,
           "nvme": nvme.run, "restart": restart.run, "serve": serve.run, "forward": forward.run,
           "instructions": instructions.run}


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name == "compare":
        return cmd_bench_compare(args)
    if args.rev or args.only:
        raise BadInput(f"REV and --only are for bench compare, not bench {args.name}")
    if args.name == "boot":
        return cmd_bench_boot(args)
    extra: dict[str, Any] = {"peer": args.peer} if args.peer else {}
    if args.hang:
        if args.name != "restart":
            raise BadInput(f"--hang is for bench restart, not {args.name}")
        extra["hang"] = True
    if args.kill:
        if args.name not in ("forward", "serve"):
            raise BadInput(f"--kill is for bench forward and bench serve, not {args.name}")
        extra["kill"] = args.kill
    if args.guest_sources:
        if args.name != "instructions":
            raise BadInput(f"--guest-sources is for bench instructions, not {args.name}")
        extra["guest_sources"] = args.guest_sources
    if args.peer and args.name not in ("ahci", "e1000"):
        raise BadInput(f"--peer {args.peer} is for bench ahci and bench e1000, not {args.name}")
    if args.kill and args.name == "serve":
        print_json(serve.kill_run(args.accel, args.kill, quick=args.quick, iommu=iommu_of(args)), args.json,
                   left_out="lines")
        return 0
    result = BENCHES[args.name](args.accel, quick=args.quick, iommu=iommu_of(args), **extra)
    print_json(result, args.json, left_out="per_round")
    return 0


def cmd_bench_boot(args: argparse.Namespace) -> int:
    result = boot.run(args.accel, count=args.count or 10, iommu=iommu_of(args))
    print_json(result, args.json, left_out="boots_s")
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    if not args.rev:
        raise BadInput("bench compare REV: name the revision to compare the working tree with (e.g. HEAD~1)")
    if getattr(args, "no_iommu", False):
        raise BadInput("bench compare runs both sides as users get them: --no-iommu does not apply")
    result = compare.run(args.rev, args.accel, args.only or compare.DEFAULT_ONLY, quick=args.quick,
                         rounds=args.rounds, say=lambda line: say(f"  {line}"))
    say(compare.table(result))
    write_json(result, args.json)
    return 0
