"""The machine layer: a declarative spec, one QEMU process per Machine."""

from .accel import kvm_usable, resolve_accel
from .console import Console
from .machine import Machine
from .spec import MachineSpec, Option, RuntimeFile, random_mac

__all__ = ["Console", "Machine", "MachineSpec", "Option", "RuntimeFile", "kvm_usable", "random_mac",
           "resolve_accel"]
