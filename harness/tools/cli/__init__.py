"""``hwharness``: boot the proxy, run the demo, run benchmarks.

What a person reads goes to stdout through ``say``; everything else is
logging (``-v`` shows it). A command that fails says so in one line on
stderr, ``hwharness: error: ...``, and exits 2 when the input was unusable
(:class:`~harness.errors.BadInput`, checked before any machine boots where
it can be), 1 when a check or a device failed; ``--debug`` or
``HWHARNESS_DEBUG=1`` adds the traceback.

Each command lives in a module of its own, imported when it runs, so that
``hwharness --help`` boots nothing and imports no driver.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from ... import tracing
from ...errors import BadInput, HarnessError
from .common import log

# command -> the module of this package and the function that runs it
COMMANDS = {"boot": "boot:cmd_boot", "run": "boot:cmd_run", "demo": "demo:cmd_demo", "bench": "bench:cmd_bench",
            "latency": "latency:cmd_latency", "keyboard": "keyboard:cmd_keyboard", "parport": "parport:cmd_parport",
            "net": "net:cmd_net", "disk": "disk:cmd_disk", "serve": "serve:cmd_serve"}


def command(name: str):  # type: ignore[no-untyped-def]
    """The function that runs command ``name``, its module imported now."""
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __name__), function)


def writable_output(path: str, option: str) -> None:
    """Refuse an output path that cannot be written, before the work that would fill it."""
    target = Path(path)
    if target.is_dir():
        raise BadInput(f"{option} {path}: is a directory; give a file name")
    parent = target.resolve().parent
    while not parent.exists():                      # write_json makes the missing directories
        parent = parent.parent
    try:                                            # the only sure test (root, read-only mounts, /proc)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise BadInput(f"{option} {path}: cannot write in {parent} ({exc.strerror})") from exc


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path a command was given (--json, --plot, --pcap, --trace) can be written."""
    for option in ("json", "plot", "pcap", "trace"):
        if getattr(args, option, None):
            writable_output(getattr(args, option), f"--{option}")


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text!r}")
    return value


def add_kernel_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--kernel", metavar="K", help="kernel to boot (default: the Linux guest `make images` built)")
    p.add_argument("--initrd", metavar="I", help="initial ramdisk for --kernel")
    p.add_argument("--append", metavar="ARGS", help="kernel command line (added to the Linux guest's own)")
    p.add_argument("--memory", type=int, default=256, metavar="MB", help="guest memory (default 256)")
    p.add_argument("--prompt", default=r"[#$] ", metavar="REGEX",
                   help="what --kernel's shell prompt matches (default '[#$] ')")
    p.add_argument("--disk", metavar="URI",
                   help="an NBD export (`hwharness serve disk` prints its URI) as a virtio-blk disk, /dev/vda")
    p.add_argument("--root", action="store_true",
                   help="the Linux guest's root filesystem is --disk (ext4, such as images/linux/root.ext4)")
    p.add_argument("--net", metavar="unix:PATH",
                   help="an e1000 (the Linux guest's eth0) on that wire: `hwharness serve net` listens there")
    return p


def command_line() -> argparse.ArgumentParser:
    """Every command and its options."""
    parser = argparse.ArgumentParser(prog="hwharness", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_accel(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                       help="auto (the default): kvm only where it is hardware-backed, else tcg")
        p.add_argument("--no-iommu", action="store_true",
                       help="no VT-d: devices' DMA is not confined to their domains (for comparison)")
        return p

    boot_p = add_kernel_args(with_accel(sub.add_parser(
        "boot", help="boot a kernel (default: the Linux guest) with the terminal on its serial console")))
    boot_p.add_argument("--proxy", action="store_true",
                        help="boot the proxy guest instead, print the device table, wait for Ctrl-C")
    boot_p.add_argument("--serve", action="store_true",
                        help="the proxy guest, and let other processes attach to its driver slots")
    run_p = add_kernel_args(with_accel(sub.add_parser(
        "run", help="boot, run COMMAND at the guest's shell, print its output, exit with its status")))
    run_p.add_argument("--timeout", type=float, default=300.0, help="seconds for the boot and for COMMAND")
    run_p.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    with_accel(sub.add_parser("demo", help="boot, drive the devices, print what happened"))
    bench = with_accel(sub.add_parser("bench", help="run a benchmark and write JSON"))
    bench.add_argument("name", choices=("roundtrip", "e1000", "e1000-itr", "ahci", "nvme", "boot", "restart",
                                        "serve", "forward", "instructions", "compare"))
    bench.add_argument("rev", nargs="?", metavar="REV",
                       help="compare: the git revision to measure the working tree against")
    bench.add_argument("--only", default=None, metavar="NAMES",
                       help="compare: which benches (default roundtrip,latency,ahci,nvme,e1000)")
    bench.add_argument("--rounds", type=positive_int, default=3,
                       help="compare: rounds, alternating which side goes first (default 3)")
    bench.add_argument("--hang", action="store_true",
                       help="restart: stop the driver (SIGSTOP, a hang) instead of killing it")
    bench.add_argument("--count", type=positive_int, help="boot: how many boots (default 10)")
    bench.add_argument("--kill", type=positive_int, metavar="N",
                       help="serve: Linux writes on its root on the AHCI export while the driver is SIGKILLed "
                            "N times (and SIGSTOPped once); forward: the bridge so, under a Linux download")
    bench.add_argument("--guest-sources", metavar="DIR", type=Path,
                       help="instructions: count the guest built from DIR (another checkout's guests/proxy)")
    bench.add_argument("--json", metavar="PATH", help="write the result here too")
    bench.add_argument("--peer", choices=("linux",),
                       help="also measure Linux's own driver in the same machine (the Linux guest of `make images`)")
    bench.add_argument("--quick", action="store_true",
                       help="a second or two of each workload: checks that the bench works, measures little")
    net = sub.add_parser("net", help="the e1000 driver against QEMU's user-mode network")
    net_sub = net.add_subparsers(dest="net_command", required=True)
    ping = with_accel(net_sub.add_parser("ping", help="DHCP lease, ARP for the gateway, ICMP echo"))
    ping.add_argument("--count", type=positive_int, default=4)
    ping.add_argument("--pcap", metavar="PATH", help="keep QEMU's filter-dump of the traffic here")
    disk = sub.add_parser("disk", help="a FAT image on the AHCI or NVMe controller, through the Python driver")
    disk_sub = disk.add_subparsers(dest="disk_command", required=True)
    ls = with_accel(disk_sub.add_parser("ls", help="list a directory"))
    ls.add_argument("image")
    ls.add_argument("dir", nargs="?", default="/")
    cat = with_accel(disk_sub.add_parser("cat", help="write a file's exact bytes to stdout"))
    cat.add_argument("image")
    cat.add_argument("path")
    ident = with_accel(disk_sub.add_parser("identify", help="IDENTIFY DEVICE (AHCI) or Identify (NVMe)"))
    ident.add_argument("image")
    for p in (ls, cat, ident):
        p.add_argument("--bus", choices=("ahci", "nvme"), default="ahci",
                       help="the image on the AHCI controller (default) or as an NVMe namespace")
    serve_p = sub.add_parser("serve", help="a supervised Python driver serving a disk (NBD) or a network bridge, until Ctrl-C")
    serve_sub = serve_p.add_subparsers(dest="serve_command", required=True)
    serve_net = with_accel(serve_sub.add_parser(
        "net", help="bridge QEMU's user network to a wire another machine's NIC connects to"))
    serve_net.add_argument("--wire", metavar="unix:PATH", help="where the wire listens (default: a new temporary directory)")
    serve_disk = with_accel(serve_sub.add_parser(
        "disk", help="the image on the AHCI or NVMe controller, served by the supervised driver process"))
    serve_disk.add_argument("image")
    serve_disk.add_argument("--bus", choices=("ahci", "nvme"), default="ahci",
                            help="the image on the AHCI controller (default) or as an NVMe namespace")
    serve_disk.add_argument("--nbd", metavar="unix:PATH|tcp:HOST:PORT",
                            help="where clients connect (default: a Unix socket in the machine's directory; "
                                 "tcp port 0: any free one)")
    serve_disk.add_argument("--format", choices=("raw", "qcow2"),
                            help="what the image is: raw bytes, or a qcow2 image whose virtual disk is served "
                                 "(default raw; an image with a qcow2 header must say which)")
    serve_disk.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    serve_disk.add_argument("--timeout", type=float, default=120.0,
                            help="seconds a driver (the first, or a restarted one) has to start serving")
    kbd = with_accel(sub.add_parser("keyboard", help="type TEXT through QMP; print what the Python driver decoded"))
    kbd.add_argument("--type", required=True, metavar="TEXT")
    par = with_accel(sub.add_parser("parport", help="send FILE through the Python parallel port driver"))
    par.add_argument("--send", required=True, metavar="FILE")
    lat = with_accel(sub.add_parser("latency", help="interrupt latency of a real device, in stages"))
    lat.add_argument("--mode", choices=("spin", "sleep"), default="spin",
                     help="the host spins on the interrupt, or sleeps until the guest rings")
    lat.add_argument("--count", type=positive_int, default=10000, help="interrupts to time (default 10000)")
    lat.add_argument("--json", metavar="PATH", help="write the figures here")
    lat.add_argument("--quick", action="store_true", help="time 200 interrupts: checks the tool, measures little")
    lat.add_argument("--plot", metavar="PNG", help="write histograms of the stages here")
    add_anywhere_options(parser)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM came (``timeout``, a cancelled CI job): the command unwinds as from Ctrl-C
    (an interruption, not a failure), so its machines shut down and its worktrees and
    scratch files go, instead of dying where it stood."""


def unwinding_on_sigterm() -> bool:
    """Make SIGTERM raise :class:`Terminated` in the main thread, once (a second one kills,
    as the default does); left alone where SIGTERM was ignored or handled already, or
    off the main thread. Whether it did."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False

    def terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()
    signal.signal(signal.SIGTERM, terminated)
    return True


def main(argv: list[str] | None = None) -> int:
    unwinding = unwinding_on_sigterm()
    try:
        return run(argv)
    finally:
        if unwinding:                   # main() may run inside another program (the tests)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run(argv: list[str] | None) -> int:
    args = command_line().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:            # a failure is one line: QMP's own error repeats our MachineError, and
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)     # where a failed machine's files
        logging.getLogger("harness.machine").setLevel(logging.ERROR)  # are kept is for -v
        logging.getLogger("harness.processes").setLevel(logging.ERROR)  # restarts and endings: serve prints them
    try:
        check_outputs(args)
        if not args.trace:
            return command(args.command)(args)
        with tracing.trace(args.trace) as tracer:
            status = command(args.command)(args)
        sys.stderr.write(f"hwharness: trace of {tracer.written} records in {tracer.path} "
                         f"and {tracing.text_path(tracer.path)} (ui.perfetto.dev opens the JSON)\n")
        return status
    except BaseException as exc:  # the one place a failure becomes what a person reads
        return report(exc, debug=args.debug or os.environ.get("HWHARNESS_DEBUG", "") not in ("", "0"))


# Options of the main parser that may also follow any command: ``hwharness disk ls X --trace T``.
ANYWHERE = (
    (("--debug",), dict(action="store_true", help="show the traceback of an error (also HWHARNESS_DEBUG=1)")),
    (("--trace",), dict(metavar="PATH", help="record every access, batch, poll, interrupt and DMA allocation: "
                                             "Chrome/Perfetto trace JSON at PATH, a text log beside it (.txt)")),
)


def add_anywhere_options(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """ANYWHERE's options on ``parser`` and every command below it. Below the top they
    default to SUPPRESS, so one that is not given leaves the top's value alone."""
    if top:
        for flags, settings in ANYWHERE:
            parser.add_argument(*flags, **settings)  # type: ignore[arg-type]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for below in action.choices.values():
                for flags, settings in ANYWHERE:
                    below.add_argument(*flags, **settings, default=argparse.SUPPRESS)  # type: ignore[arg-type]
                add_anywhere_options(below, top=False)


def complain(message: str) -> None:
    """The one line on stderr that says why a command failed."""
    sys.stderr.write(f"hwharness: error: {message}\n")
    sys.stderr.flush()


def report(exc: BaseException, debug: bool) -> int:
    """Say why the command failed, in one line, and return the exit status:
    2 for input it could not use, 1 for a failed check or device, 130 for Ctrl-C,
    143 for SIGTERM."""
    if isinstance(exc, SystemExit):
        raise exc
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, Terminated):
        complain("terminated")
        return 128 + signal.SIGTERM
    if isinstance(exc, KeyboardInterrupt):
        complain("interrupted")
        return 130
    if isinstance(exc, BrokenPipeError):            # `disk cat ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if isinstance(exc, OSError) and exc.filename:
        message = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, (HarnessError, OSError)):
        message = str(exc)
    else:
        message = f"internal error: {type(exc).__name__}: {exc}"
        if not debug:
            message += " (--debug or HWHARNESS_DEBUG=1 shows the traceback)"
    first, _, details = message.partition("\n")
    if details.strip():
        log.info("%s", details)                 # QEMU's output, a crash report's registers
        if not log.isEnabledFor(logging.INFO):
            first += " (-v shows the details)"
    complain(first)
    return 2 if isinstance(exc, BadInput) else 1


