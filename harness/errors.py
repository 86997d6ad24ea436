"""The one exception tree of hwharness.

Every error the harness raises derives from :class:`HarnessError`::

    HarnessError
    ├── BadInput            what the user gave cannot be used: an image that is not
    │                       FAT, a path not on it, text with no key on the layout
    │                       (the CLI exits 2 for these, 1 for everything else)
    ├── QemuNotFound        the QEMU binary is missing (with the install hint)
    ├── DeviceNotFound      the machine has no device that matches (also a LookupError)
    ├── MachineError        QEMU failed to start, died, or QMP failed;
    │   │                   carries the command line and the tail of its output
    │   ├── QemuExited      QEMU exited while something waited on it (and the console's tail)
    │   ├── SnapshotError   a snapshot could not be saved or loaded (QEMU's reason)
    │   └── ConsoleTimeout  a console wait ran out of time; quotes the console's tail
    ├── GuestFailure        the console or QMP shows the guest is gone; quotes the
    │   │                   console's tail, and the machine keeps its artifacts
    │   ├── GuestPanic      a kernel panic
    │   ├── GuestOops       an oops or BUG
    │   ├── GuestReset      a triple fault or reboot (-no-reboot turns it into QEMU's exit)
    │   └── GuestHang       no console output for the quiet time; carries QMP's status
    ├── ImageMissing        a guest image is not built (with the command that builds it)
    ├── AttachRefused       the machine's owner will not lend a driver slot or a device:
    │                       every slot is taken, another process holds the device
    ├── SupervisorError     a supervised driver did not start or serve in time (harness.processes)
    ├── NbdError ...        the block protocol's errors (NBD, harness.services.nbd): an error reply,
    │                       a refused export, no server to reconnect to, a silent server, nonsense replies
    ├── AbiError            the guest ELF is missing or speaks another ABI version
    ├── ProxyUnresponsive   the proxy did not complete a request in time
    ├── InterruptTimeout    no interrupt arrived within the wait's timeout
    ├── GuestCrash          the guest took a CPU exception or panicked;
    │                       carries the crash record and a rendered report
    └── ProxyError          the proxy completed a request with a non-OK status;
        │                   carries the request and the status
        ├── AccessDenied    outside the channel's grants
        ├── BadRequest      malformed: operation, width, alignment, range
        ├── DeviceTimeout   a guest-side poll expired; carries the last value
        ├── ProxyFault      the proxy could not carry the request out
        └── DmaFault        the channel's device tried DMA outside its domain;
                            carries the fault (address, direction, reason)

Bad arguments that are caught on the host before anything reaches a device
(an offset past a region, a width that does not exist) raise ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


class HarnessError(Exception):
    """Root of every hwharness error."""


class BadInput(HarnessError):
    """The input cannot be used as given; the message names it and says what would do."""


class QemuNotFound(HarnessError):
    """The QEMU binary is not installed or not on PATH."""


class DeviceNotFound(HarnessError, LookupError):
    """The machine has no device that matches what a driver asked for."""


def qemu_reason(output: str) -> str:
    """QEMU's own last error in its output, without its program name: what a person needs on
    the one line a failure gets ("-device ide-hd,...: Failed to get "write" lock", "invalid
    kernel header"); "" if none."""
    for line in reversed(output.strip().splitlines()):
        program, sep, reason = line.partition(": ")
        name = program.rsplit("/", 1)[-1]
        if sep and (name == "qemu" or name.startswith("qemu-system")):      # both prefix its errors
            return reason.strip()
    return ""


class MachineError(HarnessError):
    """QEMU failed to launch, exited unexpectedly, or QMP failed."""

    def __init__(self, message: str, command: Sequence[str] = (), output: str = "",
                 exitcode: int | None = None) -> None:
        self.command = list(command)
        self.output = output
        self.exitcode = exitcode
        detail = message
        if exitcode is not None:
            detail += f" (exit code {exitcode})"
        reason = qemu_reason(output)
        if reason:
            detail += f": {reason}"
        if output.strip():
            detail += "\n--- QEMU output (tail) ---\n" + output.strip()[-2000:]
        super().__init__(detail)


class QemuExited(MachineError):
    """QEMU exited while the harness waited on it; ``console`` is the console's tail."""

    def __init__(self, message: str, command: Sequence[str] = (), output: str = "",
                 exitcode: int | None = None, console: str = "") -> None:
        self.console = console
        if console.strip():
            message += "\n--- console (tail) ---\n" + console.rstrip()
        super().__init__(message, command, output, exitcode)


class SnapshotError(MachineError):
    """A snapshot could not be taken or restored; the message carries QEMU's reason."""


class ConsoleTimeout(MachineError):
    """A console wait reached its timeout; ``console`` is the console's tail."""

    def __init__(self, message: str, console: str = "", workdir: Any = None) -> None:
        self.console = console
        self.workdir = workdir
        super().__init__(message + "\n--- console (tail) ---\n" + console.rstrip())


class GuestFailure(HarnessError):
    """The guest is gone: ``what`` happened, ``console`` is the console's tail, and the
    machine's directory (``workdir``: serial log, QEMU output, command line) is kept."""

    def __init__(self, what: str, console: str, workdir: Any = None) -> None:
        self.what = what
        self.console = console
        self.workdir = workdir
        kept = f" (artifacts kept in {workdir})" if workdir else ""
        super().__init__(f"{type(self).__name__}: {what}{kept}\n--- console (tail) ---\n{console.rstrip()}")


class GuestPanic(GuestFailure):
    """The kernel panicked (its panic line on the console, or QEMU's guest-panic event)."""


class GuestOops(GuestFailure):
    """The kernel printed an oops or a BUG."""


class GuestReset(GuestFailure):
    """The guest reset itself (a triple fault, a reboot); with -no-reboot QEMU exits."""


class GuestHang(GuestFailure):
    """No console output for the quiet time; ``status`` is what QMP's query-status said."""

    def __init__(self, what: str, console: str, workdir: Any = None, status: str = "") -> None:
        self.status = status
        super().__init__(what, console, workdir)


class ImageMissing(HarnessError):
    """A guest image has not been built; the message says how to build it."""


class AttachRefused(HarnessError):
    """The machine's owner would not lend it: the device is held by another process,
    every driver slot is taken, or the asking process is not the owner's user."""


class SupervisorError(HarnessError):
    """A driver could not be started, or the supervisor itself failed."""


class AbiError(HarnessError):
    """The guest ELF is missing, unreadable, or of a different ABI version."""


class ProxyUnresponsive(HarnessError):
    """The proxy did not complete a request before the deadline."""


class InterruptTimeout(HarnessError):
    """``Irq.wait`` saw no new interrupt before its timeout."""


class GuestCrash(HarnessError):
    """The proxy guest took a CPU exception or panicked.

    ``record`` is the decoded crash record (registers, vector, code bytes);
    ``report`` is the human-readable rendering with disassembly and symbol.
    """

    def __init__(self, record: dict[str, Any], report: str) -> None:
        self.record = record
        self.report = report
        super().__init__(report)


class ProxyError(HarnessError):
    """A request completed with a status other than OK."""

    status_name = "ERROR"

    def __init__(self, request: Any, status: int, value: int = 0, register: str = "") -> None:
        self.request = request
        self.status = status
        self.value = value
        self.register = register           # the register's name, where the driver declared it
        super().__init__(f"{self.status_name}: {request}" + (f" ({register})" if register else ""))


class AccessDenied(ProxyError):
    """The request lies outside the channel's grants; nothing was touched."""

    status_name = "DENIED"


class BadRequest(ProxyError):
    """The request is malformed; nothing was touched."""

    status_name = "BAD_REQUEST"


class DeviceTimeout(ProxyError):
    """A guest-side poll expired; ``last_value`` is what the register last read."""

    status_name = "TIMEOUT"

    @property
    def last_value(self) -> int:
        return self.value

    def __str__(self) -> str:
        return f"{super().__str__()} (last value {self.value:#x})"


class ProxyFault(ProxyError):
    """The proxy could not carry the request out."""

    status_name = "FAULT"


@dataclass(frozen=True)
class DmaFaultRecord:
    """What the IOMMU reported of a device's DMA outside its domain (the latest of ``count``)."""

    count: int              # faults on this channel so far
    source: str             # the device, bus:dev.fn
    addr: int               # the faulting page (an IOVA)
    write: bool             # a DMA write (else a read)
    reason: int             # the VT-d fault reason code (VT-d spec, Appendix A)

    def __str__(self) -> str:
        return (f"{self.source} DMA {'write to' if self.write else 'read from'} {self.addr:#x} "
                f"outside its domain (VT-d fault reason {self.reason:#x}; {self.count} so far)")


class DmaFault(ProxyError):
    """The channel's device tried DMA outside its domain since the channel's previous request;
    this request was not run. ``fault`` says what the IOMMU saw; nothing outside the domain
    was read or written."""

    status_name = "DMA_FAULT"

    def __init__(self, request: Any, status: int, fault: DmaFaultRecord) -> None:
        self.fault = fault
        super().__init__(request, status, 0)

    def __str__(self) -> str:
        return f"{self.fault} (reported on: {self.request})"
