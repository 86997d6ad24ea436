"""NVMe controllers and their namespaces: the protocol core (``core``: identify, namespaces,
commands, status names) and the PCI transport (``pci``: registers, queues, PRPs, doorbells)."""

from .core import Coalescing, Command, ControllerIdentity, Namespace, NamespaceIdentity, NvmeError
from .pci import Nvme, QueuePair, QueueState

__all__ = ["Coalescing", "Command", "ControllerIdentity", "Namespace", "NamespaceIdentity", "Nvme", "NvmeError", "QueuePair",
           "QueueState"]
