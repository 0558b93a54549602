"""Weighted hard voting: each owner's vote counts its public weight."""

from __future__ import annotations

from .base import IntegerWeighted
from .hard_vote import HardVote


class WeightedHardVote(IntegerWeighted, HardVote):
    """Plurality where owner ``i``'s vote counts ``w_i`` (public weights, ``owners[i].weight``).

    Each owner's one-hot vote (as in :class:`~protocols.hard_vote.HardVote`) is multiplied on
    shares by its integer weight ``W_i`` (:class:`~protocols.base.IntegerWeighted`), so weighted
    counts are exact integers and ties are real ties.
    Tie rule: an owner's own vote and the weighted plurality both go to the lowest class index.
    """

    name = "weighted_hard_vote"
    summary = "each owner votes for its top class with its public weight; the heaviest class wins."
    releases = {"label": "the weighted plurality label",
                "scores": "every class's share of the total weight (weighted vote counts / total)"}
    cost = ("output mode: one argmax over C weighted counts (the weighting is local); full mode: "
            "+ one argmax per owner on shares")
