"""GNMax: Gaussian noise on the vote counts, on shares, before the argmax (PATE)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpc_fi import plain, secure
from mpc_fi.privacy import QueryCost, gnmax_cost
from mpc_fi.result import Prediction

from . import plain_ops, secure_ops
from .base import JointNoiseVote
from .hard_vote import HardVote
from .noise import NoiseSource


@dataclass(frozen=True)
class GNMaxParams:
    sigma: float = field(metadata={"what": "the noise std per vote count, a number > 0"})

    def check(self, protocol: Any, *, num_owners: int) -> None:
        protocol.positive_real_param("sigma", self.sigma)


class GNMax(JointNoiseVote):
    """PATE's Gaussian NoisyMax around hard voting: ``argmax_j (n_j + N(0, sigma**2))``.

    The vote counts ``n`` are :class:`~protocols.hard_vote.HardVote`'s (one vote per owner). The
    noise is generated jointly on shares (:func:`protocols.secure_ops.joint_gaussian`): each of
    the ``m = N + 1`` computing parties (owners and querier) draws ``N(0, sigma**2 / m)`` per
    count from its own CSPRNG stream (:attr:`noise_source`) and secret-shares it; no
    party sees the total. Only the noisy argmax (or, with ``reveal: scores``, the noisy counts)
    is opened to the querier.

    Privacy: the querier knows its own noise share, so the noise it cannot subtract has std
    ``sigma * sqrt(N / (N + 1))``; :meth:`privacy_cost` charges the budget at that std
    (sensitivity ``sqrt(2)``, :func:`mpc_fi.privacy.gnmax_cost`). A coalition of the querier and
    ``k`` owners faces std ``sigma * sqrt((N - k) / (N + 1))`` (docs/protocols.md).
    Tie rule: equal noisy fixed-point counts go to the lowest class index.
    """

    name = "gnmax"
    summary = ("PATE GNMax: Gaussian noise (std sigma) added on shares to every vote count, "
               "then the argmax; differentially private, charged to the querier's budget.")
    releases = {"label": "the argmax of the vote counts plus Gaussian noise of std sigma per count",
                "scores": "the noisy vote counts themselves (the same Gaussian mechanism; the "
                          "same privacy cost)"}
    cost = ("output mode: one argmax over C noisy counts; noise sharing is local (N + 1 sharings "
            "of zero); full mode: + one argmax per owner on shares")

    Params = GNMaxParams

    def __init__(self, *, sigma: float | None = None, **common: Any) -> None:
        super().__init__(inner_cls=HardVote, **common)
        self.sigma = self.positive_real_param("sigma", sigma)

    @classmethod
    def privacy_cost(cls, *, params: Mapping[str, Any], num_owners: int, queries: int,
                     answered: int | None = None) -> QueryCost:
        sigma = float(cls.parse_params(params, num_owners=num_owners).sigma)
        return gnmax_cost(sigma=plain_ops.effective_sigma(sigma, num_owners + 1), queries=queries)

    def to_reveal(self, aggregate: Any) -> Any:
        noisy = aggregate + secure_ops.joint_gaussian(aggregate.size(), self.sigma,
                                                      self.noise_source)
        if self.reveal == "label":
            return secure.argmax_index(noisy, self.num_classes)
        return noisy

    def plaintext(self, logits: Sequence[torch.Tensor], *,
                  noise_sources: Sequence[NoiseSource] | None = None) -> Prediction:
        """Twin; ``noise_sources`` replays each computing party's noise (fresh draws if None)."""
        units = self.plaintext_aggregate(logits)
        sources = self.twin_sources(noise_sources)
        noisy = units + sum(self.twin_draw(src, units.shape, self.sigma, len(sources))
                            for src in sources)
        return Prediction(labels=plain.argmax_lowest(noisy).numpy(),
                          scores=(noisy.to(torch.float64) / self.scale).numpy()
                          if self.reveal == "scores" else None)
