"""The entry object for pipelines: ``Federation(config).predict(X)``.

Differential privacy: when the federation has a ``privacy`` section, the protocol must be a
differentially private one (``cls.differentially_private``; it prices a batch of queries with
``cls.privacy_cost``). **The owners enforce the budget**: inside the party runtime every owner
checks its own ledger for the worst case (every query answered) and charges it before it
contributes, and the run goes ahead only if every owner agrees (:mod:`mpc_fi.budget`). The
querier cannot undo that by deleting its own files. :attr:`RunResult.budget` carries what the
owners' ledgers record afterwards; :meth:`Federation.budget` reads the ledgers on this host.

``privacy.budget_file``, when set, is the querier's own ledger, a convenience on top: under an
exclusive lock on ``<budget_file>.run.lock`` (two runs sharing it cannot both pass the check),
:meth:`Federation.run`

1. prices the run for the worst case and checks that ledger:
   :class:`~mpc_fi.errors.BudgetExceededError` **before any party starts**, ledger untouched;
2. runs the parties (where the owners check and charge their own ledgers);
3. charges the actual cost to that ledger (Confident-GNMax: the answered count, read from the
   released labels, which are ``-1`` where the query abstained) and only then returns the answers.

A run that fails charges nothing to that ledger (the caller receives no answer); the owners may
have charged theirs already (they charge before contributing, so a failure never leaves an
answer uncharged). Ledgers are written atomically by :class:`mpc_fi.privacy.PrivacyBudget`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .budget import protocol_is_dp
from .config import FederationConfig
from .errors import BudgetExceededError, ConfigError, InputError, InsecureSettingWarning, \
    PartyFailedError, ProtocolError
from .plugins import LAUNCHERS, PROTOCOLS, lookup
from .result import ABSTAIN, BudgetReport, PartyCost, Prediction, RunResult

if TYPE_CHECKING:  # dp-accounting (and scipy) load only for federations with a budget
    from .serve import ServedFederation
    from .privacy import PrivacyBudget, QueryCost


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
        Folder for party logs and results. By default a fresh temporary folder per run, removed
        after a successful run unless ``keep_run_dir``; a failed run keeps it and its error
        names it. A folder given here is never removed.
    keep_run_dir:
        Keep the temporary run folder (party logs) after a successful run too.
    progress:
        ``progress(done, total)``, called as the querier finishes batches (local launcher).
    memory_limit_mb:
        Working memory each party may use for one batch, in MiB. A ``batch_size`` that would
        need more is split into smaller batches (same answers); a single query that needs more is
        refused with :class:`~mpc_fi.errors.InputError`. None: the launcher shares out half of
        the memory available on the host.
    """

    def __init__(self, config: FederationConfig | str | os.PathLike[str], *, launcher: str = "local",
                 timeout_s: float = 600.0, run_dir: str | os.PathLike[str] | None = None,
                 memory_limit_mb: float | None = None, keep_run_dir: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.config = config if isinstance(config, FederationConfig) else FederationConfig.load(config)
        self._launcher_cls = lookup(LAUNCHERS, launcher, key="launcher")
        self.timeout_s = timeout_s
        self.run_dir = run_dir
        self.memory_limit_mb = memory_limit_mb
        self.keep_run_dir = keep_run_dir
        self.progress = progress

    def run(self, X: Any | None = None) -> RunResult:
        """Answer every query in ``X`` (or in ``querier.data`` when ``X`` is None).

        With a ``privacy`` section, the owners refuse a run whose worst case would exceed the
        querier's budget in any owner's ledger (:class:`~mpc_fi.errors.BudgetExceededError` on
        every party, nothing computed or charged) and otherwise charge it before contributing;
        ``result.budget`` says what their ledgers record afterwards. With ``budget_file``, the
        querier's own ledger is checked before any party starts and charged after the run (see
        the module docstring).
        """
        query = None if X is None else np.asarray(X)
        fed = self.config
        protocol_cls = lookup(PROTOCOLS, fed.protocol.name, key="protocol.name")
        plan = self._privacy_plan(protocol_cls, query)
        with _ledger_lock(plan[0] if plan else None):
            if plan:
                budget, worst, _ = plan
                budget.check(fed.querier.name, worst)  # raises before any party starts
            extra: dict[str, Any] = {}  # only when asked: other launchers may not take them
            if self.keep_run_dir:
                extra["keep_run_dir"] = True
            if self.progress is not None:
                extra["progress"] = self.progress
            launcher = self._launcher_cls(fed, run_dir=self.run_dir, timeout_s=self.timeout_s,
                                          memory_limit_mb=self.memory_limit_mb, **extra)
            results = launcher.run(query=query)
            out = results[fed.querier_rank]
            prediction = Prediction(labels=out["labels"], scores=out["scores"])
            if plan:
                self._charge(protocol_cls, plan, prediction)
        costs = tuple(PartyCost(**results[r]["cost"]) for r in sorted(results))
        spent = out.get("budget")
        return RunResult(prediction=prediction, costs=costs, run_dir=str(Path(launcher.run_dir)),
                         run_dir_kept=Path(launcher.run_dir).exists(),
                         budget=None if spent is None else BudgetReport.from_dict(spent))

    def budget(self) -> BudgetReport:
        """What the owners' ledgers on this host record for this federation's querier: epsilon
        spent (the largest owner figure binds) and what is left, as the owners enforce it.

        A ledger that is not on this host counts as nothing recorded, which is right for the
        local launcher (every owner runs here). When the owners run on their own hosts, their
        figures come back with every run (:attr:`RunResult.budget`), and each owner can read its
        own with ``mpc-fi budget --federation F --party OWNER``. Raises
        :class:`~mpc_fi.errors.ConfigError` without a ``privacy`` section.
        """
        from .budget import read_budget  # noqa: PLC0415

        return read_budget(self.config)

    # -- differential privacy -------------------------------------------------------------
    def _privacy_plan(self, protocol_cls: Any, query: np.ndarray | None
                      ) -> tuple[PrivacyBudget, QueryCost, int] | None:
        """``(querier's ledger, worst-case cost, number of queries)``, or None when the querier
        keeps no ledger of its own (the owners keep theirs either way)."""
        fed = self.config
        name = fed.protocol.name
        is_dp = bool(getattr(protocol_cls, "differentially_private", False))
        if fed.privacy is None:
            if is_dp:
                warnings.warn(
                    f"protocol {name!r} adds differential-privacy noise but the federation has no "
                    "privacy section: no budget is checked or charged. Add privacy: {epsilon, "
                    "delta} to have every owner account for what the querier learns.",
                    InsecureSettingWarning, stacklevel=3)
            return None
        protocol_is_dp(fed)  # ConfigError before any party starts (the owners check it too)
        if fed.privacy.budget_file is None:
            return None
        queries = self._count_queries(query)
        worst = protocol_cls.privacy_cost(params=dict(fed.protocol.params),
                                          num_owners=fed.num_owners, queries=queries)
        from .privacy import PrivacyBudget  # noqa: PLC0415

        budget = PrivacyBudget(fed.privacy.budget_file, epsilon=fed.privacy.epsilon,
                               delta=fed.privacy.delta)
        return budget, worst, queries

    def _count_queries(self, query: np.ndarray | None) -> int:
        if query is None:
            if not self.config.querier.data:
                raise InputError("the querier has no queries: pass X to the API or set querier.data")
            from .data import load_queries  # noqa: PLC0415 - only needed to price a DP run

            query = load_queries(self.config.querier.data)
        return int(query.shape[0]) if query.ndim >= 1 else 1

    def _charge(self, protocol_cls: Any, plan: tuple[PrivacyBudget, QueryCost, int],
                prediction: Prediction) -> None:
        budget, _, queries = plan
        fed = self.config
        labels = np.asarray(prediction.labels)
        answered = int(np.count_nonzero(labels != ABSTAIN)) if labels.ndim == 1 else queries
        cost = protocol_cls.privacy_cost(params=dict(fed.protocol.params),
                                         num_owners=fed.num_owners, queries=queries,
                                         answered=answered)
        try:
            budget.charge(fed.querier.name, cost)
        except BudgetExceededError as exc:
            # Only possible if another process charged this ledger without the run lock.
            raise BudgetExceededError(
                f"the run finished but charging it failed, so its answers are withheld: {exc} "
                "(another process charged the same ledger during this run)") from None

    def start(self, *, ready_timeout_s: float | None = None) -> "ServedFederation":
        """Bring up a long-lived local federation; use it as a context manager.

        Every party starts once (models loaded once; in full mode the weights shared once) and
        answers each ``predict`` / ``predict_proba`` / ``run`` of the returned
        :class:`~mpc_fi.serve.ServedFederation` with exactly what :meth:`run` gives, until
        ``close()`` or the end of the ``with`` block. Differential-privacy budgets are checked
        and charged by the owners per request.
        """
        from .serve import ServedFederation  # noqa: PLC0415

        fed = self.config
        extra: dict[str, Any] = {"keep_run_dir": True} if self.keep_run_dir else {}
        launcher = self._launcher_cls(fed, run_dir=self.run_dir, timeout_s=self.timeout_s,
                                      memory_limit_mb=self.memory_limit_mb, **extra)
        if not hasattr(launcher, "serve_socket"):
            raise ConfigError(f"launcher {type(launcher).__name__} cannot serve a session",
                              key="launcher")
        socket_path = Path(launcher.run_dir) / "querier.sock"
        if len(str(socket_path)) > 100:  # AF_UNIX paths are short
            socket_path = Path(tempfile.mkdtemp(prefix="mpc-fi-sock-")) / "querier.sock"
        launcher.serve_socket = str(socket_path)
        launcher.start()
        deadline = time.monotonic() + (ready_timeout_s or self.timeout_s)
        try:
            while not socket_path.exists():
                launcher.raise_first_failure()
                if time.monotonic() > deadline:
                    raise PartyFailedError("the served federation was not ready within "
                                           f"{ready_timeout_s or self.timeout_s:g} s")
                time.sleep(0.01)
            served = ServedFederation(socket_path, launcher=launcher, timeout_s=self.timeout_s,
                                      reveal=fed.reveal)
            # The querier answers from the start; ready once every party has joined.
            health = served.wait_ready(deadline - time.monotonic(),
                                       check=launcher.raise_first_failure)
            if health["status"] != "ready":
                raise PartyFailedError("the served federation was not ready within "
                                       f"{ready_timeout_s or self.timeout_s:g} s: waiting for "
                                       f"{', '.join(health.get('missing', []))}")
            return served
        except BaseException:
            launcher.terminate()
            raise

    def predict(self, X: Any | None = None) -> np.ndarray:
        """Labels, one per query (``-1`` where the protocol abstained)."""
        return self.run(X).prediction.labels

    def predict_proba(self, X: Any | None = None) -> np.ndarray:
        """The released aggregate scores; needs ``reveal: scores`` in the federation."""
        if self.config.reveal != "scores":
            raise ProtocolError("predict_proba needs the federation to allow reveal: scores "
                                "(by default only the label is released)")
        return self.run(X).prediction.scores


@contextlib.contextmanager
def _ledger_lock(budget: PrivacyBudget | None) -> Iterator[None]:
    """Hold ``<ledger>.run.lock`` exclusively from the budget check to the charge."""
    if budget is None:
        yield
        return
    path = budget.path.with_name(budget.path.name + ".run.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
