"""Differential-privacy accounting for PATE-style releases, and a persistent per-querier budget.

The protocols package releases labels with the two aggregators of PATE (Papernot, Song,
Mironov, Raghunathan, Talwar, Erlingsson, "Scalable Private Learning with PATE", ICLR 2018,
arXiv:1802.08908):

* **GNMax**: Gaussian noise of standard deviation ``sigma`` is added to each class's vote
  count and only the noisy argmax is released.
* **Confident-GNMax**: the maximum vote count plus Gaussian noise of standard deviation
  ``sigma_threshold`` is compared with a public ``threshold``; if it passes, a GNMax answer with
  standard deviation ``sigma`` is released, otherwise the query abstains.

This module prices those releases and keeps a budget. It never imports crypten or torch.

Analysis (data-independent, Renyi DP)
-------------------------------------
Epsilon is always computed by Google's ``dp_accounting`` library (``RdpAccountant`` fed with
``GaussianDpEvent`` / ``SelfComposedDpEvent`` / ``ComposedDpEvent``); this module contains no
closed-form epsilon of its own. The choices it encodes are:

* Neighbouring datasets differ in one training example of one model owner. That can change the
  owner's model, hence its vote, arbitrarily, but the owner still casts exactly one vote.
* **GNMax** is a Gaussian mechanism on the vote histogram ``n(x)``. Moving one vote from class
  ``a`` to class ``b`` changes ``n_a`` by -1 and ``n_b`` by +1, so the L2 sensitivity is
  ``sqrt(2)`` and the noise multiplier is ``sigma / sqrt(2)`` (:data:`GNMAX_SENSITIVITY`),
  which is PATE's ``(lambda, lambda / sigma**2)``-RDP bound. Releasing only the argmax is
  post-processing.
* **Threshold check**: the input is ``max_j n_j(x)``. Each count moves by at most 1 and the
  maximum is 1-Lipschitz in the L-infinity norm, so the maximum moves by at most 1: the L2
  sensitivity of this scalar is 1 and the noise multiplier is ``sigma_threshold``
  (:data:`THRESHOLD_SENSITIVITY`), i.e. ``(lambda, lambda / (2 sigma_threshold**2))``-RDP. This
  is the data-independent bound of PATE's reference code (``pate_2018`` ``core.py``,
  ``compute_rdp_data_independent_threshold``: "the input to the threshold mechanism has
  stability 1, compared to GNMax, which has stability 2"). The pass/fail bit is released
  (an abstention is visible), so every check is paid for.
* A **Confident-GNMax** query always pays the threshold check and pays the GNMax step only when
  it answers, as in PATE Section 4.1: whether the GNMax step runs is a function of the
  already-released check outcome, so RDP's adaptive composition applies.
* The ``(epsilon, delta)`` reported is ``RdpAccountant.get_epsilon(delta)`` (the library's
  RDP-to-DP conversion minimised over :data:`DEFAULT_ORDERS`) of the composition of everything
  charged. When nothing was released at all the answer is exactly ``0.0`` (the conversion of a
  zero RDP curve would otherwise report a small positive number).

Caveats: only the data-independent bound is used; PATE's data-dependent (smooth-sensitivity)
analysis, which can be much smaller, would itself need privatising and is out of scope. The
budget is enforced as a filter: a query is refused when the composed epsilon would exceed it.
Because the number of answered Confident-GNMax queries depends on the data, callers who want
the strictest worst-case reading can charge ``answered=checked``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import numbers
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting import rdp as dp_rdp

from .errors import BudgetExceededError, ConfigError

__all__ = [
    "DEFAULT_ORDERS",
    "GNMAX_SENSITIVITY",
    "THRESHOLD_SENSITIVITY",
    "LedgerCorruptError",
    "PrivacyBudget",
    "QueryCost",
    "confident_gnmax_cost",
    "epsilon_for",
    "gnmax_cost",
]

#: L2 sensitivity of the vote histogram (one vote moves: one count -1, another +1).
GNMAX_SENSITIVITY: float = math.sqrt(2.0)
#: L2 sensitivity of the maximum vote count (it moves by at most 1).
THRESHOLD_SENSITIVITY: float = 1.0

#: RDP orders: the library's defaults plus larger ones for few queries at large sigma.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    float(a) for a in list(dp_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS) + [2048, 4096]
)

LEDGER_FORMAT = "mpc-fi-privacy-ledger"
LEDGER_VERSION = 1


class LedgerCorruptError(ConfigError):
    """The ledger file exists but cannot be read back; it is never silently reset."""


# ----------------------------------------------------------------------------- validation


def _positive_real(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"must be a positive number, got {value!r}", key=key)
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"must be a finite number > 0, got {value!r}", key=key)
    return value


def _delta(value: Any, key: str = "delta") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"must be a number in (0, 1), got {value!r}", key=key)
    value = float(value)
    if not (0.0 < value < 1.0):
        raise ConfigError(f"must be in (0, 1), got {value!r}", key=key)
    return value


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"must be an integer >= 0, got {value!r}", key=key)
    value = int(value)
    if value < 0:
        raise ConfigError(f"must be >= 0, got {value}", key=key)
    return value


def _querier(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, got {value!r}", key="querier")
    return value


def _orders(value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"must be a non-empty sequence of numbers > 1, got {value!r}",
                          key="orders")
    out = []
    for i, a in enumerate(value):
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not (
                math.isfinite(float(a)) and float(a) > 1.0):
            raise ConfigError(f"must be a finite number > 1, got {a!r}", key=f"orders[{i}]")
        out.append(float(a))
    return tuple(out)


# ----------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class QueryCost:
    """What a batch of releases spends.

    ``checked`` threshold checks ran with noise std ``threshold_sigma`` (Gaussian, sensitivity
    :data:`THRESHOLD_SENSITIVITY`) and ``answered`` GNMax answers were released with noise std
    ``gnmax_sigma`` (Gaussian, sensitivity :data:`GNMAX_SENSITIVITY`). A sigma is ``None``
    exactly when its mechanism never runs in this batch kind (plain GNMax has no threshold).
    Build instances with :func:`gnmax_cost` or :func:`confident_gnmax_cost`.
    """

    gnmax_sigma: float | None
    threshold_sigma: float | None
    answered: int
    checked: int

    def __post_init__(self) -> None:
        g = None if self.gnmax_sigma is None else _positive_real(self.gnmax_sigma, "gnmax_sigma")
        t = (None if self.threshold_sigma is None
             else _positive_real(self.threshold_sigma, "threshold_sigma"))
        answered = _count(self.answered, "answered")
        checked = _count(self.checked, "checked")
        if g is None and answered:
            raise ConfigError("answers were released but gnmax_sigma is None", key="answered")
        if t is None and checked:
            raise ConfigError("threshold checks ran but threshold_sigma is None", key="checked")
        if t is not None and answered > checked:
            raise ConfigError(
                f"a Confident-GNMax batch cannot answer more queries ({answered}) than it "
                f"checked ({checked})", key="answered")
        object.__setattr__(self, "gnmax_sigma", g)
        object.__setattr__(self, "threshold_sigma", t)
        object.__setattr__(self, "answered", answered)
        object.__setattr__(self, "checked", checked)

    # The Gaussian mechanisms this batch ran, as (noise multiplier, how many times).
    def _gaussians(self) -> list[tuple[float, int]]:
        out = []
        if self.checked:
            out.append((self.threshold_sigma / THRESHOLD_SENSITIVITY, self.checked))
        if self.answered:
            out.append((self.gnmax_sigma / GNMAX_SENSITIVITY, self.answered))
        return out

    @property
    def is_empty(self) -> bool:
        """True when no noisy mechanism ran (nothing was released)."""
        return not (self.checked or self.answered)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The ``dp_accounting`` event of this batch (a ``ComposedDpEvent``, empty if no-op)."""
        return dp_accounting.ComposedDpEvent([
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(m), n)
            for m, n in self._gaussians()
        ])

    def describe(self) -> str:
        parts = []
        if self.checked:
            parts.append(f"{self.checked} threshold check(s) at sigma={self.threshold_sigma:g}")
        if self.answered:
            parts.append(f"{self.answered} GNMax answer(s) at sigma={self.gnmax_sigma:g}")
        return " + ".join(parts) if parts else "nothing released"

    def to_dict(self) -> dict[str, Any]:
        return {"gnmax_sigma": self.gnmax_sigma, "threshold_sigma": self.threshold_sigma,
                "answered": self.answered, "checked": self.checked}

    @classmethod
    def from_dict(cls, data: Any) -> QueryCost:
        keys = {"gnmax_sigma", "threshold_sigma", "answered", "checked"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ConfigError(f"a cost record must be an object with keys {sorted(keys)}, "
                              f"got {data!r}", key="cost")
        return cls(gnmax_sigma=data["gnmax_sigma"], threshold_sigma=data["threshold_sigma"],
                   answered=data["answered"], checked=data["checked"])


def gnmax_cost(*, sigma: float, queries: int) -> QueryCost:
    """Cost of ``queries`` GNMax answers with per-count noise std ``sigma``."""
    sigma = _positive_real(sigma, "sigma")
    queries = _count(queries, "queries")
    return QueryCost(gnmax_sigma=sigma, threshold_sigma=None, answered=queries, checked=0)


def confident_gnmax_cost(*, threshold_sigma: float, sigma: float, checked: int,
                         answered: int) -> QueryCost:
    """Cost of ``checked`` Confident-GNMax queries of which ``answered`` passed the check."""
    threshold_sigma = _positive_real(threshold_sigma, "threshold_sigma")
    sigma = _positive_real(sigma, "sigma")
    checked = _count(checked, "checked")
    answered = _count(answered, "answered")
    if answered > checked:
        raise ConfigError(f"cannot exceed checked ({checked}), got {answered}", key="answered")
    return QueryCost(gnmax_sigma=sigma, threshold_sigma=threshold_sigma, answered=answered,
                     checked=checked)


def epsilon_for(events: Sequence[QueryCost], *, delta: float,
                orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (``dp_accounting``'s RdpAccountant).

    Batches are grouped by noise multiplier before composing (RDP adds up per order, so this
    is the same composition, just shorter); ``0.0`` if nothing was released.
    """
    delta = _delta(delta)
    orders = _orders(orders)
    if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
        raise ConfigError(f"must be a sequence of QueryCost, got {type(events).__name__}",
                          key="events")
    counts: Counter[float] = Counter()
    for i, event in enumerate(events):
        if not isinstance(event, QueryCost):
            raise ConfigError(f"must be a QueryCost, got {type(event).__name__}",
                              key=f"events[{i}]")
        for multiplier, n in event._gaussians():
            counts[multiplier] += n
    if not counts:
        return 0.0
    composed = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(m), n)
        for m, n in sorted(counts.items())
    ])
    accountant = dp_rdp.RdpAccountant(orders=list(orders))
    accountant.compose(composed)
    return float(accountant.get_epsilon(delta))


# ----------------------------------------------------------------------------- ledger


class PrivacyBudget:
    """A per-querier ``(epsilon, delta)`` ledger kept in a JSON file.

    The file stores the budget parameters and, per querier, every charged :class:`QueryCost`;
    spent epsilon is always recomputed from the full composition (epsilons do not add up).
    Every operation re-reads the file under an ``fcntl.flock`` on the sidecar ``<path>.lock``
    (shared for reads, exclusive for :meth:`charge`), so concurrent chargers in several
    processes never lose a charge. Writes go to a temporary file in the same directory, are
    flushed and fsync'ed, ``os.replace``'d over the ledger, and the directory is fsync'ed: a
    crash leaves either the old or the new ledger, never a partial one. The file is created
    when missing; an existing file with other ``(epsilon, delta)`` raises :class:`ConfigError`,
    and an unreadable one raises :class:`LedgerCorruptError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, epsilon: float, delta: float):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(f"must be a file path, got {path!r}", key="path")
        self.path = Path(os.fspath(path)).absolute()
        self.epsilon = _positive_real(epsilon, "epsilon")
        self.delta = _delta(delta)
        if not self.path.parent.is_dir():
            raise ConfigError(f"directory {self.path.parent} does not exist", key="path")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        with self._locked(exclusive=True):
            if self.path.exists():
                self._load()  # checks format and (epsilon, delta)
            else:
                self._write({"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                             "epsilon": self.epsilon, "delta": self.delta, "queriers": {}})

    def __repr__(self) -> str:
        return f"PrivacyBudget({str(self.path)!r}, epsilon={self.epsilon}, delta={self.delta})"

    # -- public API

    def spent(self, querier: str) -> float:
        """Epsilon (at this budget's delta) spent so far by ``querier``; 0.0 if none."""
        querier = _querier(querier)
        with self._locked(exclusive=False):
            history = self._load()["queriers"].get(querier, [])
        return epsilon_for(history, delta=self.delta)

    def remaining(self, querier: str) -> float:
        """Epsilon left to ``querier`` (never negative)."""
        return max(0.0, self.epsilon - self.spent(querier))

    def history(self, querier: str) -> list[QueryCost]:
        """Every cost charged to ``querier``, oldest first."""
        querier = _querier(querier)
        with self._locked(exclusive=False):
            return list(self._load()["queriers"].get(querier, []))

    def queriers(self) -> list[str]:
        """Queriers with a ledger entry, sorted."""
        with self._locked(exclusive=False):
            return sorted(self._load()["queriers"])

    def check(self, querier: str, cost: QueryCost) -> float:
        """Epsilon ``querier`` would have spent after ``cost``; raises BudgetExceededError if
        that exceeds the budget. Writes nothing."""
        querier = _querier(querier)
        cost = self._cost(cost)
        with self._locked(exclusive=False):
            history = self._load()["queriers"].get(querier, [])
        return self._price(querier, history, cost)

    def charge(self, querier: str, cost: QueryCost) -> float:
        """Record ``cost`` for ``querier`` and return the new total epsilon.

        Raises BudgetExceededError, leaving the ledger untouched, if it would overspend. A cost
        that released nothing is not recorded.
        """
        querier = _querier(querier)
        cost = self._cost(cost)
        with self._locked(exclusive=True):
            ledger = self._load()
            history = ledger["queriers"].get(querier, [])
            total = self._price(querier, history, cost)
            if cost.is_empty:
                return total
            ledger["queriers"][querier] = history + [cost]
            self._write(self._to_json(ledger))
        return total

    # -- internals

    @staticmethod
    def _cost(cost: Any) -> QueryCost:
        if not isinstance(cost, QueryCost):
            raise ConfigError(f"must be a QueryCost, got {type(cost).__name__}", key="cost")
        return cost

    def _price(self, querier: str, history: list[QueryCost], cost: QueryCost) -> float:
        before = epsilon_for(history, delta=self.delta)
        after = epsilon_for(history + [cost], delta=self.delta)
        if after > self.epsilon:
            raise BudgetExceededError(
                f"querier {querier!r} would exceed the privacy budget "
                f"(epsilon={self.epsilon:g}, delta={self.delta:g}): already spent "
                f"epsilon={before:.6g}; this query ({cost.describe()}) would bring the total to "
                f"epsilon={after:.6g} (+{after - before:.6g}), remaining "
                f"{max(0.0, self.epsilon - before):.6g}. "
                f"Nothing was computed or charged.")
        return after

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _corrupt(self, detail: str) -> LedgerCorruptError:
        return LedgerCorruptError(
            f"privacy ledger {self.path} is corrupt or unreadable ({detail}); it was not "
            f"modified and the budget was NOT reset. Restore it from a backup or inspect it "
            f"by hand.",
            key="ledger")

    def _load(self) -> dict[str, Any]:
        """Read and validate the ledger; ``queriers`` maps names to lists of QueryCost."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise self._corrupt("the file has disappeared since the budget was opened") from None
        except OSError as exc:
            raise self._corrupt(f"cannot read it: {exc}") from exc
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise self._corrupt("top level is not a JSON object")
        if data.get("format") != LEDGER_FORMAT:
            raise self._corrupt(f"'format' is {data.get('format')!r}, expected {LEDGER_FORMAT!r}")
        if data.get("version") != LEDGER_VERSION:
            raise self._corrupt(f"unsupported 'version' {data.get('version')!r}")
        eps, delta = data.get("epsilon"), data.get("delta")
        for name, value in (("epsilon", eps), ("delta", delta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self._corrupt(f"{name!r} is {value!r}")
        mismatch = [f"{name}: ledger has {stored!r}, opened with {wanted!r}"
                    for name, stored, wanted in (("epsilon", eps, self.epsilon),
                                                 ("delta", delta, self.delta))
                    if float(stored) != wanted]
        if mismatch:
            raise ConfigError(
                f"privacy ledger {self.path} was created with different budget parameters ("
                + "; ".join(mismatch) + "); use the original values or a new ledger file",
                key="epsilon" if float(eps) != self.epsilon else "delta")
        queriers = data.get("queriers")
        if not isinstance(queriers, dict):
            raise self._corrupt("'queriers' is not an object")
        parsed: dict[str, list[QueryCost]] = {}
        for name, records in queriers.items():
            if not isinstance(records, list):
                raise self._corrupt(f"entry of querier {name!r} is not a list")
            try:
                parsed[name] = [QueryCost.from_dict(r) for r in records]
            except ConfigError as exc:
                raise self._corrupt(f"bad cost record of querier {name!r}: {exc}") from exc
        return {"epsilon": float(eps), "delta": float(delta), "queriers": parsed}

    def _to_json(self, ledger: dict[str, Any]) -> dict[str, Any]:
        return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                "epsilon": self.epsilon, "delta": self.delta,
                "queriers": {name: [c.to_dict() for c in costs]
                             for name, costs in ledger["queriers"].items()}}

    def _write(self, data: dict[str, Any]) -> None:
        payload = (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
