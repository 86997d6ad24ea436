"""hwharness: drive real emulated x86 hardware from Python through a guest-side proxy."""

from .access import (Access, Bar, Batch, Bus, Channel, Device, Irq, IrqEvent, IrqMode, Kind, PciFunction, Region,
                     Space)
from .errors import (AbiError, AccessDenied, BadInput, BadRequest, DeviceNotFound, DeviceTimeout, GuestCrash,
                     HarnessError, InterruptTimeout, MachineError, ProxyError, ProxyFault, ProxyUnresponsive,
                     QemuNotFound)
from .machine import Machine, MachineSpec
from .tracing import Tracer, trace
from .processes.attached import attach  # noqa: E402  (after the rest: it builds on all of it)

__all__ = [
    "AbiError", "Access", "AccessDenied", "BadInput", "BadRequest", "Bar", "Batch", "Bus", "Channel", "Device",
    "DeviceNotFound", "DeviceTimeout", "GuestCrash", "HarnessError", "InterruptTimeout", "Irq", "IrqEvent", "IrqMode", "Kind", "Machine", "MachineError", "MachineSpec",
    "PciFunction", "ProxyError", "ProxyFault", "ProxyUnresponsive", "QemuNotFound", "Region", "Space", "Tracer", "attach", "trace",
]
