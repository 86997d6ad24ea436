"""The shared window as the host sees it: control page, rings, and how to wait.

Waiting is spin-then-sleep on both sides. The host spins on a completion
for a while, yielding its core to anyone runnable each time round (a
machine here has two cores, and the vCPU and QEMU's I/O threads want them
both); then it sets that doorbell vector's byte of ``host_sleeping`` and
blocks on the vector's eventfd, which the guest rings only while the byte is
set, taking it down as it rings (one ring per sleep, however many interrupts
a burst brings). Every ring and every channel vector has a doorbell vector of its own,
and each has one waiter at a time (a channel serves one thread), so one
waiting thread never swallows another's wake-up and the flags need no lock:
a second process could own a channel. In the other
direction the host kicks the guest's MSI-X vector only while the guest has
announced ``guest_sleeping``. Each side re-checks after announcing, with a
full fence between, so no wake-up is lost; the host's sleeps are also bounded
(``SLEEP_SLICE``), so even a lost one costs milliseconds, not a hang.

One reordering is left on purpose: after posting work the host reads
``guest_sleeping`` with no fence after its store (a fence from Python is a
lock round trip, a tenth of a request). If the guest went to sleep just then,
the kick is missed; the host's own re-kick before it sleeps (``_sleep``)
recovers it, at the price of one spin. Not on a ring whose channel asks the
guest for less than its default spin (``ProxyChannel.guest_spin``): there the
guest goes to halt after nearly every request, and a posted batch (a doorbell)
has no waiter to re-kick, so its post is fenced (``Ring.fenced``).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any, Callable, Protocol, Sequence

from ..errors import GuestCrash, HarnessError, MachineError, ProxyUnresponsive
from .guestelf import load_elf, render_crash
from .abi import Abi


class WindowHandles(Protocol):
    """What a holder of one ivshmem window has: its mapping and its eventfds
    (an IvshmemServer in the owner; what the owner lent, in a driver process)."""

    memory: Any                         # the mmap
    host_fds: Sequence[int]             # the guest rings these: we wait on them

    def kick_guest(self, vector: int = 0) -> None: ...


class Liveness(Protocol):
    """Whether the machine behind a window still runs (a Machine, or its owner seen from afar)."""

    argv: list[str]
    console: Any
    qemu_pid: int | None

    def check_alive(self) -> None: ...

log = logging.getLogger(__name__)

SPIN_SECONDS = 200e-6   # host spins this long on a completion before it sleeps
SLEEP_SLICE = 0.01      # longest single sleep; then liveness is checked again


class SharedWindow:
    """Typed views of the ivshmem window plus the notification protocol."""

    def __init__(self, handles: WindowHandles, abi: Abi, machine: Liveness, holds_crash: bool = True) -> None:
        self.machine = machine
        self.holds_crash = holds_crash      # the control window; a slot's says only that it happened
        self.abi = abi
        self.ivshmem = handles
        self.mem = handles.memory
        self.u16 = memoryview(self.mem).cast("H")
        self.u32 = memoryview(self.mem).cast("I")
        self.u64 = memoryview(self.mem).cast("Q")
        off = lambda path: abi.offsetof("proxy_shared", path)  # noqa: E731
        self.state_idx = off("state") // 4
        self.magic_idx = off("magic") // 4
        self.guest_sleeping_idx = off("guest_sleeping") // 4
        self.kicked = 0                 # the number of the guest's halt this process last kicked
        self.heartbeat_idx = off("heartbeat") // 8
        # Window p's hot page is hot[p] and its ring r is rings[first channel of p + r], so
        # no two windows' hot pages share an index of TCG's TLB (abi.h).
        self.slot = self.u32[off("slot") // 4]                  # the owner wrote it before boot
        hot = off("hot") + self.slot * abi.sizeof("proxy_window_hot")
        self.host_sleeping_off = hot + abi.offsetof("proxy_window_hot", "host_sleeping")  # a byte per doorbell vector
        self.irqs_off = hot + abi.offsetof("proxy_window_hot", "irqs")
        self.dma_faults_off = hot + abi.offsetof("proxy_window_hot", "dma_faults")
        first_channel = abi.PROXY_MAX_CHANNELS + (self.slot - 1) * abi.PROXY_SLOT_CHANNELS if self.slot else 0
        self.ring_size = abi.sizeof("proxy_ring")
        self.rings_off = off("rings") + first_channel * self.ring_size   # this window's ring 0
        self._fence = threading.Lock()   # a locked instruction: the full fence Python lacks
        self._pollers: dict[int, select.poll] = {}    # one per doorbell vector, made at its first sleep

    def field(self, path: str) -> Any:
        """Decode one member of the control page, e.g. ``field("tsc_hz")``."""
        offset, t = self.abi.locate("proxy_shared", path)
        return self.abi.decode(t, self.mem, offset)

    @property
    def state(self) -> int:
        return self.u32[self.state_idx]

    def wait_ready(self, timeout: float) -> None:
        """Wait for the guest to publish the ABI and reach READY."""
        deadline = time.monotonic() + timeout
        while self.state == self.abi.PROXY_STATE_BOOTING:
            self.machine.check_alive()
            if time.monotonic() > deadline:
                raise MachineError(f"the proxy guest did not come up within {timeout:g} s",
                                   self.machine.argv, self.machine.console.text() if self.machine.console else "")
            time.sleep(0.002)
        self.check_crash()
        if self.u32[self.magic_idx] != self.abi.PROXY_ABI_MAGIC:
            raise MachineError("the guest wrote a bad ABI magic into the window")
        version = self.field("abi_version")
        if version != self.abi.PROXY_ABI_VERSION:
            raise MachineError(f"the running guest speaks ABI {version}, its ELF says "
                               f"{self.abi.PROXY_ABI_VERSION}: stale build?")

    def check_crash(self) -> None:
        if self.state == self.abi.PROXY_STATE_CRASHED:
            if not self.holds_crash:
                raise GuestCrash({}, "the proxy guest crashed; its report is in the control window of the "
                                     "machine's owner")
            record = self.field("crash")
            raise GuestCrash(record, render_crash(load_elf(self.abi.path), record))

    def fence(self) -> None:
        """A full fence (a locked instruction): stores before it are seen before loads after it."""
        with self._fence:
            pass

    def kick_if_sleeping(self) -> None:
        """Kick a sleeping guest, once per halt: the guest numbers its halts in
        ``guest_sleeping``, and a second kick before it wakes would only cost the writer a
        system call and QEMU's main loop another wake-up (a bridge posting a tail each
        round while the vCPU wakes, 40 us and more under TCG, kicked twice per wake)."""
        sleep = self.u32[self.guest_sleeping_idx]
        if sleep and sleep != self.kicked:
            self.kicked = sleep
            self.ivshmem.kick_guest()

    def wait(self, done: Callable[[], bool], timeout: float, what: object, vector: int,
             spin: float = SPIN_SECONDS, on_timeout: type[HarnessError] = ProxyUnresponsive) -> None:
        """Block until ``done()``: spin for up to ``spin`` seconds, then sleep on doorbell ``vector``.

        Raises GuestCrash if the guest crashes, MachineError if QEMU dies, and
        ``on_timeout`` after ``timeout`` seconds.
        """
        start = time.perf_counter()
        deadline = start + timeout
        spin_until = start + min(spin, timeout)
        spins = 0
        while spin > 0 and not done():
            spins += 1
            # On two cores the vCPU and QEMU's I/O threads want the core this spin
            # holds: offer it every time round.
            os.sched_yield()
            if time.perf_counter() > spin_until:
                break
            if spins & 0xFFF == 0:                # a long spin still notices a dead guest
                self.check_crash()
                self.machine.check_alive()
        while not done():
            self.check_crash()
            self.machine.check_alive()
            if time.perf_counter() > deadline:
                raise on_timeout(f"nothing within {timeout:g} s for {what}")
            self._sleep(done, vector)

    def _poller(self, vector: int) -> select.poll:
        """The vector's eventfd, registered once: select() builds its fd sets on every call,
        a microsecond of each wake-up."""
        poller = self._pollers.get(vector)
        if poller is None:
            poller = self._pollers[vector] = select.poll()
            poller.register(self.ivshmem.host_fds[vector], select.POLLIN)
        return poller

    def _sleep(self, done: Callable[[], bool], vector: int) -> None:
        """Sleep on doorbell ``vector`` until it rings (or a slice passes). The count the last
        ring left is read before the sleep, not after the wake: the read is a system call,
        and after the wake it was on every interrupt's path (a sleeping waiter's p50
        20.5-21 us instead of 21-24 here)."""
        flag, fd = self.host_sleeping_off + vector, self.ivshmem.host_fds[vector]
        poller = self._poller(vector)
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        self.mem[flag] = 1
        try:
            self.fence()            # orders the flag store before the re-check below
            if done():
                return
            self.kick_if_sleeping()  # rescues a kick lost to the guest's own race
            poller.poll(SLEEP_SLICE * 1000)
        finally:
            self.mem[flag] = 0

    def release(self) -> None:
        """Drop the views so the mapping can be closed."""
        for v in (self.u16, self.u32, self.u64):
            v.release()
