"""A parallel port driver: status and control lines, the strobe/busy/ack handshake, IRQ 7.

One byte goes out as the IEEE 1284 compatibility-mode handshake: wait until
not busy, put the byte on the data lines, pulse strobe, then wait for the
printer's acknowledge pulse and for busy to drop. The waits run guest-side
(proxy polls), and bytes go out in batches, one notification per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from harness.access import Batch, Irq, Region
from harness.errors import DeviceTimeout, HarnessError

from .regs import CONTROL, DATA, PORT_COUNT, STATUS, Control, Reg, Status

log = logging.getLogger(__name__)

BYTES_PER_BATCH = 50            # five accesses each, plus one: a batch fits one ring


class ParportError(HarnessError):
    """The printer side is not in a state to take data."""


class ParportTimeout(ParportError):
    """A handshake wait expired; the message names every status line as last seen."""


@dataclass(frozen=True)
class Lines:
    """The status lines, as the printer means them."""

    busy: bool
    ack: bool
    paper_out: bool
    selected: bool
    error: bool

    @classmethod
    def decode(cls, status: int) -> "Lines":
        return cls(busy=not status & Status.NOT_BUSY, ack=not status & Status.NOT_ACK,
                   paper_out=bool(status & Status.PAPER_OUT), selected=bool(status & Status.SELECTED),
                   error=not status & Status.NOT_ERROR)

    def __str__(self) -> str:
        return ", ".join(f"{name}={'yes' if value else 'no'}" for name, value in vars(self).items())


class ParallelPort:
    """The port at ``ports`` (three registers from the base); ``irq`` counts acknowledge pulses."""

    def __init__(self, ports: Region, irq: Irq | None = None) -> None:
        if ports.size < PORT_COUNT:
            raise ValueError(f"a parallel port needs {PORT_COUNT} ports, the region has {ports.size}")
        self.ports = ports
        ports.name_registers(Reg)
        self.irq = irq
        self.control_bits = Control.NOT_INIT | Control.SELECT_IN
        self.sent = 0

    @property
    def lines(self) -> Lines:
        return Lines.decode(self.ports.read8(STATUS))

    def _control(self, bits: Control) -> None:
        self.ports.write8(CONTROL, int(bits))

    def reset(self) -> None:
        """Pulse nINIT to reset the printer, then select it; interrupts on if we have an Irq."""
        self._control(Control.SELECT_IN)
        if self.irq is not None:
            self.control_bits |= Control.IRQ_ENABLE
        self._control(self.control_bits)

    def check_ready(self) -> None:
        lines = self.lines
        if lines.paper_out or lines.error or not lines.selected:
            raise ParportError(f"the printer cannot take data: {lines}")

    def send(self, data: bytes, timeout: float = 1.0) -> int:
        """Send ``data`` with the full handshake per byte; returns the bytes sent.

        ``timeout`` bounds each wait. A wait that expires raises ParportTimeout
        naming the status lines; nothing after the stuck byte is sent.
        """
        self.check_ready()
        for start in range(0, len(data), BYTES_PER_BATCH):
            chunk = data[start:start + BYTES_PER_BATCH]
            batch = Batch(self.ports.channel)
            strobe = self.control_bits | Control.STROBE
            # not busy before the first byte; each byte's last wait covers the next one
            batch.poll(self.ports, STATUS, 1, Status.NOT_BUSY, Status.NOT_BUSY, timeout)
            for byte in chunk:
                batch.write(self.ports, DATA, 1, byte)
                batch.write(self.ports, CONTROL, 1, int(strobe))
                batch.write(self.ports, CONTROL, 1, int(self.control_bits))
                batch.poll(self.ports, STATUS, 1, Status.NOT_ACK, 0, timeout)       # the ack pulse
                batch.poll(self.ports, STATUS, 1, Status.NOT_BUSY, Status.NOT_BUSY, timeout)
            try:
                batch.run()
            except DeviceTimeout as exc:
                raise ParportTimeout(f"no handshake within {timeout:g} s at byte {self.sent}: "
                                     f"{Lines.decode(exc.last_value)} (status {exc.last_value:#04x})") from exc
            self.sent += len(chunk)
        return len(data)

    def read_data(self) -> int:
        """Turn the data lines around and read them (bidirectional ports), then turn them back."""
        self._control(self.control_bits | Control.DIRECTION)
        try:
            return self.ports.read8(DATA)
        finally:
            self._control(self.control_bits)
