"""Logit averaging: the average of the owners' raw logits, then its argmax."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


from mpc_fi.bounds import ContributionRange

from .base import Protocol


class LogitAverage(Protocol):
    """Each owner shares its raw logits; the label is the argmax of their sum (= of the average).

    No softmax anywhere, so ``full`` mode costs no more than ``output`` mode: the shared logits
    from the secure forward pass are the contributions. Logits of differently trained models can
    live on different scales (a confident model has large logits); that is the point of the
    protocol and its caveat: one owner with large logits outvotes the rest.
    Exact on shares: the sum of the encoded logits is formed without truncation.
    Tie rule: equal fixed-point sums go to the lowest class index.
    """

    name = "logit_average"
    summary = "average the owners' raw logits and take the largest."
    releases = {"label": "the label with the largest average logit",
                "scores": "the average logit vector (owners' logits averaged, before any softmax)"}
    cost = ("output and full mode: one argmax over C classes on shares (the sum is local); "
            "full mode adds only the secure forward passes")

    def local_contribution(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.to(torch.float64)

    def full_mode_contribution_range(self, activation_bound: float | None) -> Any:
        """The logits themselves: within the federation's ``activation_bound`` when it has one
        (each owner checks its model against it), else no range."""
        if activation_bound is None:
            return None
        return ContributionRange(-activation_bound, activation_bound, integer=False)

    def secure_contribution(self, logits: Any) -> Any:
        return logits

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        return (aggregate / self.num_owners).numpy()
