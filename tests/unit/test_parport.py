"""The parallel port driver against a printer that never becomes ready."""

import pytest

from drivers.parport import ParallelPort, ParportError, ParportTimeout
from tests.unit.fakes import FakePorts


def stuck_printer(status: int):  # type: ignore[no-untyped-def]
    regs = {0x378: 0, 0x379: status, 0x37A: 0}
    return FakePorts(lambda p: regs[p], lambda p, v: regs.__setitem__(p, v)).region(0x378, 3)


def test_a_port_that_never_gets_ready_names_its_status_lines() -> None:
    port = ParallelPort(stuck_printer(0x18))          # selected, no error, but busy forever
    with pytest.raises(ParportTimeout) as timeout:
        port.send(b"hello", timeout=0.05)
    message = str(timeout.value)
    for line in ("busy=yes", "ack=yes", "paper_out=no", "selected=yes", "error=no"):
        assert line in message
    assert port.sent == 0


def test_paper_out_is_refused_before_anything_is_sent() -> None:
    ports = stuck_printer(0xB8)                       # not busy, paper out
    with pytest.raises(ParportError, match="paper_out=yes"):
        ParallelPort(ports).send(b"x")
    assert not [a for a in ports.channel.log if a.kind.value == "write"]
