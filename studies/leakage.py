"""What the querier can learn from the release: model extraction and membership inference.

One federation (digits by default, ``N`` owners on a Dirichlet(alpha) split, trained as in
:mod:`mpc_fi.demo`) answers a querier under four **release policies**:

``all_outputs``
    every owner's own class distribution (what querying the owners one by one, without MPC,
    would give; no mpc-fi protocol releases this);
``averaged``
    the averaged distribution: ``soft_vote`` with ``reveal: scores``;
``label``
    one label: ``soft_vote`` with ``reveal: label`` (the default);
``dp_label``
    a GNMax-style noisy label: the owners' hard-vote counts plus Gaussian noise, argmax. The
    registry's ``gnmax`` protocol adds noise of total std ``sigma`` on shares, of which the
    querier contributes (and knows) a share, so the noise it cannot remove has std
    ``sigma * sqrt(N / (N + 1))``; the simulation draws exactly that.

The experiments run in plaintext on the protocols' twins. For ``averaged`` and ``label`` the
released values are exactly what the secure protocol opens to the querier (output mode: equality
of labels and scores asserted by ``tests/mpc_fi/test_federation.py::test_secure_equals_plaintext``
and by the non-IID study's secure runs, agreement 1.000); ``dp_label`` has the release
distribution of ``gnmax`` as seen by the querier.

Data (disjoint): owners' training data (``owner_fraction``), the querier's unlabelled query pool
(``pool_fraction``), and an evaluation split.

* **Extraction**: the querier sends ``n`` pool points, trains a surrogate (a small MLP; soft
  targets for distributions, hard for labels; with ``all_outputs`` one surrogate per owner,
  averaged) and we measure its *agreement* with the federation's label on the evaluation split.
* **Membership inference** against one owner (``target``): candidates are that owner's training
  examples (members) and as many unseen examples of the same classes (non-members, matched per
  class so that the owner's class skew cannot be exploited). The attacker knows each candidate's
  label and scores it by the released confidence in that label (``all_outputs``: the target
  owner's own probability; ``averaged``: the averaged probability) or, for label releases, by the
  fraction of ``k`` answers equal to it (the candidate, then ``k - 1`` copies perturbed with
  Gaussian noise of std ``perturb``: a label-only attack in the style of Choquette-Choo et al.,
  2021). Reported: ROC AUC and the advantage ``max_t TPR - FPR`` at the best threshold (chosen on
  the candidates themselves: an upper bound for a threshold attacker), next to the same
  advantage with membership shuffled (what a score that leaks nothing reaches).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import Progress, Row, fmt, markdown_table, mean_ci, mean_std

POLICIES = ("all_outputs", "averaged", "label", "dp_label")


@dataclass(frozen=True)
class LeakageConfig:
    dataset: str = "digits"
    num_owners: int = 3
    alpha: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    owner_fraction: float = 0.5
    pool_fraction: float = 0.35
    budgets: tuple[int, ...] = (10, 25, 50, 100, 200, 400, 600)
    sigma: float = 1.0  # gnmax sigma (total noise std per vote count on shares)
    delta: float = 1e-5
    owner_epochs: int = 60  # the demo's training
    target: int = 0
    queries_per_candidate: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    perturb: float = 0.15  # std of the label-only attack's perturbations (features in [0, 1])
    surrogate_hidden: int = 64
    surrogate_epochs: int = 200


@dataclass
class World:
    """One seed's federation and the querier's data."""

    models: list[nn.Module]
    owner_idx: list[np.ndarray]
    x_owner: np.ndarray
    y_owner: np.ndarray
    x_pool: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    x_out: np.ndarray  # never seen by any owner (pool + eval): non-member candidates
    y_out: np.ndarray
    num_classes: int


def build_world(cfg: LeakageConfig, seed: int) -> World:
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    import demos as demo  # noqa: PLC0415

    x, y = demo.load_dataset(cfg.dataset)
    c = int(y.max()) + 1
    x_own, x_rest, y_own, y_rest = train_test_split(
        x, y, train_size=cfg.owner_fraction, random_state=seed, stratify=y)
    pool_share = cfg.pool_fraction / (1 - cfg.owner_fraction)
    x_pool, x_eval, y_pool, y_eval = train_test_split(
        x_rest, y_rest, train_size=pool_share, random_state=seed, stratify=y_rest)
    parts = demo.dirichlet_split(y_own, cfg.num_owners, cfg.alpha, np.random.default_rng(seed))
    models = []
    for k, idx in enumerate(parts):
        torch.manual_seed(seed + k)
        model = demo.mlp(in_features=x.shape[1], hidden=32, num_classes=c)
        demo.train(model, x_own[idx], y_own[idx], epochs=cfg.owner_epochs, seed=seed + k)
        models.append(model)
    return World(models, parts, x_own, y_own, x_pool, x_eval, y_eval,
                 np.concatenate([x_pool, x_eval]), np.concatenate([y_pool, y_eval]), c)


class Oracle:
    """The federation as the querier sees it, one policy at a time (plaintext twins)."""

    def __init__(self, world: World, cfg: LeakageConfig, seed: int) -> None:
        from mpc_fi.plugins import PROTOCOLS, registry  # noqa: PLC0415

        self.world, self.cfg = world, cfg
        n, c = len(world.models), world.num_classes
        table = registry(PROTOCOLS)
        self.soft_scores = table["soft_vote"](num_classes=c, num_owners=n, reveal="scores")
        self.soft_label = table["soft_vote"](num_classes=c, num_owners=n, reveal="label")
        self.hard = table["hard_vote"](num_classes=c, num_owners=n, reveal="scores")
        self.sigma_eff = cfg.sigma * math.sqrt(n / (n + 1))
        self.rng = np.random.default_rng(10_000 + seed)

    def logits(self, x: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad():
            xt = torch.as_tensor(x, dtype=torch.float32)
            return [m(xt).to(torch.float64) for m in self.world.models]

    def release(self, policy: str, x: np.ndarray) -> np.ndarray:
        """``all_outputs``: (N, n, C) distributions; ``averaged``: (n, C); labels: (n,)."""
        lg = self.logits(x)
        if policy == "all_outputs":
            return np.stack([torch.softmax(v, -1).numpy() for v in lg])
        if policy == "averaged":
            return np.asarray(self.soft_scores.plaintext(lg).scores)
        if policy == "label":
            return np.asarray(self.soft_label.plaintext(lg).labels)
        if policy == "dp_label":
            counts = np.asarray(self.hard.plaintext(lg).scores, dtype=float)
            noisy = counts + self.rng.normal(0.0, self.sigma_eff, counts.shape)
            return noisy.argmax(-1)
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")

    def federation_label(self, x: np.ndarray) -> np.ndarray:
        return self.release("label", x)


# ---------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------
def train_surrogate(x: np.ndarray, targets: np.ndarray, num_classes: int, *, hidden: int,
                    epochs: int, seed: int) -> nn.Module:
    """A small MLP on soft targets ``(n, C)`` (a one-hot for labels); full-batch Adam."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    xt = torch.as_tensor(x, dtype=torch.float32)
    tt = torch.as_tensor(targets, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        loss = -(tt * torch.log_softmax(model(xt), -1)).sum(-1).mean()
        loss.backward()
        opt.step()
    return model.eval()


def _one_hot(labels: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c)[labels]


def extraction(oracle: Oracle, policy: str, budget: int, seed: int) -> dict[str, float]:
    w, cfg = oracle.world, oracle.cfg
    order = np.random.default_rng(seed).permutation(len(w.x_pool))[:budget]
    xq = w.x_pool[order]
    rel = oracle.release(policy, xq)
    kw = {"hidden": cfg.surrogate_hidden, "epochs": cfg.surrogate_epochs, "seed": seed}
    c = w.num_classes
    xe = torch.as_tensor(w.x_eval, dtype=torch.float32)
    if policy == "all_outputs":
        surrogates = [train_surrogate(xq, r, c, **kw) for r in rel]
    elif policy == "averaged":
        surrogates = [train_surrogate(xq, rel, c, **kw)]
    else:
        surrogates = [train_surrogate(xq, _one_hot(rel, c), c, **kw)]
    with torch.no_grad():
        probs = np.mean([torch.softmax(s(xe), -1).numpy() for s in surrogates], axis=0)
    pred = probs.argmax(-1)
    return {"agreement": float((pred == oracle.federation_label(w.x_eval)).mean()),
            "surrogate_accuracy": float((pred == w.y_eval).mean())}


# ---------------------------------------------------------------------------------------
# Membership inference
# ---------------------------------------------------------------------------------------
def candidates(world: World, target: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, is_member)``: the target owner's examples and class-matched non-members."""
    rng = np.random.default_rng(seed)
    idx = world.owner_idx[target]
    xm, ym = world.x_owner[idx], world.y_owner[idx]
    xs, ys, member = [], [], []
    for c in np.unique(ym):
        mem = np.flatnonzero(ym == c)
        non = np.flatnonzero(world.y_out == c)
        k = min(len(mem), len(non))
        if k == 0:
            continue
        mem, non = rng.choice(mem, k, replace=False), rng.choice(non, k, replace=False)
        xs += [xm[mem], world.x_out[non]]
        ys += [ym[mem], world.y_out[non]]
        member += [np.ones(k, bool), np.zeros(k, bool)]
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(member)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR among ROC points with ``FPR <= target`` (0 if none). With ``m``
    non-members the smallest non-zero FPR is ``1/m``: below it this is the TPR at FPR = 0."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(score: np.ndarray, member: np.ndarray) -> dict[str, float]:
    """ROC AUC, the best-threshold advantage ``max_t TPR(t) - FPR(t)`` and the TPR at 1 % and
    0.1 % FPR."""
    from sklearn.metrics import roc_auc_score, roc_curve  # noqa: PLC0415

    fpr, tpr, _ = roc_curve(member, score)
    return {"auc": float(roc_auc_score(member, score)), "advantage": float(np.max(tpr - fpr)),
            "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001)}


def membership(oracle: Oracle, policy: str, k: int, seed: int) -> dict[str, float]:
    w, cfg = oracle.world, oracle.cfg
    x, y, member = candidates(w, cfg.target, seed)
    if policy == "all_outputs":
        score = oracle.release(policy, x)[cfg.target][np.arange(len(y)), y]
    elif policy == "averaged":
        score = oracle.release(policy, x)[np.arange(len(y)), y]
    else:
        rng = np.random.default_rng(20_000 + seed)
        hits = np.zeros(len(y))
        for j in range(k):
            xj = x if j == 0 else (x + rng.normal(0.0, cfg.perturb, x.shape)).astype(np.float32)
            hits += oracle.release(policy, xj) == y
        score = hits / k
    out = attack_metrics(score, member)
    out.update(candidates=len(y), queries=len(y) * (k if policy in ("label", "dp_label") else 1),
               advantage_null=null_advantage(score, member, seed))
    return out


def null_advantage(score: np.ndarray, member: np.ndarray, seed: int, rounds: int = 20) -> float:
    """The best-threshold advantage of the same scores with membership shuffled (no leakage).

    The threshold is chosen on the candidates themselves, so even a useless score shows a
    positive advantage, larger for scores with many distinct values: compare with this.
    """
    rng = np.random.default_rng(30_000 + seed)
    return float(np.mean([attack_metrics(score, rng.permutation(member))["advantage"]
                          for _ in range(rounds)]))


def owner_gap(world: World, target: int) -> float:
    """Train accuracy minus unseen accuracy of the target owner (how much it overfits)."""
    m = world.models[target]
    idx = world.owner_idx[target]
    with torch.no_grad():
        tr = (m(torch.as_tensor(world.x_owner[idx])).argmax(-1).numpy() == world.y_owner[idx]).mean()
        classes = np.unique(world.y_owner[idx])
        sel = np.isin(world.y_out, classes)
        te = (m(torch.as_tensor(world.x_out[sel])).argmax(-1).numpy() == world.y_out[sel]).mean()
    return float(tr - te)


def dp_epsilon(sigma: float, num_owners: int, queries: int, delta: float) -> float:
    """Epsilon of ``queries`` GNMax answers at the querier's effective noise (mpc_fi.privacy)."""
    from mpc_fi.privacy import epsilon_for, gnmax_cost  # noqa: PLC0415

    eff = sigma * math.sqrt(num_owners / (num_owners + 1))
    return epsilon_for([gnmax_cost(sigma=eff, queries=queries)], delta=delta)


def run_leakage(cfg: LeakageConfig = LeakageConfig(), *, show_progress: bool = True) -> list[Row]:
    """Both experiments for every seed; rows in long format (``experiment`` column)."""
    torch.set_num_threads(1)
    n_label = len(cfg.queries_per_candidate)
    steps = len(cfg.seeds) * (len(POLICIES) * len(cfg.budgets) + 2 + 2 * n_label)
    bar = Progress(steps, "leakage", enabled=show_progress)
    rows: list[Row] = []
    for seed in cfg.seeds:
        world = build_world(cfg, seed)
        oracle = Oracle(world, cfg, seed)
        gap = owner_gap(world, cfg.target)
        base = {"dataset": cfg.dataset, "owners": cfg.num_owners, "alpha": cfg.alpha, "seed": seed,
                "sigma": cfg.sigma}
        for policy in POLICIES:
            for budget in cfg.budgets:
                b = min(budget, len(world.x_pool))
                t0 = time.perf_counter()
                res = extraction(oracle, policy, b, seed)
                rows.append({**base, "experiment": "extraction", "policy": policy, "queries": b,
                             **res, "seconds": time.perf_counter() - t0,
                             "epsilon": dp_epsilon(cfg.sigma, cfg.num_owners, b, cfg.delta)
                             if policy == "dp_label" else math.nan})
                bar.step(f"extraction {policy} n={b}")
        for policy in POLICIES:
            ks = cfg.queries_per_candidate if policy in ("label", "dp_label") else (1,)
            for k in ks:
                res = membership(oracle, policy, k, seed)
                rows.append({**base, "experiment": "membership", "policy": policy,
                             "queries_per_candidate": k, **res, "target_gap": gap,
                             "epsilon": dp_epsilon(cfg.sigma, cfg.num_owners, res["queries"],
                                                   cfg.delta) if policy == "dp_label" else math.nan})
                bar.step(f"membership {policy} k={k}")
    return rows


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def _group(rows: Sequence[Row], experiment: str, key: str, metric: str
           ) -> dict[tuple[str, int], tuple[float, float]]:
    """(policy, key) -> (mean, std over seeds): for the plots."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["experiment"] == experiment:
            groups.setdefault((r["policy"], r[key]), []).append(r[metric])
    return {k: mean_std(v) for k, v in groups.items()}


def _ci(rows: Sequence[Row], experiment: str, key: str, metric: str) -> dict[tuple[str, int], Any]:
    """(policy, key) -> :class:`~studies.common.Interval` over seeds."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["experiment"] == experiment:
            groups.setdefault((r["policy"], r[key]), []).append(r[metric])
    return {k: mean_ci(v) for k, v in groups.items()}


def markdown_report(rows: Sequence[Row]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    r0 = rows[0]
    out = [f"{r0['dataset']}, {r0['owners']} owners, Dirichlet alpha={r0['alpha']:g}, GNMax "
           f"sigma={r0['sigma']:g}; seeds {', '.join(map(str, seeds))}: mean ± half-width of "
           "the 95 % t-interval over seeds (dp_label draws seeded noise).\n\n"
           "**Model extraction**: surrogate agreement with the federation's label on the "
           "evaluation split, by number of queries (epsilon: dp_label at delta=1e-5).\n\n"]
    agree = _ci(rows, "extraction", "queries", "agreement")
    budgets = sorted({k[1] for k in agree})
    table = [[p] + [agree[(p, b)].short() for b in budgets] for p in POLICIES]
    eps = _group([r for r in rows if r["policy"] == "dp_label"], "extraction", "queries", "epsilon")
    table.append(["ε (dp_label)"] + [fmt(eps[("dp_label", b)][0], 1) for b in budgets])
    out.append(markdown_table(table, ["policy"] + [f"n={b}" for b in budgets]))
    auc = _ci(rows, "membership", "queries_per_candidate", "auc")
    adv = _ci(rows, "membership", "queries_per_candidate", "advantage")
    null = _ci(rows, "membership", "queries_per_candidate", "advantage_null")
    excess = {k: mean_ci(r["advantage"] - r["advantage_null"] for r in rows
                         if r["experiment"] == "membership"
                         and (r["policy"], r["queries_per_candidate"]) == k) for k in adv}
    t1 = _ci(rows, "membership", "queries_per_candidate", "tpr_at_1pct_fpr")
    t01 = _ci(rows, "membership", "queries_per_candidate", "tpr_at_0.1pct_fpr")
    eps = _group([r for r in rows if r["policy"] == "dp_label"], "membership",
                 "queries_per_candidate", "epsilon")
    cand = mean_std(r["candidates"] for r in rows if r["experiment"] == "membership")[0]
    gap = mean_ci(r["target_gap"] for r in rows if r["experiment"] == "membership"
                  and r["policy"] == "label" and r["queries_per_candidate"] == 1)
    out.append(f"\n**Membership inference** against owner 0 (about {cand:.0f} class-matched "
               f"candidates, half members; the target's train-minus-unseen accuracy gap is "
               f"{gap.text()}). k = queries per candidate. AUC and advantage: mean [95 % "
               "interval]; TPR at a fixed FPR: with about "
               f"{cand / 2:.0f} non-members the smallest non-zero FPR is "
               f"{2 / max(cand, 1):.4f}, so 'TPR @ 0.1 % FPR' is the TPR at FPR = 0.\n\n")
    table = []
    for (p, k) in sorted(auc, key=lambda t: (POLICIES.index(t[0]), t[1])):
        table.append([p, k, auc[(p, k)].text(), adv[(p, k)].text(), null[(p, k)].short(),
                      excess[(p, k)].text(), t1[(p, k)].short(), t01[(p, k)].short(),
                      fmt(eps[(p, k)][0], 1) if p == "dp_label" else ""])
    out.append(markdown_table(table, ["policy", "k", "AUC", "advantage", "advantage, shuffled",
                                      "advantage − shuffled (paired)", "TPR @ 1 % FPR", "TPR @ 0.1 % FPR", "ε (dp_label)"]))
    return "".join(out)


def summary_for_plot(rows: Sequence[Row]) -> dict[str, Any]:
    return {"agreement": _group(rows, "extraction", "queries", "agreement"),
            "advantage": _group(rows, "membership", "queries_per_candidate", "advantage"),
            "advantage_null": _group(rows, "membership", "queries_per_candidate",
                                     "advantage_null"),
            "auc": _group(rows, "membership", "queries_per_candidate", "auc")}
