"""Drivers in processes of their own: the owner's control socket that lends driver slots
(``serve(pm)``), a driver process's ``attach()``, and the supervisor that forks drivers from
a zygote and restarts them when they die or hang."""

from .attached import attach
from .control import ControlServer, serve
from .supervisor import Supervisor

__all__ = ["ControlServer", "Supervisor", "attach", "serve"]
