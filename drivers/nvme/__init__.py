"""NVMe controllers and their namespaces."""

from .driver import Command, ControllerIdentity, NamespaceIdentity, Namespace, Nvme, NvmeError, QueuePair

__all__ = ["Command", "ControllerIdentity", "Namespace", "NamespaceIdentity", "Nvme", "NvmeError", "QueuePair"]
