"""Proxy channels and interrupts that record into a trace (harness.tracing).

The bus makes a channel of these classes instead of the plain ones when a
trace is on as the channel opens; the plain classes know nothing of tracing,
so with tracing off the hot path is exactly what it was.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Mapping, Sequence

from ..access import Access, IrqEvent
from ..errors import ProxyError
from .. import tracing
from ..tracing import Tracer
from .channel import Flight, PreparedBatch, ProxyChannel
from .irq import ProxyIrq

if TYPE_CHECKING:
    from ..access import DmaDomain
    from .bus import WindowBus
    from .dma import DmaPool


def channel_for(bus: "WindowBus", index: int, name: str, domain: "DmaPool | None" = None) -> ProxyChannel:
    """A channel on ring ``index`` of ``bus``'s window: one that records, if a trace is on."""
    tracer = tracing.active()
    if tracer is None:
        return ProxyChannel(bus, index, name, domain)
    ch = TracedChannel(bus, index, name, tracer, domain)
    if domain is not None:
        domain.observer = lambda phys, size, freed: tracer.dma(ch, phys, size, freed=freed)
    return ch


def status_of(exc: BaseException) -> str:
    return exc.status_name if isinstance(exc, ProxyError) else type(exc).__name__


class TracedChannel(ProxyChannel):
    """A ProxyChannel that records every request into ``tracer``."""

    def __init__(self, bus: "WindowBus", index: int, name: str, tracer: Tracer,
                 domain: "DmaDomain | None" = None) -> None:
        super().__init__(bus, index, name, domain)
        self.tracer = tracer
        ops = {code: (kind, space) for (kind, space), code in self._ops.items()}
        names = {v: k.removeprefix("PROXY_OP_").lower() for k, v in bus.abi.consts.items()
                 if k.startswith("PROXY_OP_")}
        # op -> (what the trace calls it, its space): "read"/"write" in a space, else the op's own name
        self._op_names = {code: (ops[code][0].value, ops[code][1]) if code in ops else (name, None)
                          for code, name in names.items()}
        self._prepared_start = 0

    def _one(self, op: int, width: int, addr: int, value: int = 0) -> int:
        tracer = self.tracer
        if not tracer.recording:
            return super()._one(op, width, addr, value)
        start = time.perf_counter_ns()
        status, result = "OK", value
        try:
            result = super()._one(op, width, addr, value)
            return result
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            kind, space = self._op_names.get(op, (f"op {op}", None))
            tracer.access(self, kind, space, addr, width, value if kind == "write" else result, status,
                          self.last_start_tsc, start, time.perf_counter_ns())

    def execute(self, accesses: Sequence[Access]) -> list[int]:
        if not self.tracer.recording or (len(accesses) == 1 and not accesses[0].kind.polls):
            return super().execute(accesses)          # a single access: _one records it
        head, start, values, status = self.ring.head, time.perf_counter_ns(), None, "OK"
        try:
            values = super().execute(accesses)
            return values
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            self.tracer.batch(self, accesses, values, status, self.ring.start_tsc(head), start, time.perf_counter_ns())

    def _fly(self, accesses: Sequence[Access], posted: bool) -> Flight:
        """A posted or started batch is recorded as it is published: nobody waits for it here."""
        if not self.tracer.recording:
            return super()._fly(accesses, posted)
        start = time.perf_counter_ns()
        flight = super()._fly(accesses, posted)
        self.tracer.batch(self, accesses, None, "POSTED" if posted else "STARTED", 0, start, time.perf_counter_ns())
        return flight

    def _start_prepared(self, batch: PreparedBatch, patch: Mapping[int, int] | None) -> None:
        self._prepared_start = time.perf_counter_ns()
        super()._start_prepared(batch, patch)

    def _finish_prepared(self) -> list[int]:
        if self._started is None or not self.tracer.recording:
            return super()._finish_prepared()
        batch, patch, head, _, _ = self._started
        first = (head - batch.count) & 0xFFFFFFFF
        values, status = None, "OK"
        try:
            values = super()._finish_prepared()
            return values
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            self.tracer.batch(self, batch.with_values(patch or {}), values, status, self.ring.start_tsc(first),
                              self._prepared_start, time.perf_counter_ns())

    def _control(self, op: int, addr: int, value: int, what: str, mask: int = 0, expect: int = 0) -> int:
        if not self.tracer.recording:
            return super()._control(op, addr, value, what, mask, expect)
        start, result, status = time.perf_counter_ns(), 0, "OK"
        try:
            result = super()._control(op, addr, value, what, mask, expect)
            return result
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            self.tracer.control(self, what, result, status, start, time.perf_counter_ns())

    @property
    def irq_class(self) -> type:
        return TracedIrq


class TracedIrq(ProxyIrq):
    """A ProxyIrq whose every wait that returns is an instant in the trace."""

    channel: TracedChannel

    def wait(self, timeout: float) -> IrqEvent:
        event = super().wait(timeout)
        if self.channel.tracer.recording:
            self.channel.tracer.interrupt(self.channel, event)
        return event
