"""``hwharness latency``: interrupt latency of a real device, in stages, like cyclictest."""

from __future__ import annotations

import argparse
import sys

from ..bench import latency
from .common import iommu_of, say, write_json


def cmd_latency(args: argparse.Namespace) -> int:
    count = latency.QUICK_COUNT if args.quick else args.count
    result, samples = latency.run(args.accel, args.mode, count, args.plot, progress=sys.stderr.isatty(),
                                  iommu=iommu_of(args))
    r = result["results"]
    say(f"interrupt latency: {r['count']} e1000 interrupts, {result['accel']}, {args.mode} mode, "
        f"other processes used {result['foreign_cores']:.2f} cores")
    say(latency.table(samples))
    say(f"\nend to end / guest entry (the user-level overhead): {r['end_to_end_over_guest_entry']:.1f}x")
    write_json(result, args.json)
    if args.plot:
        say(f"plot: {args.plot}")
    return 0
