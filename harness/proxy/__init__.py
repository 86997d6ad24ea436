"""The proxy transport: rings in ivshmem windows, served by the guest in guests/proxy."""

from .abi import Abi, load_abi
from .admin import ProxyAdmin
from .bus import ProxyBus
from .channel import ProxyChannel
from .machine import ProxyMachine, ProxyWindows, on_fastest_aio, proxy_spec

__all__ = ["Abi", "ProxyAdmin", "ProxyBus", "ProxyChannel", "ProxyMachine", "ProxyWindows", "load_abi", "on_fastest_aio", "proxy_spec"]
