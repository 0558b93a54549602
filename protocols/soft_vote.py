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

    #: Full mode with a label release: the probabilities on shares are multiplied by
    #: :attr:`label_scale` (the label is the same; each probability keeps more bits).
    scale_for_labels = True

    @property
    def label_scale(self) -> int:
        """``2**max(0, bits(C) - 4)`` when only a label is released, else 1: with 1,000
        classes every probability is near 1/1000, 65 units of 2**-16; scaled by 64, about 4,200."""
        if self.reveal != "label" or not self.scale_for_labels:
            return 1
        return 1 << max(0, self.num_classes.bit_length() - 4)

    def full_mode_contribution_range(self, activation_bound: float | None) -> Any:
        """Probabilities from :func:`mpc_fi.secure.softmax` (each within ``[0, 1]`` up to its
        fixed-point error, times :attr:`label_scale`): the full-mode aggregate's comparisons
        carry few bits."""
        return ContributionRange(0.0, float(self.label_scale), integer=False)

    def secure_contribution(self, logits: Any) -> Any:
        return secure.softmax(logits, -1, self.label_scale)

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        return (aggregate / self.num_owners).numpy()
