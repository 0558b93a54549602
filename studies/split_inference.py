"""Split inference against the public-backbone mode: can an owner rebuild the query?

The setting of the SiftFunnel paper: a **public backbone** (a feature extractor everybody may
hold) and **private heads** (each owner's classifier on the backbone's features), the setting of
``public_backbone`` in :class:`mpc_fi.FederationConfig`.

* **Split deployment** (what the paper attacks): the querier runs the backbone and sends its
  features **in plaintext** to the owners, who run their heads. An honest-but-curious owner
  trains an *inversion network* (an MLP decoder, features -> input) on data it has: the public
  split and its own training shard, passed through the public backbone. It then decodes every
  query it is sent.
* **mpc-fi's public-backbone mode**: the querier runs the backbone and **secret-shares** the
  features; the owners' heads run on shares; only the aggregate (``soft_vote``) is opened, to the
  querier. The same owner trains the same inversion network on **what it holds and receives**
  for queries whose inputs it knows (a known-plaintext attacker: the querier is made to ask the
  owner's whole auxiliary set first), and decodes the held-out queries from it.

The secure side is the engine itself: a federation with ``public_backbone`` (full mode,
``soft_vote``, TTP dealer) run by the registered local launcher with the **wire audit** on
(:mod:`mpc_fi.audit`), answering the auxiliary digits and then the queries in one run. From the
audit logs the study takes owner 0's view of every query's features: its own share (recorded by
the audit as its part of the features' masked openings) and the openings of the features it
receives (the sum of every party's masked message: one, since the heads' first products run as
one product with their weights concatenated; one per head before that); the decoded
sum of all parties' recorded shares is checked to be the features. :func:`mpc_fi.audit.verify`
must find no problem (every message belongs to a declared site, every opening equals the
sender's share masked by dealer material regenerated from the dealer's keys, no material masks
two openings, the only release goes to the querier, no query data crosses the wire), and the
study counts the bytes the other parties send that reach owner 0. A Kolmogorov-Smirnov test
compares owner 0's shares (64-bit words / 2^64) with the uniform distribution, and the querier's
labels are compared with the plaintext twin's.

**Data.** scikit-learn's digits (8x8, pixels scaled to [0, 1]); per seed a stratified split:
40 % public (trains the backbone and the fixed evaluation classifier; the attacker has it), 30 %
shared among the owners (IID, equal shards; owner 0 is the attacker), 30 % held-out queries.

**Backbones** of several depths and widths (``depth`` linear layers of ``width`` units with ReLU
between them and a sigmoid at the end: features in [0, 1], the engine's declared
``output_range``), trained with a linear classifier on the public split.

**Metrics** on the held-out queries, for each view (``features``: split deployment, ``shares``:
mpc-fi, ``mean``: the baseline that predicts the mean auxiliary image for every query): MSE and
PSNR (pixel range 1), SSIM (one 8x8 window per image), and the accuracy of a fixed logistic
regression (trained on the public split's images) on the reconstructions. The inversion network
is chosen by its MSE on a held-out 20 % of the attacker's auxiliary data (early stopping), the
same way for both views. Means over seeds with 95 % Student-t intervals; gains over the mean
baseline are paired by seed.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpc_fi.errors import ConfigError

from .common import Progress, Row, describe_failure, fmt, markdown_table, mean_ci

#: The three views of a query an owner can decode from, in table order.
VIEWS = ("features", "shares", "mean")
VIEW_TEXT = {"features": "plaintext features (split deployment)",
             "shares": "secret shares (mpc-fi public backbone)",
             "mean": "mean image (no information)"}


@dataclass(frozen=True)
class SplitConfig:
    """The study's grid. Defaults: the command that wrote ``docs/study/split_inference.*``."""

    backbones: tuple[tuple[int, int], ...] = ((1, 8), (1, 32), (2, 32), (3, 64))  # (depth, width)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    num_owners: int = 3
    backbone_epochs: int = 200
    inverter_hidden: int = 256
    inverter_epochs: int = 600
    queries: int | None = None  # the first Q held-out queries (None: all 540)
    secure: bool = True
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.backbones or any(len(b) != 2 or b[0] < 1 or b[1] < 1 for b in self.backbones):
            raise ConfigError(f"backbones are (depth >= 1, width >= 1) pairs, got "
                              f"{self.backbones!r}", key="--backbones")
        if not self.seeds:
            raise ConfigError("at least one seed is needed", key="--seeds")
        if self.num_owners < 2:
            raise ConfigError(f"a federation needs at least 2 owners, got {self.num_owners}",
                              key="--owners")
        if self.queries is not None and self.queries < 2:
            raise ConfigError(f"must be >= 2, got {self.queries}", key="--queries")


# ---------------------------------------------------------------------------------------
# Models and metrics (pure functions)
# ---------------------------------------------------------------------------------------
def make_backbone(depth: int, width: int, in_features: int = 64) -> nn.Sequential:
    """``depth`` linear layers of ``width`` units, ReLU between them, a sigmoid at the end."""
    layers: list[nn.Module] = [nn.Linear(in_features, width)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    return nn.Sequential(*layers, nn.Sigmoid())


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Any, *, epochs: int,
         lr: float = 0.01) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return model.eval()


def encode_shares(shares: np.ndarray) -> np.ndarray:
    """An inversion network's input from 64-bit ring shares: the high and the low 32 bits of
    every word as floats in [-1, 1) and [0, 1] (the fixed-point value and its fraction)."""
    s = np.asarray(shares, dtype=np.int64)
    high = (s >> 32).astype(np.float64) / 2.0 ** 31
    low = (s & 0xFFFFFFFF).astype(np.float64) / 2.0 ** 32
    return np.concatenate([high, low], axis=1).astype(np.float32)


def train_inverter(z: np.ndarray, x: np.ndarray, *, seed: int, hidden: int = 256,
                   epochs: int = 600, lr: float = 3e-3, check_every: int = 10) -> nn.Module:
    """An MLP decoder ``z -> x`` (sigmoid output: pixels in [0, 1]) trained with MSE on 80 % of
    the pairs; the weights with the lowest MSE on the other 20 % are kept (early stopping).
    Inputs are standardised with the training part's mean and std (part of the model)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(z))
    cut = max(1, int(0.8 * len(z)))
    tr, va = order[:cut], order[cut:] if cut < len(z) else order[:1]
    zt = torch.from_numpy(np.asarray(z, dtype=np.float32))
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    mu, sd = zt[tr].mean(0), zt[tr].std(0) + 1e-6
    torch.manual_seed(seed)
    net = nn.Sequential(_Standardise(mu, sd), nn.Linear(z.shape[1], hidden), nn.ReLU(),
                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, x.shape[1]),
                        nn.Sigmoid())
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    best, best_state = math.inf, None
    for epoch in range(epochs):
        net.train()
        opt.zero_grad()
        nn.functional.mse_loss(net(zt[tr]), xt[tr]).backward()
        opt.step()
        if epoch % check_every == check_every - 1 or epoch == epochs - 1:
            net.eval()
            with torch.no_grad():
                val = float(nn.functional.mse_loss(net(zt[va]), xt[va]))
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval()


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std


def mse(recon: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean((np.asarray(recon, np.float64) - np.asarray(truth, np.float64)) ** 2))


def psnr(recon: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1], from the mean MSE over images."""
    return float(10 * math.log10(1.0 / max(mse(recon, truth), 1e-12)))


def ssim(recon: np.ndarray, truth: np.ndarray) -> float:
    """Mean SSIM over images, each image one window (8x8 digits are too small for the usual 7x7
    sliding window); constants ``(0.01 L)^2`` and ``(0.03 L)^2`` with ``L = 1``."""
    a, b = np.asarray(recon, np.float64), np.asarray(truth, np.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = a.mean(1), b.mean(1)
    va, vb = a.var(1), b.var(1)
    cov = ((a - ma[:, None]) * (b - mb[:, None])).mean(1)
    return float(np.mean(((2 * ma * mb + c1) * (2 * cov + c2))
                         / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))))


# ---------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------
@dataclass
class Data:
    x_public: np.ndarray
    y_public: np.ndarray
    x_owners: list[np.ndarray]
    y_owners: list[np.ndarray]
    x_query: np.ndarray
    y_query: np.ndarray

    @property
    def x_aux(self) -> np.ndarray:
        """What the attacking owner (owner 0) has: the public split and its own shard."""
        return np.concatenate([self.x_public, self.x_owners[0]])


def split_data(seed: int, num_owners: int, queries: int | None = None) -> Data:
    import demos  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    x, y = demos.load_dataset("digits")  # pixels / 16: in [0, 1]
    x_rest, x_q, y_rest, y_q = train_test_split(x, y, test_size=0.3, random_state=seed,
                                                stratify=y)
    x_pub, x_own, y_pub, y_own = train_test_split(x_rest, y_rest, test_size=3 / 7,
                                                  random_state=seed, stratify=y_rest)
    shards = np.array_split(np.random.default_rng((seed, 7)).permutation(len(y_own)), num_owners)
    if queries is not None:
        x_q, y_q = x_q[:queries], y_q[:queries]
    return Data(x_pub, y_pub, [x_own[s] for s in shards], [y_own[s] for s in shards], x_q, y_q)


def _features(backbone: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return backbone(torch.from_numpy(x)).numpy().astype(np.float64)


def _scores(view: str, recon: np.ndarray, truth: np.ndarray, y: np.ndarray, clf: Any) -> Row:
    return {"view": view, "mse": mse(recon, truth), "psnr": psnr(recon, truth),
            "ssim": ssim(recon, truth),
            "classifier_accuracy": float((clf.predict(recon) == y).mean())}


def run_seed(cfg: SplitConfig, seed: int, workdir: Path) -> list[Row]:
    """Every backbone of one seed: train it and the heads, invert features and shares."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    data = split_data(seed, cfg.num_owners, cfg.queries)
    clf = LogisticRegression(max_iter=3000).fit(data.x_public, data.y_public)
    rows: list[Row] = []
    x_aux, xq = data.x_aux, data.x_query
    for depth, width in cfg.backbones:
        key = {"seed": seed, "depth": depth, "width": width, "queries": len(xq),
               "aux_size": len(x_aux)}
        t0 = time.perf_counter()
        torch.manual_seed(seed * 1000 + depth * 100 + width)
        backbone = make_backbone(depth, width)
        probe = nn.Linear(width, 10)
        _fit(nn.Sequential(backbone, probe), torch.from_numpy(data.x_public),
             torch.from_numpy(data.y_public), nn.functional.cross_entropy,
             epochs=cfg.backbone_epochs)
        backbone.eval()
        with torch.no_grad():
            task_acc = float((probe(backbone(torch.from_numpy(xq))).argmax(1).numpy()
                              == data.y_query).mean())
        heads = []
        for k in range(cfg.num_owners):  # each owner's private head on its own shard
            torch.manual_seed(seed * 1000 + k)
            head = nn.Linear(width, 10)
            _fit(head, torch.from_numpy(_features(backbone, data.x_owners[k]).astype(np.float32)),
                 torch.from_numpy(data.y_owners[k]), nn.functional.cross_entropy, epochs=200)
            heads.append(head)
        f_aux, f_q = _features(backbone, x_aux), _features(backbone, xq)
        base = {**key, "task_accuracy": task_acc, "train_seconds": time.perf_counter() - t0}
        # split deployment: the owner decodes the plaintext features it is sent
        inv = train_inverter(f_aux, x_aux, seed=seed, hidden=cfg.inverter_hidden,
                             epochs=cfg.inverter_epochs)
        with torch.no_grad():
            recon = inv(torch.from_numpy(f_q.astype(np.float32))).numpy()
        rows.append({**base, **_scores("features", recon, xq, data.y_query, clf)})
        rows.append({**base, **_scores("mean", np.broadcast_to(x_aux.mean(0), xq.shape), xq,
                                       data.y_query, clf)})
        rows.append({**base, "view": "truth", "classifier_accuracy":
                     float((clf.predict(xq) == data.y_query).mean())})
        if cfg.secure:
            rows.append(_secure(cfg, seed, base, backbone, heads, np.concatenate([x_aux, xq]),
                                np.concatenate([f_aux, f_q]), len(x_aux), x_aux, xq,
                                data.y_query, clf, workdir / f"s{seed}-d{depth}w{width}"))
    return rows


def _secure(cfg: SplitConfig, seed: int, base: Row, backbone: nn.Module, heads: list[nn.Linear],
            x_all: np.ndarray, features: np.ndarray, n_aux: int, x_aux: np.ndarray,
            xq: np.ndarray, yq: np.ndarray, clf: Any, workdir: Path) -> Row:
    """The engine's public-backbone mode (a federation with ``public_backbone``, full mode,
    ``soft_vote``, the registered local launcher) with the wire audit on, answering the
    attacker's auxiliary digits and then the queries; owner 0 inverts what the audit shows it
    holds and receives. Returns the ``shares`` row with the audit's evidence."""
    from mpc_fi import audit  # noqa: PLC0415
    from mpc_fi.config import BackboneConfig, FederationConfig, ModelSource, OwnerConfig, \
        ProtocolConfig, QuerierConfig  # noqa: PLC0415
    from mpc_fi.plugins import LAUNCHERS, build_protocol, lookup  # noqa: PLC0415
    from scipy import stats  # noqa: PLC0415

    workdir.mkdir(parents=True, exist_ok=True)
    depth, width = base["depth"], base["width"]
    torch.save(backbone.state_dict(), workdir / "backbone.pt")
    owners = []
    for k, head in enumerate(heads):  # mpc_fi.demo:head is Sequential(Linear(features, classes))
        torch.save(nn.Sequential(head).state_dict(), workdir / f"head{k}.pt")
        owners.append(OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory="mpc_fi.demo:head", weights=str(workdir / f"head{k}.pt"),
            kwargs={"features": width, "num_classes": 10})))
    fed = FederationConfig(
        owners=tuple(owners), mode="full", protocol=ProtocolConfig(name="soft_vote"),
        querier=QuerierConfig(name="querier", input_range=(0.0, 1.0)),
        public_backbone=BackboneConfig(model=ModelSource(
            factory="studies.split_inference:make_backbone", weights=str(workdir / "backbone.pt"),
            kwargs={"depth": depth, "width": width}), output_range=(0.0, 1.0)))
    row: Row = {**base, "view": "shares"}
    t0 = time.perf_counter()
    try:
        launcher = lookup(LAUNCHERS, "local", key="launcher")(
            fed, run_dir=workdir / "run", timeout_s=cfg.timeout_s, audit=True, keep_run_dir=True)
        results = launcher.run(query=x_all)
    except Exception as exc:  # noqa: BLE001 - a failed run is a row, not a crash
        return {**row, "note": "failed: " + describe_failure(exc)}
    seconds = time.perf_counter() - t0
    ranks = len(fed.party_names)
    logs = {r: audit.load(str(workdir / "run" / f"audit-{r}.npz")) for r in range(ranks)}
    problems = audit.verify(logs, querier=fed.querier_rank, mode="full",
                            dealer=fed.compute_world_size)
    received = sum(_nbytes(rec.data) for r, log in logs.items() if r != 0
                   for rec in log.sent if rec.peer in (0, None))
    opened_x, secrets_x = feature_openings(logs, cfg.num_owners, features.shape)
    if not opened_x:
        return {**row, "note": "no opening of the features found in the audit",
                "audit_problems": len(problems)}
    shares = secrets_x[0][0]  # owner 0's share of the features, as the audit recorded it
    decoded = np.sum(np.stack(secrets_x[0]), axis=0, dtype=np.int64).astype(np.float64) / 2.0 ** 16
    with torch.no_grad():
        logits = [head(torch.from_numpy(features.astype(np.float32))).double() for head in heads]
    twin = np.asarray(build_protocol(fed, num_classes=10).plaintext(logits).labels)
    labels = np.asarray(results[fed.querier_rank]["labels"])
    words = shares.reshape(-1).view(np.uint64).astype(np.float64) / 2.0 ** 64
    # owner 0's whole view of each query's features: its share and the openings of them it
    # receives (one for all heads' first products, masked by fresh dealer material)
    z = encode_shares(np.concatenate([shares, *opened_x], axis=1))
    inv = train_inverter(z[:n_aux], x_aux, seed=seed, hidden=cfg.inverter_hidden,
                         epochs=cfg.inverter_epochs)
    with torch.no_grad():
        recon = inv(torch.from_numpy(z[n_aux:])).numpy()
    return {**row, **_scores("shares", recon, xq, yq, clf),
            "audit_problems": len(problems), "audit_first_problem": problems[0] if problems else "",
            "bytes_to_owner0": received,
            "ks_uniform_p": float(stats.kstest(words, "uniform").pvalue),
            "share_feature_max_abs_r": _max_abs_corr(z[:, :features.shape[1]], features),
            # the same statistic with the queries' order shuffled: its value without dependence
            "share_feature_max_abs_r_null": _max_abs_corr(
                z[:, :features.shape[1]],
                features[np.random.default_rng((seed, 11)).permutation(len(features))]),
            "label_agreement_with_twin": float((labels == twin).mean()),
            "openings_to_owner0": len(opened_x),
            "audited_site_is_features_err": float(np.abs(decoded - features).max()),
            "secure_seconds": seconds}


def feature_openings(logs: dict[int, Any], num_owners: int, shape: tuple[int, ...]
                     ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """From the audit of every computing party: the value each Beaver matrix product opened for
    its ``shape``-d operand (the shared features), as everyone (owner 0 included) receives it,
    the sum of the parties' masked messages modulo 2^64; and each party's share of the secret
    behind it (what the audit recorded), to check that the operand is the features."""
    opened, secrets = [], []
    ranks = range(num_owners + 1)
    sites = {r: [s for s in logs[r].sites if s.kind == "masked" and s.name == "beaver.matmul"]
             for r in ranks}
    for k in range(min(len(v) for v in sites.values())):
        sent, held = [], []
        for r in ranks:
            site = sites[r][k]
            recs = [np.asarray(rec.data) for rec in logs[r].sent
                    if rec.site == site.seq and rec.op == "all_reduce"
                    and tuple(np.shape(rec.data)) == tuple(shape)]
            parts = [p.secret.reshape(shape) for p in site.parts if p.numel == int(np.prod(shape))]
            if len(recs) != 1 or not parts:
                break
            sent.append(recs[0].astype(np.int64))
            held.append(parts[0].astype(np.int64))
        else:
            opened.append(np.sum(np.stack(sent), axis=0, dtype=np.int64))  # wraps mod 2^64
            secrets.append(held)
    return opened, secrets


def _nbytes(data: Any) -> int:
    return len(data) if isinstance(data, (bytes, bytearray)) else int(np.asarray(data).nbytes)


def _max_abs_corr(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |Pearson r| between column j of ``a`` and column j of ``b``."""
    a = (a - a.mean(0)) / (a.std(0) + 1e-12)
    b = (b - b.mean(0)) / (b.std(0) + 1e-12)
    return float(np.abs((a * b).mean(0)).max())


def run_split_inference(cfg: SplitConfig = SplitConfig(), *, show_progress: bool = True
                        ) -> list[Row]:
    """Every seed and backbone; rows in long format (one per view)."""
    torch.set_num_threads(1)
    bar = Progress(len(cfg.seeds), "split-inference", enabled=show_progress)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mpc-fi-split-") as tmp:
        for seed in cfg.seeds:
            rows += run_seed(cfg, seed, Path(tmp))
            bar.step(f"seed {seed}")
    return rows


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def gains_over_mean(rows: Sequence[Row], metric: str = "mse") -> dict[tuple[int, int, str], Any]:
    """(depth, width, view) -> Interval of ``mse(mean) - mse(view)`` paired by seed: > 0 means
    the view's reconstructions are better than the mean image."""
    by: dict[tuple[int, int, str], dict[int, float]] = {}
    for r in rows:
        if metric in r and r["view"] in VIEWS:
            by.setdefault((r["depth"], r["width"], r["view"]), {})[r["seed"]] = r[metric]
    out = {}
    for (d, w, view), vals in by.items():
        ref = by.get((d, w, "mean"), {})
        if view != "mean":
            out[(d, w, view)] = mean_ci(ref[s] - vals[s] for s in vals if s in ref)
    return out


def markdown_report(rows: Sequence[Row]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    backbones = sorted({(r["depth"], r["width"]) for r in rows})
    gains = gains_over_mean(rows)
    table = []
    for d, w in backbones:
        cell = [r for r in rows if (r["depth"], r["width"]) == (d, w)]
        task = mean_ci(r["task_accuracy"] for r in cell if r["view"] == "features")
        truth = mean_ci(r["classifier_accuracy"] for r in cell if r["view"] == "truth")
        for view in VIEWS:
            got = [r for r in cell if r["view"] == view and "mse" in r]
            if not got:
                continue
            g = gains.get((d, w, view))
            gain = "–" if g is None else (f"**{g.short(4)}**" if g.excludes(0.0) else g.short(4))
            table.append([f"{d} x {w}", task.short(), VIEW_TEXT[view],
                          mean_ci(r["mse"] for r in got).short(4), gain,
                          mean_ci(r["psnr"] for r in got).short(2),
                          mean_ci(r["ssim"] for r in got).short(3),
                          mean_ci(r["classifier_accuracy"] for r in got).short(3),
                          truth.short(3)])
    out = [f"Reconstruction of the held-out queries by owner 0 (mean ± half-width of the 95 % "
           f"t-interval over seeds {', '.join(map(str, seeds))}; gain: MSE of the mean image "
           "minus the view's MSE, paired by seed, **bold** when its interval excludes 0).\n\n",
           markdown_table(table, ["backbone (depth x width)", "backbone task acc", "owner decodes",
                                  "MSE", "gain over mean", "PSNR dB", "SSIM",
                                  "classifier acc on recon", "classifier acc on queries"],
                          align="lrlrrrrrr")]
    secure = [r for r in rows if r["view"] == "shares"]
    if secure:
        ev = []
        for d, w in backbones:
            got = [r for r in secure if (r["depth"], r["width"]) == (d, w)]
            ok = [r for r in got if "audit_problems" in r]
            ev.append([f"{d} x {w}", f"{len(ok)}/{len(got)}",
                       sum(r["audit_problems"] for r in ok),
                       fmt(float(np.mean([r["bytes_to_owner0"] for r in ok])) / 1e6, 2)
                       if ok else "–",
                       fmt(min((r["ks_uniform_p"] for r in ok), default=math.nan), 3),
                       fmt(max((r["share_feature_max_abs_r"] for r in ok), default=math.nan), 3)
                       + " / " + fmt(max((r["share_feature_max_abs_r_null"] for r in ok),
                                         default=math.nan), 3),
                       f"{sum(r['openings_to_owner0'] for r in ok) // max(1, len(ok))}",
                       fmt(min((r["label_agreement_with_twin"] for r in ok), default=math.nan), 3),
                       fmt(float(np.mean([r["secure_seconds"] for r in ok])) if ok
                           else math.nan, 1),
                       "; ".join(sorted({r.get("note", "") for r in got} - {""}))])
        out.append("\n**Evidence from the runs on shares** (one audited run per seed and "
                   "backbone: runs ok; problems `mpc_fi.audit.verify` found, summed; MB the other "
                   "parties sent that reach owner 0, mean; smallest KS p-value of owner 0's shares "
                   "against uniform 64-bit words; largest |r| between a feature and the high "
                   "word of owner 0's share of it over every run, then the same with the queries shuffled "
                   "(no dependence); openings of the features owner 0 receives per run (each a "
                   "Beaver product's masked operand, given to its inversion network with its "
                   "shares); smallest agreement of the querier's labels with the plaintext twin's; "
                   "seconds per run).\n\n")
        out.append(markdown_table(ev, ["backbone", "runs ok", "audit problems", "MB to owner 0",
                                       "min KS p", "max abs r (shuffled)", "openings",
                                       "labels = twin (min)", "s", "note"], align="lrrrrrrrrl"))
        pvalues = [r["ks_uniform_p"] for r in secure if "ks_uniform_p" in r]
        if len(pvalues) > 1:
            from scipy import stats  # noqa: PLC0415

            fisher = stats.combine_pvalues(pvalues, method="fisher").pvalue
            out.append(f"\nKS p-values of all {len(pvalues)} runs: median "
                       f"{float(np.median(pvalues)):.3f}, smallest {min(pvalues):.4f}; Fisher's "
                       f"combination of them (one test over every run) p = {fisher:.3f}.\n")
    return "".join(out)
