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

The noise here is simulated in the twin from seeded numpy Generators; the secure computation
does not add it yet (see docs/STUDY.md).
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


def build_world(dataset: str, num_owners: int, alpha: float, seed: int,
                protocol: str = "soft_vote") -> ValuationWorld:
    import demos as demo  # noqa: PLC0415
    from .contribution import encoded_contributions  # noqa: PLC0415
    from .common import protocol_specs  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="mpc-fi-valuation-") as tmp:
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
    return ValuationWorld(units, y, counts, c)


class ValuationOracle:
    """The contribution protocol as the querier sees it: per run, every coalition's count
    (optionally noisy), with the owners' minimum size and the querier's budget enforced."""

    def __init__(self, world: ValuationWorld, *, min_validation: int = 1, sigma: float = 0.0,
                 budget: Any = None, delta: float = 1e-5, seed: int = 0) -> None:
        from .contribution import all_coalitions  # noqa: PLC0415

        self.world = world
        self.n = len(world.units)
        self.coalitions = all_coalitions(self.n)
        self.min_validation, self.sigma, self.budget, self.delta = min_validation, sigma, budget, delta
        self.rng = np.random.default_rng((seed, 4242))
        self.runs = self.refused = 0

    def cost(self) -> Any:
        """One run's privacy cost: K sensitivity-1 Gaussian mechanisms with std ``sigma``."""
        from mpc_fi.privacy import QueryCost  # noqa: PLC0415

        return QueryCost(gnmax_sigma=None, threshold_sigma=self.sigma, answered=0,
                         checked=len(self.coalitions))

    def run(self, idx: np.ndarray) -> np.ndarray | None:
        """Counts per coalition (row ``m - 1`` = bitmask ``m``) on the held-out queries ``idx``;
        None when the owners refuse (too small) or the budget would be exceeded."""
        from mpc_fi.errors import BudgetExceededError  # noqa: PLC0415
        from .contribution import plaintext_coalition_values  # noqa: PLC0415

        self.runs += 1
        if len(idx) < self.min_validation:
            self.refused += 1
            return None
        if self.sigma > 0 and self.budget is not None:
            try:
                self.budget.charge("querier", self.cost())
            except BudgetExceededError:
                self.refused += 1
                return None
        zeros = [torch.zeros(len(idx))] * self.n
        vals = plaintext_coalition_values([u[idx] for u in self.world.units], self.world.y[idx],
                                          self.coalitions, zeros)
        counts = vals.correct.astype(float)
        if self.sigma > 0:
            counts = counts + self.rng.normal(0.0, self.sigma, counts.shape)
        return counts

    def epsilon_per_run(self) -> float:
        from mpc_fi.privacy import epsilon_for  # noqa: PLC0415

        return epsilon_for([self.cost()], delta=self.delta) if self.sigma > 0 else math.inf


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
