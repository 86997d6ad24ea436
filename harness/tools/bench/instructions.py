"""``hwharness bench instructions``: the proxy's hot paths in guest instructions, not seconds.

Wall-clock benches on a shared host measure its load as much as the code: a
regression of a tenth on the proxy's hot path hides in their noise. This bench
boots the proxy under TCG with ``-icount shift=0``, where the guest's TSC
advances one tick per guest instruction, and reads the TSC stamps the proxy
already reports (a request's ``start_tsc``, an interrupt's handler-entry
``tsc``). A difference of two stamps taken without an idle wait between them
is then a count of guest instructions, the same on every run whatever the
host does; each figure is taken ``repeats`` times and its min and max are
reported beside it (they should be equal).

The host spins on every wait here (``spin``), so the guest never rings the
host's doorbell: the counts are of the path without that one MMIO write.

- ``pio_batch``: one debugcon port read inside a batch, start to start.
- ``mmio_batch``: the same for an e1000 STATUS read.
- ``pio_single``: a batch of one port read, from its start to the start of a
  one-read batch on the next ring (both posted while the machine was stopped):
  the request, its batch's end and the next batch's start, without the idle
  loop's look for work.
- ``irq_entry``: an e1000 ICS write's ``start_tsc`` to the proxy's handler
  entry (the write's request up to the access, the interrupt's delivery).
- ``irq_total``: what the interrupt adds to the request it lands in, its
  delivery, handler and return (a batch [ICS write, STATUS read], start to
  start, less the same batch whose ICS write raises nothing). The handler
  alone is this less its delivery, which no stamp separates from the write's
  request (``irq_entry`` holds both).
- ``turn_resume``: a batch that outlasts its turn yields and is resumed on the
  idle loop's next pass: that pass and the resume, over a batch that does not
  yield (a native repeat loop of known length, then a port read).

Every key ends in ``_instructions``: lower is better (``bench compare``).
Under KVM there is no icount: ``--accel auto`` runs TCG regardless (the JSON
says so), ``--accel kvm`` is refused.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from ...access import Access, Irq, Kind, Region
from ...errors import BadInput, HarnessError
from ...proxy import ProxyMachine, proxy_spec, raw
from ...proxy.channel import ProxyChannel
from ...proxy.guest import guest_elf
from .roundtrip import DEBUGCON_PORT, E1000, STATUS

ICR, ICS, IMS = 0x00C0, 0x00C8, 0x00D0      # 8254x interrupt cause read / set, mask set
ICR_RXT0 = 0x80
BATCH = 16                  # reads per batch: the per-request figure is their median difference
SPIN_S = 30.0               # the host spins through every wait: the guest rings no doorbell
REPEATS, QUICK_REPEATS = 10, 3
SHORT_LOOP = 1000           # native reads in a loop well inside a turn


def turn_resume(port: Region, reads: int) -> int:
    """A batch [a native loop of ``reads`` port reads, one port read]: the instructions
    between its two starts that are not the loop's own (the loop reports those)."""
    channel = port.channel
    assert isinstance(channel, ProxyChannel)
    loop = raw.repeat_request(channel, port.space, port.base, 1, reads)
    (_, looped), _ = raw.submit(channel, [loop, raw.encode(channel, port.access(Kind.READ, 0, 1))])
    t = _stamps(channel, 2)
    return t[1] - t[0] - looped


def loop_pass(port: Region) -> int:
    """Instructions per read of the guest's native repeat loop."""
    return max(1, raw.repeat_read(port.channel, port.space, port.base, 1, SHORT_LOOP) // SHORT_LOOP)


def turn_ticks(pm: ProxyMachine) -> int:
    """A ring's turn in guest TSC ticks, as the guest computes it."""
    return pm.bus.tsc_hz * pm.abi.PROXY_TURN_US // 1_000_000


def _stamps(channel: ProxyChannel, count: int) -> list[int]:
    """The start_tsc of the channel's last ``count`` requests, oldest first."""
    ring = channel.ring
    return [ring.start_tsc(ring.head - count + i) for i in range(count)]


def per_request_in_batch(channel: ProxyChannel, access: Access) -> int:
    """One batch of BATCH copies of ``access``: the median of its start-to-start differences."""
    channel.prepare([access] * BATCH).run()
    t = _stamps(channel, BATCH)
    return int(statistics.median(b - a for a, b in zip(t, t[1:])))


def single_request(pm: ProxyMachine, first: tuple[ProxyChannel, Access], second: tuple[ProxyChannel, Access]) -> int:
    """A one-access batch on the first channel's ring, to the start of a one-access batch on
    the second's, both posted while the machine is stopped so the guest finds them in one look."""
    pm.machine.qmp("stop")
    try:
        pending = [channel.start([access]) for channel, access in (first, second)]
    finally:
        pm.machine.qmp("cont")
    for p in pending:
        p.wait()
    a, b = first[0].last_start_tsc, second[0].last_start_tsc
    if b <= a:
        raise HarnessError(f"the proxy served ring {second[0]!r} before {first[0]!r}: this bench's premise is gone")
    return b - a


def interrupt(nic: ProxyChannel, bar0: Region, irq: Irq) -> tuple[int, int]:
    """(entry, total): a batch [ICS write, STATUS read] whose write raises the e1000's
    interrupt, against the same batch whose write raises nothing."""
    status = bar0.access(Kind.READ, STATUS, 4)
    nic.prepare([bar0.access(Kind.WRITE, ICS, 4, 0), status]).run()
    quiet = _stamps(nic, 2)
    nic.prepare([bar0.access(Kind.WRITE, ICS, 4, ICR_RXT0), status]).run()
    loud = _stamps(nic, 2)
    event = irq.wait(SPIN_S)
    bar0.read32(ICR)                        # deasserts the line
    irq.ack()
    return event.guest_tsc - loud[0], (loud[1] - loud[0]) - (quiet[1] - quiet[0])


def measure(pm: ProxyMachine, repeats: int) -> dict[str, list[int]]:
    """Each figure ``repeats`` times, in guest instructions, by its key."""
    bus = pm.bus
    port = bus.ports(DEBUGCON_PORT, 1)       # opened first: its ring is served first
    nic = bus.open(bus.find(**E1000))
    try:
        bar0 = nic.bar(0)
        for channel in (port.channel, nic.channel):
            channel.spin = SPIN_S
        bar0.write32(IMS, ICR_RXT0)
        irq = nic.irq()
        irq.spin = SPIN_S
        per_read, turn = loop_pass(port), turn_ticks(pm)
        turn_loop = min(pm.abi.PROXY_REPEAT_MAX, 2 * turn // per_read)
        if turn_loop * per_read <= turn:
            raise HarnessError("bench instructions: the guest's longest native loop no longer outlasts a turn")
        pio, mmio = port.access(Kind.READ, 0, 1), bar0.access(Kind.READ, STATUS, 4)
        figures: dict[str, Callable[[], int]] = {
            "pio_batch": lambda: per_request_in_batch(port.channel, pio),
            "mmio_batch": lambda: per_request_in_batch(nic.channel, mmio),
            "pio_single": lambda: single_request(pm, (port.channel, pio), (nic.channel, mmio)),
            # a loop longer than a turn (PROXY_TURN_US) against a short one: the yield, the
            # idle loop's pass back to the ring and the resume
            "turn_resume": lambda: turn_resume(port, turn_loop) - turn_resume(port, SHORT_LOOP),
        }
        got: dict[str, list[int]] = {name: [] for name in (*figures, "irq_entry", "irq_total")}
        for name, take in figures.items():
            take()                          # warm up: the first run translates the guest's code
            got[name] = [take() for _ in range(repeats)]
        interrupt(nic.channel, bar0, irq)
        for _ in range(repeats):
            entry, total = interrupt(nic.channel, bar0, irq)
            got["irq_entry"].append(entry)
            got["irq_total"].append(total)
        irq.close()
    finally:
        nic.close()
        port.channel.close()
    return {f"{name}_instructions": values for name, values in got.items()}


def run(accel: str, quick: bool = False, iommu: bool | None = None,
        guest_sources: Path | None = None) -> dict[str, object]:
    """Boot the proxy under TCG with -icount shift=0 and count its hot paths (see the module's
    docstring). ``guest_sources``: another checkout's guests/proxy, to count its guest."""
    if accel == "kvm":
        raise BadInput("bench instructions counts guest instructions with QEMU's -icount, which only TCG has: "
                       "run it with --accel tcg (or auto)")
    spec = proxy_spec(elf=guest_elf(guest_sources), accel="tcg", iommu=iommu)
    spec.icount_shift = 0
    spec.device("e1000", mitigation=False)      # no throttle timer between the write and the interrupt
    spec.chardev("null", "debugcon")
    spec.device("isa-debugcon", iobase=DEBUGCON_PORT, chardev="debugcon")
    repeats = QUICK_REPEATS if quick else REPEATS
    with ProxyMachine(spec, name="bench-instructions") as pm:
        counts = measure(pm, repeats)
        elf, tsc_hz = pm.elf, pm.bus.tsc_hz
    # tsc_hz: the guest's PIT calibration, 1 GHz when the TSC counts instructions (2**0 ns each)
    # the median is the figure (bench compare compares it); [min, max] shows it repeats exactly,
    # and "repeated" holds every repeat (an interrupt landing inside one repeat's span adds to it)
    return {"benchmark": "instructions", "accel": "tcg", "accel_asked": accel, "icount_shift": 0,
            "tsc_hz": tsc_hz, "clock": "guest instructions", "guest": str(elf), "repeats": repeats, "quick": quick,
            "results": {key: int(statistics.median(v)) for key, v in counts.items()},
            "range": {key: [min(v), max(v)] for key, v in counts.items()}, "repeated": counts}
