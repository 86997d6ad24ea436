"""AHCI SATA driver: HBA reset, ports, command lists in DMA memory, DMA and NCQ commands.

Every command is one slot of the port's command list: an H2D register FIS
and a PRD table in the slot's command table, then a bit in PxCI (and PxSACT
for NCQ). Data land in DMA buffers the host has mapped.

A command (not queued, polling) is a posted PxCI write, and its completion is
what the HBA writes into the received-FIS area, which the host has mapped too:
the D2H Register FIS, with the status and error the HBA also copies into
PxTFD. QEMU clears PxCI before it writes that FIS (hw/ide/ahci.c,
ahci_cmd_done), so once Python sees it the slot is free; nothing waits for a
round trip. If the FIS is slow to come, a guest-side poll on PxCI with PxIS
and PxTFD read in the same batch takes over (and reports a posted write's
failure). Queued (NCQ) commands are issued by posted writes too, and complete
by Set Device Bits FISes, which QEMU overwrites one per command: the host sees
in that FIS that some command ended, and reads PxSACT, a round at a time, to
learn which (``Port._queue_round_posted``).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from harness.access import Batch, Bus, Deadline, Device, DmaBuffer, IrqMode, Kind, Prepared, spin_until
from harness.errors import DeviceTimeout, HarnessError, InterruptTimeout

from .regs import (CAP_NCS_MASK, CAP_NCS_SHIFT, CMD_TABLE_ACMD, CMD_TABLE_PRDT, DEVICE_LBA, FIS_DWORDS,
                   FIS_TYPE_D2H, FIS_TYPE_SDB, RFIS_D2H, RFIS_SDB, HEADER_ATAPI, HEADER_WRITE, PACKET_DMA, PORT_BASE, PORT_STRIDE, PXIS_ERRORS, SECTOR, SIG_ATA,
                   SIG_ATAPI, SSTS_DET_PRESENT, Ata, Cap, CommandHeader, Ghc, Hba, Prd, Px, PxCmd, PxIs, Tfd,
                   pack_h2d_fis, packer)

log = logging.getLogger(__name__)

VENDOR, DEVICE = 0x8086, 0x2922         # ICH9 AHCI, built into q35 at 00:1f.2
ABAR = 5
SLOT_SECTORS = 128                      # 64 KiB of DMA buffer per command slot
DMA_SIZE = 16 << 20                     # the HBA's DMA domain: 2.1 MiB per disk, the rest for callers' buffers
MAX_PRDS = 24                           # scatter-gather entries a command may carry
TABLE_SIZE = CMD_TABLE_PRDT + ctypes.sizeof(Prd) * MAX_PRDS     # FIS, ATAPI command, PRD table: 512 bytes (aligned 128)
MAX_PRD_BYTES = 4 << 20                 # a PRD moves at most 4 MiB (22-bit byte count)
PORT_INTERRUPTS = PxIs.DHRS | PxIs.PSS | PxIs.DSS | PxIs.SDBS | PXIS_ERRORS     # what raises the MSI
# The hot path tests plain ints: arithmetic on an IntFlag costs about a microsecond.
TFD_ERR, QUEUE_EVENTS = int(Tfd.ERR), int(PxIs.SDBS | PXIS_ERRORS)

# The hot paths pack with struct, in the layouts the ctypes declarations in regs.py give.
PRD = packer(Prd)
HEADER = packer(CommandHeader, last="ctba")         # the HBA writes the rest
HEADER_SIZE = ctypes.sizeof(CommandHeader)
# The queue writes command headers by words, at the declaration's offsets.
HEADER_WORDS = HEADER_SIZE // 4
PRDBC_WORD, CTBA_WORD = CommandHeader.prdbc.offset // 4, CommandHeader.ctba.offset // 4


QueuedRequest = tuple[int, "int | None", int]   # (lba, buffer address or None for the slot's own, bytes)


class DiskError(HarnessError):
    """The device reported an error (task file ERR); ``error`` is its error register.
    For queued commands, ``failed`` lists the requests (by index) that did not complete."""

    def __init__(self, message: str, status: int, error: int, failed: Sequence[int] = ()) -> None:
        super().__init__(f"{message}: status {status:#04x} error {error:#04x}")
        self.status, self.error = status, error
        self.failed = list(failed)          # queued requests (by index) that did not complete


@dataclass(frozen=True)
class Identity:
    model: str
    serial: str
    firmware: str
    sectors: int            # LBA48 capacity
    lba48: bool
    ncq: bool
    queue_depth: int
    raw: bytes


def _ata_string(words: bytes) -> str:
    """ATA strings swap the bytes of every word (ATA8-ACS 3.4.9)."""
    return bytes(b for pair in zip(words[1::2], words[0::2]) for b in pair).decode("ascii", "replace").strip()


def parse_identify(data: bytes) -> Identity:
    w = struct.unpack("<256H", data)
    lba48 = bool(w[83] & 1 << 10)
    sectors = w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 if lba48 else w[60] | w[61] << 16
    return Identity(model=_ata_string(data[54:94]), serial=_ata_string(data[20:40]),
                    firmware=_ata_string(data[46:54]), sectors=sectors, lba48=lba48,
                    ncq=bool(w[76] & 1 << 8), queue_depth=(w[75] & 0x1F) + 1, raw=data)


def _name(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def _attached(ssts: int) -> bool:
    """PxSSTS says a device is there and the link is up."""
    return ssts & 0xF == SSTS_DET_PRESENT


class Ahci:
    """The HBA: reset, AHCI mode, and its ports.

    The bring-up is four round trips to the proxy whatever the ports, because it is what a
    restarted driver waits on: the HBA reset with what the HBA is, the ports' status, then
    every port pointed at its memory and started where a device is. Each wait is a
    guest-side poll of the bit the specification names, in the same round trip, never a
    fixed sleep: QEMU's HBA reset and its PxCMD engines are done when the write is
    (hw/ide/ahci.c: ahci_reset, ahci_cond_start_engines), a real HBA's take up to the
    specification's limits, and the polls wait that long."""

    def __init__(self, bus: Bus, device: Device, timeout: float = 2.0, interrupts: bool = False) -> None:
        self.bus, self.dev, self.regs = bus, device, device.bar(ABAR)
        self.regs.name_registers(Hba)
        self.timeout = timeout
        self.irq = device.irq(IrqMode.MSI) if interrupts else None
        device.enable_decoding()        # no DMA until the reset: commands a killed driver left in flight
        r = self.regs
        # HBA reset (AHCI 10.4.3): every port stops and drops what it had in flight (QEMU cancels
        # it before the write returns) and GHC.HR reads 0 once done.
        try:
            with device.batch() as b:
                b.write32(r, Hba.GHC, Ghc.AE)
                b.write32(r, Hba.GHC, Ghc.HR | Ghc.AE)
                b.poll(r, Hba.GHC, 4, Ghc.HR, 0, timeout)
                b.write32(r, Hba.GHC, Ghc.AE | (Ghc.IE if interrupts else 0))
                i_cap, i_pi = b.read32(r, Hba.CAP), b.read32(r, Hba.PI)
        except DeviceTimeout as exc:
            raise DiskError(f"the HBA did not come out of reset within {timeout:g} s", exc.last_value, 0) from exc
        device.enable_dma()
        self.cap = Cap(b.results[i_cap])
        self.slots = ((self.cap >> CAP_NCS_SHIFT) & CAP_NCS_MASK) + 1
        indices = [i for i in range(32) if b.results[i_pi] & 1 << i]
        with device.batch() as b:
            status = [b.read32(r, PORT_BASE + i * PORT_STRIDE + Px.SSTS) for i in indices]
        self.ports = [Port(self, i, _attached(b.results[s])) for i, s in zip(indices, status)]
        try:
            with device.batch() as b:
                for port in self.ports:
                    port.bring_up(b)
        except DeviceTimeout as exc:
            raise DiskError(f"a port did not come up after the HBA reset: {exc}", exc.last_value, 0) from exc

    @classmethod
    def open(cls, bus: Bus, **kwargs: object) -> "Ahci":
        return cls(bus, bus.open(bus.find(vendor=VENDOR, device=DEVICE), dma_size=DMA_SIZE),
                   **kwargs)  # type: ignore[arg-type]

    def disks(self) -> list["Port"]:
        return self._ports_with(SIG_ATA)

    def cdroms(self) -> list["Port"]:
        return self._ports_with(SIG_ATAPI)

    def _ports_with(self, signature: int) -> list["Port"]:
        """The ports with a device of ``signature`` attached now: one round trip."""
        with self.dev.batch() as b:
            looks = [(p, b.read32(self.regs, p.base + Px.SSTS), b.read32(self.regs, p.base + Px.SIG))
                     for p in self.ports]
        return [p for p, ssts, sig in looks if _attached(b.results[ssts]) and b.results[sig] == signature]

    def close(self) -> None:
        for p in self.ports:
            p.close()
        if self.irq is not None:
            self.irq.close()
        self.dev.close()


class Port:
    """One AHCI port and the ATA disk behind it: a block device."""

    def __init__(self, hba: Ahci, index: int, attached: bool) -> None:
        """Memory for port ``index`` (slot buffers only where a device is ``attached``); the
        HBA's bring-up then programs it (``bring_up``)."""
        self.hba, self.index = hba, index
        self.base = PORT_BASE + index * PORT_STRIDE
        self.r = hba.regs
        self.r.name_registers(Px, self.base, f"P{index}.")
        dev = hba.dev
        self.slots = hba.slots
        self.command_list = dev.dma_alloc(32 * HEADER_SIZE, 1024)
        self.received_fis = dev.dma_alloc(256, 256)
        # Two command tables per slot: a queued command is built in one while the slot's
        # previous command still runs from the other. Table k is slot k % slots.
        self.tables = dev.dma_alloc(2 * self.slots * TABLE_SIZE, 128)
        if self.tables.phys >> 32 != (self.tables.phys + self.tables.size - 1) >> 32:     # one CTBAU for all
            for buf in (self.command_list, self.received_fis, self.tables):
                dev.dma_free(buf)
            raise DiskError(f"port {index}: the command tables straddle 4 GiB", 0, 0)
        # Slot buffers (2 MiB with 32 slots) only where a device is attached.
        self.buffers = dev.dma_alloc(self.slots * SLOT_SECTORS * SECTOR) if attached else None
        self.identity: Identity | None = None
        self._batches: dict[tuple, Prepared] = {}
        self._issues = [self.r.access(Kind.WRITE, self.base + Px.CI, 4, 1 << k) for k in range(self.slots)]
        # The queue's hot path writes headers by words, and a PRD only when it changed (per table).
        self._list_words = self.command_list.view.cast("I")
        self._table_prd: list[tuple[int, int] | None] = [None] * (2 * self.slots)
        self._look_sleeps = False       # the last queued look outlasted the channel's spin (_queue_round_posted)

    def bring_up(self, b: Batch) -> None:
        """Into ``b``, after the HBA reset: wait for the reset's stop of both engines (AHCI
        10.4.3 clears PxCMD.ST and FRE; CR and FR follow), point the port at its command
        list and FIS area, clear its errors, and start it where a device is attached. PxCMD
        is written whole, not read first: after the reset its writable bits are all 0 but
        SUD and POD, which this sets."""
        r, base, timeout = self.r, self.base, self.hba.timeout
        b.poll(r, base + Px.CMD, 4, PxCmd.ST | PxCmd.CR | PxCmd.FRE | PxCmd.FR, 0, timeout)
        for reg, value in ((Px.CLB, self.command_list.phys & 0xFFFFFFFF), (Px.CLBU, self.command_list.phys >> 32),
                           (Px.FB, self.received_fis.phys & 0xFFFFFFFF), (Px.FBU, self.received_fis.phys >> 32),
                           (Px.SERR, 0xFFFFFFFF), (Px.IS, 0xFFFFFFFF)):
            b.write32(r, base + reg, value)
        if self.hba.irq is not None:
            b.write32(r, base + Px.IE, PORT_INTERRUPTS)
        if self.buffers is not None:
            self._start_into(b, int(PxCmd.POD | PxCmd.SUD))

    # ---- registers ----

    def _r(self, reg: int) -> int:
        return self.r.read32(self.base + reg)

    def _w(self, reg: int, value: int) -> None:
        self.r.write32(self.base + reg, value)

    @property
    def present(self) -> bool:
        return _attached(self._r(Px.SSTS))

    def _wait(self, reg: int, mask: int, value: int, what: str) -> int:
        return self.r.wait32(self.base + reg, mask, value, self.hba.timeout, lambda detail, last: DiskError(
            f"port {self.index}: timed out waiting for {what}: {detail}", last, 0))

    def stop(self) -> None:
        """Stop the command list, then FIS receive (AHCI 10.1.2): two round trips."""
        command = self._r(Px.CMD)
        self._in_one_trip("stopping", lambda b: self._stop_into(b, command))

    def _stop_into(self, b: Batch, command: int) -> None:
        """Stop the port whose PxCMD reads ``command``, into ``b``."""
        command &= ~PxCmd.ST
        b.write32(self.r, self.base + Px.CMD, command)
        b.poll(self.r, self.base + Px.CMD, 4, PxCmd.CR, 0, self.hba.timeout)
        b.write32(self.r, self.base + Px.CMD, command & ~PxCmd.FRE)
        b.poll(self.r, self.base + Px.CMD, 4, PxCmd.FR, 0, self.hba.timeout)

    def _in_one_trip(self, doing: str, build: Callable[[Batch], object]) -> None:
        """``build(batch)``'s accesses in one round trip; a poll's timeout a DiskError naming the register."""
        try:
            with self.hba.dev.batch() as b:
                build(b)
        except DeviceTimeout as exc:
            raise DiskError(f"port {self.index}: timed out {doing}: {exc}", exc.last_value, 0) from exc

    def _stop_commands(self) -> None:
        self._w(Px.CMD, self._r(Px.CMD) & ~PxCmd.ST)
        self._wait(Px.CMD, PxCmd.CR, 0, "the command list to stop")

    def start(self) -> None:
        """FIS receive on, then, once the device is idle, the command list: two round trips."""
        command = self._r(Px.CMD)
        self._in_one_trip("starting", lambda b: self._start_into(b, command))

    def _start_into(self, b: Batch, command: int) -> None:
        """Start the port whose PxCMD reads ``command``, into ``b``. QEMU posts the device's
        first D2H FIS when FIS receive comes on; until then PxTFD reads 0x7F (DRQ set)."""
        command |= PxCmd.FRE | PxCmd.POD | PxCmd.SUD
        b.write32(self.r, self.base + Px.CMD, command)
        b.poll(self.r, self.base + Px.TFD, 4, Tfd.BSY | Tfd.DRQ, 0, self.hba.timeout)
        b.write32(self.r, self.base + Px.CMD, command | PxCmd.ST)

    def recover(self) -> None:
        """After a task-file error: restart the port, clearing its error state (AHCI 6.2.2)."""
        self.stop()
        self._w(Px.SERR, 0xFFFFFFFF)
        self._w(Px.IS, 0xFFFFFFFF)
        self.start()

    def reset(self) -> None:
        """COMRESET (AHCI 10.4.2): the device drops whatever it still has in flight.

        After a queued command fails, the others may still be running; stopping the
        port forgets them, but their completions would arrive later and clear the
        PxSACT bits of whatever reuses their tags. A COMRESET cancels them (QEMU
        waits for each one) and clears the device's error status. FIS receive stays
        on meanwhile: QEMU 7.2 keeps the tags that finish during the cancel as
        "finished" until it can post a Set Device Bits FIS, and with FIS receive off
        it would post them later, against the next commands on those tags."""
        self._stop_commands()
        self._w(Px.SCTL, 1)
        time.sleep(0.001)                       # DET = 1 for at least 1 ms (AHCI 3.3.11)
        self._w(Px.SCTL, 0)
        self._wait(Px.SSTS, 0xF, SSTS_DET_PRESENT, "the link to come back after COMRESET")
        self._w(Px.SERR, 0xFFFFFFFF)
        self._w(Px.IS, 0xFFFFFFFF)
        if self.hba.irq is not None:
            self._w(Px.IE, PORT_INTERRUPTS)
        self.start()

    # ---- building commands ----

    def _slot_buffer(self, slot: int) -> tuple[int, memoryview]:
        if self.buffers is None:
            raise DiskError(f"port {self.index}: no device is attached", 0, 0)
        size = SLOT_SECTORS * SECTOR
        return self.buffers.phys + slot * size, self.buffers.view[slot * size:(slot + 1) * size]

    def _completion_batch(self, slot: int) -> Prepared:
        """Poll guest-side until PxCI clears ``slot``, read PxIS and PxTFD: one round trip,
        encoded once per slot."""
        key = ("command", slot)
        batch = self._batches.get(key)
        if batch is None:
            r, base = self.r, self.base
            batch = self._batches[key] = self.hba.dev.channel.prepare([
                r.access(Kind.POLL, base + Px.CI, 4, 0, 1 << slot, 0, self.hba.timeout),
                r.access(Kind.READ, base + Px.IS, 4), r.access(Kind.READ, base + Px.TFD, 4)])
        return batch

    def _run_posted(self, slot: int) -> tuple[int, int]:
        """Issue ``slot`` by a posted write and see it end in the D2H Register FIS the HBA
        writes (the received-FIS area: no round trip); (PxIS, PxTFD) as far as they matter:
        the FIS's status and error are what PxTFD holds. If the FIS is slow, a guest-side
        wait on PxCI takes over."""
        fis, channel = self.received_fis.view, self.hba.dev.channel
        fis[RFIS_D2H] = 0                       # the HBA writes its type when the command ends
        channel.post([self._issues[slot]])
        if spin_until(lambda: fis[RFIS_D2H] == FIS_TYPE_D2H, channel.spin):
            return 0, fis[RFIS_D2H + 3] << 8 | fis[RFIS_D2H + 2]
        _, status, tfd = self._completion_batch(slot).run()
        return status, tfd

    def _queue_look(self, wait: bool) -> Prepared:
        """Read PxIS (``wait``: poll it guest-side until it shows a completion, SDBS, or an
        error), clear its completion bits, read PxSACT and PxTFD: one round trip, encoded
        once. Clearing PxIS before reading PxSACT loses no completion: a later one sets
        PxIS again. Error bits stay set until recovery, so one that lands between the look
        and the clear is seen next round."""
        key = ("queue", wait)
        batch = self._batches.get(key)
        if batch is None:
            r, base = self.r, self.base
            look = (r.access(Kind.POLL_CHANGE, base + Px.IS, 4, 0, QUEUE_EVENTS, 0, self.hba.timeout) if wait
                    else r.access(Kind.READ, base + Px.IS, 4))
            batch = self._batches[key] = self.hba.dev.channel.prepare([
                look, r.access(Kind.WRITE, base + Px.IS, 4, ~PXIS_ERRORS & 0xFFFFFFFF),
                r.access(Kind.READ, base + Px.SACT, 4), r.access(Kind.READ, base + Px.TFD, 4)])
        return batch

    def _queue_round_posted(self, fresh: int, meanwhile: Callable[[], None]) -> tuple[int, int, int]:
        """Issue ``fresh`` by a posted write (PxSACT, then PxCI), and see that a command ended
        in the Set Device Bits FIS the HBA writes into the received-FIS area, which the host
        has mapped (no round trip, and no guest-side poll taking the device's lock); then one
        round trip reads what ended (``_queue_look``). QEMU overwrites that FIS at every
        completion (hw/ide/ahci.c: ahci_write_fis_sdb), so it says that a command ended, not
        which: its type byte is cleared before PxSACT is read, so a command that ends after
        the read writes it again and one that ends before is in PxSACT; none is missed, and
        at worst a round finds nothing. If no FIS comes within the channel's spin, the
        guest-side poll on PxIS takes over (and reports a posted write's failure).

        A look that outlasts the channel's spin makes the next one sleep at once instead of
        spinning: the look's PxIS read waits for QEMU's lock, which the main loop holds while
        it completes the rest of the round (QD32: about 120 us of a 170 us round on a quiet
        machine, within the spin; a millisecond on a busy one), and a host spin then holds
        one of the two cores the main loop and the vCPU want. A quiet machine's looks stay
        within the spin and keep spinning. Measured on a busy machine (load 12 on 2 cores,
        alternated in one machine): QD32 0.32 of the C loop spinning, 0.42 so, with host
        CPU per command 10.5 -> 6.0 us."""
        fis, channel = self.received_fis.view, self.hba.dev.channel
        if fresh:
            r, base = self.r, self.base
            channel.post([r.access(Kind.WRITE, base + Px.SACT, 4, fresh), r.access(Kind.WRITE, base + Px.CI, 4, fresh)])
        meanwhile()
        ended = spin_until(lambda: fis[RFIS_SDB] == FIS_TYPE_SDB, channel.spin)
        fis[RFIS_SDB] = 0
        look = self._queue_look(not ended)
        spin = channel.spin
        if self._look_sleeps:
            channel.spin = 0.0
        started = time.perf_counter()
        try:
            status, _, active, tfd = look.run()
        finally:
            channel.spin = spin
        self._look_sleeps = time.perf_counter() - started > spin
        return status, active, tfd

    def _prepare(self, slot: int, command: int, lba: int = 0, count: int = 0, write: bool = False,
                 nbytes: int = 0, tag: int | None = None, device: int = DEVICE_LBA,
                 regions: Sequence[tuple[int, int]] = (), features: int = 0, atapi: bool = False) -> None:
        """Fill slot ``slot``: the FIS, then a PRD per region (phys, bytes), by default the
        slot's own buffer for ``nbytes``."""
        table_off = slot * TABLE_SIZE
        self._table_prd[slot] = None
        pack_h2d_fis(self.tables.view, table_off, command, lba, count, device, features, tag)
        if not regions and nbytes:
            regions = [(self._slot_buffer(slot)[0], nbytes)]
        if len(regions) > MAX_PRDS:
            raise ValueError(f"a command carries at most {MAX_PRDS} buffers")
        for i, (phys, size) in enumerate(regions):
            if not 0 < size <= MAX_PRD_BYTES or size & 1:
                raise ValueError(f"a PRD moves an even 2 to {MAX_PRD_BYTES} bytes, not {size}")
            PRD.pack_into(self.tables.view, table_off + CMD_TABLE_PRDT + PRD.size * i, phys, 0, size - 1)
        flags = FIS_DWORDS | (HEADER_WRITE if write else 0) | (HEADER_ATAPI if atapi else 0)
        HEADER.pack_into(self.command_list.view, slot * HEADER_SIZE, flags, len(regions), 0,
                         self.tables.phys + table_off)

    def lay_out_read(self, slot: int, sectors: int, phys: int, queued: bool) -> None:
        """Lay out a read of ``sectors`` sectors from LBA 0 into ``phys`` in command slot
        ``slot`` and its command table (``TABLE_SIZE`` bytes each, from ``tables``), without
        issuing it: READ FPDMA QUEUED on tag ``slot`` (``queued``), else READ DMA EXT.

        For code that runs the port's command list itself, such as the in-guest loop
        ``hwharness bench ahci`` measures this driver against: it changes only the FIS's
        LBA and the PRD's address, then issues the slot."""
        command = Ata.READ_FPDMA_QUEUED if queued else Ata.READ_DMA_EXT
        self._prepare(slot, command, 0, sectors, tag=slot if queued else None, regions=[(phys, sectors * SECTOR)])

    def _run(self, slot: int, what: str | Callable[[], str]) -> None:
        """Issue ``slot`` and wait for it; raise DiskError on a task-file error or a timeout.
        ``what`` names the command in errors (a callable, to be formatted only then).

        Polling: a posted issue and the host's own look at the received FIS
        (``_run_posted``). Interrupts: issue, wait for the HBA's MSI, look at PxCI, PxIS
        and PxTFD, and acknowledge."""
        try:
            if self.hba.irq is None:
                status, tfd = self._run_posted(slot)
            else:
                status, tfd = self._run_by_interrupt(slot)
        except DeviceTimeout as exc:
            self.recover()
            raise DiskError(f"port {self.index}: {_name(what)} did not complete", exc.last_value, 0) from exc
        if status & PXIS_ERRORS or tfd & TFD_ERR:
            self.recover()
            raise DiskError(f"port {self.index}: {_name(what)} failed", tfd & 0xFF, tfd >> 8 & 0xFF)

    def _run_by_interrupt(self, slot: int) -> tuple[int, int]:
        bit = 1 << slot
        _, status, tfd = self._until_interrupted(
            {Px.CI: bit}, (Px.CI, Px.IS, Px.TFD), f"slot {slot}",
            lambda ci, status, tfd: status & PXIS_ERRORS or tfd & TFD_ERR or not ci & bit)
        with self.hba.dev.batch() as b:                  # acknowledge what completion set
            b.write32(self.r, self.base + Px.IS, status)
            b.write32(self.r, Hba.IS, 1 << self.index)
        return status, tfd

    def _until_interrupted(self, issue: dict[int, int], look: tuple[int, ...], what: str,
                           done: Callable[..., object]) -> list[int]:
        """Write the ``issue`` registers, then read the ``look`` registers, again after each
        MSI of the HBA, until ``done(*values)``; returns those values."""
        deadline = Deadline(self.hba.timeout)
        while True:
            with self.hba.dev.batch() as b:
                for reg, value in issue.items():
                    b.write32(self.r, self.base + reg, value)
                indices = [b.read32(self.r, self.base + reg) for reg in look]
            issue = {}
            values = [b.results[i] for i in indices]
            if done(*values):
                return values
            if deadline.expired:
                raise DeviceTimeout(what, 0, values[0])
            try:
                self.hba.irq.wait(deadline.remaining)    # type: ignore[union-attr]
            except InterruptTimeout:
                pass

    # ---- the block device ----

    def identify(self) -> Identity:
        self._prepare(0, Ata.IDENTIFY, nbytes=SECTOR, device=0)
        self._run(0, "IDENTIFY DEVICE")
        self.identity = parse_identify(bytes(self._slot_buffer(0)[1][:SECTOR]))
        return self.identity

    @property
    def sector_size(self) -> int:
        return SECTOR

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return (self.identity or self.identify()).sectors * SECTOR

    def _check(self, lba: int, count: int) -> None:
        sectors = (self.identity or self.identify()).sectors
        if count <= 0 or lba < 0 or lba + count > sectors:
            raise ValueError(f"sectors {lba}..{lba + count - 1} are not on a disk of {sectors}")

    def read(self, lba: int, count: int) -> bytes:
        """``count`` sectors from ``lba`` (READ DMA EXT, 64 KiB a command)."""
        self._check(lba, count)
        out = bytearray()
        for start in range(0, count, SLOT_SECTORS):
            n = min(SLOT_SECTORS, count - start)
            self._prepare(0, Ata.READ_DMA_EXT, lba + start, n, nbytes=n * SECTOR)
            self._run(0, f"READ DMA EXT {lba + start}+{n}")
            out += self._slot_buffer(0)[1][:n * SECTOR]
        return bytes(out)

    def write(self, lba: int, data: bytes) -> None:
        """Whole sectors at ``lba`` (WRITE DMA EXT). Checked before anything is written."""
        if len(data) % SECTOR or not data:
            raise ValueError(f"{len(data)} bytes is not a whole number of {SECTOR}-byte sectors")
        count = len(data) // SECTOR
        self._check(lba, count)
        for start in range(0, count, SLOT_SECTORS):
            n = min(SLOT_SECTORS, count - start)
            self._slot_buffer(0)[1][:n * SECTOR] = data[start * SECTOR:(start + n) * SECTOR]
            self._prepare(0, Ata.WRITE_DMA_EXT, lba + start, n, write=True, nbytes=n * SECTOR)
            self._run(0, f"WRITE DMA EXT {lba + start}+{n}")

    def read_into(self, lba: int, buffers: Sequence[DmaBuffer]) -> None:
        """Read straight into DMA buffers, in order (scatter): no copy through Python."""
        self._transfer(lba, buffers, write=False)

    def write_from(self, lba: int, buffers: Sequence[DmaBuffer]) -> None:
        """Write straight from DMA buffers, in order (gather)."""
        self._transfer(lba, buffers, write=True)

    def _transfer(self, lba: int, buffers: Sequence[DmaBuffer], write: bool) -> None:
        regions = [(b.phys, b.size) for b in buffers]
        total = sum(size for _, size in regions)
        if not regions or total % SECTOR or any(size & 1 for _, size in regions):
            raise ValueError(f"buffers of {total} bytes are not whole {SECTOR}-byte sectors")
        count = total // SECTOR
        if count > 65536:
            raise ValueError("one command moves at most 65536 sectors")
        self._check(lba, count)
        command = Ata.WRITE_DMA_EXT if write else Ata.READ_DMA_EXT
        self._prepare(0, command, lba, count & 0xFFFF, write=write, regions=regions)
        self._run(0, lambda: f"{command.name} {lba}+{count} ({len(buffers)} buffers)")

    # ---- ATAPI (a CD-ROM): SCSI commands inside ATA PACKET (MMC; AHCI 4.2.2 "A") ----

    def _packet(self, cdb: bytes, nbytes: int, what: str) -> memoryview:
        """PACKET with ``cdb`` in the command table's ATAPI area, data in by DMA to slot 0."""
        if nbytes > SLOT_SECTORS * SECTOR:
            raise ValueError(f"one ATAPI transfer moves at most {SLOT_SECTORS * SECTOR} bytes")
        self._prepare(0, Ata.PACKET, 0, 0, nbytes=nbytes, device=0, features=PACKET_DMA, atapi=True)
        self.tables.view[CMD_TABLE_ACMD:CMD_TABLE_ACMD + 16] = cdb.ljust(16, b"\0")
        self._run(0, what)
        return self._slot_buffer(0)[1][:nbytes]

    def identify_packet(self) -> Identity:
        self._prepare(0, Ata.IDENTIFY_PACKET, nbytes=SECTOR, device=0)
        self._run(0, "IDENTIFY PACKET DEVICE")
        self.identity = parse_identify(bytes(self._slot_buffer(0)[1][:SECTOR]))
        return self.identity

    def atapi_capacity(self) -> tuple[int, int]:
        """READ CAPACITY(10): (blocks, block size)."""
        data = bytes(self._packet(bytes([0x25]), 8, "READ CAPACITY"))
        last, size = struct.unpack(">II", data)
        return last + 1, size

    def atapi_read(self, lba: int, count: int) -> bytes:
        """READ(10) of ``count`` 2048-byte blocks from ``lba``."""
        blocks, size = self.atapi_capacity()
        if count <= 0 or lba < 0 or lba + count > blocks:
            raise ValueError(f"blocks {lba}..{lba + count - 1} are not on a disc of {blocks}")
        out = bytearray()
        per = SLOT_SECTORS * SECTOR // size
        for start in range(0, count, per):
            n = min(per, count - start)
            cdb = struct.pack(">BBIBHB", 0x28, 0, lba + start, 0, n, 0)
            out += self._packet(cdb, n * size, f"READ(10) {lba + start}+{n}")
        return bytes(out)

    def flush(self) -> None:
        self._prepare(0, Ata.FLUSH_CACHE_EXT)
        self._run(0, "FLUSH CACHE EXT")

    @property
    def queue_depth(self) -> int:
        identity = self.identity or self.identify()
        return min(self.slots, identity.queue_depth) if identity.ncq else 0

    def read_queued(self, requests: Sequence[tuple[int, int]]) -> list[bytes]:
        """NCQ reads of (lba, sectors), at most ``SLOT_SECTORS`` each, through the slots' own
        buffers; the results come back in request order."""
        for lba, count in requests:
            if not 0 < count <= SLOT_SECTORS:
                raise ValueError(f"a queued read is 1 to {SLOT_SECTORS} sectors, not {count}")
            self._check(lba, count)
        out = [b""] * len(requests)

        def collect(tag: int, index: int) -> None:
            out[index] = bytes(self._slot_buffer(tag)[1][:requests[index][1] * SECTOR])
        self._queued([(lba, None, count * SECTOR) for lba, count in requests], False, collect)
        return out

    def read_queued_into(self, requests: Sequence[tuple[int, DmaBuffer]]) -> None:
        """NCQ reads straight into DMA buffers: no copy through Python."""
        self._queued(self._queue_of(requests), False)

    def write_queued_from(self, requests: Sequence[tuple[int, DmaBuffer]]) -> None:
        """NCQ writes (WRITE FPDMA QUEUED) straight from DMA buffers. Queued writes may reach
        the disk in any order: requests that overlap are refused."""
        queue = self._queue_of(requests)
        spans = sorted((lba, lba + size // SECTOR) for lba, _, size in queue)
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
            raise ValueError("queued writes overlap: the device may apply them in any order")
        self._queued(queue, True)

    def _queue_of(self, requests: Sequence[tuple[int, DmaBuffer]]) -> list[QueuedRequest]:
        """``requests`` as the queue takes them, checked as a whole (each distinct size once,
        the span of LBAs once): the check runs inside every queued call, and one by one it
        cost a tenth of a 32-deep run's time. A failed check names the first bad request."""
        queue = [(lba, buffer.phys, len(buffer.view)) for lba, buffer in requests]
        for size in dict.fromkeys(size for _, _, size in queue):     # each size once, in order
            if not size or size % SECTOR or size > MAX_PRD_BYTES:
                raise ValueError(f"a queued command moves whole sectors, at most {MAX_PRD_BYTES} bytes, not {size}")
        sectors = (self.identity or self.identify()).sectors
        if queue and (min(lba for lba, _, _ in queue) < 0
                      or max(lba + size // SECTOR for lba, _, size in queue) > sectors):
            for lba, _, size in queue:
                self._check(lba, size // SECTOR)
        return queue

    def _queued(self, requests: Sequence[QueuedRequest], write: bool,
                collect: Callable[[int, int], None] | None = None) -> None:
        """Run ``requests`` with NCQ (see ``QueuedRun``); ``collect(tag, index)`` sees each
        request done, while its data are still in the tag's slot buffer."""
        if not self.queue_depth:
            raise DiskError(f"port {self.index}: the device does not queue", 0, 0)
        with self.hba.dev.batch() as b:
            i_tfd, i_act, i_ci = (b.read32(self.r, self.base + reg) for reg in (Px.TFD, Px.SACT, Px.CI))
        if b.results[i_tfd] & TFD_ERR or b.results[i_act] or b.results[i_ci]:
            self.reset()        # an earlier failure, or commands an interrupted call left running
        QueuedRun(self, requests, write, collect).run()

    def _queue_round(self, fresh: int, meanwhile: Callable[[], None]) -> tuple[int, int, int]:
        """Issue ``fresh`` and wait for a completion or an error: (PxIS, PxSACT, PxTFD).
        ``meanwhile`` runs while the proxy works on the round."""
        if self.hba.irq is None:
            return self._queue_round_posted(fresh, meanwhile)
        meanwhile()
        self._until_interrupted({Px.SACT: fresh, Px.CI: fresh}, (Px.IS,), "queued commands",
                                lambda status: status & QUEUE_EVENTS)
        with self.hba.dev.batch() as b:
            i_is = b.read32(self.r, self.base + Px.IS)
            b.write32(self.r, self.base + Px.IS, ~PXIS_ERRORS & 0xFFFFFFFF)
            b.write32(self.r, Hba.IS, 1 << self.index)
            i_act = b.read32(self.r, self.base + Px.SACT)
            i_tfd = b.read32(self.r, self.base + Px.TFD)
        return b.results[i_is], b.results[i_act], b.results[i_tfd]

    def close(self) -> None:
        try:
            if self.present:
                self.stop()
        finally:
            for buf in (self.command_list, self.received_fis, self.tables, self.buffers):
                if buf is not None:
                    self.hba.dev.dma_free(buf)


class QueuedRun:
    """One call's NCQ requests on a port, up to ``queue_depth`` in flight, the way a
    kernel's block layer keeps a queue full.

    Each round (``Port._queue_round``) issues the fresh tags, waits until a completion
    (SDBS) or an error shows (polling: in the received Set Device Bits FIS, then one round
    trip; interrupts: the HBA's MSI), then sees in PxSACT which tags are done (``reap``).
    While the device works on a round, Python builds each busy tag's next command in its
    spare table (``build_ahead``), so a tag that completes goes again at once, and
    Python's share of the work overlaps the device's. (Issuing
    by halves, to fill one while the other is in flight, measured slower: QEMU's cost per
    PxCI write is large enough that fewer, fuller issues win.) A failed command stops the
    port: it is reset (COMRESET), and every request that had not completed is retried on
    its own, not queued (``recover``), so one bad sector fails one request, which
    DiskError names, and no other. Tags are bits of masks here, as they are in PxSACT.
    Each tag has two command tables: table k is slot k % slots; one runs, the other is
    the spare its next command is built in."""

    def __init__(self, port: Port, requests: Sequence[QueuedRequest], write: bool,
                 collect: Callable[[int, int], None] | None) -> None:
        self.port, self.requests, self.write, self.collect = port, requests, write, collect
        self.depth = depth = port.queue_depth
        self.command = int(Ata.WRITE_FPDMA_QUEUED if write else Ata.READ_FPDMA_QUEUED)
        slots, tables_phys = port.slots, port.tables.phys
        self.view, self.table_prd, self.headers = port.tables.view, port._table_prd, port._list_words
        # what stays in a tag's header: a FIS, one PRD, the write bit; the tables' address above 4 GiB
        header = bytes(CommandHeader(flags=FIS_DWORDS | (HEADER_WRITE if write else 0), prdtl=1))
        self.header_flags, self.tables_high = int.from_bytes(header[:4], "little"), tables_phys >> 32
        self.address = [(tables_phys + k * TABLE_SIZE) & 0xFFFFFFFF for k in range(2 * slots)]
        self.other = [k + slots if k < slots else k - slots for k in range(2 * slots)]     # a table's twin
        self.request_of = [0] * depth               # tag -> the request it runs
        self.built = [-1] * depth                   # tag -> the request built in its spare table
        self.ahead = 0                              # tags whose spare table holds a built request
        self.spare = list(range(slots, slots + depth))  # tag -> the table its next command goes in
        self.following = 0                          # the next request to build
        self.free = (1 << depth) - 1                # tags with nothing to run
        self.in_flight = 0                          # tags the HBA has
        self.fresh = 0                              # tags issued in the command list, not yet to the HBA
        self.failures: list[tuple[int, DiskError]] = []

    def run(self) -> None:
        """Every request, round by round; raise DiskError naming those that failed."""
        port = self.port
        self.claim_headers()
        while True:
            self.fill()
            if not self.fresh and not self.in_flight:
                break
            self.in_flight |= self.fresh
            try:
                status, active, tfd = port._queue_round(self.fresh, self.build_ahead)
            except DeviceTimeout as exc:
                port.reset()
                raise DiskError(f"port {port.index}: queued commands did not complete", exc.last_value, 0,
                                failed=[i for i, _ in self.failures] + self.unfinished()) from exc
            self.fresh = 0
            self.reap(active)
            if status & PXIS_ERRORS or tfd & TFD_ERR:
                self.recover()
        if self.failures:
            failed = [i for i, _ in self.failures]
            last = self.failures[-1][1]
            raise DiskError(f"port {port.index}: queued request(s) {failed} failed", last.status, last.error,
                            failed=failed)

    def claim_headers(self) -> None:
        """The header words that stay the same all run long."""
        headers, flags, high = self.headers, self.header_flags, self.tables_high
        for tag in range(self.depth):
            headers[tag * HEADER_WORDS], headers[tag * HEADER_WORDS + CTBA_WORD + 1] = flags, high

    def build(self, tag: int) -> None:
        """The next request into ``tag``'s spare table: the FIS, and the one PRD (checked by
        the caller) only if that table's differs."""
        index = self.following
        lba, phys, size = self.requests[index]
        if phys is None:
            phys = self.port._slot_buffer(tag)[0]
        table = self.spare[tag]
        offset = table * TABLE_SIZE
        pack_h2d_fis(self.view, offset, self.command, lba, size // SECTOR, DEVICE_LBA, 0, tag)
        if self.table_prd[table] != (phys, size):
            PRD.pack_into(self.view, offset + CMD_TABLE_PRDT, phys, 0, size - 1)
            self.table_prd[table] = (phys, size)
        self.built[tag] = index
        self.ahead |= 1 << tag
        self.following = index + 1

    def issue(self, tags: int) -> None:
        """Point each of ``tags``' headers at what was built in its spare table; they go to
        the HBA next round."""
        self.fresh |= tags
        self.ahead &= ~tags
        spare, headers, address, other = self.spare, self.headers, self.address, self.other
        request_of, built = self.request_of, self.built
        while tags:
            bit = tags & -tags
            tags ^= bit
            tag = bit.bit_length() - 1
            table, h = spare[tag], tag * HEADER_WORDS
            headers[h + PRDBC_WORD] = 0
            headers[h + CTBA_WORD] = address[table]
            request_of[tag], built[tag] = built[tag], -1
            spare[tag] = other[table]

    def fill(self) -> None:
        """Free tags take the next requests at once, lowest tag first."""
        free, total, taken = self.free, len(self.requests), 0
        while free and self.following < total:
            bit = free & -free
            free ^= bit
            taken |= bit
            self.build(bit.bit_length() - 1)
        self.free = free
        self.issue(taken)

    def build_ahead(self) -> None:
        """While a round runs: each tag in flight gets its next command, lowest tag first."""
        waiting, total = self.in_flight & ~self.ahead, len(self.requests)
        while waiting and self.following < total:
            bit = waiting & -waiting
            waiting ^= bit
            self.build(bit.bit_length() - 1)

    def reap(self, active: int) -> None:
        """Tags PxSACT no longer shows are done: collected, then issued again if their next
        command is built, or free. The HBA has nothing to do while this runs (a round's tags
        mostly end together), so it works on masks, not tag by tag, but to collect."""
        done, self.in_flight = self.in_flight & ~active, self.in_flight & active
        if self.collect:
            collect, request_of, left = self.collect, self.request_of, done
            while left:
                bit = left & -left
                left ^= bit
                collect(bit.bit_length() - 1, request_of[bit.bit_length() - 1])
        self.free |= done & ~self.ahead
        self.issue(done & self.ahead)

    def unfinished(self) -> list[int]:
        """The requests not done: in flight, built ahead, not yet built."""
        return sorted([self.request_of[t] for t in range(self.depth) if self.in_flight >> t & 1]
                      + [b for b in self.built if b >= 0] + list(range(self.following, len(self.requests))))

    def recover(self) -> None:
        """After a failed command: COMRESET, each request that was in flight or built retried
        alone, and the queue starts again empty."""
        self.port.reset()
        waiting = [self.request_of[t] for t in range(self.depth) if (self.in_flight | self.fresh) >> t & 1]
        self.failures += self.retry_alone(sorted(waiting + [b for b in self.built if b >= 0]))
        self.fresh, self.free, self.in_flight, self.built = 0, (1 << self.depth) - 1, 0, [-1] * self.depth
        self.ahead = 0
        self.claim_headers()                        # the retries used slot 0's header

    def retry_alone(self, indices: list[int]) -> list[tuple[int, DiskError]]:
        """Each of ``indices`` once more, on its own in slot 0 (not queued). Returns those
        that fail again, with their errors."""
        port = self.port
        command = Ata.WRITE_DMA_EXT if self.write else Ata.READ_DMA_EXT
        failed: list[tuple[int, DiskError]] = []
        for index in indices:
            lba, phys, size = self.requests[index]
            region = (port._slot_buffer(0)[0] if phys is None else phys, size)
            port._prepare(0, command, lba, size // SECTOR, write=self.write, regions=[region])
            try:
                port._run(0, f"{command.name} {lba}+{size // SECTOR} (retried alone)")
            except DiskError as exc:
                failed.append((index, exc))
                port.reset()                    # queued commands after this start from a clean status
                continue
            if self.collect:
                self.collect(0, index)
        log.info("port %d: a queued command failed; %d retried alone, %d failed again",
                 port.index, len(indices), len(failed))
        return failed
