"""A proxy channel: one ring in the shared window, confined by the guest to one device's grants."""

from __future__ import annotations

import array
import functools
import logging
import struct
from typing import TYPE_CHECKING, Callable, ContextManager, Mapping, Sequence

from ..access import Access, Channel, DmaDomain, IrqMode, Kind, Pending, Prepared, Space
from ..errors import AccessDenied, BadRequest, DeviceTimeout, DmaFault, DmaFaultRecord, ProxyError, ProxyFault
from ..machine.ioeventfd import new_eventfds
from .ring import Ring, reached
from .window import SPIN_SECONDS

if TYPE_CHECKING:
    from .bus import WindowBus
    from .irq import ProxyIrq

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0   # seconds a request may take beyond its own poll timeout


class Flight:
    """A batch published on the ring and not yet collected: entries ``start`` .. ``start +
    count - 1``. ``posted``: nobody waits for it; its failure goes to the channel's next
    waited request. Collected, it holds its ``values`` or its ``error``."""

    __slots__ = ("start", "count", "end", "posted", "timeout", "describe", "values", "error")

    def __init__(self, start: int, count: int, posted: bool, timeout: float,
                 describe: Callable[[int], object]) -> None:
        self.start, self.count, self.end = start, count, (start + count) & 0xFFFFFFFF
        self.posted, self.timeout, self.describe = posted, timeout, describe
        self.values: list[int] | None = None
        self.error: BaseException | None = None


class ProxyPending(Pending):
    """A batch in flight on a proxy channel (``ProxyChannel.start``)."""

    def __init__(self, channel: "ProxyChannel", flight: Flight) -> None:
        self.channel, self.flight = channel, flight

    def wait(self) -> list[int]:
        return self.channel._wait_flight(self.flight)


class ProxyChannel(Channel):
    """Executes accesses through ring ``index`` of the shared window (``ring``).

    Like a socket, a channel serves one thread at a time: the hot path takes
    no lock (a lock costs as much as a fifth of a round trip here).

    Besides the round trips, batches may be in flight (``post``, ``start``): each is a
    Flight, in ring order, collected (statuses read) once the guest has served it, at
    the latest before the ring wraps onto its entries. ``_quiet`` says there are none,
    no failure of a posted batch is waiting to be told, nothing is started and the
    channel is open: then the hot path (``_one``) looks at nothing else.
    """

    def __init__(self, bus: "WindowBus", index: int, name: str, domain: DmaDomain | None = None) -> None:
        self.bus = bus
        self.index = index
        self.name = name
        self.domain = domain
        self._closed = False
        self._flights: list[Flight] = []             # in ring order
        self._deferred: BaseException | None = None   # a posted batch's failure, for the next waited request
        self._quiet = True
        self.spin = SPIN_SECONDS
        w = bus.window
        abi = bus.abi
        self.ring = Ring(w, index)
        self._w = w
        self._mem = w.mem
        self._u16, self._u32, self._u64 = w.u16, w.u32, w.u64
        self._started_batch: tuple | None = None    # a prepared batch published, not yet awaited
        self._continues = abi.PROXY_STATUS_CONTINUES    # marks each entry of a batch after its first
        self._marks = memoryview(array.array("H", [self._continues] * self.ring.size))
        self._ok = abi.PROXY_STATUS_OK
        self._errors = {abi.PROXY_STATUS_DENIED: AccessDenied, abi.PROXY_STATUS_BAD_REQUEST: BadRequest,
                        abi.PROXY_STATUS_TIMEOUT: DeviceTimeout, abi.PROXY_STATUS_FAULT: ProxyFault}
        self._skipped = abi.PROXY_STATUS_SKIPPED
        self._ops: dict[tuple[Kind, Space], int] = {
            (Kind.READ, Space.PIO): abi.PROXY_OP_PIO_READ, (Kind.WRITE, Space.PIO): abi.PROXY_OP_PIO_WRITE,
            (Kind.READ, Space.MMIO): abi.PROXY_OP_MMIO_READ, (Kind.WRITE, Space.MMIO): abi.PROXY_OP_MMIO_WRITE,
            (Kind.READ, Space.CONFIG): abi.PROXY_OP_CFG_READ, (Kind.WRITE, Space.CONFIG): abi.PROXY_OP_CFG_WRITE,
            (Kind.POLL, Space.PIO): abi.PROXY_OP_PIO_POLL, (Kind.POLL, Space.MMIO): abi.PROXY_OP_MMIO_POLL,
            (Kind.POLL_CHANGE, Space.PIO): abi.PROXY_OP_PIO_POLL_CHANGE,
            (Kind.POLL_CHANGE, Space.MMIO): abi.PROXY_OP_MMIO_POLL_CHANGE,
            (Kind.POLL, Space.DMA): abi.PROXY_OP_DMA_POLL,
        }
        self._read_ops = {space: op for (kind, space), op in self._ops.items() if kind is Kind.READ}
        self._write_ops = {space: op for (kind, space), op in self._ops.items() if kind is Kind.WRITE}

    def __repr__(self) -> str:
        return f"<ProxyChannel {self.index} {self.name}>"

    # ---- state the hot path looks at once (_quiet) ----

    def _requiet(self) -> None:
        self._quiet = not (self._closed or self._started_batch is not None or self._flights or self._deferred)

    @property
    def closed(self) -> bool:
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = value
        self._requiet()

    @property
    def _started(self) -> tuple | None:
        return self._started_batch

    @_started.setter
    def _started(self, value: tuple | None) -> None:
        self._started_batch = value
        self._requiet()

    # ---- batches in flight ----

    def _column(self, view: memoryview, start: int, count: int, offset: int) -> list[int]:
        """One field out of entries ``start`` .. ``start + count - 1``, through strided views
        (no Python loop), across the ring's wrap."""
        ring = self.ring
        size, item = ring.entry_size, view.itemsize
        stride = size // item
        first = min(count, ring.size - (start & ring.mask))     # entries before the ring wraps
        lo = (ring.offset(start) + offset) // item
        col = view[lo:lo + first * stride:stride].tolist()
        if first < count:
            lo = (ring.entries_off + offset) // item
            col += view[lo:lo + (count - first) * stride:stride].tolist()
        return col

    def _collect(self, flight: Flight) -> None:
        """Wait until the guest has served ``flight`` and keep what it says."""
        self.ring.wait_past(flight.end, flight.timeout, f"a batch of {flight.count} on {self!r}", self.spin)
        statuses = self._column(self._u16, flight.start, flight.count, self.ring.status_off)
        values = self._column(self._u64, flight.start, flight.count, self.ring.value_off)
        flight.values = values
        if statuses.count(self._ok) != flight.count:
            i = next(i for i, st in enumerate(statuses) if st != self._ok)
            flight.error = self._error(flight.describe(i), statuses[i], values[i])

    def _settle(self, through: Flight | None = None) -> None:
        """Collect the flights up to ``through`` (None: all), oldest first; a posted one's
        failure is kept for the next waited request (the first, if several)."""
        flights = self._flights
        while flights:
            flight = flights.pop(0)
            try:
                self._collect(flight)
            except BaseException:
                flights.insert(0, flight)
                raise
            if flight.posted and flight.error is not None and self._deferred is None:
                self._deferred = flight.error
            if flight is through:
                break
        self._requiet()

    def _raise_deferred(self) -> None:
        error, self._deferred = self._deferred, None
        self._requiet()
        if error is not None:
            raise error

    def _room(self, count: int) -> None:
        """Refuse if closed or a prepared batch is started; else make room in the ring for
        ``count`` more entries, collecting the oldest flights whose entries they would reuse."""
        if self._closed or self._started_batch is not None:
            self._refuse()
        flights, ring = self._flights, self.ring
        if flights and (ring.head + count - flights[0].start) & 0xFFFFFFFF > ring.size:
            self._reclaim()
        while flights and (ring.head + count - flights[0].start) & 0xFFFFFFFF > ring.size:
            self._settle(flights[0])

    def _reclaim(self) -> None:
        """Drop every posted flight at the front that the guest has served, their statuses
        read in one pass: a driver that posts a doorbell a request would otherwise collect
        one old flight per post, once the ring is full (about 2 us each). A failure among
        them is left to ``_settle``, which names it."""
        flights, ring = self._flights, self.ring
        served = ring.served
        n = 0
        for flight in flights:
            if not flight.posted or not reached(served, flight.end):
                break
            n += 1
        if not n:
            return
        start, count = flights[0].start, (flights[n - 1].end - flights[0].start) & 0xFFFFFFFF
        if self._column(self._u16, start, count, ring.status_off).count(self._ok) == count:
            del flights[:n]
            self._requiet()

    def _after_waited(self) -> None:
        """A waited request is done, so everything before it is served: collect it all, and
        raise the failure of a posted batch, if any (an earlier one than the request's own)."""
        if self._flights:
            self._settle()
        self._raise_deferred()

    def _fly(self, accesses: Sequence[Access], posted: bool) -> Flight:
        if not 0 < len(accesses) <= self.ring.size:
            raise ValueError(f"a batch in flight holds 1 to {self.ring.size} accesses, not {len(accesses)}")
        encoded = [self._encode(a) for a in accesses]
        self._room(len(encoded))
        start = self.ring.head
        self._write_entries(start, encoded)
        flight = Flight(start, len(encoded), posted, DEFAULT_TIMEOUT + sum(a.timeout for a in accesses),
                        list(accesses).__getitem__)
        self.ring.publish(len(encoded))
        self._flights.append(flight)
        self._quiet = False
        return flight

    def post(self, accesses: Sequence[Access]) -> None:
        """Publish a batch nobody waits for (a doorbell, a tail pointer); its failure is raised,
        typed, by the channel's next waited request (or ``flush``)."""
        self._fly(accesses, True)

    def start(self, accesses: Sequence[Access]) -> ProxyPending:
        """Publish a batch and return at once; ``wait()`` on the result returns its values.
        Several may be in flight; they complete in order."""
        return ProxyPending(self, self._fly(accesses, False))

    def _wait_flight(self, flight: Flight) -> list[int]:
        if flight.values is None:
            if flight not in self._flights:
                raise RuntimeError(f"{self!r}: that batch is not in flight here")
            self._settle(flight)
        self._raise_deferred()
        if flight.error is not None:
            raise flight.error
        assert flight.values is not None
        return flight.values

    def flush(self) -> None:
        """Wait until every batch in flight is served; raise the failure of a posted one."""
        if self._closed:
            self._refuse()
        self._after_waited()

    # ---- the ring ----

    def _encode(self, a: Access) -> tuple[int, ...]:
        try:
            op = self._ops[a.kind, a.space]
        except KeyError:
            raise ValueError(f"the proxy cannot {a.kind.value} {a.space.value}") from None
        return (op, a.width, 0, int(a.timeout * 1e6), a.addr & (2**64 - 1), a.value & (2**64 - 1),
                a.mask & (2**64 - 1), a.expect & (2**64 - 1))

    def _submit(self, requests: Sequence[tuple[int, ...]], timeout: float = DEFAULT_TIMEOUT,
                what: object = None) -> list[tuple[int, int]]:
        """Publish raw requests (tuples of REQUEST_FIELDS) and return (status, value) for each.

        No status is interpreted here; :meth:`execute` does that. The owner's benches and
        tests reach this and the other requests beyond accesses through :mod:`.raw`. Batches
        larger than the ring go in ring-sized pieces.
        """
        if not self._quiet:
            self._room(self.ring.size)
        out: list[tuple[int, int]] = []
        size = self.ring.size
        for start in range(0, len(requests), size):
            out += self._submit_chunk(requests[start:start + size], timeout, what)
        if not self._quiet:
            self._after_waited()
        return out

    def _publish(self, count: int, timeout: float, what: object) -> None:
        """Hand the next ``count`` entries to the guest and wait until it has served them."""
        self.ring.wait(self.ring.publish(count), timeout, what, self.spin)

    def _refuse(self) -> None:
        if self.closed:
            raise ValueError(f"{self!r} is closed")
        raise RuntimeError(f"{self!r}: a started batch must finish before anything else runs")

    def _submit_raw(self, entries: Sequence[bytes], timeout: float = DEFAULT_TIMEOUT) -> list[tuple[int, int]]:
        """Publish whole ring entries exactly as given, garbage included (for testing the
        proxy's validation), one batch each; return (status, value) for each."""
        if not self._quiet:
            self._room(self.ring.size)
            self._after_waited()
        ring = self.ring
        out = []
        for raw in entries:
            if len(raw) != ring.entry_size:
                raise ValueError(f"a ring entry is {ring.entry_size} bytes, not {len(raw)}")
            seq = ring.head
            slot = ring.offset(seq)
            # All of it but the publication word, which is publish()'s: garbage there could
            # publish the entry, with any count, before it is whole.
            word = ring.published_off
            self._mem[slot:slot + word] = raw[:word]
            self._mem[slot + word + 8:slot + ring.entry_size] = raw[word + 8:]
            self._publish(1, timeout, "a raw ring entry")
            out.append((ring.status(seq), ring.value(seq)))
        return out

    def prepare(self, accesses: Sequence[Access]) -> "PreparedBatch":
        """Encode a batch once to run it many times (at most one ring's worth)."""
        return PreparedBatch(self, accesses)

    def _start_prepared(self, batch: "PreparedBatch", patch: Mapping[int, int] | None) -> None:
        """Copy the batch in and publish it; ``_finish_prepared`` waits for it. In between the
        guest works while the caller may compute, but may not use the channel."""
        if not self._quiet:
            self._room(batch.count)
        ring = self.ring
        n, size, entries = batch.count, ring.entry_size, ring.entries_off
        for i, value in (patch or {}).items():    # checked before anything is written
            if not 0 <= i < n or not 0 <= value < batch.limits[i]:
                raise ValueError(f"no access {i} of {n} takes the value {value:#x}")
        start = ring.head
        first = min(n, ring.size - (start & ring.mask))     # entries before the ring wraps
        base = ring.offset(start)
        self._mem[base:base + first * size] = batch.blob[:first * size]
        if first < n:
            self._mem[entries:entries + (n - first) * size] = batch.blob[first * size:]
        for i, value in (patch or {}).items():
            self._u64[(ring.offset(start + i) + ring.value_off) >> 3] = value
        self._started = (batch, patch, ring.publish(n), base, first)

    def _finish_prepared(self) -> list[int]:
        if self._started is None:
            raise RuntimeError(f"{self!r}: no batch was started")
        batch, patch, head, _, _ = self._started
        self._started = None
        flight = Flight((head - batch.count) & 0xFFFFFFFF, batch.count, False, batch.timeout,
                        lambda i: batch.with_values(patch or {})[i])
        if self._flights:                   # after the flights before it: collected in order
            self._flights.append(flight)
            self._settle()
        else:
            self._collect(flight)
        if self._deferred is not None:
            self._raise_deferred()
        if flight.error is not None:
            raise flight.error
        assert flight.values is not None
        return flight.values

    def _submit_chunk(self, requests: Sequence[tuple[int, ...]], timeout: float,
                      what: object) -> list[tuple[int, int]]:
        slots = self._write_entries(self.ring.head, requests)
        self._publish(len(requests), timeout, what or f"{len(requests)} requests on {self!r}")
        ring, u16, u64 = self.ring, self._u16, self._u64
        status, value = ring.status_off, ring.value_off
        return [(u16[(s + status) >> 1], u64[(s + value) >> 3]) for s in slots]

    def _write_entries(self, head: int, requests: Sequence[tuple[int, ...]]) -> list[int]:
        """Fill the entries from ``head`` on with one batch (its first marked); nothing is
        published. Returns where each entry is."""
        ring = self.ring                # Ring.write, inlined: batches of any size
        mem, pack, size, mask, entries = self._mem, ring.pack, ring.entry_size, ring.mask, ring.entries_off
        slots = []
        for i, r in enumerate(requests):
            slot = entries + ((head + i) & mask) * size
            pack(mem, slot, *r)
            slots.append(slot)
        self._mark_continuing(head, slots)
        return slots

    def _mark_continuing(self, start: int, slots: list[int]) -> None:
        """Mark the entries after the first of the batch at ``start`` (at ``slots``) as
        continuing it: a doorbell's few one store each, more by strided stores (no Python
        loop) across the ring's wrap."""
        ring, u16 = self.ring, self._u16
        if len(slots) <= 4:
            status, continues = ring.status_off, self._continues
            for slot in slots[1:]:
                u16[(slot + status) >> 1] = continues
            return
        first, left = start + 1, len(slots) - 1
        stride = ring.entry_size // 2
        while left > 0:
            k = min(left, ring.size - (first & ring.mask))
            lo = (ring.offset(first) + ring.status_off) >> 1
            u16[lo:lo + k * stride:stride] = self._marks[:k]
            first, left = first + k, left - k

    def _one(self, op: int, width: int, addr: int, value: int = 0) -> int:
        """The hot path: one request, no objects built unless it fails."""
        quiet = self._quiet
        if not quiet:
            self._room(1)
        ring = self.ring                # Ring.write and .publish, inlined: this is every register access
        head = ring.head
        slot = ring.entries_off + (head & ring.mask) * ring.entry_size
        ring.pack_short(self._mem, slot, op, width, 0, 0, addr, value)
        self._u64[ring.published_base + (head & ring.mask) * ring.published_stride] = ~(head >> ring.lap_shift) & 0xFFFFFFFF | 1 << 32
        ring.head = (head + 1) & 0xFFFFFFFF
        if self._u32[self._w.guest_sleeping_idx]:      # read here too: an awake guest costs no call
            self._w.kick_if_sleeping()
        u16, st = self._u16, (slot + ring.status_off) >> 1
        spins = 0
        while not u16[st]:
            spins += 1
            if spins > 256:
                self._w.wait(lambda: u16[st] != 0, DEFAULT_TIMEOUT, self._describe(op, width, addr, value),
                             self.index, spin=self.spin)
                break
        status = u16[st]
        result = self._u64[(slot + ring.value_off) >> 3]
        if not quiet:
            self._after_waited()
        if status != self._ok:
            self._raise(self._describe(op, width, addr, value), status, result)
        return result

    def _describe(self, op: int, width: int, addr: int, value: int) -> object:
        for (kind, space), code in self._ops.items():
            if code == op:
                return Access(kind, space, addr, width, value)
        return f"op {op} width {width} addr {addr:#x} value {value:#x}"

    def new_eventfds(self, expected: int) -> ContextManager[list[int]]:
        return new_eventfds(self._w.machine.qemu_pid, expected)

    def check_alive(self) -> None:
        self._w.machine.check_alive()

    def dma_faults(self) -> DmaFaultRecord | None:
        abi = self.bus.abi
        f = abi.decode("proxy_dma_fault", self._mem,
                       self._w.dma_faults_off + self.index * abi.sizeof("proxy_dma_fault"))
        if not f["count"]:
            return None
        source = f["source_id"]
        return DmaFaultRecord(f["count"], f"{source >> 8:02x}:{source >> 3 & 31:02x}.{source & 7}", f["addr"],
                              bool(f["write"]), f["reason"])

    def _raise(self, what: object, status: int, value: int) -> None:
        raise self._error(what, status, value)

    def _error(self, what: object, status: int, value: int) -> ProxyError:
        """The typed error for ``what`` ending in ``status``."""
        if status == self.bus.abi.PROXY_STATUS_DMA_FAULT:
            fault = self.dma_faults()
            assert fault is not None, "a DMA fault status with no fault recorded"
            return DmaFault(what, status, fault)
        register = self.register_name(what.space, what.addr) if isinstance(what, Access) else ""
        return self._errors.get(status, ProxyError)(what, status, value, register)

    # ---- the access interface ----

    def execute(self, accesses: Sequence[Access]) -> list[int]:
        if len(accesses) == 1 and not accesses[0].kind.polls:
            a = accesses[0]
            return [self._one(self._encode(a)[0], a.width, a.addr, a.value)]
        encoded = [self._encode(a) for a in accesses]
        results = self._submit(encoded, DEFAULT_TIMEOUT + sum(a.timeout for a in accesses),
                              accesses[0] if len(accesses) == 1 else None)
        for a, (status, value) in zip(accesses, results):
            if status != self._ok:
                assert status != self._skipped, "a skip without an earlier failure"
                self._raise(a, status, value)
        return [value for _, value in results]

    def accessor(self, kind: Kind, space: Space) -> Callable[[int, int, int], int]:
        if kind.polls:
            return super().accessor(kind, space)
        return functools.partial(self._one, self._ops[kind, space])

    def read(self, space: Space, addr: int, width: int) -> int:
        return self._one(self._read_ops[space], width, addr, 0)

    def write(self, space: Space, addr: int, width: int, value: int) -> None:
        self._one(self._write_ops[space], width, addr, value)

    def _control(self, op: int, addr: int, value: int, what: str, mask: int = 0, expect: int = 0) -> int:
        """One request that is not an access (open, close, interrupt control); raises on failure."""
        (status, result), = self._submit([(op, 0, 0, 0, addr, value, mask, expect)], what=what)
        if status != self._ok:
            self._raise(what, status, result)
        return result

    def interrupt(self, mode: IrqMode, isa_irqs: Sequence[int] = ()) -> "ProxyIrq":
        from .irq import enable
        return enable(self, mode, isa_irqs)[0]

    def interrupts(self, mode: IrqMode, count: int) -> list["ProxyIrq"]:
        from .irq import enable
        return enable(self, mode, count=count)

    @property
    def guest_spin(self) -> float:
        """Seconds the proxy's idle loop goes on looking for work after this channel's last
        request before it halts (0.2 ms when the channel opens). A driver that issues its
        commands back to back finds the guest up; one whose requests come further apart (a
        block server's, when its clients send them) sets 0: each request then pays a kick,
        tens of microseconds, and the vCPU's core goes meanwhile to the threads the request
        needs. The guest spins as long as the longest ask of the channels it served since
        it last halted, and the default after a wake-up that brought no request (a device's
        interrupt), so a channel's 0 is not a promise while others keep the default."""
        return self._u32[self.ring.idle_spin_idx] / 1e6

    @guest_spin.setter
    def guest_spin(self, seconds: float) -> None:
        abi = self.bus.abi
        if self._closed:
            self._refuse()                  # the ring's ask is its next owner's
        if not 0 <= seconds * 1e6 <= abi.PROXY_IDLE_SPIN_MAX_US:
            raise ValueError(f"the proxy spins 0 to {abi.PROXY_IDLE_SPIN_MAX_US} us after a channel's "
                             f"request, not {seconds * 1e6:g}")
        self._u32[self.ring.idle_spin_idx] = round(seconds * 1e6)
        # the guest goes to halt after nearly every request: a lost kick would strand a doorbell
        self.ring.fenced = seconds * 1e6 < abi.PROXY_IDLE_SPIN_US

    @property
    def last_start_tsc(self) -> int:
        """Guest TSC just before the most recent request on this channel was carried out."""
        return self.ring.start_tsc(self.ring.head - 1)

    def guest_time(self) -> int:
        """The guest's TSC, read by serving a NOP."""
        self._one(self.bus.abi.PROXY_OP_NOP, 0, 0)
        return self.last_start_tsc

    def close(self) -> None:
        if self.closed:
            return
        if self._started is not None:             # let a started batch end before the grants go
            try:
                self._finish_prepared()
            except Exception as exc:
                log.debug("closing %r: its started batch ended with %s", self, exc)
        try:                                      # and batches in flight
            self._after_waited()
        except Exception as exc:
            log.debug("closing %r: a batch in flight ended with %s", self, exc)
        self.closed = True
        self.bus.close_channel(self)


class PreparedBatch(Prepared):
    """A batch encoded once into ring-entry bytes; ``run()`` copies it in and returns the values."""

    def __init__(self, channel: ProxyChannel, accesses: Sequence[Access]) -> None:
        ring = channel.ring
        if not 0 < len(accesses) <= ring.size:
            raise ValueError(f"a prepared batch holds 1 to {ring.size} accesses, not {len(accesses)}")
        self.channel = channel
        self.accesses = list(accesses)
        self.count = len(accesses)
        blob = bytearray()
        for a in accesses:
            packed = bytearray(ring.entry_size)
            ring.pack(packed, ring.first_off, *channel._encode(a))
            blob += packed
        for i in range(1, len(accesses)):          # one batch: every entry after the first continues it
            struct.pack_into("<H", blob, i * ring.entry_size + ring.status_off, channel._continues)
        self.blob = bytes(blob)
        self.limits = [1 << (8 * a.width) for a in accesses]
        self.timeout = DEFAULT_TIMEOUT + sum(a.timeout for a in accesses)   # as execute() allows

    def run(self, values: Mapping[int, int] | None = None) -> list[int]:
        self.channel._start_prepared(self, values)
        return self.channel._finish_prepared()

    def start(self, values: Mapping[int, int] | None = None) -> None:
        self.channel._start_prepared(self, values)

    def finish(self) -> list[int]:
        return self.channel._finish_prepared()
