"""The access interface: everything a driver may use to touch hardware.

Drivers import this module and nothing else from the harness (besides the
exceptions in :mod:`harness.errors`, which are part of the contract). Two
transports implement it: the proxy (a guest CPU performs each access) and
qtest (QEMU performs it with the guest CPU stopped).

The pieces:

- :class:`Access`: one operation (read, write or poll) in one address space;
- :class:`Channel`: a transport's connection for one device, confined to that
  device's grants; it executes accesses, one at a time or as a batch;
- :class:`Region`: a window of one space (a BAR, a port range, config space)
  with ``read32(offset)``-style methods, checked against its size on the host;
- :class:`PciFunction` / :class:`Bar`: what the bus found;
- :class:`Device`: an opened PCI function, its BARs and config space;
- :class:`Bus`: finds functions and opens channels;
- :class:`Irq`: a channel's interrupt: ``wait``, ``ack``, handlers, counters;
- :class:`DmaBuffer`: memory a device can reach, from ``Device.dma_alloc``: each
  opened device has a DMA domain of its own, and with the IOMMU on it can
  reach that and nothing else.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import dataclasses
import enum
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Mapping, NamedTuple, Sequence

from .errors import DeviceNotFound, DeviceTimeout, DmaFaultRecord

PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30       # prctl(2)
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class Deadline:
    """A point in time to give up at: ``remaining`` shrinks to 0, ``expired`` turns true."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    @property
    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end


def spin_until(done: Callable[[], bool], seconds: float) -> bool:
    """Poll memory the host has mapped (a completion entry a device wrote by DMA) for up to
    ``seconds``, giving the core away each time round (the vCPU and QEMU's main loop want
    the machine's cores too); whether ``done()`` came true. No round trip: the caller
    falls back to a guest-side wait, which also reports posted batches' failures."""
    if done():
        return True
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        os.sched_yield()
        if done():
            return True
    return False


NAP_SLACK_NS = 1000     # a napping waiter's timer slack: Linux's default, 50 us, ends a 20 us nap at 70


@contextlib.contextmanager
def timer_slack(nanoseconds: int = NAP_SLACK_NS) -> Iterator[None]:
    """This thread's timer slack (how late the kernel may end its sleeps) for a ``with``."""
    before = _prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
    if before < 0 or _prctl(PR_SET_TIMERSLACK, nanoseconds, 0, 0, 0) < 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_TIMERSLACK) failed")
    try:
        yield
    finally:
        _prctl(PR_SET_TIMERSLACK, before, 0, 0, 0)


class Space(enum.Enum):
    """An address space an access goes to."""

    PIO = "pio"        # x86 I/O ports
    MMIO = "mmio"      # guest-physical memory-mapped registers
    CONFIG = "config"  # the channel's own PCI configuration space (offsets)
    DMA = "dma"        # memory from Bus.dma_alloc, by DmaBuffer.phys: polls only (wait for what a device wrote)

    # Members are singletons compared by identity: hash them so too. Enum's own hash is a Python
    # call on every lookup keyed by a member, and a channel looks one up for each access it encodes.
    __hash__ = object.__hash__


class Kind(enum.Enum):
    READ = "read"
    WRITE = "write"
    POLL = "poll"                   # read until (value & mask) == expect, guest-side, with a timeout
    POLL_CHANGE = "poll-change"     # read until (value & mask) != expect: until it leaves a known state

    __hash__ = object.__hash__      # as Space's

    @property
    def polls(self) -> bool:
        return self is Kind.POLL or self is Kind.POLL_CHANGE


# PCI 3.0 6.2.2: the command register and the two bits Device turns on. The contract reads no
# guest ELF, so these three are typed here as well as in guests/proxy/abi.h; tests/unit/test_abi.py
# checks that the two agree.
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 0x2, 0x4   # memory space decode, bus master

WIDTHS = {Space.PIO: (1, 2, 4), Space.MMIO: (1, 2, 4, 8), Space.CONFIG: (1, 2, 4), Space.DMA: (1, 2, 4, 8)}


@dataclass(frozen=True)
class Access:
    """One operation. ``timeout`` is in seconds and matters only for polls."""

    kind: Kind
    space: Space
    addr: int
    width: int
    value: int = 0
    mask: int = 0
    expect: int = 0
    timeout: float = 0.0

    def __str__(self) -> str:
        s = f"{self.kind.value} {self.space.value} {self.addr:#x} width {self.width}"
        if self.kind is Kind.WRITE:
            s += f" value {self.value:#x}"
        if self.kind.polls:
            s += (f" until & {self.mask:#x} {'!=' if self.kind is Kind.POLL_CHANGE else '=='} {self.expect:#x}"
                  f" within {self.timeout:g} s")
        return s

    def satisfied_by(self, value: int) -> bool:
        """Whether a poll stops at ``value``."""
        return (value & self.mask == self.expect) != (self.kind is Kind.POLL_CHANGE)


class IrqMode(enum.Enum):
    """Which interrupt of a channel's device to take."""

    INTX = "intx"      # the PCI INTx line: level, masked until every channel on it acks
    MSI = "msi"        # the PCI device's MSI, 1, 2 or 4 messages (an Irq each): edge, never masked
    MSIX = "msix"      # the PCI device's MSI-X table entries 0..n-1, one Irq each: edge, never masked
    ISA = "isa"        # an ISA IRQ, for a port-range channel: edge


class IrqEvent(NamedTuple):
    """What ``Irq.wait`` returns (a named tuple: a frozen dataclass cost 1-2 µs to build,
    a third of an interrupt's whole path from the device to Python).

    ``count`` is the running count of interrupts delivered to the channel (as
    UIO's read returns); ``new`` how many arrived since the previous wait
    returned, so ``new > 1`` means some arrived while the driver was still
    busy with the last one. ``guest_tsc`` is the guest's TSC at handler entry
    of the latest; ``host_ns`` is ``time.perf_counter_ns()`` when the wait saw it.
    """

    count: int
    new: int
    guest_tsc: int
    host_ns: int


class Irq(abc.ABC):
    """A channel's interrupt, enabled by ``Channel.interrupt``."""

    def __init__(self) -> None:
        self.handlers: list[Callable[[IrqEvent], None]] = []
        self.delivered = 0      # interrupts seen by wait()
        self.missed = 0         # of those, ones that arrived before the previous was handled

    @abc.abstractmethod
    def wait(self, timeout: float) -> IrqEvent:
        """Block until an interrupt newer than the last one returned; InterruptTimeout after ``timeout`` s."""

    @abc.abstractmethod
    def ack(self) -> None:
        """Done with the interrupt: a level line is unmasked (once every channel on it has acked)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Detach from the interrupt. Idempotent."""

    def _count(self, event: IrqEvent) -> IrqEvent:
        self.delivered += event.new
        self.missed += event.new - 1
        return event

    def on(self, handler: Callable[[IrqEvent], None]) -> None:
        """Call ``handler(event)`` for every interrupt that :meth:`dispatch` waits for."""
        self.handlers.append(handler)

    def dispatch(self, timeout: float) -> IrqEvent:
        """Wait for one interrupt and run every handler on it, in this thread, in order."""
        event = self.wait(timeout)
        for handler in self.handlers:
            handler(event)
        return event


class Channel(abc.ABC):
    """A transport's connection for one device. Accesses run in order.

    ``spin`` is how long a transport may busy-wait for a completion before it
    sleeps. On a machine with few cores a device whose operations take long
    (a disk) runs faster when the waiting host gives its core back.

    ``guest_spin`` is how long a transport's guest, which carries the channel's
    requests, goes on looking for the next one before it halts (the proxy's: 0.2 ms
    by default, see ProxyChannel.guest_spin). A driver whose requests come when
    others send them (frames off a wire, a block server's clients) sets 0. A
    transport without such a guest (qtest) ignores it.
    """

    spin: float = 0.0
    guest_spin: float = 0.0

    @abc.abstractmethod
    def execute(self, accesses: Sequence[Access]) -> list[int]:
        """Run every access in order and return one value per access
        (what was read; 0 for writes). The first failure raises its typed
        :class:`~harness.errors.ProxyError`, naming the access."""

    def read(self, space: Space, addr: int, width: int) -> int:
        return self.execute([Access(Kind.READ, space, addr, width)])[0]

    def write(self, space: Space, addr: int, width: int, value: int) -> None:
        self.execute([Access(Kind.WRITE, space, addr, width, value)])

    def poll(self, space: Space, addr: int, width: int, mask: int, expect: int,
             timeout: float) -> int:
        """Wait, without leaving the guest, until ``(read & mask) == expect``.
        Returns the matching value; raises DeviceTimeout with the last one."""
        return self.execute([Access(Kind.POLL, space, addr, width, 0, mask, expect, timeout)])[0]

    def prepare(self, accesses: Sequence[Access]) -> "Prepared":
        """A batch to run many times; a transport may encode it once (the proxy does)."""
        return Prepared(self, accesses)

    # Asynchronous use. A transport that can (the proxy) lets these batches run while the
    # caller goes on; here each runs at once, which keeps every promise below.

    def post(self, accesses: Sequence[Access]) -> None:
        """Run a batch nobody waits for (a doorbell, a tail pointer). Its failure is raised,
        typed and naming the access, by the channel's next waited request (any read, write,
        poll, batch, ``Pending.wait`` or ``flush``), or here."""
        self.execute(accesses)

    def start(self, accesses: Sequence[Access]) -> "Pending":
        """Begin a batch and return at once; ``wait()`` on the result returns its values.
        Several may be in flight on a channel; they complete in the order they started,
        before any request started after them."""
        return Pending(self.execute(accesses))

    def flush(self) -> None:
        """Wait until every posted and started batch is done; raise a posted batch's failure."""

    def accessor(self, kind: Kind, space: Space) -> Callable[[int, int, int], int]:
        """A callable ``(width, addr, value) -> int`` doing one read or write.

        Regions bind one of each when they are made, so the per-access cost
        is a single call; a transport may return something faster than this.
        """
        def access(width: int, addr: int, value: int) -> int:
            return self.execute([Access(kind, space, addr, width, value)])[0]
        return access

    def interrupt(self, mode: IrqMode, isa_irqs: Sequence[int] = ()) -> Irq:
        """Enable and take the device's interrupt, or for a port range the ISA IRQs ``isa_irqs``
        (one Irq for all of them: the i8042's 1 and 12, say)."""
        raise NotImplementedError(f"{type(self).__name__} does not deliver interrupts")

    domain: "DmaDomain | None" = None       # the device's DMA memory, where the transport lends any

    def dma_faults(self) -> "DmaFaultRecord | None":
        """The latest DMA the device tried outside its domain (and how many so far), or None."""
        return None

    def check_alive(self) -> None:
        """Raise MachineError if the machine behind the channel is gone (for a driver that
        waits on the device without a request through the channel)."""

    def new_eventfds(self, expected: int) -> ContextManager[list[int]]:
        """The eventfds the machine's emulator attaches to the device's registers while the
        block runs (QEMU's ioeventfds: see :mod:`harness.machine.ioeventfd`), taken into this
        process: exactly ``expected`` of them or none. None where the transport has no QEMU
        process to take them from."""
        return contextlib.nullcontext([])

    def interrupts(self, mode: IrqMode, count: int) -> list[Irq]:
        """Enable the device's interrupt with ``count`` vectors (several: MSI-X entries 0..count-1),
        one Irq each with its own counter; closing the last of them disables the interrupt."""
        if count != 1:
            raise NotImplementedError(f"{type(self).__name__} delivers one vector per channel")
        return [self.interrupt(mode)]

    def close(self) -> None:
        """Give the grants back. Idempotent."""

    # The names drivers gave registers, by (space, address); a channel's own dict from the first
    # name on (a transport's channel need not call any __init__ of this class).
    register_names: "dict[tuple[Space, int], str] | None" = None

    def name_registers(self, space: Space, names: Mapping[int, str]) -> None:
        """Remember register names by address (``Region.name_registers`` calls this once per region);
        a trace of this channel's accesses shows them."""
        if self.register_names is None:
            self.register_names = {}
        self.register_names.update({(space, addr): name for addr, name in names.items()})

    def register_name(self, space: Space, addr: int) -> str:
        """The name a driver gave the register at ``addr``, or ""."""
        return self.register_names.get((space, addr), "") if self.register_names else ""


class Prepared:
    """A fixed batch: ``run()`` executes it and returns one value per access.

    ``run(values)`` may swap in a new value for some accesses, by index: the
    shape stays fixed, the numbers written (a queue's fresh tags, say) vary."""

    def __init__(self, channel: Channel, accesses: Sequence[Access]) -> None:
        self.channel = channel
        self.accesses = list(accesses)
        self._results: list[int] | None = None

    def with_values(self, values: Mapping[int, int]) -> list[Access]:
        """The accesses with ``values`` swapped in, each checked against its width."""
        accesses = list(self.accesses)
        for i, value in values.items():
            if not 0 <= i < len(accesses):
                raise ValueError(f"no access {i} of {len(accesses)} to take the value {value:#x}")
            a = accesses[i]
            if not 0 <= value < 1 << (8 * a.width):
                raise ValueError(f"{a}: value {value:#x} does not fit {a.width} bytes")
            accesses[i] = dataclasses.replace(a, value=value)
        return accesses

    def run(self, values: Mapping[int, int] | None = None) -> list[int]:
        return self.channel.execute(self.with_values(values) if values else self.accesses)

    def start(self, values: Mapping[int, int] | None = None) -> None:
        """Begin ``run``; ``finish()`` returns its values. A transport may let the device work
        in between (the proxy does) while the caller computes; the channel is not to be
        used meanwhile. Here the whole run happens in ``start``."""
        self._results = self.run(values)

    def finish(self) -> list[int]:
        results, self._results = self._results, None
        if results is None:
            raise RuntimeError("no batch was started")
        return results


class Pending:
    """A batch in flight (``Channel.start``): ``wait()`` returns one value per access, or
    raises the batch's typed error (or an earlier posted batch's)."""

    def __init__(self, values: list[int]) -> None:
        self._values = values

    def wait(self) -> list[int]:
        return self._values


class DmaDomain(abc.ABC):
    """A device's own DMA memory: buffers it can reach, at the addresses to program into it."""

    size: int

    @abc.abstractmethod
    def alloc(self, size: int, align: int = 4096) -> "DmaBuffer":
        """A zeroed buffer; MemoryError when the domain has no room (it names what is free)."""

    @abc.abstractmethod
    def free(self, buffer: "DmaBuffer") -> None:
        """Give a buffer back; ValueError if it is not one of this domain's."""


class Region:
    """A window of one space: offsets are relative to ``base`` and checked against ``size``."""

    def __init__(self, channel: Channel, space: Space, base: int, size: int, name: str = "") -> None:
        self.channel = channel
        self.space = space
        self.base = base
        self.size = size
        self.name = name or f"{space.value}@{base:#x}"
        self._widths = WIDTHS[space]
        self._read = channel.accessor(Kind.READ, space)
        self._write = channel.accessor(Kind.WRITE, space)

    def _check(self, offset: int, width: int) -> None:
        """Raise ValueError for an access that cannot be right."""
        if width not in WIDTHS[self.space]:
            raise ValueError(f"{self.name}: width {width} is not one of {WIDTHS[self.space]}")
        if offset < 0 or offset + width > self.size:
            raise ValueError(f"{self.name}: offset {offset:#x} (+{width}) is outside its {self.size:#x} bytes")

    def access(self, kind: Kind, offset: int, width: int, value: int = 0, mask: int = 0,
               expect: int = 0, timeout: float = 0.0) -> Access:
        """Build an access at ``offset``, refusing what cannot be right before it leaves the host."""
        self._check(offset, width)
        if not 0 <= value < 1 << (8 * width):
            raise ValueError(f"{self.name}: value {value:#x} does not fit {width} bytes")
        return Access(kind, self.space, self.base + offset, width, value, mask, expect, timeout)

    # The register accessors are the hot path of every driver: one check, one call.
    def read(self, offset: int, width: int) -> int:
        if width not in self._widths or not 0 <= offset <= self.size - width:
            self._check(offset, width)
        return self._read(width, self.base + offset, 0)

    def write(self, offset: int, width: int, value: int) -> None:
        if width not in self._widths or not 0 <= offset <= self.size - width:
            self._check(offset, width)
        if not 0 <= value < 1 << (8 * width):
            raise ValueError(f"{self.name}: value {value:#x} does not fit {width} bytes")
        self._write(width, self.base + offset, value)

    def poll(self, offset: int, width: int, mask: int, expect: int, timeout: float) -> int:
        return self.channel.execute([self.access(Kind.POLL, offset, width, 0, mask, expect, timeout)])[0]

    def poll_change(self, offset: int, width: int, mask: int, expect: int, timeout: float) -> int:
        """Wait guest-side until ``(read & mask) != expect``; returns the value that differed."""
        return self.channel.execute([self.access(Kind.POLL_CHANGE, offset, width, 0, mask, expect, timeout)])[0]

    def read8(self, offset: int) -> int:
        if not 0 <= offset < self.size:
            self._check(offset, 1)
        return self._read(1, self.base + offset, 0)

    def read16(self, offset: int) -> int:
        return self.read(offset, 2)

    def read32(self, offset: int) -> int:
        if not 0 <= offset <= self.size - 4:
            self._check(offset, 4)
        return self._read(4, self.base + offset, 0)

    def read64(self, offset: int) -> int:
        return self.read(offset, 8)

    def write8(self, offset: int, value: int) -> None:
        self.write(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        self.write(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        self.write(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        self.write(offset, 8, value)

    def set_bits32(self, offset: int, bits: int) -> int:
        """Read, OR in ``bits``, write back; returns the value written."""
        value = self.read32(offset) | bits
        self.write32(offset, value)
        return value

    def clear_bits32(self, offset: int, bits: int) -> int:
        """Read, clear ``bits``, write back; returns the value written."""
        value = self.read32(offset) & ~bits & 0xFFFFFFFF
        self.write32(offset, value)
        return value

    def wait32(self, offset: int, mask: int, expect: int, timeout: float,
               error: Callable[[str, int], Exception]) -> int:
        """``poll32``, but a timeout raises the caller's own error: ``error(message, last_value)``,
        the message naming the register, what was awaited and what it last read."""
        try:
            return self.poll32(offset, mask, expect, timeout)
        except DeviceTimeout as exc:
            register = self.channel.register_name(self.space, self.base + offset) or f"{self.name}+{offset:#x}"
            raise error(f"{register} & {mask:#x} was not {expect:#x} within {timeout:g} s "
                        f"(last {exc.last_value:#x})", exc.last_value) from exc

    def poll32(self, offset: int, mask: int, expect: int, timeout: float) -> int:
        return self.poll(offset, 4, mask, expect, timeout)

    def name_registers(self, registers: type[enum.IntEnum], offset: int = 0, prefix: str = "") -> None:
        """Declare the names of this region's registers, once, from a driver's regs.py enum:
        each member's value is its offset (plus ``offset``; ``prefix`` goes before the name, as
        ``P0.`` for an AHCI port's block). Aliases share a name: ``STATUS/COMMAND``."""
        names: dict[int, str] = {}
        for name, member in registers.__members__.items():
            addr = self.base + offset + int(member)
            names[addr] = f"{names[addr]}/{name}" if addr in names else prefix + name
        self.channel.name_registers(self.space, names)

    def __repr__(self) -> str:
        return f"<Region {self.name} {self.space.value} {self.base:#x}+{self.size:#x}>"


class Batch:
    """Accesses collected against regions and sent with one notification.

    ``with device.batch() as b: i = b.read32(bar, 8); b.write32(bar, 0xd0, 1)``
    runs on leaving the block; ``b.results[i]`` then holds each value in order.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.accesses: list[Access] = []
        self.results: list[int] = []

    def add(self, access: Access) -> int:
        self.accesses.append(access)
        return len(self.accesses) - 1

    def read(self, region: Region, offset: int, width: int) -> int:
        return self.add(region.access(Kind.READ, offset, width))

    def write(self, region: Region, offset: int, width: int, value: int) -> int:
        return self.add(region.access(Kind.WRITE, offset, width, value))

    def poll(self, region: Region, offset: int, width: int, mask: int, expect: int, timeout: float) -> int:
        return self.add(region.access(Kind.POLL, offset, width, 0, mask, expect, timeout))

    def read32(self, region: Region, offset: int) -> int: return self.read(region, offset, 4)
    def write32(self, region: Region, offset: int, value: int) -> int: return self.write(region, offset, 4, value)

    def run(self) -> list[int]:
        self.results = self.channel.execute(self.accesses)
        return self.results

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.run()


@dataclass(frozen=True)
class DmaBuffer:
    """Memory a device can reach: ``phys`` is the address to program into it, ``view`` the
    same bytes as Python sees them (no copies: the device writes, Python reads)."""

    phys: int
    view: memoryview

    @property
    def size(self) -> int:
        return len(self.view)


@dataclass(frozen=True)
class Bar:
    index: int
    base: int
    size: int
    is_io: bool
    is_64: bool = False
    prefetchable: bool = False


@dataclass(frozen=True)
class PciFunction:
    """A PCI function as the bus enumerated it."""

    bus: int
    dev: int
    fn: int
    vendor: int
    device: int
    class_code: int
    subclass: int
    prog_if: int
    revision: int
    irq_line: int
    irq_pin: int
    bars: tuple[Bar, ...] = ()
    caps: tuple[tuple[int, int], ...] = ()     # (capability id, config offset)

    @property
    def bdf(self) -> str:
        return f"{self.bus:02x}:{self.dev:02x}.{self.fn:x}"

    @property
    def devfn(self) -> int:
        return self.bus << 8 | self.dev << 3 | self.fn

    def __str__(self) -> str:
        return (f"{self.bdf} {self.vendor:04x}:{self.device:04x} class "
                f"{self.class_code:02x}{self.subclass:02x}{self.prog_if:02x}")


@dataclass
class Device:
    """An opened PCI function: its BARs and configuration space, over one channel."""

    function: PciFunction
    channel: Channel
    _regions: dict[int, Region] = field(default_factory=dict)

    def bar(self, index: int) -> Region:
        if index not in self._regions:
            bars = {b.index: b for b in self.function.bars}
            if index not in bars:
                raise ValueError(f"{self.function}: has no BAR{index}")
            b = bars[index]
            space = Space.PIO if b.is_io else Space.MMIO
            self._regions[index] = Region(self.channel, space, b.base, b.size,
                                          f"{self.function.bdf} BAR{index}")
        return self._regions[index]

    @property
    def config(self) -> Region:
        return Region(self.channel, Space.CONFIG, 0, 256, f"{self.function.bdf} config")

    def batch(self) -> Batch:
        return Batch(self.channel)

    def irq(self, mode: IrqMode = IrqMode.INTX) -> Irq:
        """The device's interrupt: INTx (level, shareable) or MSI."""
        return self.channel.interrupt(mode)

    def enable_decoding(self) -> None:
        """Turn on memory decoding (PCI command register), not DMA: the device answers at its
        memory BARs. Reset it before ``enable_dma()``: a device a killed driver left running
        would otherwise go on with its old rings the moment it may DMA again."""
        self.config.write16(PCI_COMMAND, self.config.read16(PCI_COMMAND) | PCI_COMMAND_MEMORY)

    def enable_dma(self) -> None:
        """Turn on memory decoding and bus mastering (PCI command register): the device may
        then answer at its memory BARs and DMA into its domain."""
        self.config.write16(PCI_COMMAND, self.config.read16(PCI_COMMAND) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def dma_alloc(self, size: int, align: int = 4096) -> "DmaBuffer":
        """Memory this device can DMA to and from, zeroed, from its own domain. ``phys`` is
        the address to program into the device (an IOVA; the same with the IOMMU off)."""
        if self.channel.domain is None:
            raise NotImplementedError(f"{self.function}: this transport lends no DMA memory")
        return self.channel.domain.alloc(size, align)

    def dma_free(self, buffer: "DmaBuffer") -> None:
        """Give a buffer back to the device's domain."""
        if self.channel.domain is None:
            raise NotImplementedError(f"{self.function}: this transport lends no DMA memory")
        self.channel.domain.free(buffer)

    def dma_faults(self) -> "DmaFaultRecord | None":
        """The latest DMA the device tried outside its domain (with the running count), or None.
        The channel's next request after a fault raises :class:`~harness.errors.DmaFault`."""
        return self.channel.dma_faults()

    def new_eventfds(self, expected: int) -> ContextManager[list[int]]:
        """``with device.new_eventfds(1) as fds: ...``: the eventfds QEMU attaches to this
        device's registers while the block runs (an NVMe queue created), ``expected`` of them
        or none, taken into this process for the driver to signal and close."""
        return self.channel.new_eventfds(expected)

    def irqs(self, mode: IrqMode, count: int) -> list[Irq]:
        """``count`` vectors of the device's interrupt (MSI-X entries 0..count-1, or MSI
        messages where the device offers several), an Irq each."""
        return self.channel.interrupts(mode, count)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Bus(abc.ABC):
    """Finds PCI functions and opens channels to them."""

    @property
    @abc.abstractmethod
    def functions(self) -> Sequence[PciFunction]:
        """Every PCI function, in enumeration order."""

    @abc.abstractmethod
    def open_channel(self, function: PciFunction, dma_size: int | None = None) -> Channel:
        """A channel granted exactly ``function``'s BARs and config space, and where the
        transport lends DMA memory, a domain of ``dma_size`` bytes (None: its default)."""

    @abc.abstractmethod
    def open_ports(self, base: int, count: int) -> Channel:
        """A channel granted the ISA ports ``base .. base + count - 1``."""

    def find_all(self, vendor: int | None = None, device: int | None = None,
                 class_code: int | None = None, subclass: int | None = None) -> Iterator[PciFunction]:
        for f in self.functions:
            if ((vendor is None or f.vendor == vendor) and (device is None or f.device == device)
                    and (class_code is None or f.class_code == class_code)
                    and (subclass is None or f.subclass == subclass)):
                yield f

    def find(self, vendor: int | None = None, device: int | None = None,
             class_code: int | None = None, subclass: int | None = None) -> PciFunction:
        """The first function that matches; DeviceNotFound (a LookupError) if none does."""
        for f in self.find_all(vendor, device, class_code, subclass):
            return f
        wanted = ", ".join(f"{name} {value:#x}" for name, value in (("vendor", vendor), ("device", device),
                           ("class", class_code), ("subclass", subclass)) if value is not None)
        present = "; ".join(str(f) for f in self.functions) or "none"
        raise DeviceNotFound(f"this machine has no PCI device with {wanted or 'any ID'} (it has: {present})")

    def close(self) -> None:
        """Close every channel this bus opened. Idempotent."""

    def open_channel_sharing(self, function: PciFunction, channel: Channel) -> Channel:
        """A channel to ``function`` whose device DMAs in ``channel``'s domain (a channel this
        bus opened): both devices reach the same buffers, and nothing else."""
        raise NotImplementedError(f"{function}: this transport cannot share a DMA domain")

    def open(self, function: PciFunction, dma_size: int | None = None,
             share_domain_with: Device | None = None) -> Device:
        """Open ``function``; ``dma_size`` is how much DMA memory its domain holds (None: the
        transport's default). ``share_domain_with``: an open device of this bus whose domain
        this one shares instead (as a VFIO container), so a buffer one device received the
        other can send as it is; a device opened apart still reaches nothing of it."""
        if share_domain_with is None:
            return Device(function, self.open_channel(function, dma_size))
        if dma_size is not None:
            raise ValueError(f"{function}: a shared domain has the size it was opened with")
        return Device(function, self.open_channel_sharing(function, share_domain_with.channel))

    def ports(self, base: int, count: int) -> Region:
        """An ISA port range as a region; close it with ``region.channel.close()``."""
        return Region(self.open_ports(base, count), Space.PIO, base, count, f"ports {base:#x}+{count}")
