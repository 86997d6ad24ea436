"""A trace of what drivers did: every access, batch, poll, interrupt and DMA allocation.

``with harness.trace("run.json"):`` (the CLI's ``--trace PATH``, pytest's
``--hwharness-trace PATH``) turns it on. Channels opened while a trace is on
record into it; the others, and everything while it is off, run the
transport's own untouched code: a transport swaps in a tracing channel when a
channel is opened (:mod:`harness.proxy.traced`), so tracing off costs the
hot path nothing at all.

Each record holds the channel (its track), the device, the space, the
address, the register's name where the driver declared it
(``Region.name_registers`` with its regs.py enum), the value, the status,
the guest TSC at the access and the host time before and after. They are
written as

- ``PATH``: Chrome trace-event JSON (the array form, which stays readable if
  the process dies before the closing bracket): a process per machine, a
  track per channel, accesses, polls and batches as slices, interrupts and
  DMA allocations as instants. ui.perfetto.dev and chrome://tracing open it.
- ``PATH`` with ``.txt`` (in place of ``.json``): one line per record.

Records are written out in chunks as they accumulate, so a long run holds
only a chunk in memory; the last ``keep`` stay for :meth:`Tracer.tail`
(pytest puts them beside a failed test's artifacts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .access import Access, Channel, IrqEvent, Space

log = logging.getLogger(__name__)

ACCESS, BATCH, CONTROL, IRQ, DMA = "access", "batch", "control", "irq", "dma"
CHUNK = 50_000          # records held before they are written out
BATCH_ARGS = 64         # accesses of a batch listed in its slice's arguments

_active: "Tracer | None" = None


def active() -> "Tracer | None":
    """The tracer that newly opened channels record into, or None when tracing is off."""
    return _active


def text_path(path: Path) -> Path:
    """Where the text log of the trace at ``path`` goes."""
    return path.with_suffix(".txt") if path.suffix == ".json" else path.with_name(path.name + ".txt")


class Tracer:
    """Collects records and writes them to ``path`` (JSON) and its text log."""

    def __init__(self, path: str | Path, keep: int = 1000) -> None:
        self.path = Path(path)
        self.keep = keep
        self.records: list[tuple[Any, ...]] = []   # the last `keep` written ones, then those not yet written
        self._unwritten = 0                         # index in records of the first not yet written
        self.recording = True
        self.written = 0                            # records written out so far
        self.t0 = time.perf_counter_ns()
        self._lock = threading.Lock()
        self._tracks: dict[int, tuple[int, int]] = {}     # id(channel) -> (pid, tid), first seen order
        self._machines: dict[int, int] = {}               # id(bus) -> pid
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._json = open(self.path, "w")
        self._text = open(text_path(self.path), "w")
        self._json.write("[\n")
        self._first_event = True

    # ---- recording (the traced transports call these) ----

    def add(self, record: tuple[Any, ...]) -> None:
        """Keep one record; write the collected ones out when a chunk is full."""
        records = self.records
        records.append(record)
        if len(records) >= CHUNK + self.keep:
            self.flush()

    def access(self, channel: Channel, kind: str, space: Space | None, addr: int, width: int, value: int,
               status: str, guest_tsc: int, start_ns: int, end_ns: int) -> None:
        """One register access, or one request that is not (``kind`` "nop", a control name)."""
        self.add((ACCESS, channel, kind, space, addr, width, value, status, guest_tsc, start_ns, end_ns))

    def batch(self, channel: Channel, accesses: Sequence[Access], values: Sequence[int] | None, status: str,
              guest_tsc: int, start_ns: int, end_ns: int) -> None:
        """Accesses carried out together (a batch, a prepared batch, a poll); ``values`` None if it failed."""
        self.add((BATCH, channel, list(accesses), values, status, guest_tsc, start_ns, end_ns))

    def control(self, channel: Channel, what: str, result: int, status: str, start_ns: int, end_ns: int) -> None:
        """A request that is not an access: open, close, interrupt enable and ack."""
        self.add((CONTROL, channel, what, result, status, start_ns, end_ns))

    def interrupt(self, channel: Channel, event: IrqEvent) -> None:
        self.add((IRQ, channel, event))

    def dma(self, channel: Channel, phys: int, size: int, freed: bool = False) -> None:
        """A DMA buffer lent (or given back), recorded on the bus's admin track."""
        self.add((DMA, channel, phys, size, freed, time.perf_counter_ns()))

    # ---- output ----

    def _track(self, channel: Channel) -> tuple[int, int]:
        """(pid, tid) of a channel: a process per machine, a thread per channel, named when first seen."""
        track = self._tracks.get(id(channel))
        if track is None:
            bus = getattr(channel, "bus", None)
            pid = self._machines.get(id(bus))
            if pid is None:
                pid = self._machines[id(bus)] = len(self._machines) + 1
                machine = getattr(getattr(bus, "machine", None), "name", "machine")
                self._event({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": machine}})
            track = self._tracks[id(channel)] = (pid, int(getattr(channel, "index", len(self._tracks))))
            self._event({"ph": "M", "name": "thread_name", "pid": pid, "tid": track[1],
                         "args": {"name": f"ch{track[1]} {getattr(channel, 'name', channel)}"}})
        return track

    def _event(self, event: dict[str, Any]) -> None:
        self._json.write(("" if self._first_event else ",\n") + json.dumps(event, separators=(",", ":")))
        self._first_event = False

    def _us(self, ns: int) -> float:
        return round((ns - self.t0) / 1000, 3)

    def describe(self, record: tuple[Any, ...]) -> tuple[str, dict[str, Any], str]:
        """A record as (slice name, JSON arguments, text line without the time)."""
        what, channel = record[0], record[1]
        device = getattr(channel, "name", str(channel))
        if what == ACCESS:
            _, _, kind, space, addr, width, value, status, tsc, _, _ = record
            reg = channel.register_name(space, addr) if space is not None else ""
            where = f"{space.value} {addr:#x}" if space is not None else ""
            args = {"device": device, "space": space.value if space else None, "addr": f"{addr:#x}",
                    "register": reg or None, "width": width, "value": f"{value:#x}", "status": status,
                    "guest_tsc": tsc}
            return (f"{kind} {reg or where}", args,
                    f"{kind:<6} {where:<16} {reg:<14} w{width} {value:#x} {status} tsc={tsc}")
        if what == BATCH:
            _, _, accesses, values, status, tsc, _, _ = record
            lines = []
            for i, a in enumerate(accesses):
                reg = channel.register_name(a.space, a.addr)
                got = f" -> {values[i]:#x}" if values is not None and a.kind.value != "write" else ""
                lines.append(f"{a}{' ' + reg if reg else ''}{got}")
            name = (f"{accesses[0].kind.value} {channel.register_name(accesses[0].space, accesses[0].addr) or ''}".strip()
                    if len(accesses) == 1 else f"batch of {len(accesses)}")
            args = {"device": device, "status": status, "guest_tsc": tsc, "accesses": lines[:BATCH_ARGS]}
            text = f"{name} {status} tsc={tsc}" + "".join(f"\n{'':44}{line}" for line in lines)
            return name, args, text
        if what == CONTROL:
            _, _, request, result, status, _, _ = record
            return request, {"device": device, "result": result, "status": status}, \
                f"{request} -> {result:#x} {status}"
        if what == IRQ:
            event: IrqEvent = record[2]
            return "interrupt", {"device": device, "count": event.count, "new": event.new,
                                 "guest_tsc": event.guest_tsc}, \
                f"interrupt count={event.count} new={event.new} tsc={event.guest_tsc}"
        _, _, phys, size, freed, _ = record
        name = "dma free" if freed else "dma alloc"
        return name, {"phys": f"{phys:#x}", "size": size}, f"{name} {phys:#x}+{size:#x}"

    @staticmethod
    def times(record: tuple[Any, ...]) -> tuple[int, int | None]:
        """(start, end) in host ns; end None for an instant."""
        if record[0] == IRQ:
            return record[2].host_ns, None
        if record[0] == DMA:
            return record[5], None
        return record[-2], record[-1]

    def line(self, record: tuple[Any, ...]) -> str:
        start, end = self.times(record)
        _, _, text = self.describe(record)
        pid, tid = self._track(record[1])
        took = f"+{(end - start) / 1000:9.3f}" if end is not None else f"{'':10}"
        return f"{self._us(start):14.3f} us {took}  m{pid} ch{tid:<2} {text}"

    def flush(self) -> None:
        """Write out every record not yet written, keeping the last ``keep`` for tail()."""
        with self._lock:
            upto = len(self.records)                # records another thread adds meanwhile wait their turn
            pending = self.records[self._unwritten:upto]
            for record in pending:
                start, end = self.times(record)
                name, args, _ = self.describe(record)
                pid, tid = self._track(record[1])
                event: dict[str, Any] = {"name": name, "cat": record[0], "pid": pid, "tid": tid,
                                         "ts": self._us(start), "args": args}
                if end is None:
                    event.update(ph="i", s="t")
                else:
                    event.update(ph="X", dur=round((end - start) / 1000, 3))
                self._event(event)
                self._text.write(self.line(record) + "\n")
            self.written += len(pending)
            drop = max(0, upto - self.keep)
            del self.records[:drop]
            self._unwritten = upto - drop
            self._json.flush()
            self._text.flush()

    def tail(self, count: int | None = None) -> str:
        """The last ``count`` records (at most ``keep``) as text lines."""
        with self._lock:
            records = self.records[-(count or self.keep):]
        return "\n".join(self.line(r) for r in records) + ("\n" if records else "")

    def close(self) -> None:
        """Stop recording and finish both files."""
        if not self.recording:
            return
        self.flush()
        self.recording = False
        self._json.write("\n]\n")
        self._json.close()
        self._text.close()
        log.info("trace: %d records in %s and %s", self.written, self.path, text_path(self.path))


def start(path: str | Path, keep: int = 1000) -> Tracer:
    """Turn tracing on: channels opened from now on record into ``path``. ``stop()`` ends it."""
    global _active
    if _active is not None:
        raise RuntimeError(f"a trace into {_active.path} is already on")
    _active = Tracer(path, keep)
    return _active


def stop() -> None:
    """Turn tracing off and finish the files; channels that were recording pass straight through."""
    global _active
    tracer, _active = _active, None
    if tracer is not None:
        tracer.close()


@contextlib.contextmanager
def trace(path: str | Path, keep: int = 1000) -> Iterator[Tracer]:
    """Record what channels opened inside the block do, into ``path`` (Chrome/Perfetto JSON)
    and its ``.txt`` log; written out when the block ends."""
    tracer = start(path, keep)
    try:
        yield tracer
    finally:
        stop()
