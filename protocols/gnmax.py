"""GNMax: Gaussian noise on the vote counts, on shares, before the argmax (PATE)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


from mpc_fi.privacy import QueryCost, gnmax_cost

from . import plain_ops
from .base import JointNoiseVote


@dataclass(frozen=True)
class GNMaxParams:
    sigma: float = field(metadata={"what": "the noise std per vote count, a number > 0"})
    inner: str = "hard_vote"  # the aggregate the noise is added to: hard_vote | soft_vote

    def check(self, protocol: Any, *, num_owners: int) -> None:
        protocol.positive_real_param("sigma", self.sigma)
        protocol.inner_param(self.inner)


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

    def __init__(self, *, sigma: float | None = None, inner: Any = None, **common: Any) -> None:
        super().__init__(inner=inner, **common)
        self.sigma = self.positive_real_param("sigma", sigma)

    @classmethod
    def privacy_cost(cls, *, params: Mapping[str, Any], num_owners: int, queries: int,
                     answered: int | None = None) -> QueryCost:
        sigma = float(cls.parse_params(params, num_owners=num_owners).sigma)
        return gnmax_cost(sigma=plain_ops.effective_sigma(sigma, num_owners + 1), queries=queries)

    def release(self, ops: Any, aggregate: Any) -> Any:
        noisy = aggregate + ops.joint_noise(aggregate.size(), self.sigma)
        if self.reveal == "label":
            return ops.argmax_index(noisy, self.num_classes)
        return noisy
