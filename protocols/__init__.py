"""Aggregation protocols that run on secret shares, each with a plaintext twin.

``REGISTRY`` maps each protocol's name to its class; the engine finds it through the
``mpc_fi.plugins`` entry point declared in ``setup.cfg`` (``mpc_fi`` never imports this package).

Layout: :mod:`.base` (the interface, the wrapper and weighting bases), one protocol per module,
:mod:`.secure_ops` (arithmetic on shares) with its twins in :mod:`.plain_ops`, and :mod:`.noise`
(each party's private noise supply for the differentially private protocols).
"""

from .base import Protocol, VoteWrapper
from .confident_gnmax import ConfidentGNMax
from .confident_vote import ConfidentVote
from .entropy_weighted_vote import EntropyWeightedVote
from .gnmax import GNMax
from .hard_vote import HardVote
from .logit_average import LogitAverage
from .soft_vote import SoftVote
from .top_k import TopK
from .weighted_hard_vote import WeightedHardVote
from .weighted_soft_vote import WeightedSoftVote

REGISTRY: dict[str, type[Protocol]] = {
    SoftVote.name: SoftVote,
    HardVote.name: HardVote,
    LogitAverage.name: LogitAverage,
    WeightedSoftVote.name: WeightedSoftVote,
    WeightedHardVote.name: WeightedHardVote,
    EntropyWeightedVote.name: EntropyWeightedVote,
    TopK.name: TopK,
    ConfidentVote.name: ConfidentVote,
    GNMax.name: GNMax,
    ConfidentGNMax.name: ConfidentGNMax,
}

__all__ = ["REGISTRY", "Protocol", "VoteWrapper", "SoftVote", "HardVote", "LogitAverage",
           "WeightedSoftVote", "WeightedHardVote", "EntropyWeightedVote", "TopK", "ConfidentVote",
           "GNMax", "ConfidentGNMax"]
