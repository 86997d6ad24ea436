"""The i8042 keyboard controller: set-up, command handshakes, and interrupt-driven reads.

Every byte the controller offers is read once, by ``pump``, and routed by the
status register's AUX_OBF bit to the keyboard's or the mouse's queue, so the
two devices never steal each other's bytes. Every wait has a deadline; the
interrupt (IRQ 1 and 12 on one Irq) wakes the reader, and a short poll
interval covers an interrupt that was already consumed.
"""

from __future__ import annotations

import collections
import enum
import logging
import time

from harness.access import Deadline, Irq, Region
from harness.errors import DeviceTimeout, HarnessError, InterruptTimeout

from .regs import ACK, COMMAND, DATA, PORT_TEST_OK, RESEND, SELF_TEST_OK, STATUS, Cmd, Config, Reg, Status

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02        # longest nap between looks at the status register
RESEND_LIMIT = 3


class Port(enum.Enum):
    KBD = "keyboard"
    AUX = "mouse"


class Ps2Error(HarnessError):
    """A PS/2 device or the controller misbehaved."""


class Ps2Timeout(Ps2Error):
    """Nothing came within the deadline; the message names the status bits seen last."""


class CommandRefused(Ps2Error):
    """The device answered a command with neither ACK nor (after retries) anything but RESEND."""


def describe(status: int) -> str:
    return f"status {status:#04x} ({Status(status)!r})"


class Controller:
    """The 8042 behind ports 0x60 (data) and 0x64 (status and command)."""

    def __init__(self, ports: Region, irq: Irq | None = None) -> None:
        if ports.size < 5:
            raise ValueError("the i8042 needs the five ports 0x60..0x64 in one region")
        self.ports = ports
        ports.name_registers(Reg)
        self.irq = irq
        self.queues: dict[Port, collections.deque[int]] = {p: collections.deque() for p in Port}
        self.config = Config(0)
        self.resends = 0                # RESEND replies seen, for the curious

    # ---- bytes in ----

    def pump(self) -> int:
        """Move every byte the controller holds into its port's queue; how many there were."""
        n = 0
        while True:
            status = self.ports.read8(STATUS)
            if not status & Status.OBF:
                return n
            byte = self.ports.read8(DATA)
            self.queues[Port.AUX if status & Status.AUX_OBF else Port.KBD].append(byte)
            n += 1

    def next_byte(self, port: Port, timeout: float) -> int | None:
        """The next byte from ``port``, or None if none came within ``timeout`` seconds."""
        queue = self.queues[port]
        deadline = Deadline(timeout)
        while not queue:
            self.pump()
            if queue or deadline.expired:
                break
            self._nap(min(POLL_INTERVAL, deadline.remaining))
        return queue.popleft() if queue else None

    def _nap(self, seconds: float) -> None:
        if self.irq is None:
            time.sleep(seconds)         # no interrupt: poll
            return
        try:
            self.irq.wait(seconds)
        except InterruptTimeout:
            pass

    def read_byte(self, port: Port, timeout: float) -> int:
        byte = self.next_byte(port, timeout)
        if byte is None:
            raise Ps2Timeout(f"no byte from the {port.value} within {timeout:g} s; "
                             f"{describe(self.ports.read8(STATUS))}")
        return byte

    def flush(self) -> list[int]:
        """Discard whatever the controller and the queues hold; return it."""
        self.pump()
        dropped = [b for q in self.queues.values() for b in q]
        for q in self.queues.values():
            q.clear()
        if dropped:
            log.debug("flushed %s", bytes(dropped).hex(" "))
        return dropped

    # ---- bytes out ----

    def _wait_writable(self, timeout: float) -> None:
        try:
            self.ports.poll(STATUS, 1, Status.IBF, 0, timeout)
        except DeviceTimeout as exc:
            raise Ps2Timeout(f"the controller did not take input within {timeout:g} s; "
                             f"{describe(exc.last_value)}") from exc

    def command(self, cmd: int, arg: int | None = None, timeout: float = 0.5) -> None:
        """A controller command (port 0x64), with its argument byte (port 0x60) if any."""
        self._wait_writable(timeout)
        self.ports.write8(COMMAND, cmd)
        if arg is not None:
            self._wait_writable(timeout)
            self.ports.write8(DATA, arg)

    def query(self, cmd: int, timeout: float = 0.5) -> int:
        """A controller command that answers one byte."""
        self.command(cmd, timeout=timeout)
        return self.read_byte(Port.KBD, timeout)

    def send(self, port: Port, byte: int, timeout: float = 0.5) -> None:
        """One byte to a device: the mouse's go through the WRITE_AUX command."""
        if port is Port.AUX:
            self.command(Cmd.WRITE_AUX, byte, timeout)
        else:
            self._wait_writable(timeout)
            self.ports.write8(DATA, byte)

    def command_device(self, port: Port, cmd: int, *args: int, timeout: float = 0.5) -> None:
        """Send a device command and its arguments, each acknowledged (0xFA).

        A RESEND (0xFE) repeats the byte, up to RESEND_LIMIT times. Bytes the
        device sends meanwhile (a key pressed during the handshake) are kept,
        in order, for whoever reads the port next.
        """
        for byte in (cmd, *args):
            for attempt in range(RESEND_LIMIT + 1):
                self.send(port, byte, timeout)
                reply = self._reply(port, timeout, f"{byte:#04x}")
                if reply == ACK:
                    break
                self.resends += 1
                log.debug("%s asked for %#04x again", port.value, byte)
            else:
                raise CommandRefused(f"the {port.value} refused {byte:#04x} (command {cmd:#04x}) "
                                     f"{RESEND_LIMIT + 1} times")

    def _reply(self, port: Port, timeout: float, what: str) -> int:
        aside: list[int] = []
        try:
            while True:
                byte = self.read_byte(port, timeout)
                if byte in (ACK, RESEND):
                    return byte
                aside.append(byte)
        except Ps2Timeout as exc:
            raise Ps2Timeout(f"the {port.value} did not acknowledge {what}: {exc}") from exc
        finally:
            self.queues[port].extendleft(reversed(aside))

    # ---- set-up ----

    def initialize(self, timeout: float = 1.0) -> None:
        """Disable both ports, flush, self-test, test both interfaces, then enable
        both ports with their interrupts on and translation off."""
        self.command(Cmd.DISABLE_KBD, timeout=timeout)
        self.command(Cmd.DISABLE_AUX, timeout=timeout)
        self.flush()
        config = Config(self.query(Cmd.READ_CONFIG, timeout))
        config &= ~(Config.KBD_INT | Config.AUX_INT | Config.XLAT)
        self.command(Cmd.WRITE_CONFIG, int(config), timeout)
        if (answer := self.query(Cmd.SELF_TEST, timeout)) != SELF_TEST_OK:
            raise Ps2Error(f"controller self-test answered {answer:#04x}, not {SELF_TEST_OK:#04x}")
        self.command(Cmd.WRITE_CONFIG, int(config), timeout)        # a self-test may reset it
        for test, port in ((Cmd.TEST_KBD, Port.KBD), (Cmd.TEST_AUX, Port.AUX)):
            if (answer := self.query(test, timeout)) != PORT_TEST_OK:
                raise Ps2Error(f"{port.value} interface test answered {answer:#04x}")
        self.command(Cmd.ENABLE_KBD, timeout=timeout)
        self.command(Cmd.ENABLE_AUX, timeout=timeout)
        config = (config | Config.KBD_INT | Config.AUX_INT) & ~(Config.KBD_DISABLED | Config.AUX_DISABLED)
        self.command(Cmd.WRITE_CONFIG, int(config), timeout)
        self.config = config
        self.flush()
