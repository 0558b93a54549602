"""Aggregation protocols that run on secret shares, each with a plaintext twin.

``REGISTRY`` maps each protocol's name to ``"module:Class"``; the engine finds it through the
``mpc_fi.plugins`` entry point declared in ``setup.cfg`` (``mpc_fi`` never imports this package)
and imports a protocol's module only when a federation names it: a soft-voting party never
loads the differentially private protocols or their accounting (dp-accounting, scipy).
``REGISTRY[name]`` and ``from protocols import SoftVote`` import the one module they need.

Layout: :mod:`.base` (the interface, the wrapper and weighting bases), one protocol per module,
:mod:`.secure_ops` (arithmetic on shares) with its twins in :mod:`.plain_ops`, and :mod:`.noise`
(each party's private noise supply for the differentially private protocols).
"""

from __future__ import annotations

from typing import Any

from mpc_fi.plugins import LazyRegistry

#: Class name -> module, for every protocol shipped here (and the interface classes).
_CLASSES: dict[str, str] = {
    "Protocol": "protocols.base",
    "VoteWrapper": "protocols.base",
    "SoftVote": "protocols.soft_vote",
    "HardVote": "protocols.hard_vote",
    "LogitAverage": "protocols.logit_average",
    "WeightedSoftVote": "protocols.weighted_soft_vote",
    "WeightedHardVote": "protocols.weighted_hard_vote",
    "EntropyWeightedVote": "protocols.entropy_weighted_vote",
    "TopK": "protocols.top_k",
    "ConfidentVote": "protocols.confident_vote",
    "GNMax": "protocols.gnmax",
    "ConfidentGNMax": "protocols.confident_gnmax",
}

#: Protocol name (the federation's ``protocol.name``) -> "module:Class".
REGISTRY = LazyRegistry({
    "soft_vote": "protocols.soft_vote:SoftVote",
    "hard_vote": "protocols.hard_vote:HardVote",
    "logit_average": "protocols.logit_average:LogitAverage",
    "weighted_soft_vote": "protocols.weighted_soft_vote:WeightedSoftVote",
    "weighted_hard_vote": "protocols.weighted_hard_vote:WeightedHardVote",
    "entropy_weighted_vote": "protocols.entropy_weighted_vote:EntropyWeightedVote",
    "top_k": "protocols.top_k:TopK",
    "confident_vote": "protocols.confident_vote:ConfidentVote",
    "gnmax": "protocols.gnmax:GNMax",
    "confident_gnmax": "protocols.confident_gnmax:ConfidentGNMax",
})


def __getattr__(name: str) -> Any:
    """``from protocols import SoftVote`` imports only ``protocols.soft_vote`` (PEP 562)."""
    module = _CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module 'protocols' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(module), name)


__all__ = ["REGISTRY", "Protocol", "VoteWrapper", "SoftVote", "HardVote", "LogitAverage",
           "WeightedSoftVote", "WeightedHardVote", "EntropyWeightedVote", "TopK", "ConfidentVote",
           "GNMax", "ConfidentGNMax"]
