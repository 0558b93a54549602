"""Soft voting: the average of the owners' class distributions (softmax outputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mpc_fi import secure

from mpc_fi.bounds import ContributionRange

from .base import Protocol


class SoftVote(Protocol):
    """Average of softmax probabilities; the label is its argmax (lowest index on ties).

    ``output`` mode: each owner applies softmax locally and shares its probabilities; the sum on
    shares is local, so the only interactive step is the argmax (or nothing, if the scores are
    revealed). ``full`` mode: softmax runs on shares (``exp`` and a reciprocal: costly; the
    exponent is clamped, so any logit spread is safe: :func:`mpc_fi.secure.softmax`).
    Tie rule: classes whose summed fixed-point probabilities are equal go to the lowest index.
    """

    name = "soft_vote"
    summary = "average the owners' softmax distributions and take the most likely class."
    releases = {"label": "the label of the averaged distribution",
                "scores": "the averaged class distribution"}
    cost = "output mode: one argmax over C classes; full mode: + one softmax per owner on shares"

    def local_contribution(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.to(torch.float64), dim=-1)

    def full_mode_contribution_range(self, activation_bound: float | None) -> Any:
        """Probabilities from :func:`mpc_fi.secure.softmax` (each within ``[0, 1]`` up to its
        fixed-point error): the full-mode aggregate's comparisons carry few bits."""
        return ContributionRange(0.0, 1.0, integer=False)

    def secure_contribution(self, logits: Any) -> Any:
        return secure.softmax(logits, -1)

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        return (aggregate / self.num_owners).numpy()
