"""Which accelerator a machine runs under: ``auto`` picks KVM only where KVM is fast.

An openable /dev/kvm is not enough. Some hosts (nested cloud VMs) provide it
through ``kvm_pvm``, a module that runs any guest that is not PVM-aware (the
proxy, SeaBIOS, a stock Linux kernel) through KVM's instruction emulator:
there the proxy's round trip is 176 us against 0.78 us under TCG, and a
Debian kernel prints nothing in 180 s. So ``auto`` asks for the hardware
(vmx or svm among the CPU flags) and for the absence of a known emulating
module, and logs what it decided and why, once per process.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ACCELS = ("auto", "kvm", "tcg")
# Modules that provide /dev/kvm without hardware virtualisation (checked in /sys/module).
EMULATING_KVM_MODULES = ("kvm_pvm",)
VIRT_FLAGS = ("vmx", "svm")     # Intel VT-x, AMD-V


@dataclass(frozen=True)
class AccelChoice:
    """What ``auto`` resolved to and the reason, in words a log reader understands."""

    accel: str
    reason: str


def kvm_usable(device: Path = Path("/dev/kvm")) -> bool:
    """True when /dev/kvm exists and this process may open it read-write."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags (every CPU of a host has the same ones)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def choose_auto(device: Path = Path("/dev/kvm"), cpuinfo: Path = Path("/proc/cpuinfo"),
                modules: Path = Path("/sys/module")) -> AccelChoice:
    """Decide what ``auto`` means on this host; the paths are parameters so tests can fake a host."""
    if not kvm_usable(device):
        return AccelChoice("tcg", f"{device} is missing or cannot be opened read-write")
    emulating = [m for m in EMULATING_KVM_MODULES if (modules / m).exists()]
    if emulating:
        return AccelChoice("tcg", f"{device} is provided by {', '.join(emulating)}, which emulates every "
                                  "instruction of a guest that is not PVM-aware: far slower than TCG")
    flags = cpu_flags(cpuinfo)
    if not flags & set(VIRT_FLAGS):
        return AccelChoice("tcg", f"{device} opens but the CPU flags have neither vmx nor svm, so KVM "
                                  "cannot be hardware-backed")
    return AccelChoice("kvm", f"{device} opens and the CPU has {'/'.join(sorted(flags & set(VIRT_FLAGS)))}")


@functools.lru_cache(maxsize=None)
def _auto_for_this_host() -> AccelChoice:
    choice = choose_auto()
    log.info("accel auto -> %s: %s", choice.accel, choice.reason)
    return choice


def resolve_accel(accel: str) -> str:
    """``auto`` becomes kvm only where KVM is hardware-backed, else tcg; a forced choice stays."""
    if accel not in ACCELS:
        raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
    if accel == "auto":
        return _auto_for_this_host().accel
    return accel


def emulating_kvm(accel: str) -> bool:
    """Whether ``accel`` is a forced KVM that ``auto`` would not pick on this host: one that
    emulates every guest instruction, far slower than TCG."""
    return resolve_accel(accel) == "kvm" and _auto_for_this_host().accel != "kvm"


def why_linux_does_not_boot(accel: str) -> str:
    """Why the Linux guest is not booted under ``accel`` on this host ('' where it is): a
    forced KVM that ``auto`` would not pick emulates a stock kernel for minutes. The one
    check the pytest fixtures, the benches and the demo make."""
    if emulating_kvm(accel):
        return f"the Linux guest is not booted under this host's KVM ({_auto_for_this_host().reason})"
    return ""
