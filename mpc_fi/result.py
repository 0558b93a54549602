"""What a run returns to the querier (and, for accounting, what each party measured)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ABSTAIN = -1  #: label value of a query the protocol declined to answer


@dataclass(frozen=True)
class PartyCost:
    """Cost seen by one party. ``rounds`` counts collective calls (CrypTen's definition), not
    network latency rounds; ``bytes_sent`` is elements x 8 with CrypTen's per-collective factors."""

    party: str
    role: str
    wall_s: float
    rounds: int
    bytes_sent: int
    peak_rss_mb: float


@dataclass(frozen=True)
class Prediction:
    """The released aggregate: labels (``-1`` = abstain) and, where allowed, scores."""

    labels: np.ndarray
    scores: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OwnerSpend:
    """What one owner's ledger records for a querier: ``spent`` epsilon (at the budget's delta)
    over ``charges`` charged releases."""

    owner: str
    spent: float
    charges: int


@dataclass(frozen=True)
class BudgetReport:
    """A querier's differential-privacy budget as the owners' ledgers record it.

    ``querier`` is the identity the owners key their ledgers by (``"key:<fingerprint>"`` or,
    without keys on loopback, ``"name:<querier name>"``). Each owner enforces its own ledger,
    so the owner that recorded the most binds: :attr:`spent` is the largest figure,
    :attr:`remaining` what is left of ``epsilon`` after it (like Opacus' ``get_epsilon``).
    """

    querier: str
    epsilon: float
    delta: float
    owners: tuple[OwnerSpend, ...]

    @property
    def spent(self) -> float:
        return max((o.spent for o in self.owners), default=0.0)

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon - self.spent)

    def describe(self) -> str:
        per_owner = ", ".join(f"{o.owner} {o.spent:.4g} in {o.charges} charge(s)"
                              for o in self.owners)
        return (f"querier {self.querier} has spent epsilon={self.spent:.4g} of {self.epsilon:g} "
                f"(delta={self.delta:g}), {self.remaining:.4g} left"
                + (f" (owners' ledgers: {per_owner})" if per_owner else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"querier": self.querier, "epsilon": self.epsilon, "delta": self.delta,
                "owners": [{"owner": o.owner, "spent": o.spent, "charges": o.charges}
                           for o in self.owners]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BudgetReport":
        return cls(querier=str(data["querier"]), epsilon=float(data["epsilon"]),
                   delta=float(data["delta"]),
                   owners=tuple(OwnerSpend(owner=str(o["owner"]), spent=float(o["spent"]),
                                           charges=int(o["charges"])) for o in data["owners"]))


@dataclass(frozen=True)
class RunResult:
    """A run's answers, each party's cost, and its run folder (``run_dir_kept`` False: the
    temporary folder was removed after the successful run). ``budget``: with a ``privacy``
    section, what the owners' ledgers record for this querier once this run was charged."""

    prediction: Prediction
    costs: tuple[PartyCost, ...]
    run_dir: str
    run_dir_kept: bool = True
    budget: BudgetReport | None = None
