"""Stronger attacks on the release (issue #13): LiRA, extraction off-distribution, label skew.

Three experiments, each on scikit-learn's bundled digits, against the release policies of
:mod:`studies.leakage` (``all_outputs``: every owner's distribution, the insecure baseline;
``averaged``: ``soft_vote`` with ``reveal: scores``; ``label``: ``soft_vote`` with ``reveal:
label``; ``dp_label``: GNMax's label, the querier's part of the noise removed). Every release is
computed by the registry's plaintext twins (exactly what the secure protocols open; GNMax's noise
from seeded generators, so every number reproduces from its seed).

**Membership inference with shadow models** (:func:`run_membership`; LiRA, Carlini et al. 2022,
online, fixed variance). The attacker knows the data distribution (it holds a population sample
disjoint from every owner's data), the owners' architecture and training recipe, the number of
owners, the policy (and GNMax's sigma), and the candidate set ``U``; it does not know the other
owners' data. The target owner (owner 0) trains on a random half of ``U`` (IID; the other owners
on a Dirichlet(alpha) split of their own data). The attacker trains ``shadows`` shadow
federations: shadow owner 0 on a random half of ``U``, the other shadow owners on its population
sample (IID halves), all with the same recipe, and queries them as it queries the federation.
Per candidate it fits one Gaussian to the released statistic over the shadows that trained on it
and one over those that did not (means per example, one pooled variance per group), and scores
the federation's statistic by the log-likelihood ratio. The statistic: the logit of the released
probability of the true label (``all_outputs``: owner 0's; ``averaged``: the average's); for
label releases, the logit of the smoothed fraction of ``label_queries`` answers equal to the true
label (the candidate, then copies with Gaussian noise of std ``perturb``, the same copies for
every federation): a shadow-calibrated version of the noise-robustness label-only attack. The
same statistic without shadows, thresholded globally, is the ``global`` baseline. Several target
federations (a new owner 0 on a new half of ``U`` each) are attacked per seed, so that a seed has
at least ``nonmembers`` non-member scores and 0.1 % FPR is a real operating point.
Owner 0 follows a **regime** (:data:`REGIMES`): the demo's recipe (200 examples, 60 epochs,
weight decay 1e-4), or one of two that overfit (100 examples and 400 epochs, or 50 and 1000,
without weight decay).

**Extraction off-distribution** (:func:`run_extraction`). The federation of
:mod:`studies.leakage` (3 owners, Dirichlet(0.5)) answers queries from: its in-distribution pool;
uniform noise; a Gaussian with the per-pixel mean and std of ``public`` pool images; mixup of
pairs of those images; 8x8 patches of scikit-learn's two bundled photographs (grayscale, scaled
to [0, 1]); and pool digits with their pixels permuted (one fixed permutation). A student (the
surrogate of :mod:`studies.leakage`) is distilled from the release; we report its agreement with
the federation's label and its accuracy on the evaluation split.

**Label-skew inference** (:func:`run_skew`). ``N`` owners on a Dirichlet(alpha) split; the
attacker sends unlabelled in-distribution queries and estimates each owner's class distribution
from the release (:func:`estimate_skew`): with ``all_outputs`` owner k's mean output, raw or
divided by the owners' average (which removes the queries' own class mix); with an aggregate
only, one estimate for the whole federation (the mean released distribution or the histogram of
released labels), which it can only assign to every owner alike. Measured: Pearson
correlation and total-variation distance between estimate and truth per owner (and against the
owners' average class distribution, what an aggregate can reveal), whether the owner's largest
class is found, next to a uniform guess.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import Progress, Row, markdown_table, mean_ci

POLICIES = ("all_outputs", "averaged", "label", "dp_label")
SOURCES = ("in_distribution", "uniform", "gaussian", "mixup", "ood_patches", "ood_permuted")
EXPERIMENTS = ("membership", "extraction", "skew")


@dataclass(frozen=True)
class Regime:
    """How the target owner trains (full-batch Adam, lr 0.01, as :func:`demos.train`)."""

    name: str
    train_size: int
    epochs: int
    weight_decay: float


REGIMES = (Regime("demo", 200, 60, 1e-4), Regime("overfit", 100, 400, 0.0),
           Regime("overfit_small", 50, 1000, 0.0))


@dataclass(frozen=True)
class AttacksConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    experiments: tuple[str, ...] = EXPERIMENTS
    num_owners: int = 3
    alpha: float = 0.5
    hidden: int = 32  # the owners' MLP, as the demo
    sigma: float = 1.0  # GNMax noise std per vote count on shares
    # membership
    regimes: tuple[Regime, ...] = REGIMES
    policies: tuple[str, ...] = POLICIES
    shadows: int = 16
    nonmembers: int = 1600  # per seed, over the target federations
    others_size: int = 500  # the other owners' data, together
    population_size: int = 500  # the attacker's sample of the distribution
    label_queries: int = 16
    perturb: float = 0.15
    # extraction
    sources: tuple[str, ...] = SOURCES
    budgets: tuple[int, ...] = (100, 300, 600, 2000)
    extraction_policies: tuple[str, ...] = ("all_outputs", "averaged", "label")
    public: int = 10
    # skew
    skew_owners: tuple[int, ...] = (3, 5)
    skew_alphas: tuple[float, ...] = (0.1, 1.0)
    skew_queries: int = 300
    # one membership cell on shares (the first seed, demo regime, averaged release)
    secure_check: bool = True
    timeout_s: float = 900.0


# ---------------------------------------------------------------------------------------
# Releases (plaintext twins of the registry's protocols)
# ---------------------------------------------------------------------------------------
@cache
def _protocol(name: str, num_classes: int, num_owners: int, reveal: str) -> Any:
    from mpc_fi.plugins import PROTOCOLS, registry  # noqa: PLC0415

    return registry(PROTOCOLS)[name](num_classes=num_classes, num_owners=num_owners,
                                     reveal=reveal)


def release(policy: str, logits: Sequence[torch.Tensor], *, sigma: float = 1.0,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """What the querier receives for owners' ``logits`` (each ``(n, C)``).

    ``all_outputs``: ``(N, n, C)`` distributions; ``averaged``: ``(n, C)``; label policies:
    ``(n,)``. ``dp_label`` adds the noise the querier cannot subtract (std
    ``sigma * sqrt(N / (N + 1))``, see :mod:`studies.leakage`) from ``rng``.
    """
    n, c = len(logits), int(logits[0].shape[-1])
    lg = [v.to(torch.float64) for v in logits]
    if policy == "all_outputs":
        return np.stack([torch.softmax(v, -1).numpy() for v in lg])
    if policy == "averaged":
        return np.asarray(_protocol("soft_vote", c, n, "scores").plaintext(lg).scores)
    if policy == "label":
        return np.asarray(_protocol("soft_vote", c, n, "label").plaintext(lg).labels)
    if policy == "dp_label":
        if rng is None:
            raise ValueError("dp_label needs a seeded rng")
        counts = np.asarray(_protocol("hard_vote", c, n, "scores").plaintext(lg).scores, float)
        return (counts + rng.normal(0.0, sigma * math.sqrt(n / (n + 1)), counts.shape)).argmax(-1)
    raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")


def _logits(models: Sequence[nn.Module], x: np.ndarray) -> list[torch.Tensor]:
    with torch.no_grad():
        xt = torch.as_tensor(x, dtype=torch.float32)
        return [m(xt) for m in models]


def train_owner(x: np.ndarray, y: np.ndarray, *, num_classes: int, hidden: int, epochs: int,
                weight_decay: float, seed: int) -> nn.Module:
    """The demo's owner (``mpc_fi.demo.mlp`` trained as :func:`demos.train`), weight decay free."""
    from mpc_fi.demo import mlp  # noqa: PLC0415

    torch.manual_seed(seed)
    model = mlp(in_features=x.shape[1], hidden=hidden, num_classes=num_classes)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------
# Membership inference: LiRA
# ---------------------------------------------------------------------------------------
def tpr_at_fpr(score: np.ndarray, member: np.ndarray, fpr: float) -> float:
    """TPR of the best threshold whose FPR is at most ``fpr`` (a member is flagged when its score
    is strictly above the threshold; ties between a member and a non-member count against)."""
    score, member = np.asarray(score, float), np.asarray(member, bool)
    non = np.sort(score[~member])[::-1]
    allowed = math.floor(fpr * len(non) + 1e-9)  # false positives allowed
    # threshold: the (allowed+1)-th largest non-member score; flag scores strictly above it
    thr = non[allowed] if allowed < len(non) else -np.inf
    return float((score[member] > thr).mean())


def roc_auc(score: np.ndarray, member: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    return float(roc_auc_score(np.asarray(member, bool), score))


def mia_metrics(score: np.ndarray, member: np.ndarray) -> dict[str, float]:
    return {"auc": roc_auc(score, member), "tpr_at_1pct_fpr": tpr_at_fpr(score, member, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(score, member, 0.001)}


def logit_confidence(p: np.ndarray) -> np.ndarray:
    """LiRA's statistic ``log p - log (1 - p)`` (``p`` clipped to [1e-12, 1 - 1e-12])."""
    p = np.clip(np.asarray(p, float), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def lira_scores(shadow_stats: np.ndarray, shadow_in: np.ndarray,
                target_stats: np.ndarray) -> np.ndarray:
    """Online LiRA with a pooled (fixed) variance per group.

    ``shadow_stats``/``shadow_in``: ``(S, M)`` statistics and membership of the ``M`` candidates
    in ``S`` shadow models; ``target_stats``: ``(T, M)`` (or ``(M,)``). Returns the
    log-likelihood ratio ``log N(t; mu_in, s_in) - log N(t; mu_out, s_out)``, same shape as
    ``target_stats``. A candidate that no shadow trained on (or every shadow did) falls back to
    the group mean over all candidates.
    """
    s, m = np.asarray(shadow_stats, float), np.asarray(shadow_in, bool)

    def group(mask: np.ndarray) -> tuple[np.ndarray, float]:
        count = mask.sum(0)
        total = np.where(mask, s, 0.0).sum(0)
        overall = s[mask].mean() if mask.any() else s.mean()
        mu = np.where(count > 0, total / np.maximum(count, 1), overall)
        resid = (s - mu)[mask]
        sd = float(resid.std()) if resid.size > 1 else 1.0
        return mu, max(sd, 1e-6)

    mu_in, sd_in = group(m)
    mu_out, sd_out = group(~m)
    t = np.asarray(target_stats, float)
    return (-0.5 * ((t - mu_in) / sd_in) ** 2 - math.log(sd_in)) \
        - (-0.5 * ((t - mu_out) / sd_out) ** 2 - math.log(sd_out))


def label_queries(x: np.ndarray, k: int, perturb: float, rng: np.random.Generator) -> np.ndarray:
    """``(k, M, d)``: the candidates, then ``k - 1`` noisy copies (the attacker's, fixed)."""
    noise = rng.normal(0.0, perturb, (k - 1,) + x.shape)
    return np.concatenate([x[None], x[None] + noise]).astype(np.float32)


def membership_statistic(policy: str, models: Sequence[nn.Module], target: int, x: np.ndarray,
                         y: np.ndarray, queries: np.ndarray, *, sigma: float,
                         rng: np.random.Generator) -> np.ndarray:
    """The per-candidate statistic LiRA models, from what ``policy`` releases."""
    idx = np.arange(len(y))
    if policy == "all_outputs":
        return logit_confidence(release(policy, _logits(models, x))[target][idx, y])
    if policy == "averaged":
        return logit_confidence(release(policy, _logits(models, x))[idx, y])
    k = len(queries)
    flat = queries.reshape(-1, queries.shape[-1])
    labels = release(policy, _logits(models, flat), sigma=sigma, rng=rng).reshape(k, -1)
    hits = (labels == y[None]).sum(0)
    return logit_confidence((hits + 0.5) / (k + 1))


@dataclass
class _Split:
    x_u: np.ndarray
    y_u: np.ndarray
    x_others: list[np.ndarray]
    y_others: list[np.ndarray]
    x_pop: np.ndarray
    y_pop: np.ndarray
    num_classes: int


def _membership_split(cfg: AttacksConfig, seed: int, u_size: int) -> _Split:
    import demos  # noqa: PLC0415

    x, y = demos.load_dataset("digits")
    c = int(y.max()) + 1
    order = np.random.default_rng(seed).permutation(len(y))
    need = u_size + cfg.others_size + cfg.population_size
    if need > len(y):
        raise ValueError(f"membership split needs {need} examples, digits has {len(y)}")
    u = order[:u_size]
    others = order[u_size:u_size + cfg.others_size]
    pop = order[u_size + cfg.others_size:need]
    parts = demos.dirichlet_split(y[others], cfg.num_owners - 1, cfg.alpha,
                                  np.random.default_rng(seed), min_size=10)
    return _Split(x[u], y[u], [x[others][p] for p in parts], [y[others][p] for p in parts],
                  x[pop], y[pop], c)


def _half(m: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(m, bool)
    mask[rng.permutation(m)[: m // 2]] = True
    return mask


@dataclass
class _MembershipModels:
    split: _Split
    others: list[nn.Module]  # the real other owners
    targets: list[nn.Module]  # owner 0 of each target federation
    target_in: np.ndarray  # (T, |U|)
    shadows: list[list[nn.Module]]  # each shadow federation, its owner 0 first
    shadow_in: np.ndarray  # (S, |U|)


def membership_models(cfg: AttacksConfig, seed: int, regime: Regime) -> _MembershipModels:
    """Train the target federations and the attacker's shadow federations of one seed."""
    u_size = 2 * regime.train_size
    sp = _membership_split(cfg, seed, u_size)
    c, h = sp.num_classes, cfg.hidden
    demo_kw = {"num_classes": c, "hidden": h, "epochs": 60, "weight_decay": 1e-4}
    own_kw = {"num_classes": c, "hidden": h, "epochs": regime.epochs,
              "weight_decay": regime.weight_decay}
    rng = np.random.default_rng((seed, 1))
    others = [train_owner(xo, yo, seed=1000 * seed + k + 1, **demo_kw)
              for k, (xo, yo) in enumerate(zip(sp.x_others, sp.y_others))]
    n_targets = math.ceil(cfg.nonmembers / (u_size - u_size // 2))
    target_in = np.stack([_half(u_size, rng) for _ in range(n_targets)])
    targets = [train_owner(sp.x_u[m], sp.y_u[m], seed=1000 * seed + 100 + t, **own_kw)
               for t, m in enumerate(target_in)]
    shadow_in = np.stack([_half(u_size, rng) for _ in range(cfg.shadows)])
    shadows: list[list[nn.Module]] = []
    per_other = len(sp.y_pop) // max(cfg.num_owners - 1, 1)
    for s, m in enumerate(shadow_in):
        zero = train_owner(sp.x_u[m], sp.y_u[m], seed=1000 * seed + 500 + s, **own_kw)
        perm = rng.permutation(len(sp.y_pop))
        fed = [zero]
        for k in range(cfg.num_owners - 1):
            sel = perm[k * per_other:(k + 1) * per_other]
            fed.append(train_owner(sp.x_pop[sel], sp.y_pop[sel],
                                   seed=1000 * seed + 700 + s * 10 + k, **demo_kw))
        shadows.append(fed)
    return _MembershipModels(sp, others, targets, target_in, shadows, shadow_in)


def membership_seed(cfg: AttacksConfig, seed: int, regime: Regime,
                    step: Callable[[str], None] = lambda note: None) -> list[Row]:
    """Every policy's LiRA and global-threshold attack on owner 0 for one seed and regime."""
    mm = membership_models(cfg, seed, regime)
    sp, others, targets, target_in = mm.split, mm.others, mm.targets, mm.target_in
    shadows, shadow_in, n_targets = mm.shadows, mm.shadow_in, len(mm.targets)
    step(f"membership {regime.name} seed {seed}: trained")
    gap = float(np.mean([_gap(t, sp, m) for t, m in zip(targets, target_in)]))
    queries = label_queries(sp.x_u, cfg.label_queries, cfg.perturb, np.random.default_rng((seed, 2)))
    rows = []
    for policy in cfg.policies:
        noise = np.random.default_rng((seed, 3, POLICIES.index(policy)))
        feds = shadows + [[t, *others] for t in targets]
        stats = np.stack([membership_statistic(policy, fed, 0, sp.x_u, sp.y_u, queries,
                                               sigma=cfg.sigma, rng=noise) for fed in feds])
        sh, tg = stats[:len(shadows)], stats[len(shadows):]
        member = target_in.ravel()
        base = {"experiment": "membership", "regime": regime.name, "seed": seed,
                "policy": policy, "owners": cfg.num_owners, "alpha": cfg.alpha,
                "shadows": cfg.shadows, "targets": n_targets,
                "members": int(member.sum()), "nonmembers": int((~member).sum()),
                "target_gap": gap,
                "queries_per_candidate": cfg.label_queries if "label" in policy else 1}
        for attack, score in (("lira", lira_scores(sh, shadow_in, tg)), ("global", tg)):
            rows.append({**base, "attack": attack, **mia_metrics(score.ravel(), member)})
        step(f"membership {regime.name} {policy}")
    return rows


def _gap(model: nn.Module, sp: _Split, member: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.as_tensor(sp.x_u)).argmax(-1).numpy()
    ok = pred == sp.y_u
    return float(ok[member].mean() - ok[~member].mean())


def run_membership(cfg: AttacksConfig, bar: Progress) -> list[Row]:
    rows: list[Row] = []
    for regime in cfg.regimes:
        for seed in cfg.seeds:
            rows += membership_seed(cfg, seed, regime, bar.step)
    return rows


def secure_spot_check(cfg: AttacksConfig, *, seed: int = 0, regime: Regime = REGIMES[0],
                      timeout_s: float = 900.0) -> Row:
    """One membership cell on shares: the first target federation of ``seed`` releases the
    averaged distribution (``soft_vote``, ``reveal: scores``) on the candidates through
    :class:`mpc_fi.Federation` (local launcher, output mode, TTP dealer); we compare the opened
    scores and the LiRA statistics with the twin's, and the attack's metrics on that federation
    computed from either."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from mpc_fi.config import (  # noqa: PLC0415
        FederationConfig,
        ModelSource,
        OwnerConfig,
        QuerierConfig,
    )
    from mpc_fi.federation import Federation  # noqa: PLC0415

    mm = membership_models(cfg, seed, regime)
    sp = mm.split
    fed_models = [mm.targets[0]] + mm.others
    kwargs = {"in_features": int(sp.x_u.shape[1]), "hidden": cfg.hidden,
              "num_classes": sp.num_classes}
    idx = np.arange(len(sp.y_u))
    twin = release("averaged", _logits(fed_models, sp.x_u))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mpc-fi-attacks-") as tmp:
        owners = []
        for i, model in enumerate(fed_models):
            path = Path(tmp) / f"owner{i}.pt"
            torch.save(model.state_dict(), path)
            owners.append(OwnerConfig(name=f"owner{i}", model=ModelSource(
                factory="mpc_fi.demo:mlp", weights=str(path.resolve()), kwargs=dict(kwargs))))
        fed = FederationConfig(owners=tuple(owners),
                               querier=QuerierConfig(name="querier", input_range=(0.0, 1.0)),
                               mode="output", reveal="scores", dealer="ttp")
        got = np.asarray(Federation(fed, timeout_s=timeout_s, run_dir=Path(tmp) / "run")
                         .run(sp.x_u).prediction.scores, dtype=float)
    seconds = time.perf_counter() - t0
    shadow = np.stack([logit_confidence(release("averaged", _logits(f, sp.x_u))[idx, sp.y_u])
                       for f in mm.shadows])
    stat_twin = logit_confidence(twin[idx, sp.y_u])
    stat_secure = logit_confidence(got[idx, sp.y_u])
    member = mm.target_in[0]
    m_twin = mia_metrics(lira_scores(shadow, mm.shadow_in, stat_twin), member)
    m_secure = mia_metrics(lira_scores(shadow, mm.shadow_in, stat_secure), member)
    return {"experiment": "secure_check", "seed": seed, "regime": regime.name,
            "policy": "averaged", "candidates": len(idx),
            "max_abs_score_difference": float(np.abs(got - twin).max()),
            "max_abs_statistic_difference": float(np.abs(stat_secure - stat_twin).max()),
            **{f"{k}_twin": v for k, v in m_twin.items()},
            **{f"{k}_secure": v for k, v in m_secure.items()}, "seconds": seconds}


# ---------------------------------------------------------------------------------------
# Extraction from synthetic and out-of-distribution queries
# ---------------------------------------------------------------------------------------
def image_patches(n: int, rng: np.random.Generator, side: int = 8, zoom: int = 4) -> np.ndarray:
    """``n`` random ``side x side`` grayscale patches of scikit-learn's bundled photographs
    (``zoom``-fold average-pooled, each scaled to [0, 1]), flattened."""
    from sklearn.datasets import load_sample_images  # noqa: PLC0415

    images = [img.mean(-1) for img in load_sample_images().images]
    w = side * zoom
    out = np.empty((n, side * side), np.float32)
    for i in range(n):
        img = images[rng.integers(len(images))]
        r, c = rng.integers(img.shape[0] - w), rng.integers(img.shape[1] - w)
        p = img[r:r + w, c:c + w].reshape(side, zoom, side, zoom).mean((1, 3))
        lo, hi = p.min(), p.max()
        out[i] = ((p - lo) / (hi - lo + 1e-8)).ravel()
    return out


def make_queries(source: str, n: int, pool: np.ndarray, rng: np.random.Generator, *,
                 public: int = 10, permutation: np.ndarray | None = None) -> np.ndarray | None:
    """``n`` query inputs from ``source`` (``None`` when the source has fewer than ``n``)."""
    d = pool.shape[1]
    if source in ("in_distribution", "ood_permuted"):
        if n > len(pool):
            return None
        x = pool[rng.permutation(len(pool))[:n]]
        if source == "ood_permuted":
            perm = permutation if permutation is not None else rng.permutation(d)
            x = x[:, perm]
        return x.astype(np.float32)
    if source == "uniform":
        return rng.uniform(0.0, 1.0, (n, d)).astype(np.float32)
    pub = pool[rng.permutation(len(pool))[:public]]
    if source == "gaussian":
        x = rng.normal(pub.mean(0), pub.std(0) + 1e-3, (n, d))
        return np.clip(x, 0.0, 1.0).astype(np.float32)
    if source == "mixup":
        a, b = rng.integers(public, size=n), rng.integers(public, size=n)
        lam = rng.uniform(0.0, 1.0, (n, 1))
        return (lam * pub[a] + (1 - lam) * pub[b]).astype(np.float32)
    if source == "ood_patches":
        return image_patches(n, rng)
    raise ValueError(f"unknown query source {source!r}; choose from {SOURCES}")


def run_extraction(cfg: AttacksConfig, bar: Progress) -> list[Row]:
    from .leakage import LeakageConfig, Oracle, build_world, train_surrogate  # noqa: PLC0415

    rows: list[Row] = []
    lcfg = LeakageConfig(num_owners=cfg.num_owners, alpha=cfg.alpha)
    for seed in cfg.seeds:
        world = build_world(lcfg, seed)
        oracle = Oracle(world, lcfg, seed)
        fed_eval = oracle.federation_label(world.x_eval)
        xe = torch.as_tensor(world.x_eval, dtype=torch.float32)
        permutation = np.random.default_rng((seed, 4)).permutation(world.x_pool.shape[1])
        c = world.num_classes
        for s_i, source in enumerate(cfg.sources):
            for budget in cfg.budgets:
                xq = make_queries(source, budget, world.x_pool,
                                  np.random.default_rng((seed, 5, s_i, budget)),
                                  public=cfg.public, permutation=permutation)
                for policy in cfg.extraction_policies:
                    bar.step(f"extraction {source} n={budget} {policy}")
                    if xq is None:
                        continue
                    t0 = time.perf_counter()
                    rel = oracle.release(policy, xq)
                    kw = {"hidden": lcfg.surrogate_hidden, "epochs": lcfg.surrogate_epochs,
                          "seed": seed}
                    if policy == "all_outputs":
                        students = [train_surrogate(xq, r, c, **kw) for r in rel]
                    elif policy == "averaged":
                        students = [train_surrogate(xq, rel, c, **kw)]
                    else:
                        students = [train_surrogate(xq, np.eye(c)[rel], c, **kw)]
                    with torch.no_grad():
                        probs = np.mean([torch.softmax(s(xe), -1).numpy() for s in students], 0)
                    pred = probs.argmax(-1)
                    rows.append({"experiment": "extraction", "seed": seed, "source": source,
                                 "policy": policy, "queries": budget,
                                 "owners": cfg.num_owners, "alpha": cfg.alpha,
                                 "agreement": float((pred == fed_eval).mean()),
                                 "student_accuracy": float((pred == world.y_eval).mean()),
                                 "federation_accuracy": float((fed_eval == world.y_eval).mean()),
                                 "seconds": time.perf_counter() - t0})
    return rows


# ---------------------------------------------------------------------------------------
# Label-skew inference
# ---------------------------------------------------------------------------------------
SKEW_ESTIMATORS = {"all_outputs": ("mean", "normalised"), "averaged": ("mean",),
                   "label": ("histogram",), "dp_label": ("histogram",)}


def estimate_skew(policy: str, released: np.ndarray, num_owners: int, num_classes: int,
                  estimator: str | None = None) -> np.ndarray:
    """``(N, C)``: the attacker's estimate of each owner's class distribution from a release.

    ``all_outputs`` (``(N, n, C)``): ``mean``, owner k's mean output; ``normalised``, that mean
    divided per class by the owners' average of it (the attacker's estimate of the queries' own
    class mix, which every owner's outputs also reflect), renormalised. ``averaged``
    (``(n, C)``): the mean released distribution; label policies (``(n,)``): the released
    labels' histogram. An aggregate is symmetric in the owners, so those estimates are the same
    row for every owner.
    """
    if policy not in SKEW_ESTIMATORS:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    estimator = estimator or SKEW_ESTIMATORS[policy][0]
    if estimator not in SKEW_ESTIMATORS[policy]:
        raise ValueError(f"{policy} has the estimators {SKEW_ESTIMATORS[policy]}, "
                         f"not {estimator!r}")
    if policy == "all_outputs":
        est = np.asarray(released, float).mean(1)
        if estimator == "normalised":
            est = est / np.maximum(est.mean(0, keepdims=True), 1e-12)
    elif policy == "averaged":
        est = np.tile(np.asarray(released, float).mean(0), (num_owners, 1))
    else:
        hist = np.bincount(np.asarray(released, int), minlength=num_classes).astype(float)
        est = np.tile(hist, (num_owners, 1))
    return est / est.sum(1, keepdims=True)


def skew_metrics(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean over owners of Pearson r and total-variation distance between the estimated and
    true class distributions, the fraction of owners whose largest class is the estimate's, and
    the same r and TV against the owners' average distribution (what an aggregate can show)."""
    def r(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan

    pooled = truth.mean(0)
    uniform = np.full(truth.shape[1], 1.0 / truth.shape[1])
    return {"r_owner": float(np.nanmean([r(e, t) for e, t in zip(estimate, truth)])),
            "tv_owner": float(np.mean(0.5 * np.abs(estimate - truth).sum(1))),
            "top_class_found": float(np.mean(estimate.argmax(1) == truth.argmax(1))),
            "r_pooled": r(estimate.mean(0), pooled),
            "tv_pooled": float(0.5 * np.abs(estimate.mean(0) - pooled).sum()),
            "tv_owner_uniform_guess": float(np.mean(0.5 * np.abs(uniform - truth).sum(1)))}


def run_skew(cfg: AttacksConfig, bar: Progress) -> list[Row]:
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    import demos  # noqa: PLC0415

    x, y = demos.load_dataset("digits")
    c = int(y.max()) + 1
    rows: list[Row] = []
    for n in cfg.skew_owners:
        for alpha in cfg.skew_alphas:
            for seed in cfg.seeds:
                x_own, x_q, y_own, _ = train_test_split(x, y, train_size=0.5, random_state=seed,
                                                        stratify=y)
                parts = demos.dirichlet_split(y_own, n, alpha, np.random.default_rng(seed))
                models = [train_owner(x_own[p], y_own[p], num_classes=c, hidden=cfg.hidden,
                                      epochs=60, weight_decay=1e-4, seed=seed + k)
                          for k, p in enumerate(parts)]
                truth = np.stack([np.bincount(y_own[p], minlength=c) / len(p) for p in parts])
                xq = x_q[np.random.default_rng((seed, 6)).permutation(len(x_q))[:cfg.skew_queries]]
                lg = _logits(models, xq)
                for policy in cfg.policies:
                    rel = release(policy, lg, sigma=cfg.sigma,
                                  rng=np.random.default_rng((seed, 7, n)))
                    for estimator in SKEW_ESTIMATORS[policy]:
                        est = estimate_skew(policy, rel, n, c, estimator)
                        rows.append({"experiment": "skew", "seed": seed, "owners": n,
                                     "alpha": alpha, "policy": policy, "estimator": estimator,
                                     "queries": len(xq), **skew_metrics(est, truth)})
                bar.step(f"skew N={n} alpha={alpha:g}")
    return rows


# ---------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------
def _steps(cfg: AttacksConfig) -> int:
    steps = 0
    if "membership" in cfg.experiments:
        steps += len(cfg.regimes) * len(cfg.seeds) * (1 + len(cfg.policies))
    if "extraction" in cfg.experiments:
        steps += len(cfg.seeds) * len(cfg.sources) * len(cfg.budgets) \
            * len(cfg.extraction_policies)
    if "skew" in cfg.experiments:
        steps += len(cfg.skew_owners) * len(cfg.skew_alphas) * len(cfg.seeds)
    return steps


def run_attacks(cfg: AttacksConfig = AttacksConfig(), *, show_progress: bool = True) -> list[Row]:
    """The chosen experiments for every seed; rows in long format (``experiment`` column)."""
    unknown = [e for e in cfg.experiments if e not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    torch.set_num_threads(1)
    bar = Progress(_steps(cfg), "attacks", enabled=show_progress)
    rows: list[Row] = []
    if "membership" in cfg.experiments:
        rows += run_membership(cfg, bar)
    if "extraction" in cfg.experiments:
        rows += run_extraction(cfg, bar)
    if "skew" in cfg.experiments:
        rows += run_skew(cfg, bar)
    if cfg.secure_check and "membership" in cfg.experiments:
        rows.append(secure_spot_check(cfg, seed=cfg.seeds[0], timeout_s=cfg.timeout_s))
    return rows


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def _ci(rows: Sequence[Row], experiment: str, keys: Sequence[str], metric: str
        ) -> dict[tuple, Any]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["experiment"] == experiment:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r[metric])
    return {k: mean_ci(v) for k, v in groups.items()}


def _paired(rows: Sequence[Row], experiment: str, keys: Sequence[str], metric: str,
            field_: str, a: Any, b: Any) -> dict[tuple, Any]:
    """Interval of ``metric(field_=a) - metric(field_=b)``, paired by seed, per ``keys``."""
    by: dict[tuple, dict[Any, dict[int, float]]] = {}
    for r in rows:
        if r["experiment"] == experiment and r[field_] in (a, b):
            by.setdefault(tuple(r[k] for k in keys), {}).setdefault(r[field_], {})[r["seed"]] = \
                r[metric]
    out = {}
    for k, v in by.items():
        if a in v and b in v:
            out[k] = mean_ci(v[a][s] - v[b][s] for s in v[a] if s in v[b])
    return out


def summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Intervals over seeds of every table's cells (JSON-ready)."""
    def dump(table: dict[tuple, Any]) -> list[dict[str, Any]]:
        return [{"key": list(k), "mean": v.mean, "lo": v.lo, "hi": v.hi, "n": v.n}
                for k, v in sorted(table.items(), key=lambda t: str(t[0]))]

    out: dict[str, Any] = {"confidence": 0.95, "seeds": sorted({r["seed"] for r in rows})}
    mk = ("regime", "policy", "attack")
    for m in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
        out[f"membership.{m}"] = dump(_ci(rows, "membership", mk, m))
    ek = ("source", "policy", "queries")
    for m in ("agreement", "student_accuracy"):
        out[f"extraction.{m}"] = dump(_ci(rows, "extraction", ek, m))
    sk = ("owners", "alpha", "policy", "estimator")
    for m in ("r_owner", "tv_owner", "top_class_found", "r_pooled", "tv_pooled",
              "tv_owner_uniform_guess"):
        out[f"skew.{m}"] = dump(_ci(rows, "skew", sk, m))
    out["secure_check"] = [r for r in rows if r["experiment"] == "secure_check"]
    return out


def markdown_report(rows: Sequence[Row]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    out = [(f"Seeds {', '.join(map(str, seeds))}: mean [95 % t-interval] over seeds "
            "(plaintext twins; GNMax noise seeded).\n")]
    mem = [r for r in rows if r["experiment"] == "membership"]
    if mem:
        r0 = mem[0]
        kq = max(r["queries_per_candidate"] for r in mem)
        first = {g: next(r for r in mem if r["regime"] == g)
                 for g in dict.fromkeys(r["regime"] for r in mem)}
        gaps = {g: mean_ci(r["target_gap"] for r in mem if r["regime"] == g
                           and r["policy"] == r0["policy"] and r["attack"] == "lira")
                for g in first}
        out.append(
            f"\n**Membership inference on owner 0 with {r0['shadows']} shadow federations** "
            f"({r0['owners']} owners). Per seed, the target federations pooled (members and "
            "non-member scores): "
            + "; ".join(f"{g} {f['targets']} ({f['members']}, {f['nonmembers']})"
                        for g, f in first.items())
            + ". Owner 0's train-minus-unseen accuracy gap: "
            + "; ".join(f"{g} {v.text()}" for g, v in gaps.items())
            + f". Label policies: {kq} queries per candidate. A score that leaks nothing has "
            "TPR = FPR (0.01 and 0.001).\n\n")
        keys = ("regime", "policy", "attack")
        auc = _ci(rows, "membership", keys, "auc")
        t1 = _ci(rows, "membership", keys, "tpr_at_1pct_fpr")
        t01 = _ci(rows, "membership", keys, "tpr_at_0.1pct_fpr")
        gain = _paired(rows, "membership", ("regime", "policy"), "tpr_at_1pct_fpr", "attack",
                       "lira", "global")
        table = []
        order = {p: i for i, p in enumerate(POLICIES)}
        for k in sorted(auc, key=lambda t: (t[0], order.get(t[1], 9), t[2] != "lira")):
            g = gain.get(k[:2]) if k[2] == "lira" else None
            table.append([k[0], k[1], k[2], auc[k].text(), t1[k].text(), t01[k].text(),
                          g.text() if g is not None else ""])
        out.append(markdown_table(table, ["owner 0", "policy", "attack", "AUC", "TPR @ 1 % FPR",
                                          "TPR @ 0.1 % FPR", "TPR @ 1 %: LiRA − global (paired)"],
                                  align="lllrrrr"))
        lira = [r for r in rows if r["experiment"] == "membership" and r["attack"] == "lira"]
        pairs = [(a, b) for a, b in zip(POLICIES, POLICIES[1:])
                 if any(r["policy"] == a for r in lira) and any(r["policy"] == b for r in lira)]
        if pairs:
            table = []
            for g in first:
                cells = []
                for metric in ("tpr_at_1pct_fpr", "auc"):
                    for a, b in pairs:
                        d = _paired([r for r in lira if r["regime"] == g], "membership",
                                    ("regime",), metric, "policy", a, b)
                        cells.append(d[(g,)].text())
                table.append([g, *cells])
            head = [f"{m}: {a} − {b}" for m in ("TPR @ 1 %", "AUC") for a, b in pairs]
            out.append("\nLiRA, paired by seed: one policy minus the next.\n\n")
            out.append(markdown_table(table, ["owner 0", *head]))
    ext = [r for r in rows if r["experiment"] == "extraction"]
    if ext:
        fed = mean_ci(r["federation_accuracy"] for r in ext
                      if r["source"] == ext[0]["source"] and r["policy"] == ext[0]["policy"]
                      and r["queries"] == ext[0]["queries"])
        out.append(f"\n**Extraction by distillation** ({ext[0]['owners']} owners, Dirichlet "
                   f"{ext[0]['alpha']:g}; the federation's accuracy {fed.text()}). Student "
                   "agreement with the federation's label on the evaluation split, then the "
                   "student's accuracy; '–': the source has fewer inputs than the budget.\n\n")
        budgets = sorted({r["queries"] for r in ext})
        for metric, title in (("agreement", "agreement"), ("student_accuracy", "accuracy")):
            ci = _ci(rows, "extraction", ("source", "policy", "queries"), metric)
            table = []
            for source in dict.fromkeys(r["source"] for r in ext):
                for policy in dict.fromkeys(r["policy"] for r in ext):
                    table.append([source, policy] + [
                        ci[(source, policy, b)].short() if (source, policy, b) in ci else "–"
                        for b in budgets])
            out.append(f"\nStudent {title}:\n\n")
            out.append(markdown_table(table, ["queries", "policy"] + [f"n={b}" for b in budgets],
                                      align="ll" + "r" * len(budgets)))
        table = []
        for source in dict.fromkeys(r["source"] for r in ext):
            cells = []
            for a, b in (("all_outputs", "averaged"), ("averaged", "label")):
                d = _paired([r for r in ext if r["source"] == source], "extraction",
                            ("queries",), "agreement", "policy", a, b)
                cells += [d[(q,)].text() if (q,) in d else "–" for q in budgets]
            table.append([source, *cells])
        if table:
            out.append("\nStudent agreement, paired by seed: all_outputs − averaged, then "
                       "averaged − label:\n\n")
            out.append(markdown_table(
                table, ["queries"] + [f"{h} n={q}" for h in ("all − avg", "avg − label")
                                      for q in budgets]))
    sk = [r for r in rows if r["experiment"] == "skew"]
    if sk:
        out.append(f"\n**Label-skew inference** from {sk[0]['queries']} unlabelled "
                   "in-distribution queries: per owner, Pearson r and total-variation distance "
                   "between the estimated and the true class distribution (mean over owners), "
                   "the fraction of owners whose largest class is found, the TV of a uniform "
                   "guess, and r against the owners' average distribution (what an aggregate "
                   "can show).\n\n")
        keys = ("owners", "alpha", "policy", "estimator")
        cis = {m: _ci(rows, "skew", keys, m) for m in
               ("r_owner", "tv_owner", "top_class_found", "tv_owner_uniform_guess", "r_pooled")}
        order = {p: i for i, p in enumerate(POLICIES)}
        table = []
        for k in sorted(cis["r_owner"], key=lambda t: (t[0], t[1], order.get(t[2], 9), t[3])):
            table.append([k[0], f"{k[1]:g}", k[2], k[3]] + [cis[m][k].text() for m in cis])
        norm = _paired([r for r in rows if r["experiment"] == "skew"
                        and r["policy"] == "all_outputs"], "skew", ("owners", "alpha"),
                       "r_owner", "estimator", "normalised", "mean")
        agg = _paired([r for r in rows if r["experiment"] == "skew"
                       and r["estimator"] in ("mean", "histogram")], "skew", ("owners", "alpha"),
                      "r_owner", "policy", "all_outputs", "label")
        notes = "".join(
            f"\n* N={k[0]}, alpha={k[1]:g}: r, all_outputs normalised − mean "
            f"{norm[k].text()}; all_outputs (mean) − label {agg[k].text()} (paired)"
            for k in sorted(norm) if k in agg)
        out.append(markdown_table(table, ["N", "alpha", "policy", "estimator", "r (per owner)",
                                          "TV (per owner)", "largest class found",
                                          "TV, uniform guess", "r (owners' average)"],
                                  align="rrllrrrrr"))
        out.append(notes + "\n")
    sec = [r for r in rows if r["experiment"] == "secure_check"]
    for r in sec:
        out.append(f"\n**On shares** (one cell: seed {r['seed']}, owner 0 {r['regime']}, the "
                   f"first target federation, `soft_vote` with `reveal: scores` through "
                   f"`mpc_fi.Federation`, {r['candidates']} candidates, {r['seconds']:.0f} s): "
                   f"largest |opened − twin| score {r['max_abs_score_difference']:.2g}, LiRA "
                   f"statistic {r['max_abs_statistic_difference']:.2g}; on this federation "
                   f"alone AUC {r['auc_secure']:.3f} (twin {r['auc_twin']:.3f}), TPR @ 1 % FPR "
                   f"{r['tpr_at_1pct_fpr_secure']:.3f} (twin {r['tpr_at_1pct_fpr_twin']:.3f}), "
                   f"TPR @ 0.1 % FPR {r['tpr_at_0.1pct_fpr_secure']:.3f} (twin "
                   f"{r['tpr_at_0.1pct_fpr_twin']:.3f}).\n")
    return "".join(out)


def small_config(**changes: Any) -> AttacksConfig:
    """A tiny configuration for tests and smoke runs."""
    base = AttacksConfig(seeds=(0, 1), shadows=4, nonmembers=100, label_queries=4,
                         regimes=(Regime("demo", 60, 30, 1e-4), Regime("overfit", 40, 100, 0.0)),
                         others_size=200, population_size=200, budgets=(50, 700),
                         sources=("in_distribution", "uniform", "ood_patches"),
                         skew_owners=(3,), skew_alphas=(0.3,), skew_queries=100,
                         secure_check=False)
    return replace(base, **changes)


__all__ = [
    "EXPERIMENTS",
    "POLICIES",
    "REGIMES",
    "SOURCES",
    "AttacksConfig",
    "Regime",
    "estimate_skew",
    "lira_scores",
    "make_queries",
    "markdown_report",
    "release",
    "run_attacks",
    "secure_spot_check",
    "skew_metrics",
    "small_config",
    "summary",
    "tpr_at_fpr",
]
