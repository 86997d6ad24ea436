"""The machine layer: a declarative spec, one QEMU process per Machine."""

from .console import Console
from .machine import Machine
from .spec import MachineSpec, Option, RuntimeFile, kvm_usable, random_mac, resolve_accel

__all__ = ["Console", "Machine", "MachineSpec", "Option", "RuntimeFile", "kvm_usable", "random_mac",
           "resolve_accel"]
