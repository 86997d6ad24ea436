"""The proxy transport: rings in the ivshmem window, served by the guest in guests/proxy."""

from .abi import Abi, load_abi
from .bus import ProxyBus, ProxyMachine, proxy_spec
from .channel import ProxyChannel

__all__ = ["Abi", "ProxyBus", "ProxyChannel", "ProxyMachine", "load_abi", "proxy_spec"]
