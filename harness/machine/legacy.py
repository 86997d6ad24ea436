"""The legacy (ISA) devices a machine has, and their ports: what an ISA channel may be granted.

Ports are granted by allow-list: a port belongs to a legacy device this
machine was built with (the i8042 and the RTC that q35 and pc build in, and
the ISA devices of its spec), or nobody gets it. On top of this, the proxy
refuses the ports whose effects reach beyond one device whatever it is
asked (``enum proxy_reserved_ports`` in guests/proxy/abi.h).

Port numbers and defaults are QEMU's (hw/char/parallel.c, hw/char/serial-isa.c,
hw/char/debugcon.c, hw/misc/debugexit.c, hw/input/pckbd.c, hw/rtc/mc146818rtc.c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .spec import MachineSpec


@dataclass(frozen=True)
class LegacyDevice:
    name: str
    ports: tuple[int, ...]
    irqs: tuple[int, ...] = ()

    def __str__(self) -> str:
        ps = self.ports
        span = f"{ps[0]:#x}-{ps[-1]:#x}" if ps == tuple(range(ps[0], ps[-1] + 1)) and len(ps) > 1 else \
            ", ".join(f"{p:#x}" for p in ps)
        return f"{self.name} at {span}"


BUILT_IN = (LegacyDevice("i8042", (0x60, 0x64), (1, 12)), LegacyDevice("rtc", (0x70, 0x71), (8,)))
PARALLEL_BASES = (0x378, 0x278, 0x3BC)              # by index; every one's IRQ is 7 unless told
SERIAL_BASES = (0x3F8, 0x2F8, 0x3E8, 0x2E8)         # by index
SERIAL_IRQS = (4, 3, 4, 3)                          # by index


def _int(value: object) -> int:
    return int(str(value), 0)


def _spec_device(driver: str, props: dict[str, object], index: int) -> LegacyDevice | None:
    """The ports of one ``-device`` option, if it is a legacy device; ``index`` counts its kind."""
    if driver == "isa-parallel":
        base = _int(props["iobase"]) if "iobase" in props else PARALLEL_BASES[_int(props.get("index", index))]
        return LegacyDevice("isa-parallel", tuple(range(base, base + 3)), (_int(props.get("irq", 7)),))
    if driver == "isa-serial":
        n = _int(props.get("index", index + 1))
        base = _int(props["iobase"]) if "iobase" in props else SERIAL_BASES[n]
        return LegacyDevice("isa-serial", tuple(range(base, base + 8)), (_int(props.get("irq", SERIAL_IRQS[n])),))
    if driver == "isa-debugcon":
        return LegacyDevice("isa-debugcon", (_int(props.get("iobase", 0xE9)),))
    if driver == "isa-debug-exit":
        base, size = _int(props.get("iobase", 0x501)), _int(props.get("iosize", 2))
        return LegacyDevice("isa-debug-exit", tuple(range(base, base + size)))
    return None


def legacy_devices(spec: MachineSpec) -> list[LegacyDevice]:
    """Every legacy device ``spec`` builds, with its ports."""
    found = list(BUILT_IN) if spec.machine.split(",")[0] in ("q35", "pc") else []
    seen: dict[str, int] = {}
    for option in spec.options:
        if option.name != "device":
            continue
        device = _spec_device(option.kind, option.props, seen.get(option.kind, 0))
        seen[option.kind] = seen.get(option.kind, 0) + 1
        if device:
            found.append(device)
    return found


def irqs_of(spec: MachineSpec, base: int, count: int) -> int:
    """The ISA IRQs (bit n: IRQ n) of the legacy devices with a port in ``base .. base + count - 1``:
    the interrupts a channel holding those ports may take."""
    return sum({1 << irq for d in legacy_devices(spec) if any(base <= p < base + count for p in d.ports)
                for irq in d.irqs})


def grantable(spec: MachineSpec, base: int, count: int, reserved: Sequence[str] = ()) -> tuple[int, str]:
    """Which of ports ``base .. base + count - 1`` belong to a legacy device of ``spec``:
    a mask (bit n for port base + n), and when it is 0, why not: the proxy's ``reserved``
    reasons for the range where there are any, else what the machine has."""
    devices = legacy_devices(spec)
    mask = 0
    for device in devices:
        for port in device.ports:
            if base <= port < base + count:
                mask |= 1 << (port - base)
    if mask:
        return mask, ""
    if reserved:
        return 0, f"the proxy never grants {', '.join(reserved)}: their effects reach beyond one device"
    have = "; ".join(str(d) for d in devices) or "none"
    return 0, (f"ports {base:#x}-{base + count - 1:#x} belong to no legacy device of this machine "
               f"(it has: {have}); add the device to its spec")
