"""Confident-GNMax: a noisy threshold check, then a noisy argmax, on shares (PATE)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


from mpc_fi.privacy import QueryCost, confident_gnmax_cost

from . import plain_ops
from .base import JointNoiseVote


@dataclass(frozen=True)
class ConfidentGNMaxParams:
    threshold: float = field(metadata={"what": "a vote count in (0, number of owners]"})
    sigma_threshold: float = field(metadata={"what": "the threshold check's noise std, > 0"})
    sigma: float = field(metadata={"what": "the noise std per vote count, > 0"})
    inner: str = "hard_vote"  # the aggregate the noise is added to: hard_vote | soft_vote

    def check(self, protocol: Any, *, num_owners: int) -> None:
        for name in ("threshold", "sigma_threshold", "sigma"):
            protocol.positive_real_param(name, getattr(self, name))
        protocol.inner_param(self.inner)
        if self.threshold > num_owners:
            raise protocol.param_error("threshold", f"is a vote count in (0, {num_owners}] (the "
                                                    f"number of owners), got {self.threshold!r}")


class ConfidentGNMax(JointNoiseVote):
    """PATE's Confident-GNMax around hard voting.

    For vote counts ``n``: if ``max_j n_j + N(0, sigma_threshold**2) >= threshold`` the querier
    gets ``argmax_j (n_j + N(0, sigma**2))``, else ``-1`` (:data:`mpc_fi.result.ABSTAIN`). Both
    noises are joint (:func:`protocols.secure_ops.joint_gaussian`, one share per computing party),
    both steps run on shares for every query (so the communication pattern never depends on the
    data), and the one opened value is the gated label: an abstention hides the noisy argmax.
    ``threshold`` is a vote count in ``(0, N]``.

    Privacy (:meth:`privacy_cost`): every query pays the threshold check (sensitivity 1), only
    answered ones pay the GNMax step (sensitivity ``sqrt(2)``), both at the std the querier
    cannot subtract, ``sigma * sqrt(N / (N + 1))``. Before a run the budget is checked for the
    worst case (every query answered); after it the actual answered count is charged.
    Tie rule: equal noisy fixed-point counts go to the lowest class index.
    """

    name = "confident_gnmax"
    summary = ("PATE Confident-GNMax: a noisy threshold check on the top vote count, then a noisy "
               "argmax, on shares; abstains (-1) below the threshold; charged to the budget.")
    releases = {"label": "the noisy-argmax label when the top vote count plus Gaussian noise "
                         "(std sigma_threshold) reaches the threshold, else -1 (the abstention is "
                         "visible, the noisy argmax is not)"}
    cost = ("two argmaxes over C (counts, noisy counts) + C comparisons + one multiplication; "
            "noise sharing is local; full mode: + one argmax per owner on shares")

    Params = ConfidentGNMaxParams

    def __init__(self, *, threshold: float | None = None, sigma_threshold: float | None = None,
                 sigma: float | None = None, inner: Any = None, **common: Any) -> None:
        super().__init__(inner=inner, **common)
        params = self.parse_params({"threshold": threshold, "sigma_threshold": sigma_threshold,
                                    "sigma": sigma}, num_owners=self.num_owners)
        self.threshold = float(params.threshold)
        self.sigma_threshold = float(params.sigma_threshold)
        self.sigma = float(params.sigma)
        self.threshold_units = plain_ops.threshold_units(self.threshold, per=1,
                                                         precision_bits=self.precision_bits)

    @classmethod
    def privacy_cost(cls, *, params: Mapping[str, Any], num_owners: int, queries: int,
                     answered: int | None = None) -> QueryCost:
        parsed = cls.parse_params(params, num_owners=num_owners)
        sigma_t, sigma = float(parsed.sigma_threshold), float(parsed.sigma)
        parties = num_owners + 1
        return confident_gnmax_cost(threshold_sigma=plain_ops.effective_sigma(sigma_t, parties),
                                    sigma=plain_ops.effective_sigma(sigma, parties),
                                    checked=queries,
                                    answered=queries if answered is None else answered)

    def release(self, ops: Any, aggregate: Any) -> Any:
        c = self.num_classes
        # Same order of draws at every party: threshold noise, then argmax noise.
        check_noise = ops.joint_noise(aggregate.size()[:-1], self.sigma_threshold)
        argmax_noise = ops.joint_noise(aggregate.size(), self.sigma)
        # max_j n_j + noise >= T  iff  the (noise-free) argmax's entry + noise >= T.
        winner = ops.argmax_one_hot(aggregate, c)
        reached = ops.above(aggregate + check_noise.unsqueeze(-1), self.threshold_units)
        passed = (winner * reached).sum(-1)
        return ops.gate(passed, ops.argmax_index(aggregate + argmax_noise, c))
