"""The entry object for pipelines: ``Federation(config).predict(X)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import FederationConfig
from .errors import ProtocolError
from .plugins import LAUNCHERS, lookup
from .result import PartyCost, Prediction, RunResult


class Federation:
    """Run secure federated inference from Python; the caller plays the querier.

    Parameters
    ----------
    config:
        A :class:`FederationConfig` or the path of a federation file (YAML/TOML).
    launcher:
        Name of a registered launcher (``"local"``: every party as a process here).
    timeout_s:
        Bound on one whole run; past it every party is stopped and ``PartyFailedError`` raised.
    run_dir:
        Folder for party logs and results (a fresh temporary folder per run by default).
    """

    def __init__(self, config: FederationConfig | str | os.PathLike[str], *, launcher: str = "local",
                 timeout_s: float = 600.0, run_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = config if isinstance(config, FederationConfig) else FederationConfig.load(config)
        self._launcher_cls = lookup(LAUNCHERS, launcher, key="launcher")
        self.timeout_s = timeout_s
        self.run_dir = run_dir

    def run(self, X: Any | None = None) -> RunResult:
        """Answer every query in ``X`` (or in ``querier.data`` when ``X`` is None)."""
        query = None if X is None else np.asarray(X)
        launcher = self._launcher_cls(self.config, run_dir=self.run_dir, timeout_s=self.timeout_s)
        results = launcher.run(query=query)
        out = results[self.config.querier_rank]
        costs = tuple(PartyCost(**results[r]["cost"]) for r in sorted(results))
        return RunResult(prediction=Prediction(labels=out["labels"], scores=out["scores"]),
                         costs=costs, run_dir=str(Path(launcher.run_dir)))

    def predict(self, X: Any | None = None) -> np.ndarray:
        """Labels, one per query (``-1`` where the protocol abstained)."""
        return self.run(X).prediction.labels

    def predict_proba(self, X: Any | None = None) -> np.ndarray:
        """The released aggregate scores; needs ``reveal: scores`` in the federation."""
        if self.config.reveal != "scores":
            raise ProtocolError("predict_proba needs the federation to allow reveal: scores "
                                "(by default only the label is released)")
        return self.run(X).prediction.scores
