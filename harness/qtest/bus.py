"""The qtest transport: the access interface over QEMU's qtest protocol, guest CPU stopped.

QEMU itself performs every access (``readl``, ``outb`` ... on the qtest
socket), so there is no guest to enumerate PCI or to enforce grants. This
module does both on the host:

- :class:`QtestBus` enumerates PCI through ports 0xcf8/0xcfc, numbers the
  buses behind bridges, sizes and assigns every BAR (no firmware ever ran),
  enables decoding, and publishes the same :class:`~harness.access.PciFunction`
  records the proxy does;
- :class:`QtestChannel` applies the proxy's grant rules in Python (the
  function's BARs and config space, or one ISA port range) and raises the
  same typed errors, so a driver behaves alike on both transports.

It is the baseline the proxy is benchmarked against, so the register hot
path (:meth:`QtestChannel.accessor`) is one check, one command and one reply.

``with QtestMachine(qtest_spec()) as qm: qm.bus.find(vendor=0x8086)``
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from ..access import Access, Bar, Bus, Channel, Kind, PciFunction, Space
from ..errors import (AccessDenied, BadRequest, DeviceTimeout, HarnessError, MachineError, ProxyFault,
                     ProxyUnresponsive)
from ..machine import Machine
from ..machine.legacy import grantable
from ..proxy.abi import Abi, load_abi
from ..proxy.guest import guest_elf

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0          # seconds QEMU may take to answer one command

# Where BARs go: no firmware assigned anything, so we do, below the IOAPIC.
MEM_START, MEM_END = 0xE000_0000, 0xFEC0_0000
IO_START, IO_END = 0xC000, 0x1_0000
BRIDGE_MEM_ALIGN, BRIDGE_IO_ALIGN = 1 << 20, 1 << 12



@functools.cache
def _proxy_rules() -> Abi:
    """The proxy's limits, reserved ports, read-only config fields and PCI registers, which
    this transport applies and uses too: read from the proxy guest's ABI (guests/proxy/abi.h),
    never retyped."""
    return load_abi(guest_elf())


# A bridge's routing registers (PCI-to-PCI Bridge 1.2, 3.2): only this transport programs
# them (the proxy runs after the firmware has); the registers both use come from the ABI.
PCI_PRIMARY_BUS = 0x18
PCI_IO_BASE, PCI_IO_LIMIT, PCI_IO_BASE_UPPER = 0x1C, 0x1D, 0x30
PCI_MEMORY_BASE, PCI_MEMORY_LIMIT = 0x20, 0x22
PCI_PREF_BASE, PCI_PREF_LIMIT, PCI_PREF_BASE_UPPER, PCI_PREF_LIMIT_UPPER = 0x24, 0x26, 0x28, 0x2C

_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
_MAX_WIDTH = {Space.PIO: 4, Space.MMIO: 8, Space.CONFIG: 4, Space.DMA: 8}
# Commands, preformatted: the hot path only fills in numbers.
_READ_CMDS = {
    Space.PIO: {1: b"inb 0x%x\n", 2: b"inw 0x%x\n", 4: b"inl 0x%x\n"},
    Space.MMIO: {1: b"readb 0x%x\n", 2: b"readw 0x%x\n", 4: b"readl 0x%x\n", 8: b"readq 0x%x\n"},
}
_WRITE_CMDS = {
    Space.PIO: {1: b"outb 0x%x 0x%x\n", 2: b"outw 0x%x 0x%x\n", 4: b"outl 0x%x 0x%x\n"},
    Space.MMIO: {1: b"writeb 0x%x 0x%x\n", 2: b"writew 0x%x 0x%x\n", 4: b"writel 0x%x 0x%x\n",
                 8: b"writeq 0x%x 0x%x\n"},
}
_CFG_READ = {1: b"inb 0x%x\n", 2: b"inw 0x%x\n", 4: b"inl 0x%x\n"}
_CFG_WRITE = {1: b"outb 0x%x 0x%x\n", 2: b"outw 0x%x 0x%x\n", 4: b"outl 0x%x 0x%x\n"}


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


@dataclass
class _Info:
    """What the bus keeps about a function beyond what it publishes."""

    function: PciFunction
    header_type: int


class QtestBus(Bus):
    """PCI functions as this bus enumerated and assigned them, and channels to them.

    Every channel shares the machine's one qtest socket, so each exchange
    holds a lock: channels of different devices may be used from different
    threads (a channel itself, like the proxy's, serves one thread at a time).
    """

    def __init__(self, machine: Machine, sock: socket.socket | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if sock is None:
            raise MachineError(f"{machine.name} has no qtest connection: build its spec with qtest_spec()")
        self.machine = machine
        self._sock = sock
        # A deadline per exchange: a QEMU that stops answering must not hang the harness.
        sock.settimeout(timeout)
        self.timeout = timeout
        self._rfile = sock.makefile("rb")
        self._send = sock.sendall
        self._readline = self._rfile.readline
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._closed = False
        self._open: dict[int, QtestChannel] = {}        # devfn -> channel
        self._isa: list[QtestChannel] = []
        self._info: dict[int, _Info] = {}
        self._rules = _proxy_rules()
        self._pci = self._rules.names("PROXY_PCI_")
        self._functions = tuple(self._enumerate())
        for f in self._functions:
            log.info("%s bars %s caps %s", f,
                     ", ".join(f"{b.index}:{'io' if b.is_io else 'mem'}@{b.base:#x}+{b.size:#x}"
                               for b in f.bars) or "-",
                     ", ".join(f"{cid:#x}@{off:#x}" for cid, off in f.caps) or "-")

    # ---- the wire ----

    def _io_error(self, exc: BaseException, what: object) -> HarnessError:
        """The connection failed mid-exchange: break it for good (a late reply would desynchronise it)."""
        if self._broken is None:
            self._broken = f"{type(exc).__name__} during {what}"
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if isinstance(exc, TimeoutError) and self.machine.alive():
            return ProxyUnresponsive(f"QEMU did not answer {what} within {self.timeout:g} s over qtest")
        return self._dead(what)

    def _dead(self, what: object) -> HarnessError:
        code = self.machine.process.poll() if self.machine.process else None
        if self._broken:
            message = f"the qtest connection is broken ({self._broken}); {what} was not run"
        else:
            message = f"QEMU closed the qtest connection during {what}"
        return MachineError(message, self.machine.argv, self.machine.output(), code)

    def _odd_reply(self, line: bytes, want_value: bool, what: Callable[[], object]) -> bytes:
        """Anything but the expected ``OK`` line: skip IRQ notices, turn the rest into errors.

        Called with the lock held; ``what`` builds the description only if needed.
        """
        while True:
            if line.startswith(b"IRQ"):
                # Asynchronous notices (irq_intercept); nothing here asks for them.
                log.debug("qtest: %s", line.rstrip().decode(errors="replace"))
                try:
                    line = self._readline()
                except OSError as exc:
                    raise self._io_error(exc, what()) from exc
                continue
            if not line:
                raise self._dead(what())
            if line.startswith(b"FAIL"):
                raise ProxyFault(what(), 0, 0)
            if want_value and line.startswith(b"OK 0x") or not want_value and line.rstrip() == b"OK":
                return line
            # A reply of the wrong shape means the stream is out of step: stop trusting it.
            raise self._io_error(ValueError(f"unexpected reply {line!r}"), what())

    def _exchange(self, commands: Sequence[bytes], want_values: Sequence[bool], what: object) -> list[bytes]:
        """Send several commands at once (QEMU answers in order) and return their reply lines."""
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        out = []
        with self._lock:
            try:
                self._send(b"".join(commands))
                for want in want_values:
                    line = self._readline()
                    if not (line.startswith(b"OK 0x") if want else line == b"OK\n"):
                        line = self._odd_reply(line, want, lambda: what)
                    out.append(line)
            except OSError as exc:
                raise self._io_error(exc, what) from exc
        return out

    # ---- configuration space, through 0xcf8/0xcfc as the proxy does ----

    @staticmethod
    def _cfg_addr(bus: int, dev: int, fn: int, off: int) -> int:
        return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (off & 0xFC)

    @staticmethod
    def _cfg_port(off: int, width: int) -> int:
        return 0xCFC + (off & 3 if width == 1 else off & 2 if width == 2 else 0)

    def cfg_read(self, bus: int, dev: int, fn: int, off: int, width: int) -> int:
        """Read config space of any function: no grants apply (the bus's own use)."""
        select = b"outl 0xcf8 0x%x\n" % self._cfg_addr(bus, dev, fn, off)
        _, reply = self._exchange((select, _CFG_READ[width] % self._cfg_port(off, width)), (False, True),
                                  f"config read {bus:02x}:{dev:02x}.{fn:x} {off:#x} width {width}")
        return int(reply[3:], 16)

    def cfg_write(self, bus: int, dev: int, fn: int, off: int, width: int, value: int) -> None:
        """Write config space of any function: no grants apply (the bus's own use)."""
        select = b"outl 0xcf8 0x%x\n" % self._cfg_addr(bus, dev, fn, off)
        write = _CFG_WRITE[width] % (self._cfg_port(off, width), value & _MASKS[width])
        self._exchange((select, write), (False, False),
                       f"config write {bus:02x}:{dev:02x}.{fn:x} {off:#x} width {width} value {value:#x}")

    # ---- enumeration and assignment ----

    def _enumerate(self) -> list[PciFunction]:
        self._next_bus = 1
        self._io_next, self._mem_next = IO_START, MEM_START
        out: list[PciFunction] = []
        self._scan_bus(0, out)
        return out

    def _alloc(self, is_io: bool, size: int) -> int:
        """A naturally aligned address for a BAR of ``size``, or 0 when the space is exhausted."""
        if is_io:
            base = _align(self._io_next, size)
            if base + size > IO_END:
                return 0
            self._io_next = base + size
        else:
            base = _align(self._mem_next, size)
            if base + size > MEM_END:
                return 0
            self._mem_next = base + size
        return base

    def _size_bar(self, b: int, d: int, f: int, i: int, nbars: int) -> tuple[int, int, bool, bool, bool]:
        """Size BAR ``i`` of ``nbars`` (decoding already off): (size, registers used, is_io, is_64, prefetchable)."""
        off = self._pci.BAR0 + 4 * i
        orig = self.cfg_read(b, d, f, off, 4)
        self.cfg_write(b, d, f, off, 4, 0xFFFF_FFFF)
        mask = self.cfg_read(b, d, f, off, 4)
        self.cfg_write(b, d, f, off, 4, orig)
        if mask == 0:
            return 0, 1, False, False, False
        if orig & 1:
            return ((~(mask & ~3)) & 0xFFFF) + 1, 1, True, False, False
        prefetchable = bool(orig >> 3 & 1)
        size_mask = 0xFFFF_FFFF_0000_0000 | (mask & ~0xF)
        is_64 = (orig >> 1 & 3) == 2 and i < nbars - 1   # the high half must be a BAR too
        if is_64:
            orig_hi = self.cfg_read(b, d, f, off + 4, 4)
            self.cfg_write(b, d, f, off + 4, 4, 0xFFFF_FFFF)
            mask_hi = self.cfg_read(b, d, f, off + 4, 4)
            self.cfg_write(b, d, f, off + 4, 4, orig_hi)
            size_mask = mask_hi << 32 | (mask & ~0xF)
        return (~size_mask + 1) & _MASKS[8], 2 if is_64 else 1, False, is_64, prefetchable

    def _assign_bars(self, b: int, d: int, f: int, nbars: int) -> tuple[list[Bar], bool, bool]:
        """Size and place every BAR; returns the bars and whether I/O and memory decoding may be on."""
        bars: list[Bar] = []
        io_ok = mem_ok = True
        i = 0
        while i < nbars:
            size, used, is_io, is_64, pref = self._size_bar(b, d, f, i, nbars)
            if size:
                base = self._alloc(is_io, size)
                if base:
                    self.cfg_write(b, d, f, self._pci.BAR0 + 4 * i, 4, base & 0xFFFF_FFFF)
                    if is_64:
                        self.cfg_write(b, d, f, self._pci.BAR0 + 4 * i + 4, 4, base >> 32)
                else:
                    # Left where it was (0): decoding it would map it over RAM or the legacy ports.
                    log.warning("%02x:%02x.%x BAR%d (%s, %#x bytes) does not fit; left unassigned",
                                b, d, f, i, "io" if is_io else "mem", size)
                    if is_io:
                        io_ok = False
                    else:
                        mem_ok = False
                bars.append(Bar(i, base, size, is_io, is_64, pref))
            i += used
        return bars, io_ok, mem_ok

    def _read_caps(self, b: int, d: int, f: int) -> tuple[tuple[int, int], ...]:
        pci = self._pci
        if not self.cfg_read(b, d, f, pci.STATUS, 2) & pci.STATUS_CAP_LIST:
            return ()
        caps = []
        ptr = self.cfg_read(b, d, f, pci.CAP_PTR, 1) & 0xFC
        for _ in range(48):     # a looping list must not hang enumeration
            if not ptr:
                break
            caps.append((self.cfg_read(b, d, f, ptr, 1), ptr))
            ptr = self.cfg_read(b, d, f, ptr + 1, 1) & 0xFC
        return tuple(caps)

    def _scan_bus(self, bus: int, out: list[PciFunction]) -> None:
        for dev in range(32):
            for fn in range(8):
                ident = self.cfg_read(bus, dev, fn, 0, 4)
                if ident & 0xFFFF == 0xFFFF:
                    if fn == 0:
                        break
                    continue
                header = self.cfg_read(bus, dev, fn, self._pci.HEADER_TYPE, 1)
                self._add_function(bus, dev, fn, ident, header, out)
                if fn == 0 and not header & self._pci.HEADER_MULTI_FUNCTION:
                    break

    def _add_function(self, b: int, d: int, f: int, ident: int, header: int, out: list[PciFunction]) -> None:
        pci = self._pci
        layout = header & pci.HEADER_LAYOUT
        bridge = layout == pci.HEADER_BRIDGE
        nbars = 6 if layout == pci.HEADER_NORMAL else 2 if bridge else 0
        klass = self.cfg_read(b, d, f, pci.CLASS_REVISION, 4)
        irq = self.cfg_read(b, d, f, pci.INTERRUPT_LINE, 2)       # and the pin above it
        cmd = self.cfg_read(b, d, f, pci.COMMAND, 2)
        # BARs are sized with decoding off, or the all-ones probe would be decoded.
        self.cfg_write(b, d, f, pci.COMMAND, 2, cmd & ~(pci.COMMAND_IO | pci.COMMAND_MEMORY))
        bars, io_ok, mem_ok = self._assign_bars(b, d, f, nbars)
        caps = self._read_caps(b, d, f)
        function = PciFunction(b, d, f, ident & 0xFFFF, ident >> 16, klass >> 24, klass >> 16 & 0xFF,
                               klass >> 8 & 0xFF, klass & 0xFF, irq & 0xFF, irq >> 8 & 0xFF, tuple(bars), caps)
        self._info[function.devfn] = _Info(function, header)
        out.append(function)     # before its children, as the proxy lists them
        if bridge:
            self._bridge(b, d, f, out)
        if bridge or any(bar.base for bar in bars):
            if io_ok and (bridge or any(bar.is_io and bar.base for bar in bars)):
                cmd |= pci.COMMAND_IO
            if mem_ok and (bridge or any(not bar.is_io and bar.base for bar in bars)):
                cmd |= pci.COMMAND_MEMORY
            cmd |= pci.COMMAND_MASTER
        self.cfg_write(b, d, f, pci.COMMAND, 2, cmd)

    def _bridge(self, b: int, d: int, f: int, out: list[PciFunction]) -> None:
        """Number the bridge's secondary bus, scan it, and open windows around what it got."""
        secondary = self._next_bus
        if secondary > 0xFF:
            log.warning("%02x:%02x.%x: out of bus numbers; not scanned", b, d, f)
            return
        self._next_bus += 1
        latency = self.cfg_read(b, d, f, PCI_PRIMARY_BUS, 4) & 0xFF00_0000
        # Subordinate 0xff while scanning, so config cycles reach every bus below.
        self.cfg_write(b, d, f, PCI_PRIMARY_BUS, 4, latency | 0xFF << 16 | secondary << 8 | b)
        io_saved, mem_saved = self._io_next, self._mem_next
        io_start = self._io_next = _align(self._io_next, BRIDGE_IO_ALIGN)
        mem_start = self._mem_next = _align(self._mem_next, BRIDGE_MEM_ALIGN)
        self._scan_bus(secondary, out)
        self.cfg_write(b, d, f, PCI_PRIMARY_BUS, 4, latency | (self._next_bus - 1) << 16 | secondary << 8 | b)
        if self._io_next > io_start:
            io_end = self._io_next = min(_align(self._io_next, BRIDGE_IO_ALIGN), IO_END)
            self.cfg_write(b, d, f, PCI_IO_BASE, 1, io_start >> 8 & 0xF0)
            self.cfg_write(b, d, f, PCI_IO_LIMIT, 1, (io_end - 1) >> 8 & 0xF0)
            self.cfg_write(b, d, f, PCI_IO_BASE_UPPER, 4, 0)
        else:
            self._io_next = io_saved
            self.cfg_write(b, d, f, PCI_IO_BASE, 1, 0xF0)      # base above limit: closed
            self.cfg_write(b, d, f, PCI_IO_LIMIT, 1, 0x00)
        if self._mem_next > mem_start:
            mem_end = self._mem_next = min(_align(self._mem_next, BRIDGE_MEM_ALIGN), MEM_END)
            self.cfg_write(b, d, f, PCI_MEMORY_BASE, 2, mem_start >> 16 & 0xFFF0)
            self.cfg_write(b, d, f, PCI_MEMORY_LIMIT, 2, (mem_end - 1) >> 16 & 0xFFF0)
        else:
            self._mem_next = mem_saved
            self.cfg_write(b, d, f, PCI_MEMORY_BASE, 2, 0xFFF0)
            self.cfg_write(b, d, f, PCI_MEMORY_LIMIT, 2, 0x0000)
        # Prefetchable BARs share the one (non-prefetchable, 32-bit) window: close this one.
        self.cfg_write(b, d, f, PCI_PREF_BASE, 2, 0xFFF0)
        self.cfg_write(b, d, f, PCI_PREF_LIMIT, 2, 0x0000)
        self.cfg_write(b, d, f, PCI_PREF_BASE_UPPER, 4, 0)
        self.cfg_write(b, d, f, PCI_PREF_LIMIT_UPPER, 4, 0)

    # ---- the Bus interface ----

    @property
    def functions(self) -> Sequence[PciFunction]:
        return self._functions

    def open_channel(self, function: PciFunction, dma_size: int | None = None) -> "QtestChannel":
        """A channel granted ``function``'s BARs and config space (as this bus enumerated it);
        qtest lends no DMA memory, so ``dma_size`` is ignored."""
        what = f"open {function}"
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        info = self._info.get(function.devfn)
        if info is None:
            raise BadRequest(what, 0)
        if function.devfn in self._open:
            raise AccessDenied(what, 0)
        f = info.function      # our own record: grants never come from the caller's copy
        pio = [(b.base, b.base + b.size) for b in f.bars if b.base and b.is_io and b.base + b.size <= 0x1_0000]
        mmio = [(b.base, b.base + b.size) for b in f.bars
                if b.base and not b.is_io and b.base + b.size <= 0x1_0000_0000]
        cfg_readonly = self._rules.readonly_config(info.header_type, f.caps)
        mmio_readonly = []
        pci = self._pci
        for cap_id, off in f.caps:
            if cap_id == pci.CAP_ID_MSIX:               # its table: an MSI is a DMA write
                table = self.cfg_read(f.bus, f.dev, f.fn, off + pci.MSIX_TABLE, 4)
                entries = (self.cfg_read(f.bus, f.dev, f.fn, off + pci.MSIX_FLAGS, 2) & pci.MSIX_FLAGS_QSIZE) + 1
                bars = {b.index: b for b in f.bars}
                if table & pci.MSIX_TABLE_BIR in bars:
                    start = bars[table & pci.MSIX_TABLE_BIR].base + (table & ~pci.MSIX_TABLE_BIR)
                    mmio_readonly.append((start, start + pci.MSIX_ENTRY_SIZE * entries))
        ch = QtestChannel(self, str(f), f, pio, mmio, mmio_readonly, cfg_readonly)
        self._open[f.devfn] = ch
        return ch

    def open_ports(self, base: int, count: int) -> "QtestChannel":
        """A channel granted the ISA ports ``base .. base + count - 1`` (the proxy's rules)."""
        what = f"open ports {base:#x}+{count}"
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        rules = self._rules
        if not 0 < count <= rules.PROXY_ISA_MAX_PORTS or not 0 <= base < 0x1_0000 or base + count > 0x1_0000:
            raise BadRequest(what, 0)
        mask, why = grantable(self.machine.spec, base, count, rules.reserved_ports(base, count))
        if not mask:
            raise AccessDenied(f"{what}: {why}", 0)
        granted = [base + n for n in range(count) if mask >> n & 1]
        reserved = [reason for port in granted for reason in rules.reserved_ports(port, 1)]
        if reserved:                                # as the proxy refuses them, whatever the host grants
            raise AccessDenied(f"{what}: the proxy never grants {', '.join(reserved)}", 0)
        if any(bar.is_io and _overlaps(base, count, bar.base, bar.size)
               for f in self._functions for bar in f.bars):
            raise AccessDenied(what, 0)
        if any(_overlaps(port, 1, b, e - b) for ch in [*self._open.values(), *self._isa] for b, e in ch.pio
               for port in granted):
            raise AccessDenied(what, 0)
        ch = QtestChannel(self, f"ports {base:#x}+{count}", None, [(p, p + 1) for p in granted], [], [], [])
        self._isa.append(ch)
        return ch

    def _forget(self, ch: "QtestChannel") -> None:
        if ch.function is not None:
            self._open.pop(ch.function.devfn, None)
        elif ch in self._isa:
            self._isa.remove(ch)

    def close(self) -> None:
        """Close every channel and let go of the socket (the machine closes it). Idempotent."""
        if self._closed:
            return
        for ch in [*self._open.values(), *self._isa]:
            ch.close()
        self._closed = True
        self._rfile.close()

    def __repr__(self) -> str:
        return f"<QtestBus {self.machine.name}>"


class QtestChannel(Channel):
    """One device's (or one ISA range's) view of the qtest connection, confined to its grants.

    Grants are half-open ``(start, end)`` pairs. Closing empties them in place,
    which the hot path's closures share, so a closed channel costs the hot
    path nothing and still cannot be used.
    """

    def __init__(self, bus: QtestBus, name: str, function: PciFunction | None,
                 pio: list[tuple[int, int]], mmio: list[tuple[int, int]],
                 mmio_readonly: list[tuple[int, int]], cfg_readonly: list[tuple[int, int]]) -> None:
        self.bus = bus
        self.name = name
        self.function = function
        self.pio = pio
        self.mmio = mmio
        self.mmio_readonly = mmio_readonly
        self.cfg_readonly = cfg_readonly    # (offset, length)
        self.closed = False
        self._fast = {(kind, space): self._make_accessor(kind, space)
                      for kind in (Kind.READ, Kind.WRITE) for space in (Space.PIO, Space.MMIO)}
        self._fast[Kind.READ, Space.CONFIG] = self._config_read
        self._fast[Kind.WRITE, Space.CONFIG] = self._config_write

    def __repr__(self) -> str:
        return f"<QtestChannel {self.name}{' closed' if self.closed else ''}>"

    # ---- grants ----

    def _refusal(self, kind: Kind, space: Space, addr: int, width: int) -> type[HarnessError] | None:
        """The error an access earns, or None: width and alignment first, then grants (as the proxy)."""
        if not isinstance(width, int) or width not in _MASKS or width > _MAX_WIDTH[space] \
                or not isinstance(addr, int) or addr & (width - 1):
            return BadRequest
        if space is Space.DMA:
            return AccessDenied             # this transport lends no DMA memory
        if space is Space.CONFIG:
            if not 0 <= addr < 256:
                return BadRequest
            if self.function is None:
                return AccessDenied
            if kind is Kind.WRITE and any(_overlaps(addr, width, o, n) for o, n in self.cfg_readonly):
                return AccessDenied
            return None
        windows = self.pio if space is Space.PIO else self.mmio
        if not any(start <= addr and addr + width <= end for start, end in windows):
            return AccessDenied
        if kind is Kind.WRITE and space is Space.MMIO and \
                any(_overlaps(addr, width, s, e - s) for s, e in self.mmio_readonly):
            return AccessDenied
        return None

    def _fail(self, kind: Kind, space: Space, width: int, addr: int, value: int) -> NoReturn:
        """Raise what the fast path declined to judge; the Access is built only now."""
        if self.closed:
            raise ValueError(f"{self!r} is closed")
        access = Access(kind, space, addr, width, value)
        error = self._refusal(kind, space, addr, width)
        if error is None:   # the fast path and _refusal disagree: a bug here, not the caller's
            raise AssertionError(f"{access} was refused by the fast path but passes the grant check")
        raise error(access, 0)

    # ---- the hot path ----

    def _make_accessor(self, kind: Kind, space: Space) -> Callable[[int, int, int], int]:
        """A closure doing one checked access: the fewest Python operations we could manage."""
        bus = self.bus
        lock, send, readline, odd, io_error = bus._lock, bus._send, bus._readline, bus._odd_reply, bus._io_error
        windows = self.pio if space is Space.PIO else self.mmio
        fail = self._fail

        def granted(cmds: dict[int, bytes], width: int, addr: int, value: int) -> bytes:
            """The qtest command for an aligned access inside a granted window; else fail()."""
            cmd = cmds.get(width)
            if cmd is None or addr & (width - 1):
                fail(kind, space, width, addr, value)
            for start, end in windows:
                if start <= addr and addr + width <= end:
                    return cmd
            fail(kind, space, width, addr, value)    # NoReturn

        if kind is Kind.READ:
            rcmds = _READ_CMDS[space]

            def read(width: int, addr: int, value: int = 0) -> int:
                cmd = granted(rcmds, width, addr, value)
                with lock:
                    try:
                        send(cmd % addr)
                        line = readline()
                    except OSError as exc:
                        raise io_error(exc, Access(kind, space, addr, width)) from exc
                    if line[:5] != b"OK 0x":
                        line = odd(line, True, lambda: Access(kind, space, addr, width))
                return int(line[3:], 16)
            return read

        wcmds = _WRITE_CMDS[space]
        readonly = self.mmio_readonly if space is Space.MMIO else []

        def write(width: int, addr: int, value: int) -> int:
            cmd = granted(wcmds, width, addr, value)
            for start, end in readonly:
                if addr < end and start < addr + width:
                    fail(kind, space, width, addr, value)
            with lock:
                try:
                    # Masked: QEMU aborts on a number it cannot parse (a negative one, say).
                    send(cmd % (addr, value & _MASKS[width]))
                    line = readline()
                except OSError as exc:
                    raise io_error(exc, Access(kind, space, addr, width, value)) from exc
                if line != b"OK\n":
                    odd(line, False, lambda: Access(kind, space, addr, width, value))
            return 0
        return write

    def accessor(self, kind: Kind, space: Space) -> Callable[[int, int, int], int]:
        if kind.polls:
            return super().accessor(kind, space)
        return self._fast[kind, space]

    def read(self, space: Space, addr: int, width: int) -> int:
        return self._fast[Kind.READ, space](width, addr, 0)

    def write(self, space: Space, addr: int, width: int, value: int) -> None:
        self._fast[Kind.WRITE, space](width, addr, value)

    # ---- configuration space ----

    def _config_read(self, width: int, addr: int, value: int = 0) -> int:
        if self.closed:
            raise ValueError(f"{self!r} is closed")
        error = self._refusal(Kind.READ, Space.CONFIG, addr, width)
        if error is not None:
            raise error(Access(Kind.READ, Space.CONFIG, addr, width), 0)
        f = self.function
        assert f is not None
        return self.bus.cfg_read(f.bus, f.dev, f.fn, addr, width)

    def _config_write(self, width: int, addr: int, value: int) -> int:
        if self.closed:
            raise ValueError(f"{self!r} is closed")
        error = self._refusal(Kind.WRITE, Space.CONFIG, addr, width)
        if error is not None:
            raise error(Access(Kind.WRITE, Space.CONFIG, addr, width, value), 0)
        f = self.function
        assert f is not None
        self.bus.cfg_write(f.bus, f.dev, f.fn, addr, width, value)
        return 0

    # ---- polls and batches ----

    def _poll(self, a: Access) -> int:
        """Read until the poll is satisfied; at least once, however short the timeout."""
        if a.space is Space.CONFIG:
            raise ValueError("the proxy cannot poll config space, so neither does qtest")
        if self.closed:
            raise ValueError(f"{self!r} is closed")
        error = self._refusal(Kind.READ, a.space, a.addr, a.width)
        if error is not None:
            raise error(a, 0)
        if not 0 <= a.timeout <= _proxy_rules().PROXY_POLL_MAX_US / 1e6:
            raise BadRequest(a, 0)
        read = self._fast[Kind.READ, a.space]
        deadline = time.monotonic() + a.timeout
        while True:
            value = read(a.width, a.addr, 0)
            if a.satisfied_by(value):
                return value
            if time.monotonic() >= deadline:
                raise DeviceTimeout(a, 0, value)

    def execute(self, accesses: Sequence[Access]) -> list[int]:
        """Run the accesses in order; the first failure raises and the rest are not run."""
        if self.closed:
            raise ValueError(f"{self!r} is closed")
        fast = self._fast
        out = []
        for a in accesses:
            if a.kind.polls:
                out.append(self._poll(a))
                continue
            try:
                op = fast[a.kind, a.space]
            except KeyError:
                raise ValueError(f"qtest cannot {a.kind.value} {a.space.value}") from None
            out.append(op(a.width, a.addr, a.value))
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # In place: the hot-path closures hold these very lists.
        self.pio.clear()
        self.mmio.clear()
        self.bus._forget(self)
