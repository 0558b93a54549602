"""Local vs central differential privacy for label aggregation (issue #13).

``N`` owners each hold a small classifier trained on a disjoint, equal, random (IID) shard of
the training split; the querier holds the held-out split and asks ``Q`` queries. Three ways to
release one label per query at the **same** ``(epsilon, delta)`` over the whole query set:

``krr`` (local DP, the PrivFusion-style fusion)
    each owner perturbs its own vote with **k-ary randomized response** before releasing it:
    it keeps its label with probability ``p = e^eps0 / (e^eps0 + k - 1)`` and otherwise reports
    one of the ``k - 1`` other labels uniformly at random (``k``: the number of classes). For any
    two labels ``a, b`` and output ``o``, ``P(o | a) / P(o | b) <= p / ((1 - p) / (k - 1)) =
    e^eps0``: one release is ``eps0``-LDP, against everyone (aggregator and other owners
    included). The aggregator outputs the plurality of the noisy votes (lowest label on ties).
    **Debiasing does not change this argmax**: the unbiased count estimate is
    ``(c_j - N q) / (p - q)`` with ``q = (1 - p) / (k - 1)``, the same increasing affine map of
    the noisy count ``c_j`` for every class, so the order of the classes (ties included) is
    that of the raw counts.
``gnmax`` (central DP on shares)
    the registry's ``gnmax`` protocol: Gaussian noise on the hard-vote histogram, then the
    argmax, on shares (only the noisy label is opened, to the querier).
``confident_gnmax`` (central DP on shares, may abstain)
    the registry's ``confident_gnmax``: a noisy threshold check on the top vote count (std
    ``ratio * sigma``, threshold a vote count), then GNMax; ``-1`` when the check fails.

**Privacy unit.** Neighbouring datasets differ in one training example of one owner, which
can change that owner's vote on every query arbitrarily; every other owner's votes are fixed.
That is the unit of :mod:`mpc_fi.privacy` (sensitivity ``sqrt 2`` of the vote histogram) and
of k-RR's ``REPLACE_ONE`` relation (the owner's vote changes from one label to another).

**Equal (epsilon, delta), per the whole query set.** Both are composed over the same ``Q``
queries with the same ``delta`` and the same RDP orders (:data:`mpc_fi.privacy.DEFAULT_ORDERS`)
and RDP-to-DP conversion (``dp_accounting``'s ``RdpAccountant``):

* GNMax: ``sigma`` is the smallest noise std such that :func:`mpc_fi.privacy.epsilon_for` of the
  protocol's own ``privacy_cost`` for ``Q`` queries (charged at the std the querier cannot
  subtract, ``sigma * sqrt(N / (N + 1))``) is at most ``epsilon``: what the engine's budget
  check computes before a run.
* Confident-GNMax: ``sigma`` (with ``sigma_threshold = ratio * sigma``) is calibrated for the
  **worst case**, every query answered (``answered = checked = Q``), as the engine checks before
  a run; the epsilon it is actually charged after the run (answered queries only) is reported
  too.
* k-RR: ``eps0`` is the largest per-query epsilon such that the ``Q``-fold composition is at
  most ``epsilon``, where the composition is the smaller of two valid bounds: **basic
  composition** ``Q * eps0`` (pure DP) and **RDP** of k-RR (``dp_accounting``'s exact RDP of
  ``RandomizedResponseDpEvent`` under ``REPLACE_ONE``, composed ``Q`` times, converted at
  ``delta``). For the defaults the RDP bound is the smaller one (the calibration table says so
  by giving both).

**Seeded study noise.** In the plaintext twin every mechanism draws from numpy Generators
seeded by the seed, ``N`` and ``epsilon`` (:func:`studies.common.study_noise` for the GNMax
protocols' twins, :func:`krr_rng` for randomized response), so every table reproduces from its
seeds. This is experiment noise, predictable to anyone who knows the seed: it protects nothing.
On shares the parties draw GNMax noise from their CSPRNGs (never seeded); the spot-check reports
the mean with its interval over runs.

**Spot-check on shares.** For a few cells (``secure_owners`` x ``secure_epsilons``), ``gnmax``
runs through :class:`mpc_fi.Federation` (local launcher, output mode, TTP dealer) with a
``privacy`` section at ``(epsilon, delta)``: the engine itself checks, before the run, that the
calibrated ``sigma`` fits the budget, and charges it after; the epsilon its ledger records is
reported.

Every table gives the mean over seeds with its 95 % Student-t interval
(:func:`studies.common.mean_ci`); differences between mechanisms are paired by seed (same split,
same owners, same queries).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpc_fi.errors import ConfigError

from .common import Interval, Progress, Row, accuracy, describe_failure, fmt, markdown_table, \
    mean_ci, study_noise

#: The mechanisms compared at equal (epsilon, delta), in table order.
MECHANISMS = ("krr", "gnmax", "confident_gnmax")
#: Reference rows (no privacy).
REFERENCES = ("non_private", "mean_owner")


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalDpConfig:
    """The grid of the study. Defaults: the command that wrote ``docs/study/local_dp.*``."""

    owners: tuple[int, ...] = (5, 25, 100, 250)
    epsilons: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0, 256.0)
    delta: float = 1e-5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    dataset: str = "digits"
    samples: int | None = None  # MNIST-1D examples to generate (None: demos.MNIST1D_SAMPLES)
    queries: int | None = None  # the first Q held-out queries (None: all of them)
    hidden: int = 32  # hidden units of each owner's MLP (the demo's model)
    confident: bool = True  # include confident_gnmax
    threshold_fraction: float = 0.5  # confident_gnmax threshold: floor(f * N) + 1 votes
    ratio: float = 2.0  # confident_gnmax: sigma_threshold / sigma
    secure_owners: tuple[int, ...] = (5,)
    secure_epsilons: tuple[float, ...] = (64.0, 256.0)
    secure_repeats: int = 1  # runs on shares per secure cell and seed (fresh noise each)
    secure: bool = True
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.owners or any(isinstance(n, bool) or int(n) != n or n < 2 for n in self.owners):
            raise ConfigError(f"owner counts must be integers >= 2, got {self.owners!r}",
                              key="--owners")
        if not self.epsilons or any(not (math.isfinite(e) and e > 0) for e in self.epsilons):
            raise ConfigError(f"epsilons must be finite and > 0, got {self.epsilons!r}",
                              key="--epsilons")
        if not 0 < self.delta < 1:
            raise ConfigError(f"must be in (0, 1), got {self.delta!r}", key="--delta")
        if not self.seeds:
            raise ConfigError("at least one seed is needed", key="--seeds")
        if self.queries is not None and self.queries < 1:
            raise ConfigError(f"must be >= 1, got {self.queries!r}", key="--queries")
        if not 0 <= self.threshold_fraction < 1:
            raise ConfigError(f"must be in [0, 1), got {self.threshold_fraction!r}",
                              key="--confident-threshold")
        if not (math.isfinite(self.ratio) and self.ratio > 0):
            raise ConfigError(f"must be > 0, got {self.ratio!r}", key="--confident-ratio")
        if self.secure:
            for name, got, grid in (("--secure-owners", self.secure_owners, self.owners),
                                    ("--secure-epsilons", self.secure_epsilons, self.epsilons)):
                missing = [v for v in got if v not in grid]
                if missing:
                    raise ConfigError(f"{missing} not in the plaintext grid {list(grid)}: "
                                      "a cell on shares is compared with its twin", key=name)
            if self.secure_repeats < 1:
                raise ConfigError(f"must be >= 1, got {self.secure_repeats}",
                                  key="--secure-repeats")

    def threshold(self, num_owners: int) -> float:
        """Confident-GNMax's threshold for ``num_owners``: ``floor(f * N) + 1`` votes (at most N)."""
        return float(min(num_owners, math.floor(self.threshold_fraction * num_owners) + 1))


# ---------------------------------------------------------------------------------------
# Mechanisms and their accounting (pure functions)
# ---------------------------------------------------------------------------------------
def krr_keep_probability(epsilon0: float, num_classes: int) -> float:
    """``p = e^eps0 / (e^eps0 + k - 1)``: the probability that k-RR reports the true label."""
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon0))


def krr_noise_parameter(epsilon0: float, num_classes: int) -> float:
    """k-RR as ``dp_accounting.RandomizedResponseDpEvent``: with probability ``r`` the output
    is uniform over all ``k`` labels, else the input; ``1 - r + r/k = p`` gives
    ``r = k / (e^eps0 + k - 1)``."""
    return num_classes / (math.exp(epsilon0) + num_classes - 1)


def randomized_response(votes: np.ndarray, *, epsilon0: float, num_classes: int,
                        rng: np.random.Generator) -> np.ndarray:
    """k-ary randomized response on every entry of ``votes`` (integers in ``[0, k)``).

    Keep with probability :func:`krr_keep_probability`, else a uniform draw among the ``k - 1``
    other labels (adding ``1..k-1`` modulo ``k``).
    """
    votes = np.asarray(votes, dtype=np.int64)
    keep = rng.random(votes.shape) < krr_keep_probability(epsilon0, num_classes)
    other = (votes + rng.integers(1, num_classes, size=votes.shape)) % num_classes
    return np.where(keep, votes, other)


def plurality(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent label per query of ``votes`` (owners x queries); lowest label on ties
    (the tie rule of ``hard_vote``)."""
    votes = np.asarray(votes, dtype=np.int64)
    counts = np.stack([(votes == c).sum(axis=0) for c in range(num_classes)], axis=-1)
    return counts.argmax(axis=-1)  # numpy's argmax returns the first maximum


def krr_epsilon(*, epsilon0: float, num_classes: int, queries: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``queries`` k-RR releases at ``epsilon0`` each, per owner.

    The smaller of basic composition (``queries * epsilon0``, pure DP) and the RDP bound
    (``dp_accounting``: exact RDP of ``RandomizedResponseDpEvent`` under ``REPLACE_ONE``, composed
    ``queries`` times, converted at ``delta`` over :data:`mpc_fi.privacy.DEFAULT_ORDERS`: the
    orders and conversion of the engine's GNMax accounting).
    """
    return min(queries * epsilon0, krr_rdp_epsilon(epsilon0=epsilon0, num_classes=num_classes,
                                                   queries=queries, delta=delta))


def krr_rdp_epsilon(*, epsilon0: float, num_classes: int, queries: int, delta: float) -> float:
    """The RDP bound alone (see :func:`krr_epsilon`)."""
    import dp_accounting  # noqa: PLC0415
    from dp_accounting import rdp as dp_rdp  # noqa: PLC0415

    from mpc_fi.privacy import DEFAULT_ORDERS  # noqa: PLC0415

    accountant = dp_rdp.RdpAccountant(
        orders=list(DEFAULT_ORDERS),
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.RandomizedResponseDpEvent(
        noise_parameter=krr_noise_parameter(epsilon0, num_classes), num_buckets=num_classes)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, queries))
    return float(accountant.get_epsilon(delta))


def _protocol(name: str) -> Any:
    from mpc_fi.plugins import PROTOCOLS, lookup  # noqa: PLC0415

    return lookup(PROTOCOLS, name, key="protocol")


def gnmax_epsilon(*, sigma: float, num_owners: int, queries: int, delta: float) -> float:
    """Epsilon the engine charges for ``queries`` answers of the registry's ``gnmax`` at
    ``sigma`` with ``num_owners`` owners (its ``privacy_cost`` and
    :func:`mpc_fi.privacy.epsilon_for`)."""
    from mpc_fi.privacy import epsilon_for  # noqa: PLC0415

    cost = _protocol("gnmax").privacy_cost(params={"sigma": sigma}, num_owners=num_owners,
                                           queries=queries)
    return epsilon_for([cost], delta=delta)


def confident_gnmax_epsilon(*, sigma: float, ratio: float, threshold: float, num_owners: int,
                            queries: int, delta: float, answered: int | None = None) -> float:
    """Epsilon the engine charges for ``queries`` Confident-GNMax checks of which ``answered``
    (None: all, the worst case) were answered; ``sigma_threshold = ratio * sigma``."""
    from mpc_fi.privacy import epsilon_for  # noqa: PLC0415

    cost = _protocol("confident_gnmax").privacy_cost(
        params={"sigma": sigma, "sigma_threshold": ratio * sigma, "threshold": threshold},
        num_owners=num_owners, queries=queries, answered=answered)
    return epsilon_for([cost], delta=delta)


def _bisect_log(fits: Callable[[float], bool], lo: float, hi: float, *, increasing_fit: bool,
                rel_tol: float = 1e-9) -> float:
    """The boundary of ``fits`` in ``[lo, hi]`` by bisection on a log scale.

    ``increasing_fit``: ``fits`` holds below the boundary (k-RR's eps0) and the largest fitting
    value is returned; else it holds above (a noise std) and the smallest fitting one is.
    The returned value always fits.
    """
    good, bad = (lo, hi) if increasing_fit else (hi, lo)
    while abs(math.log(good / bad)) > rel_tol:
        mid = math.sqrt(good * bad)
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def calibrate_krr(*, epsilon: float, num_classes: int, queries: int, delta: float) -> float:
    """The largest per-query ``eps0`` whose ``queries``-fold composition (:func:`krr_epsilon`)
    is at most ``epsilon`` at ``delta``."""
    def fits(e0: float) -> bool:
        return krr_epsilon(epsilon0=e0, num_classes=num_classes, queries=queries,
                           delta=delta) <= epsilon

    lo, hi = epsilon / queries, epsilon  # basic composition fits at lo
    while fits(hi):
        hi *= 2
    return _bisect_log(fits, lo, hi, increasing_fit=True)


def _calibrate_sigma(eps_of: Callable[[float], float], epsilon: float) -> float:
    def fits(s: float) -> bool:
        return eps_of(s) <= epsilon

    lo, hi = 1.0, 1.0
    while fits(lo):
        lo /= 2
    while not fits(hi):
        hi *= 2
    return _bisect_log(fits, lo, hi, increasing_fit=False)


def calibrate_gnmax(*, epsilon: float, num_owners: int, queries: int, delta: float) -> float:
    """The smallest ``gnmax`` ``sigma`` (the configured std, on shares) for which the engine
    charges at most ``epsilon`` at ``delta`` for ``queries`` answers."""
    return _calibrate_sigma(lambda s: gnmax_epsilon(sigma=s, num_owners=num_owners,
                                                    queries=queries, delta=delta), epsilon)


def calibrate_confident_gnmax(*, epsilon: float, ratio: float, threshold: float,
                              num_owners: int, queries: int, delta: float) -> float:
    """The smallest ``sigma`` (with ``sigma_threshold = ratio * sigma``) whose worst case (every
    query answered) costs at most ``epsilon`` at ``delta``."""
    return _calibrate_sigma(lambda s: confident_gnmax_epsilon(
        sigma=s, ratio=ratio, threshold=threshold, num_owners=num_owners, queries=queries,
        delta=delta), epsilon)


@dataclass(frozen=True)
class Calibration:
    """Each mechanism's parameters at one ``(epsilon, delta)``, ``N`` and ``Q``, and the epsilon
    each then costs by its accounting (all at most ``epsilon``)."""

    epsilon: float
    delta: float
    num_owners: int
    queries: int
    num_classes: int
    krr_epsilon0: float
    gnmax_sigma: float
    confident_sigma: float
    ratio: float
    threshold: float

    @property
    def krr_keep(self) -> float:
        return krr_keep_probability(self.krr_epsilon0, self.num_classes)

    @functools.cached_property
    def spent(self) -> dict[str, float]:
        """Epsilon per mechanism at these parameters (Confident-GNMax: worst case)."""
        return {
            "krr": krr_epsilon(epsilon0=self.krr_epsilon0, num_classes=self.num_classes,
                               queries=self.queries, delta=self.delta),
            "krr_basic": self.queries * self.krr_epsilon0,
            "krr_rdp": krr_rdp_epsilon(epsilon0=self.krr_epsilon0, num_classes=self.num_classes,
                                       queries=self.queries, delta=self.delta),
            "gnmax": gnmax_epsilon(sigma=self.gnmax_sigma, num_owners=self.num_owners,
                                   queries=self.queries, delta=self.delta),
            "confident_gnmax": confident_gnmax_epsilon(
                sigma=self.confident_sigma, ratio=self.ratio, threshold=self.threshold,
                num_owners=self.num_owners, queries=self.queries, delta=self.delta),
        }


def calibrate(*, epsilon: float, delta: float, num_owners: int, queries: int, num_classes: int,
              ratio: float, threshold: float) -> Calibration:
    """Every mechanism calibrated to ``(epsilon, delta)`` over ``queries`` queries."""
    return Calibration(
        epsilon=epsilon, delta=delta, num_owners=num_owners, queries=queries,
        num_classes=num_classes, ratio=ratio, threshold=threshold,
        krr_epsilon0=calibrate_krr(epsilon=epsilon, num_classes=num_classes, queries=queries,
                                   delta=delta),
        gnmax_sigma=calibrate_gnmax(epsilon=epsilon, num_owners=num_owners, queries=queries,
                                    delta=delta),
        confident_sigma=calibrate_confident_gnmax(epsilon=epsilon, ratio=ratio,
                                                  threshold=threshold, num_owners=num_owners,
                                                  queries=queries, delta=delta))


def krr_rng(seed: int, num_owners: int, epsilon: float) -> np.random.Generator:
    """The seeded generator of one cell's randomized response (study noise, not a secret)."""
    return np.random.default_rng((seed, num_owners, zlib.crc32(f"krr/{epsilon!r}".encode())))


def _stream(name: str, num_owners: int, epsilon: float) -> int:
    return zlib.crc32(f"{name}/N={num_owners}/eps={epsilon!r}".encode())


# ---------------------------------------------------------------------------------------
# Owners
# ---------------------------------------------------------------------------------------
@dataclass
class Owners:
    """One seed's owners for one ``N``: their votes on the queries and (optionally) saved models."""

    num_owners: int
    shard_sizes: list[int]
    logits: list[torch.Tensor]  # per owner, queries x classes (float64)
    models: list[torch.nn.Module]
    kwargs: dict[str, Any]

    @property
    def votes(self) -> np.ndarray:
        """Owners x queries: each owner's label (lowest index on ties)."""
        return np.stack([lg.numpy().argmax(axis=-1) for lg in self.logits])


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray
    num_classes: int
    input_range: tuple[float, float]


def split_data(dataset: str, seed: int, queries: int | None, samples: int | None = None
               ) -> Split:
    """The demo's stratified 70/30 split for ``seed``; the querier asks the first ``queries``
    held-out examples (``samples``: MNIST-1D examples to generate)."""
    import demos as demo  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    x, y = demo.load_dataset(dataset, samples=samples)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    if queries is not None:
        x_te, y_te = x_te[:queries], y_te[:queries]
    return Split(x_tr, y_tr, x_te, y_te, int(y.max()) + 1,
                 (float(np.floor(x.min())), float(np.ceil(x.max()))))


def train_owners(split: Split, num_owners: int, seed: int, *, hidden: int = 32) -> Owners:
    """``num_owners`` MLPs (the demo's ``mpc_fi.demo.mlp`` and training) on disjoint, equal,
    random shards of the training split."""
    import demos as demo  # noqa: PLC0415
    from mpc_fi.demo import mlp  # noqa: PLC0415

    rng = np.random.default_rng((seed, num_owners, zlib.crc32(b"shards")))
    shards = np.array_split(rng.permutation(len(split.y_train)), num_owners)
    kwargs = {"in_features": int(split.x_train.shape[1]), "hidden": hidden,
              "num_classes": split.num_classes}
    models = []
    for k, idx in enumerate(shards):
        torch.manual_seed(seed * 100_003 + k)  # reproducible initial weights per owner
        model = mlp(**kwargs)
        demo.train(model, split.x_train[idx], split.y_train[idx], seed=seed * 100_003 + k)
        models.append(model)
    return Owners(num_owners, [len(s) for s in shards], demo.owner_logits(models, split.x_query),
                  models, kwargs)


# ---------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------
def _metrics(labels: np.ndarray, truth: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    acc, acc_answered, answered = accuracy(labels, truth)
    return {"accuracy": acc, "accuracy_answered": acc_answered, "answered": answered,
            "agreement": float((np.asarray(labels) == reference).mean())}


def _twin_labels(name: str, params: dict[str, Any], owners: Owners, noise: Any) -> np.ndarray:
    cls = _protocol(name)
    proto = cls(num_classes=owners.logits[0].shape[-1], num_owners=owners.num_owners,
                **params)
    return np.asarray(proto.plaintext(owners.logits, noise_sources=noise).labels)


def run_seed(cfg: LocalDpConfig, seed: int, workdir: Path,
             calibrations: dict[tuple[int, float, int], Calibration],
             progress: Callable[[str], None] | None = None) -> list[Row]:
    """Every cell of one seed: train the owners per ``N``, release with each mechanism at each
    epsilon (seeded twins), and the cells on shares."""
    split = split_data(cfg.dataset, seed, cfg.queries, cfg.samples)
    q, k, y = len(split.y_query), split.num_classes, split.y_query
    rows: list[Row] = []
    for n in cfg.owners:
        t0 = time.perf_counter()
        owners = train_owners(split, n, seed, hidden=cfg.hidden)
        train_s = time.perf_counter() - t0
        votes = owners.votes
        clean = plurality(votes, k)
        key = {"seed": seed, "owners": n, "queries": q, "delta": cfg.delta,
               "shard_size": float(np.mean(owners.shard_sizes))}
        own_acc = [float((v == y).mean()) for v in votes]
        rows.append({**key, "mechanism": "mean_owner", "kind": "reference",
                     "accuracy": float(np.mean(own_acc)), "train_seconds": train_s})
        rows.append({**key, "mechanism": "non_private", "kind": "reference",
                     **_metrics(clean, y, clean)})
        for eps in cfg.epsilons:
            cal = calibrations.get((n, eps, q))
            if cal is None:
                cal = calibrations[(n, eps, q)] = calibrate(
                    epsilon=eps, delta=cfg.delta, num_owners=n, queries=q, num_classes=k,
                    ratio=cfg.ratio, threshold=cfg.threshold(n))
            base = {**key, "epsilon": eps, "kind": "plaintext"}
            noisy = randomized_response(votes, epsilon0=cal.krr_epsilon0, num_classes=k,
                                        rng=krr_rng(seed, n, eps))
            rows.append({**base, "mechanism": "krr", "param": cal.krr_epsilon0,
                         **_metrics(plurality(noisy, k), y, clean),
                         "epsilon_charged": cal.spent["krr"]})
            labels = _twin_labels("gnmax", {"sigma": cal.gnmax_sigma}, owners,
                                  study_noise(n + 1, seed, _stream("gnmax", n, eps)))
            rows.append({**base, "mechanism": "gnmax", "param": cal.gnmax_sigma,
                         **_metrics(labels, y, clean), "epsilon_charged": cal.spent["gnmax"]})
            if cfg.confident:
                params = {"sigma": cal.confident_sigma, "threshold": cal.threshold,
                          "sigma_threshold": cal.ratio * cal.confident_sigma}
                labels = _twin_labels("confident_gnmax", params, owners,
                                      study_noise(n + 1, seed, _stream("confident_gnmax", n, eps)))
                answered = int((labels != -1).sum())
                top = np.stack([(votes == c).sum(axis=0) for c in range(k)]).max(axis=0)
                rows.append({**base, "mechanism": "confident_gnmax", "param": cal.confident_sigma,
                             **_metrics(labels, y, clean),
                             "noise_free_pass": float((top >= cal.threshold).mean()),
                             "epsilon_charged": confident_gnmax_epsilon(
                                 sigma=cal.confident_sigma, ratio=cal.ratio,
                                 threshold=cal.threshold, num_owners=n, queries=q,
                                 delta=cfg.delta, answered=answered)})
            if cfg.secure and n in cfg.secure_owners and eps in cfg.secure_epsilons:
                rows += _secure_cell(cfg, split, owners, cal, seed, clean, base,
                                     workdir / f"seed{seed}-N{n}-eps{eps:g}", progress)
    for row in rows:
        row.setdefault("epsilon_charged", math.nan)
    return rows


def _secure_cell(cfg: LocalDpConfig, split: Split, owners: Owners, cal: Calibration, seed: int,
                 clean: np.ndarray, base: Row, workdir: Path,
                 progress: Callable[[str], None] | None) -> list[Row]:
    """``gnmax`` on shares through :class:`mpc_fi.Federation` with a budget of exactly
    ``(epsilon, delta)``: the engine checks the calibrated sigma before the run and charges it."""
    from mpc_fi.config import FederationConfig, ModelSource, OwnerConfig, PrivacyConfig, \
        ProtocolConfig, QuerierConfig  # noqa: PLC0415
    from mpc_fi.federation import Federation  # noqa: PLC0415
    from mpc_fi.privacy import PrivacyBudget  # noqa: PLC0415

    workdir.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, model in enumerate(owners.models):
        path = workdir / f"owner{i}.pt"
        torch.save(model.state_dict(), path)
        sources.append(OwnerConfig(name=f"owner{i}", model=ModelSource(
            factory="mpc_fi.demo:mlp", weights=str(path.resolve()), kwargs=dict(owners.kwargs))))
    rows = []
    for rep in range(cfg.secure_repeats):
        ledger = workdir / f"ledger{rep}.json"
        # Each run is a fresh experiment at exactly (epsilon, delta): every owner keeps its own
        # ledger (the engine's per-owner budget check), so each run gets fresh ones here, never
        # the owners' default ledgers, which would carry one cell's spending into the next.
        owners_cfg = tuple(
            dataclasses.replace(o, ledger=str(workdir / f"{o.name}-ledger{rep}.json"))
            for o in sources)
        fed = FederationConfig(
            owners=owners_cfg, querier=QuerierConfig(name="querier",
                                                         input_range=split.input_range),
            mode="output", protocol=ProtocolConfig(name="gnmax",
                                                   params={"sigma": cal.gnmax_sigma}),
            reveal="label", dealer="ttp",
            privacy=PrivacyConfig(budget_file=str(ledger), epsilon=cal.epsilon, delta=cal.delta))
        if progress:
            progress(f"seed {seed} N={owners.num_owners} eps={cal.epsilon:g} gnmax on shares "
                     f"(run {rep + 1}/{cfg.secure_repeats})")
        row = {**base, "mechanism": "gnmax", "kind": "secure", "repeat": rep,
               "param": cal.gnmax_sigma}
        t1 = time.perf_counter()
        try:
            got = np.asarray(Federation(fed, timeout_s=cfg.timeout_s,
                                        run_dir=workdir / f"run{rep}").run(split.x_query)
                             .prediction.labels)
        except Exception as exc:  # noqa: BLE001 - a failed run is a row, not a crash
            rows.append({**row, "note": "failed: " + describe_failure(exc)})
            continue
        spent = PrivacyBudget(ledger, epsilon=cal.epsilon, delta=cal.delta).spent("querier")
        rows.append({**row, **_metrics(got, split.y_query, clean), "epsilon_charged": spent,
                     "seconds": time.perf_counter() - t1})
    return rows


def run_local_dp(cfg: LocalDpConfig = LocalDpConfig(), *, show_progress: bool = True
                 ) -> tuple[list[Row], list[Calibration]]:
    """Run the whole grid: rows (long format) and the calibration of every ``(N, epsilon)``."""
    torch.set_num_threads(1)  # small models; leave the other core to the parties
    bar = Progress(len(cfg.seeds), "local-dp", enabled=show_progress)
    calibrations: dict[tuple[int, float, int], Calibration] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mpc-fi-local-dp-") as tmp:
        for seed in cfg.seeds:
            rows += run_seed(cfg, seed, Path(tmp), calibrations,
                             progress=(lambda msg: bar.stream.write(f"  ... {msg}\n"))
                             if show_progress else None)
            bar.step(f"seed {seed}")
    return rows, [calibrations[key] for key in sorted(calibrations)]


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def _values(rows: Sequence[Row], kind: str, mechanism: str, n: int, eps: float | None,
            field: str) -> dict[int, list[float]]:
    """seed -> values of ``field`` (several per seed only for repeated runs on shares).

    Reference rows (no privacy) have no epsilon: ``eps`` does not select among them.
    """
    out: dict[int, list[float]] = {}
    for r in rows:
        if (r["kind"], r["mechanism"], r["owners"]) == (kind, mechanism, n) and \
                (eps is None or kind == "reference" or r.get("epsilon") == eps) and field in r:
            out.setdefault(r["seed"], []).append(r[field])
    return out


def interval(rows: Sequence[Row], kind: str, mechanism: str, n: int, eps: float | None,
             field: str = "accuracy") -> Interval:
    """Mean and 95 % interval over seeds of ``field`` (each seed's runs averaged first)."""
    return mean_ci(float(np.mean(v)) for v in _values(rows, kind, mechanism, n, eps,
                                                       field).values())


def paired(rows: Sequence[Row], a: str, b: str, n: int, eps: float,
           field: str = "accuracy", kind_a: str = "plaintext",
           kind_b: str = "plaintext") -> Interval:
    """Interval of ``field(a) - field(b)`` paired by seed."""
    va = _values(rows, kind_a, a, n, eps, field)
    vb = _values(rows, kind_b, b, n, eps, field)
    return mean_ci(float(np.mean(va[s])) - float(np.mean(vb[s])) for s in va if s in vb)


def _bold(ci: Interval, text: str) -> str:
    return f"**{text}**" if ci.n >= 2 and ci.excludes(0.0) else text


def markdown_report(rows: Sequence[Row], calibrations: Sequence[Calibration]) -> str:
    """Calibration, owners, accuracy / agreement / answered rate per cell, and the runs on
    shares."""
    seeds = sorted({r["seed"] for r in rows})
    owners = sorted({r["owners"] for r in rows})
    epsilons = sorted({r["epsilon"] for r in rows if r["kind"] == "plaintext"})
    mechs = [m for m in MECHANISMS if any(r["mechanism"] == m for r in rows)]
    q = rows[0]["queries"]
    delta = rows[0]["delta"]
    out = [f"Seeds {', '.join(map(str, seeds))}; Q = {q} queries; delta = {delta:g}; epsilon is "
           "per owner over the whole query set. Mean [95 % t-interval] or mean ± half-width over "
           "seeds; plaintext twins with seeded study noise.\n\n"]

    out.append("**Calibration** (the same for every seed). k-RR: per-query eps0, keep "
               "probability p, and its Q-fold epsilon by basic composition and by RDP (the "
               "smaller is used); GNMax: the configured sigma (total noise std on shares) and the "
               "epsilon the engine charges; Confident-GNMax: sigma (threshold check at ratio x "
               "sigma), its threshold, worst-case epsilon.\n\n")
    table = []
    for cal in calibrations:
        spent = cal.spent
        table.append([cal.num_owners, f"{cal.epsilon:g}", f"{cal.krr_epsilon0:.4f}",
                      f"{cal.krr_keep:.3f}", f"{spent['krr_basic']:.3g}",
                      f"{spent['krr_rdp']:.4g}", f"{cal.gnmax_sigma:.3f}",
                      f"{spent['gnmax']:.4g}", f"{cal.confident_sigma:.3f}",
                      f"{cal.threshold:g}", f"{spent['confident_gnmax']:.4g}"])
    out.append(markdown_table(table, ["N", "ε", "k-RR eps0", "k-RR p", "k-RR ε basic",
                                      "k-RR ε RDP", "GNMax σ", "GNMax ε", "conf. σ",
                                      "conf. T", "conf. ε (worst)"]))

    out.append("\n**Owners**: mean shard size, mean owner accuracy, and the non-private "
               "ensemble (plurality of the owners' votes).\n\n")
    table = []
    for n in owners:
        shard = interval(rows, "reference", "mean_owner", n, None, "shard_size").mean
        table.append([n, f"{shard:.1f}", interval(rows, "reference", "mean_owner", n, None).text(),
                      interval(rows, "reference", "non_private", n, None).text()])
    out.append(markdown_table(table, ["N", "shard size", "mean owner accuracy",
                                      "non-private ensemble accuracy"]))

    out.append("\n**Accuracy** against the ground truth (abstentions count as wrong), mean ± "
               "half-width over seeds; `GNMax − k-RR` and `GNMax − non-private`: paired by "
               "seed, **bold** where the interval excludes 0.\n\n")
    table = []
    for n in owners:
        for eps in epsilons:
            line = [n, f"{eps:g}", interval(rows, "reference", "non_private", n, None).short()]
            line += [interval(rows, "plaintext", m, n, eps).short() for m in mechs]
            d = paired(rows, "gnmax", "krr", n, eps)
            line.append(_bold(d, d.short()))
            d = paired(rows, "gnmax", "non_private", n, eps, kind_b="reference")
            line.append(_bold(d, d.short()))
            table.append(line)
    out.append(markdown_table(table, ["N", "ε", "non-private", *mechs, "GNMax − k-RR",
                                      "GNMax − non-private"]))

    out.append("\n**Agreement with the non-private ensemble** (fraction of queries with its "
               "label; abstentions disagree), mean ± half-width over seeds.\n\n")
    table = [[n, f"{eps:g}"] + [interval(rows, "plaintext", m, n, eps, "agreement").short()
                                for m in mechs] for n in owners for eps in epsilons]
    out.append(markdown_table(table, ["N", "ε", *mechs]))

    if "confident_gnmax" in mechs:
        out.append("\n**Confident-GNMax**: threshold T (votes), the fraction of queries whose "
                   "top vote count reaches T without noise, the answered rate, accuracy on "
                   "answered queries, and the epsilon actually charged (answered queries only; "
                   "calibrated for the worst case, every query answered), and its accuracy "
                   "(abstentions wrong) minus GNMax's, paired by seed (**bold**: the interval "
                   "excludes 0). k-RR and GNMax answer every query.\n\n")
        thresholds = {c.num_owners: c.threshold for c in calibrations}
        table = [[n, f"{eps:g}", f"{thresholds[n]:g}",
                  interval(rows, "plaintext", "confident_gnmax", n, eps,
                           "noise_free_pass").short(),
                  interval(rows, "plaintext", "confident_gnmax", n, eps, "answered").short(),
                  interval(rows, "plaintext", "confident_gnmax", n, eps,
                           "accuracy_answered").short(),
                  fmt(interval(rows, "plaintext", "confident_gnmax", n, eps,
                               "epsilon_charged").mean, 2),
                  _bold(d := paired(rows, "confident_gnmax", "gnmax", n, eps), d.short())]
                 for n in owners for eps in epsilons]
        out.append(markdown_table(table, ["N", "ε", "T", "top count ≥ T (no noise)",
                                          "answered", "accuracy on answered",
                                          "ε charged (mean)",
                                          "accuracy − GNMax's (paired)"]))
    out.append(_secure_table(rows))
    return "".join(out)


def _secure_table(rows: Sequence[Row]) -> str:
    secure = [r for r in rows if r["kind"] == "secure"]
    if not secure:
        return ""
    cells = sorted({(r["owners"], r["epsilon"]) for r in secure})
    table = []
    for n, eps in cells:
        runs = [r for r in secure if (r["owners"], r["epsilon"]) == (n, eps)]
        ok = [r for r in runs if "accuracy" in r]
        d = paired(rows, "gnmax", "gnmax", n, eps, kind_a="secure", kind_b="plaintext")
        charged = [r["epsilon_charged"] for r in ok]
        table.append([n, f"{eps:g}", f"{runs[0]['param']:.3f}",
                      interval(rows, "plaintext", "gnmax", n, eps).text(),
                      interval(rows, "secure", "gnmax", n, eps).text(), d.text(),
                      interval(rows, "secure", "gnmax", n, eps, "agreement").text(),
                      f"{max(charged):.4g}" if charged else "–", f"{len(ok)}/{len(runs)}",
                      fmt(float(np.mean([r["seconds"] for r in ok])), 1) if ok else "–"])
    return ("\n**GNMax on shares** (Federation, local launcher, output mode, TTP dealer, a "
            "budget of (ε, δ) checked and charged by the engine; fresh CSPRNG noise per run) "
            "next to its seeded twin: accuracy mean [95 % interval] over seeds, the paired "
            "difference shares − twin, agreement with the non-private ensemble, the largest "
            "epsilon the engine's ledger recorded.\n\n"
            + markdown_table(table, ["N", "ε", "σ", "twin accuracy", "shares accuracy",
                                     "shares − twin (paired)", "shares agreement",
                                     "ε charged (max)", "runs ok", "s (mean)"]))


def calibration_rows(calibrations: Sequence[Calibration]) -> list[Row]:
    """The calibration table as CSV rows."""
    out = []
    for cal in calibrations:
        spent = cal.spent
        out.append({**{f.name: getattr(cal, f.name) for f in dataclasses.fields(cal)},
                    "krr_keep": cal.krr_keep,
                    **{f"epsilon_{k}": v for k, v in spent.items()}})
    return out
