"""Confident-GNMax: a noisy threshold check, then a noisy argmax, on shares (PATE)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpc_fi import plain, secure
from mpc_fi.privacy import QueryCost, confident_gnmax_cost
from mpc_fi.result import Prediction

from . import plain_ops, secure_ops
from .base import JointNoiseVote
from .hard_vote import HardVote
from .noise import NoiseSource


@dataclass(frozen=True)
class ConfidentGNMaxParams:
    threshold: float = field(metadata={"what": "a vote count in (0, number of owners]"})
    sigma_threshold: float = field(metadata={"what": "the threshold check's noise std, > 0"})
    sigma: float = field(metadata={"what": "the noise std per vote count, > 0"})

    def check(self, protocol: Any, *, num_owners: int) -> None:
        for name in ("threshold", "sigma_threshold", "sigma"):
            protocol.positive_real_param(name, getattr(self, name))
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
                 sigma: float | None = None, **common: Any) -> None:
        super().__init__(inner_cls=HardVote, **common)
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

    def to_reveal(self, aggregate: Any) -> Any:
        c = self.num_classes
        # Same order of draws at every party: threshold noise, then argmax noise.
        check_noise = secure_ops.joint_gaussian(aggregate.size()[:-1], self.sigma_threshold,
                                                self.noise_source)
        argmax_noise = secure_ops.joint_gaussian(aggregate.size(), self.sigma, self.noise_source)
        # max_j n_j + noise >= T  iff  the (noise-free) argmax's entry + noise >= T.
        winner = secure.argmax_one_hot(aggregate, c)
        reached = secure_ops.above(aggregate + check_noise.unsqueeze(-1), self.threshold_units,
                                   self.precision_bits)
        passed = (winner * reached).sum(-1)
        return secure_ops.gate(passed, secure.argmax_index(aggregate + argmax_noise, c))

    def plaintext(self, logits: Sequence[torch.Tensor], *,
                  noise_sources: Sequence[NoiseSource] | None = None) -> Prediction:
        """Twin; ``noise_sources`` replays each computing party's noise (fresh draws if None)."""
        units = self.plaintext_aggregate(logits)
        sources = self.twin_sources(noise_sources)
        check_noise = torch.zeros(units.shape[:-1], dtype=torch.long)
        argmax_noise = torch.zeros(units.shape, dtype=torch.long)
        for src in sources:  # per party: threshold noise first, as on shares
            check_noise += self.twin_draw(src, units.shape[:-1], self.sigma_threshold, len(sources))
            argmax_noise += self.twin_draw(src, units.shape, self.sigma, len(sources))
        passed = units.max(dim=-1).values + check_noise >= self.threshold_units
        label = plain.argmax_lowest(units + argmax_noise)
        return Prediction(labels=plain_ops.gate(label, passed).numpy())
