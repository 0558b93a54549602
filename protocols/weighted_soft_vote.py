"""Weighted soft voting: a weighted average of the owners' softmax distributions."""

from __future__ import annotations

from .base import IntegerWeighted
from .soft_vote import SoftVote


class WeightedSoftVote(IntegerWeighted, SoftVote):
    """Soft voting where owner ``i`` counts ``w_i`` times (public weights, ``owners[i].weight``).

    Each owner shares its softmax distribution exactly as in :class:`~protocols.soft_vote.
    SoftVote`; the sum multiplies owner ``i``'s shares by the integer weight ``W_i``
    (:class:`~protocols.base.IntegerWeighted`): exact, local, equal to its twin bit for bit.
    Tie rule: equal weighted fixed-point sums go to the lowest class index.
    """

    name = "weighted_soft_vote"
    summary = "weighted average of the owners' softmax distributions (public per-owner weights)."
    releases = {"label": "the label of the weighted average distribution",
                "scores": "the weighted average class distribution"}
    cost = ("output mode: one argmax over C classes (the weighted sum is local); full mode: + one "
            "softmax per owner on shares")
