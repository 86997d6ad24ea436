"""``hwharness boot`` and ``hwharness run``: a kernel on the terminal's serial console, one
command at its shell, or the proxy guest serving its driver slots until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys
from pathlib import Path

from ...errors import BadInput
from ...machine import Machine, MachineSpec, random_mac
from ...machine.linux import SERIAL_CONSOLE, linux, nbd_address, nbd_disk, wire_nic, wire_path
from ...processes import serve
from ...proxy import ProxyMachine, proxy_spec
from .common import device_table, iommu_of, readable_file, say, unix_socket


def console_machine(args: argparse.Namespace, name: str, person: bool = False) -> tuple[Machine, str]:
    """A machine for ``boot``/``run``: ``--kernel``/``--initrd``/``--append``, or the Linux guest
    ``make images`` built; with the regex its shell prompt matches. ``--disk`` attaches an NBD
    export, ``--root`` makes it the Linux guest's root. ``person``: someone types at the
    console, so the Linux guest's keeps its echo."""
    if args.root and not args.disk:
        raise BadInput("--root needs --disk URI, the export to boot from")
    if args.disk:
        try:
            server = nbd_address(args.disk)
        except ValueError as exc:
            raise BadInput(f"--disk {exc}") from exc
        if server["server.type"] == "unix":
            unix_socket(str(server["server.path"]), f"--disk {args.disk}",
                        "`hwharness serve disk IMAGE --nbd unix:PATH`")
    if args.net:
        unix_socket(wire_path(args.net), f"--net {args.net}", "`hwharness serve net --wire unix:PATH`")
    if args.kernel:
        if args.root:
            raise BadInput("--root is the Linux guest's; for --kernel, say root=/dev/vda in --append")
        readable_file(args.kernel, "--kernel")
        if args.initrd:
            readable_file(args.initrd, "--initrd")
        spec = MachineSpec(kernel=Path(args.kernel), initrd=Path(args.initrd) if args.initrd else None,
                           append=args.append or SERIAL_CONSOLE, memory_mb=args.memory, accel=args.accel)
        if args.disk:
            nbd_disk(spec, args.disk)
        return Machine(spec if args.net is None else wire_nic(spec, args.net), name=name), args.prompt
    image = linux()
    spec = image.spec(accel=args.accel, memory_mb=args.memory, append=args.append or "", disk=args.disk,
                      root=args.root, net=args.net, echo=person)
    return Machine(spec, name=name), re.escape(image.prompt)


def cmd_console(args: argparse.Namespace) -> int:
    machine, _ = console_machine(args, "boot", person=True)
    with machine as m:
        say(f"serial console of {m.spec.kernel} under {m.accel}; Ctrl-] leaves (files in {m.workdir})")
        m.console.interact()
    say("")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    words = args.guest_command[1:] if args.guest_command[:1] == ["--"] else args.guest_command
    command = " ".join(words)
    if not command:
        raise BadInput("nothing to run: hwharness run [--kernel K ...] -- COMMAND")
    machine, prompt = console_machine(args, "run")
    with machine as m:
        m.console.expect([prompt], args.timeout)
        output, status = m.console.run(command, timeout=args.timeout)
    sys.stdout.write(output + ("\n" if output else ""))
    return status


def cmd_boot(args: argparse.Namespace) -> int:
    if not (args.proxy or args.serve):
        return cmd_console(args)
    if args.net:
        raise BadInput("--net is for a kernel's machine, not the proxy guest's (see `hwharness serve net`)")
    spec = proxy_spec(accel=args.accel, iommu=iommu_of(args))
    spec.netdev("user", "net0", restrict=True)
    spec.device("e1000", netdev="net0", mac=random_mac())
    with ProxyMachine(spec, name="boot", keep_artifacts=True) as pm:
        say(f"proxy guest up under {pm.machine.accel}; QMP on the abstract socket "
            f"@{pm.machine.endpoints.qmp.lstrip(chr(0))}; files in {pm.machine.workdir}")
        device_table(pm)
        if args.serve:
            control = serve(pm)
            say(f"{len(pm.admin.slots)} driver slots; from another process: "
                f"bus = harness.attach({control.address!r})")
        with CaughtStop() as stop:
            say("Ctrl-C to stop.")
            stop.wait()
        say("stopping")
    return 0


class CaughtStop:
    """``with CaughtStop() as stop:`` SIGINT (Ctrl-C, ``kill -INT``) and SIGTERM (a service
    manager's stop) are caught, whatever this process inherited, and ``stop.wait()``
    returns once one has come, before or during it: for the commands that serve until told.

    A shell without job control starts a background job with SIGINT ignored, and Python
    keeps an ignored SIGINT ignored: under ``make test &`` ``boot --serve`` never saw the
    test's Ctrl-C. So the handlers are set here; they do nothing themselves, because the
    wakeup fd is what ends the wait: the C handler writes the signal's number to it in
    whichever thread the kernel picked, so none is lost (``signal.pause()`` misses a signal
    that comes just before it, and only the main thread raises KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "CaughtStop":
        self._caught = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_fd = signal.set_wakeup_fd(self._wake_w)
        self._previous = [signal.signal(number, lambda *_: None) for number in self.SIGNALS]
        return self

    def wait(self) -> None:
        while not self._take(None):
            pass

    def caught(self) -> bool:
        """Whether one has come (once true, true from then on); does not wait."""
        return self._take(0)

    def _take(self, timeout: float | None) -> bool:
        """Read the wakeup fd, waiting up to ``timeout`` (None: until a signal): a stop among them?"""
        if not self._caught and select.select([self._wake_r], [], [], timeout)[0]:
            numbers = os.read(self._wake_r, 256)               # a byte per signal: its number
            self._caught = any(number in numbers for number in self.SIGNALS)
        return self._caught

    def __exit__(self, *_: object) -> None:
        for number, previous in zip(self.SIGNALS, self._previous):
            signal.signal(number, previous)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._wake_r)
        os.close(self._wake_w)
