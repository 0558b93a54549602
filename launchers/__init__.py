"""Ways to start the parties: all on this machine, or one party per host.

``REGISTRY`` maps a launcher name to its class; the engine finds it through the
``mpc_fi.launchers`` entry point declared in ``setup.cfg``.
"""

from .base import Launcher
from .host import HostLauncher
from .local import LocalLauncher

REGISTRY: dict[str, type[Launcher]] = {
    LocalLauncher.name: LocalLauncher,
    HostLauncher.name: HostLauncher,
}

__all__ = ["REGISTRY", "HostLauncher", "Launcher", "LocalLauncher"]
