"""Hard voting: plurality of the owners' predicted labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mpc_fi import plain, secure

from mpc_fi.bounds import ContributionRange

from .base import Protocol


class HardVote(Protocol):
    """Each owner casts one vote (its own argmax); the label with most votes wins.

    Tie rule: an owner's own argmax and the plurality both go to the lowest class index among
    equals, so results are deterministic (CrypTen's argmax alone would break ties at random).
    ``output`` mode: owners share one-hot votes. ``full`` mode: each owner's vote is an argmax
    on shared logits.
    """

    name = "hard_vote"
    summary = "each owner votes for its top class; the plurality wins."
    releases = {"label": "the plurality label", "scores": "the vote count of every class"}
    cost = "output mode: one argmax over C counts; full mode: + one argmax per owner on shares"

    def local_contribution(self, logits: torch.Tensor) -> torch.Tensor:
        votes = plain.argmax_lowest(logits)
        return torch.nn.functional.one_hot(votes, self.num_classes).to(torch.float64)

    def full_mode_contribution_range(self, activation_bound: float | None) -> Any:
        """An exact one-hot row (:func:`mpc_fi.secure.argmax_one_hot`)."""
        return ContributionRange(0.0, 1.0, integer=True)

    def secure_contribution(self, logits: Any) -> Any:
        return secure.argmax_one_hot(logits, self.num_classes)

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        return aggregate.round().long().numpy()
