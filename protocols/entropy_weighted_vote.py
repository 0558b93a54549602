"""Entropy-weighted soft voting: confident owners count more, weights formed on shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpc_fi import plain
from mpc_fi._crypten import load_crypten

from . import plain_ops, secure_ops
from .base import Protocol

#: Largest allowed ratio between the most and the least confident owner's weight,
#: ``C**sharpness``. It keeps the smallest weight ``exp(-sharpness * log C) >= 1e-3`` (65 units at
#: 16 fractional bits) and the per-query total inside the range where CrypTen's reciprocal
#: converges.
MAX_WEIGHT_RATIO = 1000


@dataclass(frozen=True)
class EntropyWeightedParams:
    sharpness: int = 1  # weights differ by up to a factor C**sharpness

    def check(self, protocol: Any, *, num_owners: int) -> None:
        protocol.integer_param("sharpness", self.sharpness)


class EntropyWeightedVote(Protocol):
    """Soft voting where each owner's distribution is weighted by its confidence on that query.

    For query ``x`` owner ``i`` has ``p_i = softmax(z_i)`` and entropy ``H_i = -sum p_i log p_i``
    (nats). Its weight is ``w_i = u_i / sum_j u_j`` with ``u_i = exp(-k * H_i)`` (``k`` =
    ``sharpness``, a positive integer): a certain owner (``H = 0``) counts up to ``C**k`` times
    as much as a uniform one (``H = log C``). The aggregate ``sum_i w_i p_i`` is a distribution.

    * ``output`` mode: each owner computes ``p_i`` and ``u_i`` from its own logits (its own
      information) and shares ``[p_i, u_i]`` (``C + 1`` columns). The normalisation across owners
      (one reciprocal of ``sum_j u_j``) and the weighting run on shares: no owner's entropy or
      weight is opened to anyone.
    * ``full`` mode: ``p_i`` and ``u_i`` are computed on shares from the shared logits
      (:func:`protocols.secure_ops.softmax_confidence`: ``exp(-H) = exp(sum p d) / s``, no
      logarithm on shares, which is why ``k`` is an integer).

    Not exact: the reciprocal, the share products (each truncated) and, in full mode, the
    softmax/exp approximations perturb the aggregate. Tolerances are stated in
    docs/protocols.md; labels agree with the twin except where the twin's top-two margin is
    below them. Tie rule: the twin's argmax goes to the lowest index among equal averages.
    """

    name = "entropy_weighted_vote"
    summary = ("soft voting weighted by each owner's confidence exp(-sharpness * entropy), "
               "normalised across owners on shares.")
    releases = {"label": "the label of the entropy-weighted average distribution",
                "scores": "the entropy-weighted average class distribution"}
    cost = ("output mode: one reciprocal + 2 multiplications + one argmax over C; full mode: + per "
            "owner an argmax, a ReLU clamp, 2 exp, a reciprocal and a few multiplications")

    Params = EntropyWeightedParams

    def __init__(self, *, sharpness: int = 1, **common: Any) -> None:
        super().__init__(**common)
        self.parse_params({"sharpness": sharpness}, num_owners=self.num_owners)
        if self.num_classes ** int(sharpness) > MAX_WEIGHT_RATIO:
            raise self.param_error(
                "sharpness", f"{sharpness!r} lets weights differ by a factor C**sharpness = "
                f"{self.num_classes ** int(sharpness)} with {self.num_classes} classes, beyond "
                f"{MAX_WEIGHT_RATIO} (fixed-point range); use a smaller sharpness"
                + ("" if self.num_classes <= MAX_WEIGHT_RATIO else
                   f" (with more than {MAX_WEIGHT_RATIO} classes no sharpness fits)"))
        self.sharpness = int(sharpness)

    @property
    def contribution_width(self) -> int:
        return self.num_classes + 1  # the distribution, then the unnormalised weight

    def local_contribution(self, logits: torch.Tensor) -> torch.Tensor:
        p, entropy = plain_ops.softmax_entropy(logits)
        u = torch.exp(-self.sharpness * entropy)
        return torch.cat([p, u.unsqueeze(-1)], dim=-1)

    def secure_contribution(self, logits: Any) -> Any:
        crypten = load_crypten()
        p, u = secure_ops.softmax_confidence(logits, self.num_classes, power=self.sharpness)
        return crypten.cat([p, u], dim=-1)

    def combine(self, contributions: Sequence[Any]) -> Any:
        c = self.num_classes
        return secure_ops.entropy_weighted_average([x[:, :c] for x in contributions],
                                                   [x[:, c:] for x in contributions])

    def plaintext_aggregate(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weighted average in units, from the encoded contributions (float math after)."""
        c = self.num_classes
        parts = [plain.encode(self.local_contribution(lg), self.precision_bits).to(torch.float64)
                 for lg in logits]
        u = torch.stack([x[:, c] for x in parts])  # (N, batch)
        w = u / u.sum(0)
        return (w.unsqueeze(-1) * torch.stack([x[:, :c] for x in parts])).sum(0)

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        return aggregate.numpy()

    def aggregate_range(self, num_owners: int, precision_bits: int) -> None:
        """No public range: the aggregate is formed by products on shares, not a linear sum.

        Declared so that the engine does not probe :meth:`combine` on plaintext tensors
        (:mod:`mpc_fi.bounds`); the final argmax then uses full 64-bit comparisons.
        """
        del num_owners, precision_bits
        return None
