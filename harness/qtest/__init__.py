"""The qtest transport: the access interface over QEMU's qtest socket, with the guest CPU stopped.

It grants what the proxy grants (the rules are read from the proxy guest's ABI)
and is the baseline the benches measure the proxy against.
"""

from .bus import IO_END, IO_START, MEM_END, MEM_START, QtestBus, QtestChannel
from .machine import QtestMachine, QtestSocket, qtest_spec

__all__ = ["IO_END", "IO_START", "MEM_END", "MEM_START", "QtestBus", "QtestChannel", "QtestMachine", "QtestSocket", "qtest_spec"]
