"""What the contribution protocol leaks about the owners' data, attacked and defended.

The secure Shapley computation (:mod:`studies.contribution`) opens one number per coalition to
the querier: how many validation queries the coalition's ensemble answers correctly. The querier
chooses the validation inputs *and* labels. A querier that restricts the validation set to one
class ``c`` learns every owner's own accuracy on class ``c`` (the singleton counts): one run per
class reveals which classes each owner trained on (**chosen-subset attack**).

The experiment runs on the plaintext twin (:func:`studies.contribution.plaintext_coalition_values`),
whose counts equal those opened on shares exactly (``test_shapley_on_shares_equals_plaintext_exactly``).
Per seed: the demo's 70/30 split of digits, the 70 % split among ``N`` owners by Dirichlet
(``alpha``), each owner trained as in :mod:`mpc_fi.demo`; the querier holds the 30 % with labels.

**Attack success.** For each owner ``i`` and class ``c`` the attacker's score is owner ``i``'s
accuracy on the class-``c`` run. It guesses "owner ``i`` trained on class ``c``" when the score is
at least 0.5; the truth is "owner ``i`` holds at least ``holds_min`` examples of class ``c``".
Reported: the fraction of owner × class pairs guessed right (and the same for the trivial guess
"every owner holds every class"), and the Spearman correlation of the scores with the owners'
private class counts, pooled over pairs. Classes the attacker could not query (refused, or over
budget) are scored as coin flips (0.5 correct) and left out of the correlation.

**Defences the owners enforce** (each a row):

``none``
    one run per class.
``min_validation``
    every owner refuses a validation set smaller than ``min_validation`` queries (enforced on
    shares in :func:`studies.contribution._party`, :class:`~studies.contribution.ValidationRefusedError`).
    The naive attack is refused when a class has fewer examples; the adaptive attacker pads:
    one run on a padding set ``P`` (``min_validation`` queries of every class), then one run
    per class on ``P`` plus that class's other examples, and subtracts the counts
    (**differencing**): ``C + 1`` runs give every owner's exact accuracy on each class's
    examples outside the padding.
``dp``
    Gaussian noise of std ``sigma`` on every opened count. One validation query changes each of
    the ``K`` opened counts by at most 1, so a run is ``K`` Gaussian mechanisms of sensitivity 1
    with noise ``sigma``; :mod:`mpc_fi.privacy` prices it (a ``QueryCost`` with ``K`` checks at
    ``threshold_sigma = sigma``, the sensitivity-1 Gaussian it already prices) and a
    :class:`~mpc_fi.privacy.PrivacyBudget` ledger charges every run to the querier. With
    ``budget`` set, runs that would exceed it are refused (``BudgetExceededError``).
    This is DP for the *validation queries* (what one query's outcome adds), not for the
    owners' training data: it makes aggregates over few queries noisy and caps how many runs a
    querier gets, it does not hide a property of a whole model from a large enough chosen set.
    The utility cost is reported as the error of the Shapley values computed from noisy counts
    on the whole held-out set (the legitimate use).
``dp+budget``
    the same noise, every run charged to a ledger capped at ``budget``: the querier gets as many
    classes as the budget pays for.
``min_validation+dp``
    both, the attacker differencing noisy counts.

These rows run on the twin, the noise from seeded numpy Generators.
:func:`run_secure_valuation_leakage` runs the attacks with every run on shares, the owners
enforcing the defences of :mod:`studies.owner_defences` (minimum size, a pool the parties
sample from, noisy counts charged to each owner's ledger), beside the same attacks on the twin
(``pool`` rows: the twin samples with seeded keys); it adds the mislabelled-padding attack
(:func:`mislabelled_padding_attack`), which passes a minimum size with one run per class.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import Progress, Row, markdown_table, mean_ci
from .contribution import shapley_from_values

DEFENCES = ("none", "min_validation", "dp", "dp+budget", "min_validation+dp")


@dataclass(frozen=True)
class ValuationLeakageConfig:
    dataset: str = "digits"
    owners: tuple[int, ...] = (3, 5)
    alphas: tuple[float, ...] = (0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    min_validation: int = 100
    sigmas: tuple[float, ...] = (5.0, 20.0, 50.0)
    budget: float | None = 2.0  # per-querier epsilon cap of the dp+budget rows (None: no such rows)
    delta: float = 1e-5
    holds_min: int = 5  # "owner i trained on class c": it holds at least this many examples
    protocol: str = "soft_vote"


@dataclass
class ValuationWorld:
    """One seed's owners and the querier's labelled set, as the twin sees them."""

    units: list[torch.Tensor]  # each owner's encoded contribution on every held-out query
    y: np.ndarray
    class_counts: np.ndarray  # (N, C) private: owner i's training examples of class c
    num_classes: int
    #: for runs on shares (``build_world(..., workdir=...)``): the held-out inputs and each
    #: owner's ModelSource (its weights stay in ``workdir``)
    x: np.ndarray | None = None
    sources: list[Any] | None = None


def build_world(dataset: str, num_owners: int, alpha: float, seed: int,
                protocol: str = "soft_vote", *, workdir: Path | None = None) -> ValuationWorld:
    """One seed's federation; with ``workdir`` its owners' weights are kept there for runs on
    shares (:class:`SecureValuationOracle`)."""
    import contextlib  # noqa: PLC0415

    import demos as demo  # noqa: PLC0415
    from .contribution import encoded_contributions  # noqa: PLC0415
    from .common import protocol_specs  # noqa: PLC0415

    with (contextlib.nullcontext(str(workdir)) if workdir is not None
          else tempfile.TemporaryDirectory(prefix="mpc-fi-valuation-")) as tmp:
        setup = demo.prepare(Path(tmp), dataset=dataset, num_owners=num_owners, alpha=alpha,
                             seed=seed)
    x, y = setup.x_test, setup.y_test
    c = int(setup.federation.owners[0].model.kwargs["num_classes"])
    # the owners' class counts: the same split demo.prepare made (same seed, same calls)
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    xa, ya = demo.load_dataset(dataset)
    _, _, y_train, _ = train_test_split(xa, ya, test_size=0.3, random_state=seed, stratify=ya)
    parts = demo.dirichlet_split(y_train, num_owners, alpha, np.random.default_rng(seed))
    counts = np.array([np.bincount(y_train[p], minlength=c) for p in parts])
    if counts.sum(1).tolist() != list(setup.owner_sizes):
        raise RuntimeError("class counts do not reproduce demo.prepare's split")
    spec = protocol_specs(num_owners, only=[protocol])[0]
    proto = spec.build(num_classes=c, num_owners=num_owners, owner_weights=[1.0] * num_owners)
    units = encoded_contributions(proto, demo.owner_logits(setup.models, x))
    if workdir is None:
        return ValuationWorld(units, y, counts, c)
    return ValuationWorld(units, y, counts, c, x=x,
                          sources=[o.model for o in setup.federation.owners])


class ValuationOracle:
    """The contribution protocol as the querier sees it: per run, every coalition's count
    (optionally noisy), with the owners' minimum size and the querier's budget enforced."""

    def __init__(self, world: ValuationWorld, *, min_validation: int = 1, sigma: float = 0.0,
                 budget: Any = None, delta: float = 1e-5, seed: int = 0,
                 sample: int | None = None, min_pool: int = 1) -> None:
        from .contribution import all_coalitions  # noqa: PLC0415

        self.world = world
        self.n = len(world.units)
        self.coalitions = all_coalitions(self.n)
        self.min_validation, self.sigma, self.budget, self.delta = min_validation, sigma, budget, delta
        self.sample, self.min_pool = sample, min_pool
        self.rng = np.random.default_rng((seed, 4242))
        self.sample_rng = np.random.default_rng((seed, 4243))  # the twin's sampling keys
        self.runs = self.refused = 0

    def cost(self) -> Any:
        """One run's privacy cost: K sensitivity-1 Gaussian mechanisms with std ``sigma``."""
        from mpc_fi.privacy import QueryCost  # noqa: PLC0415

        return QueryCost(gnmax_sigma=None, threshold_sigma=self.sigma, answered=0,
                         checked=len(self.coalitions))

    def run(self, idx: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray | None:
        """Counts per coalition (row ``m - 1`` = bitmask ``m``) on the held-out queries ``idx``
        with the querier's ``labels`` (default: the true ones); None when the owners refuse (too
        small) or the budget would be exceeded. With ``sample``, ``idx`` is the pool: the counts
        are those of the sample scaled to the pool (``x len(pool) / sample``), the querier's
        unbiased estimate of the pool's counts."""
        from mpc_fi.errors import BudgetExceededError  # noqa: PLC0415

        self.runs += 1
        idx = np.asarray(idx)
        labels = self.world.y[idx] if labels is None else np.asarray(labels)
        size = len(idx) if self.sample is None else self.sample
        if len(idx) < self.min_pool or size > len(idx) or size < self.min_validation:
            self.refused += 1
            return None
        if self.sigma > 0 and self.budget is not None:
            try:
                self.budget.charge("querier", self.cost())
            except BudgetExceededError:
                self.refused += 1
                return None
        pool = len(idx)
        if self.sample is not None:
            from .owner_defences import sample_indices  # noqa: PLC0415

            chosen = sample_indices(self.sample_rng.bytes(32), pool, size)
            idx, labels = idx[chosen], labels[chosen]
        return self.counts(idx, labels) * (pool / size)

    def counts(self, idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
        from .contribution import plaintext_coalition_values  # noqa: PLC0415

        zeros = [torch.zeros(len(idx))] * self.n
        vals = plaintext_coalition_values([u[idx] for u in self.world.units], labels,
                                          self.coalitions, zeros)
        counts = vals.correct.astype(float)
        if self.sigma > 0:
            counts = counts + self.rng.normal(0.0, self.sigma, counts.shape)
        return counts

    def epsilon_per_run(self) -> float:
        from mpc_fi.privacy import epsilon_for  # noqa: PLC0415

        return epsilon_for([self.cost()], delta=self.delta) if self.sigma > 0 else math.inf


class SecureValuationOracle(ValuationOracle):
    """The same oracle with every run on shares (:func:`studies.contribution.secure_coalition_values`):
    the owners enforce ``min_validation``, ``min_pool``, the noise and their own ledgers
    (``ledger_dir/owner<i>.json``, capped at ``budget``), and the parties draw the sample.

    Without noise or sampling each run's counts are also computed by the twin; ``mismatches``
    counts the runs where they differ (it must stay 0).
    """

    def __init__(self, world: ValuationWorld, *, ledger_dir: Path | None = None,
                 timeout_s: float = 300.0, **kwargs: Any) -> None:
        if world.sources is None or world.x is None:
            raise ValueError("runs on shares need a world built with build_world(workdir=...)")
        budget = kwargs.pop("budget", None)
        super().__init__(world, **kwargs)
        if budget is not None and (ledger_dir is None or self.sigma <= 0):
            raise ValueError("a budget on shares needs noise (sigma > 0) and a ledger_dir")
        self.cap = budget
        self.ledgers = None if budget is None else [Path(ledger_dir) / f"owner{i}.json"
                                                    for i in range(self.n)]
        self.timeout_s = timeout_s
        self.mismatches = self.checked = 0

    def run(self, idx: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray | None:
        from mpc_fi.errors import BudgetExceededError  # noqa: PLC0415
        from .contribution import ValidationRefusedError, secure_coalition_values  # noqa: PLC0415

        self.runs += 1
        idx = np.asarray(idx)
        labels = self.world.y[idx] if labels is None else np.asarray(labels)
        try:
            vals = secure_coalition_values(
                self.world.sources, self.world.x[idx], labels, self.coalitions,
                min_validation=self.min_validation, sample=self.sample, min_pool=self.min_pool,
                count_sigma=self.sigma or None, ledgers=self.ledgers,
                budget=None if self.cap is None else (self.cap, self.delta),
                timeout_s=self.timeout_s)
        except (ValidationRefusedError, BudgetExceededError):
            self.refused += 1
            return None
        if not self.sigma and self.sample is None:
            self.checked += 1
            self.mismatches += int(not np.array_equal(vals.correct, self.counts(idx, labels)))
        return vals.correct.astype(float) * (len(idx) / vals.num_queries)


def mislabelled_padding_attack(oracle: ValuationOracle, *, pad: int, seed: int) -> np.ndarray:
    """One run per class ``c``: the class's examples with their labels, padded with ``pad``
    examples of other classes labelled ``(y + 1) mod C`` (answers the owners almost never
    give). The singleton counts (scaled to the pool when the parties sample) over the class
    size estimate each owner's accuracy on ``c``, plus the padding it answers "right" (an owner
    that predicts few classes gets some: a bias upwards, up to 0.4 at N = 3, alpha = 0.1, seed
    0). The pool passes a minimum size with one run per class and no differencing, and its
    inputs are all distinct real examples."""
    w = oracle.world
    n, c = oracle.n, w.num_classes
    singles = [(1 << i) - 1 for i in range(n)]
    scores = np.full((n, c), np.nan)
    rng = np.random.default_rng((seed, 78))
    for k in range(c):
        own = np.flatnonzero(w.y == k)
        filler = rng.permutation(np.flatnonzero(w.y != k))[:pad]
        idx = np.concatenate([own, filler])
        labels = np.concatenate([w.y[own], (w.y[filler] + 1) % c])
        counts = oracle.run(idx, labels)
        if counts is not None:
            scores[:, k] = counts[singles] / len(own)
    return scores


def chosen_subset_attack(oracle: ValuationOracle, *, differencing: bool,
                         pad: int, seed: int) -> np.ndarray:
    """Per owner and class, the attacker's estimate of the owner's accuracy on that class (NaN
    where it learned nothing)."""
    w = oracle.world
    n, c = oracle.n, w.num_classes
    singles = [(1 << i) - 1 for i in range(n)]  # row of each singleton coalition
    scores = np.full((n, c), np.nan)
    if not differencing:
        for k in range(c):
            idx = np.flatnonzero(w.y == k)
            counts = oracle.run(idx)
            if counts is not None:
                scores[:, k] = counts[singles] / len(idx)
        return scores
    rng = np.random.default_rng((seed, 77))
    per_class = max(1, math.ceil(pad / c))
    padding = np.concatenate([rng.permutation(np.flatnonzero(w.y == k))[:per_class]
                              for k in range(c)])
    base = oracle.run(padding)
    if base is None:
        return scores
    for k in range(c):
        extra = np.setdiff1d(np.flatnonzero(w.y == k), padding)
        counts = oracle.run(np.concatenate([padding, extra]))
        if counts is not None and len(extra):
            scores[:, k] = (counts[singles] - base[singles]) / len(extra)
    return scores


def attack_success(scores: np.ndarray, class_counts: np.ndarray, holds_min: int
                   ) -> dict[str, float]:
    from scipy.stats import spearmanr  # noqa: PLC0415

    truth = class_counts >= holds_min
    known = ~np.isnan(scores)
    right = np.where(known, (scores >= 0.5) == truth, 0.5)
    rho = math.nan
    if known.sum() > 2 and np.ptp(scores[known]) > 0 and np.ptp(class_counts[known]) > 0:
        rho = float(spearmanr(scores[known], class_counts[known]).statistic)
    return {"pair_accuracy": float(right.mean()), "trivial_accuracy": float(truth.mean()),
            "spearman": rho, "classes_learned": int(known.all(axis=0).sum())}


def shapley_error(world: ValuationWorld, sigma: float, seed: int) -> dict[str, float]:
    """The legitimate use under DP: Shapley values from noisy counts on the whole held-out set,
    against the exact ones (max absolute error, L1 between the clipped merit splits)."""
    from .contribution import all_coalitions, merit_shares, plaintext_coalition_values, \
        shapley_exact  # noqa: PLC0415

    n = len(world.units)
    coal = all_coalitions(n)
    exact = plaintext_coalition_values(world.units, world.y, coal,
                                       [torch.zeros(len(world.y))] * n)
    if sigma <= 0:
        return {"shapley_max_error": 0.0, "merit_l1_error": 0.0}
    rng = np.random.default_rng((seed, 999))
    noisy = exact.correct + rng.normal(0.0, sigma, exact.correct.shape)
    m = exact.num_queries
    phi = shapley_exact(exact)
    acc = dict(zip(range(1, 1 << n), noisy / m))  # row m - 1 is bitmask m
    phi_noisy = shapley_from_values(acc, n)
    own_exact = np.array([exact.accuracy()[1 << i] for i in range(n)])
    own_noisy = np.array([acc[1 << i] for i in range(n)])
    a = merit_shares(phi, own_exact)["shapley"]
    b = merit_shares(phi_noisy, own_noisy)["shapley"]
    return {"shapley_max_error": float(np.abs(phi_noisy - phi).max()),
            "merit_l1_error": float(np.abs(a - b).sum())}


def _settings(cfg: ValuationLeakageConfig) -> list[dict[str, Any]]:
    base = {"min_validation": 1, "sigma": 0.0, "attack": "naive", "budget": None}
    out: list[dict[str, Any]] = [{**base, "defence": "none"}]
    out.append({**base, "defence": "min_validation", "min_validation": cfg.min_validation})
    out.append({**base, "defence": "min_validation", "min_validation": cfg.min_validation,
                "attack": "differencing"})
    for s in cfg.sigmas:
        out.append({**base, "defence": "dp", "sigma": s})
        if cfg.budget is not None:
            out.append({**base, "defence": "dp+budget", "sigma": s, "budget": cfg.budget})
        out.append({**base, "defence": "min_validation+dp", "min_validation": cfg.min_validation,
                    "sigma": s, "attack": "differencing"})
    return out


def run_valuation_leakage(cfg: ValuationLeakageConfig = ValuationLeakageConfig(), *,
                          show_progress: bool = True) -> list[Row]:
    """Every (N, alpha, seed) x defence; one row each."""
    from mpc_fi.privacy import PrivacyBudget  # noqa: PLC0415

    torch.set_num_threads(1)
    cells = [(n, a, s) for n in cfg.owners for a in cfg.alphas for s in cfg.seeds]
    settings = _settings(cfg)
    bar = Progress(len(cells), "valuation-leakage", enabled=show_progress)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mpc-fi-ledger-") as tmp:
        for n, alpha, seed in cells:
            world = build_world(cfg.dataset, n, alpha, seed, cfg.protocol)
            for j, st in enumerate(settings):
                budget = None
                if st["budget"] is not None:
                    budget = PrivacyBudget(Path(tmp) / f"n{n}-a{alpha}-s{seed}-{j}.json",
                                           epsilon=st["budget"], delta=cfg.delta)
                oracle = ValuationOracle(world, min_validation=st["min_validation"],
                                         sigma=st["sigma"], budget=budget, delta=cfg.delta,
                                         seed=seed)
                scores = chosen_subset_attack(oracle, differencing=st["attack"] == "differencing",
                                              pad=cfg.min_validation, seed=seed)
                answered = oracle.runs - oracle.refused
                eps_run = oracle.epsilon_per_run()
                from mpc_fi.privacy import epsilon_for  # noqa: PLC0415

                eps_total = epsilon_for([oracle.cost()] * answered, delta=cfg.delta) \
                    if st["sigma"] > 0 and answered else (0.0 if st["sigma"] > 0 else math.inf)
                rows.append({"dataset": cfg.dataset, "owners": n, "alpha": alpha, "seed": seed,
                             **st, "holds_min": cfg.holds_min,
                             "runs": oracle.runs, "refused": oracle.refused,
                             "epsilon_per_run": eps_run, "epsilon_spent": eps_total,
                             "class_size_min": int(np.bincount(world.y).min()),
                             **attack_success(scores, world.class_counts, cfg.holds_min),
                             **shapley_error(world, st["sigma"], seed)})
            bar.step(f"N={n} alpha={alpha:g} seed={seed}")
    return rows


def markdown_report(rows: Sequence[Row]) -> str:
    if not rows:
        return "(no runs)\n"
    seeds = sorted({r["seed"] for r in rows})
    r0 = rows[0]
    out = [f"{r0['dataset']}: the chosen-subset attack on the contribution protocol's coalition "
           f"counts (plaintext twin, equal to the counts opened on shares); seeds "
           f"{', '.join(map(str, seeds))}; mean [95 % t-interval] over seeds. Pair accuracy: "
           "owner × class pairs where the guess \"trained on it\" (own accuracy on the class "
           f">= 0.5) matches \"holds >= {r0.get('holds_min', 5)} examples\"; trivial: always "
           "guessing \"holds\". Spearman: attack scores vs private class counts. ε: "
           "per validation query (δ = 1e-5), per run and spent by the attack. Shapley error: "
           "the DP noise's effect on the legitimate use (all held-out queries).\n\n"]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        key = (r["owners"], r["alpha"], r["defence"], r["attack"], r["min_validation"],
               r["sigma"], r["budget"])
        groups.setdefault(key, []).append(r)
    table = []
    for key, rs in groups.items():
        n, alpha, defence, attack, mv, sigma, cap = key
        table.append([n, f"{alpha:g}", defence, attack, mv if mv > 1 else "–",
                      f"{sigma:g}" if sigma else "–", "–" if cap is None else f"{cap:g}",
                      f"{np.mean([r['runs'] - r['refused'] for r in rs]):.1f} / "
                      f"{np.mean([r['runs'] for r in rs]):.0f}",
                      mean_ci(r["pair_accuracy"] for r in rs).text(),
                      mean_ci(r["trivial_accuracy"] for r in rs).text(),
                      mean_ci(r["spearman"] for r in rs).text(2),
                      "–" if not sigma else f"{np.mean([r['epsilon_per_run'] for r in rs]):.2f}",
                      "–" if not sigma else f"{np.mean([r['epsilon_spent'] for r in rs]):.1f}",
                      "–" if not sigma else mean_ci(r["shapley_max_error"] for r in rs).text()])
    out.append(markdown_table(table, ["N", "alpha", "defence", "attack", "min size", "σ (counts)",
                                      "ε cap", "runs answered / made", "pair accuracy", "trivial",
                                      "Spearman", "ε per run", "ε spent",
                                      "Shapley max error"], align="lrllrrrrrrrrrr"))
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Before and after, on shares
# ---------------------------------------------------------------------------------------
#: defence, attack; what :func:`run_secure_valuation_leakage` runs on shares (and in the twin)
SECURE_SETTINGS = (("none", "naive"), ("min_validation", "differencing"),
                   ("min_validation", "mislabelled"), ("pool", "differencing"),
                   ("pool", "mislabelled"), ("pool+dp", "mislabelled"),
                   ("pool+dp+budget", "mislabelled"))


@dataclass(frozen=True)
class SecureLeakageConfig:
    """The attack before and after the owners' defences, every run on shares."""

    dataset: str = "digits"
    owners: int = 3
    alpha: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    min_validation: int = 100  # the min_validation rows' minimum, and the attacks' padding
    min_pool: int = 100  # the pool rows: each owner's minimum pool ...
    sample: int = 50  # ... and the queries drawn from it
    sigma: float = 10.0  # noise std on every count (pool+dp rows)
    budget: float = 2.0  # each owner's epsilon cap for the querier (pool+dp+budget rows)
    delta: float = 1e-5
    holds_min: int = 5
    timeout_s: float = 300.0


def _secure_setting(cfg: SecureLeakageConfig, defence: str) -> dict[str, Any]:
    st: dict[str, Any] = {"min_validation": 1, "min_pool": 1, "sample": None, "sigma": 0.0,
                          "budget": None}
    if defence == "min_validation":
        st["min_validation"] = cfg.min_validation
    if defence.startswith("pool"):
        st.update(min_pool=cfg.min_pool, sample=cfg.sample)
    if "dp" in defence:
        st["sigma"] = cfg.sigma
    if defence.endswith("budget"):
        st["budget"] = cfg.budget
    return st


def _attack(oracle: ValuationOracle, attack: str, pad: int, seed: int) -> np.ndarray:
    if attack == "mislabelled":
        return mislabelled_padding_attack(oracle, pad=pad, seed=seed)
    return chosen_subset_attack(oracle, differencing=attack == "differencing", pad=pad, seed=seed)


def run_secure_valuation_leakage(cfg: SecureLeakageConfig = SecureLeakageConfig(), *,
                                 show_progress: bool = True) -> list[Row]:
    """Per seed and setting of :data:`SECURE_SETTINGS`: the attack with every run on shares
    (``where = "shares"``) and the same attack on the twin (``where = "twin"``, seeded)."""
    import time  # noqa: PLC0415

    from mpc_fi.privacy import PrivacyBudget  # noqa: PLC0415

    from .owner_defences import epsilon_of_runs  # noqa: PLC0415

    torch.set_num_threads(1)
    bar = Progress(len(cfg.seeds) * len(SECURE_SETTINGS), "valuation-leakage on shares",
                   enabled=show_progress)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mpc-fi-valuation-shares-") as tmp:
        for seed in cfg.seeds:
            world = build_world(cfg.dataset, cfg.owners, cfg.alpha, seed,
                                workdir=Path(tmp) / f"owners-{seed}")
            for j, (defence, attack) in enumerate(SECURE_SETTINGS):
                st = _secure_setting(cfg, defence)
                for where in ("twin", "shares"):
                    ledger_dir = Path(tmp) / f"ledgers-{seed}-{j}-{where}"
                    ledger_dir.mkdir()
                    common = dict(min_validation=st["min_validation"], sigma=st["sigma"],
                                  delta=cfg.delta, seed=seed, sample=st["sample"],
                                  min_pool=st["min_pool"])
                    t0 = time.perf_counter()
                    if where == "twin":
                        budget = None if st["budget"] is None else PrivacyBudget(
                            ledger_dir / "querier.json", epsilon=st["budget"], delta=cfg.delta)
                        oracle: ValuationOracle = ValuationOracle(world, budget=budget, **common)
                    else:
                        oracle = SecureValuationOracle(world, budget=st["budget"],
                                                       ledger_dir=ledger_dir,
                                                       timeout_s=cfg.timeout_s, **common)
                    scores = _attack(oracle, attack, cfg.min_validation, seed)
                    answered = oracle.runs - oracle.refused
                    k = len(oracle.coalitions)
                    rows.append({"dataset": cfg.dataset, "owners": cfg.owners,
                                 "alpha": cfg.alpha, "seed": seed, "where": where,
                                 "defence": defence, "attack": attack, **st,
                                 "holds_min": cfg.holds_min, "runs": oracle.runs,
                                 "refused": oracle.refused,
                                 "epsilon_per_run": epsilon_of_runs(k, st["sigma"], 1,
                                                                    delta=cfg.delta)
                                 if st["sigma"] else math.nan,
                                 "epsilon_spent": epsilon_of_runs(k, st["sigma"], answered,
                                                                  delta=cfg.delta)
                                 if st["sigma"] else math.nan,
                                 "twin_checked": getattr(oracle, "checked", 0),
                                 "twin_mismatches": getattr(oracle, "mismatches", 0),
                                 "seconds": time.perf_counter() - t0,
                                 **attack_success(scores, world.class_counts, cfg.holds_min)})
                bar.step(f"seed={seed} {defence}/{attack}")
    return rows


def markdown_secure_report(rows: Sequence[Row]) -> str:
    """Per setting: the attack on shares and on the twin, mean [95 % t-interval] over seeds."""
    if not rows:
        return "(no runs)\n"
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    out = [f"{r0['dataset']}, N = {r0['owners']}, alpha = {r0['alpha']:g}, seeds "
           f"{', '.join(map(str, seeds))}: the chosen-subset attacks with every run **on "
           "shares** (owners + querier + TTP dealer; the owners enforce the defence), and the "
           "same attacks on the plaintext twin (seeded sampling and noise). Mean [95 % "
           "t-interval] over seeds.\n\n"]
    groups: dict[tuple, dict[str, list[Row]]] = {}
    for r in rows:
        key = (r["defence"], r["attack"], r["min_validation"], r["min_pool"], r["sample"],
               r["sigma"], r["budget"])
        groups.setdefault(key, {}).setdefault(r["where"], []).append(r)
    table = []
    for key, by in groups.items():
        defence, attack, mv, mp, sample, sigma, cap = key
        sh, tw = by.get("shares", []), by.get("twin", [])
        checked = sum(r["twin_checked"] for r in sh)
        table.append([defence, attack, mv if mv > 1 else "–", mp if mp > 1 else "–",
                      sample or "–", f"{sigma:g}" if sigma else "–",
                      "–" if cap is None else f"{cap:g}",
                      f"{np.mean([r['runs'] - r['refused'] for r in sh]):.1f} / "
                      f"{np.mean([r['runs'] for r in sh]):.0f}",
                      mean_ci(r["pair_accuracy"] for r in sh).text(),
                      mean_ci(r["spearman"] for r in sh).text(2),
                      mean_ci(r["pair_accuracy"] for r in tw).text(),
                      mean_ci(r["spearman"] for r in tw).text(2),
                      mean_ci(r["trivial_accuracy"] for r in sh).text(),
                      "–" if not sigma else f"{np.mean([r['epsilon_spent'] for r in sh]):.2f}",
                      f"{checked - sum(r['twin_mismatches'] for r in sh)} / {checked}"
                      if checked else "–",
                      f"{sum(r['seconds'] for r in sh):.0f}"])
    out.append(markdown_table(table, ["defence", "attack", "min size", "min pool", "sample",
                                      "σ (counts)", "ε cap", "runs answered / made (shares)",
                                      "pair accuracy, shares", "Spearman, shares",
                                      "pair accuracy, twin", "Spearman, twin", "trivial",
                                      "ε spent (shares)", "runs = twin", "s (shares)"],
                              align="llrrrrrrrrrrrrrr"))
    return "".join(out)
