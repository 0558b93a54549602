"""Aggregation protocols that run on secret shares, each with a plaintext twin.

``REGISTRY`` maps each protocol's name to its class; the engine finds it through the
``mpc_fi.plugins`` entry point declared in ``setup.cfg`` (``mpc_fi`` never imports this package).
"""

from .base import Protocol
from .hard_vote import HardVote
from .soft_vote import SoftVote

REGISTRY: dict[str, type[Protocol]] = {
    SoftVote.name: SoftVote,
    HardVote.name: HardVote,
}

__all__ = ["REGISTRY", "Protocol", "SoftVote", "HardVote"]
