"""What a run returns to the querier (and, for accounting, what each party measured)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
class RunResult:
    """A run's answers, each party's cost, and its run folder (``run_dir_kept`` False: the
    temporary folder was removed after the successful run)."""

    prediction: Prediction
    costs: tuple[PartyCost, ...]
    run_dir: str
    run_dir_kept: bool = True
