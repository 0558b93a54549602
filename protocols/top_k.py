"""Top-k release: the k most likely labels of the averaged distribution, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mpc_fi.result import Prediction

from . import plain_ops, secure_ops
from .soft_vote import SoftVote


METHODS = ("auto", "pairwise", "iterative")


@dataclass(frozen=True)
class TopKParams:
    k: int = 1  # how many labels, most likely first (at most the class count)
    #: how labels are ranked on shares: "pairwise" (every pair of classes at once, constant
    #: depth), "iterative" (k argmaxes in sequence, fewer comparisons), "auto" (pairwise below
    #: secure_ops.PAIRWISE_TOP_K_MAX_CLASSES classes)
    method: str = "auto"

    def check(self, protocol: Any, *, num_owners: int) -> None:
        protocol.integer_param("k", self.k)
        if self.method not in METHODS:
            raise protocol.param_error("method", f"must be one of {', '.join(METHODS)}, got "
                                                 f"{self.method!r}")


class TopK(SoftVote):
    """The ``k`` classes with the largest averaged probability, most likely first.

    The aggregate is soft voting's (sum of the owners' softmax distributions). Labels are ranked
    on shares (:func:`protocols.secure_ops.top_k_indices`) and only the ``k`` indices are opened:
    the querier learns their order but no probability. Predictions have shape ``(n, k)``.
    Tie rule: among equal fixed-point sums the lower class index ranks first.
    """

    name = "top_k"
    summary = "the k most likely labels of the averaged distribution, most likely first."
    releases = {"label": "the k most likely labels, in order (no probabilities)",
                "scores": "the averaged class distribution (ranked by the querier itself)"}
    cost = ("label: C < 32: C(C-1)/2 + kC comparisons per query in two layers; C >= 32: k "
            "argmaxes over C in sequence. full mode: + one softmax per owner on shares")
    Params = TopKParams
    scale_for_labels = False  # its release bounds the aggregate by the number of owners

    def __init__(self, *, k: int = 1, method: str = "auto", **common: Any) -> None:
        super().__init__(**common)
        self.parse_params({"k": k, "method": method}, num_owners=self.num_owners)
        self.method = method
        if not k <= self.num_classes:
            raise self.param_error("k", f"must be an integer in 1..{self.num_classes} (the number "
                                        f"of classes), got {k!r}")
        self.k = int(k)

    @property
    def row_elements(self) -> int:
        c = self.num_classes
        pairwise = self.reveal == "label" and (
            self.method == "pairwise"
            or (self.method == "auto" and c < secure_ops.PAIRWISE_TOP_K_MAX_CLASSES))
        return max(super().row_elements, c * (c - 1) // 2 + self.k * c if pairwise else 0)

    def release(self, ops: Any, aggregate: Any) -> Any:
        if self.reveal == "label":
            # each owner's probabilities sum to 1, so |aggregate| <= N (plus rounding)
            return ops.top_k_indices(aggregate, self.num_classes, self.k,
                                     bound=self.num_owners + 1, method=self.method)
        return aggregate

    def decode(self, opened: torch.Tensor) -> Prediction:
        if self.reveal == "label":
            return Prediction(labels=opened.round().long().reshape(-1, self.k).numpy())
        return Prediction(labels=plain_ops.top_k_lowest(opened, self.k).numpy(),
                          scores=self.scores_from_aggregate(opened))
