"""What collaboration buys under non-IID data: owners vs every registered protocol.

For each cell of the grid (data set, owner model, number of owners ``N``, Dirichlet
concentration ``alpha``, seed) the owners are trained exactly as in :mod:`mpc_fi.demo`
(``demo.prepare``: stratified 70/30 split, Dirichlet(alpha) split of the training part among the
owners, each owner trained on its share) and scored on the held-out 30 %, which the querier holds:

* each owner alone, the best and the mean owner;
* every protocol in the registry **at run time**, through its plaintext twin;
* for a configurable subset of cells and protocols, the same protocol **on shares**, through
  :class:`mpc_fi.Federation` with the local launcher (output mode, TTP dealer), and the label
  agreement of the secure run with its twin (1.0 expected for every protocol without noise).

Differentially private protocols draw noise. Their plaintext twins draw it from
:func:`studies.common.study_noise` (numpy Generators seeded by the cell's seed and the protocol's
name), so every table reproduces from its seeds; on shares the parties draw it from their CSPRNGs
(never seeded), so each DP protocol runs ``secure_repeats`` times per secure cell and is reported
as a mean with its confidence interval over those runs.

Every table reports the mean over seeds with a 95 % Student-t interval
(:func:`studies.common.mean_ci`), and the gain of each protocol over the best owner as a paired
difference per seed (same split, same owners) with its interval.

Weighted protocols get each owner's training-set size as its public weight. Protocols that
require parameters get :func:`studies.common.default_params`; protocols that abstain are
scored with abstentions counted wrong (``accuracy``) and on answered queries only
(``accuracy_answered``, with ``coverage``).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import Progress, Row, accuracy, describe_failure, fmt, markdown_table, mean_ci, \
    mean_std, protocol_specs, study_noise

#: (data set, owner model) pairs of the study: the CNN is for the 8x8 digit images only.
COMBOS: tuple[tuple[str, str], ...] = (("digits", "mlp"), ("digits", "cnn"), ("breast_cancer", "mlp"))


@dataclass(frozen=True)
class SecureCell:
    """Which cells and protocols also run on shares."""

    combos: tuple[tuple[str, str], ...] = (("digits", "mlp"),)
    owners: tuple[int, ...] = (3,)
    alphas: tuple[float, ...] = (0.1, 10.0)
    protocols: tuple[str, ...] | None = None  # None: every registered protocol
    seeds: tuple[int, ...] | None = (0,)  # None: every seed of the grid

    def selects(self, combo: tuple[str, str], n: int, alpha: float, seed: int) -> bool:
        return combo in self.combos and n in self.owners and alpha in self.alphas \
            and (self.seeds is None or seed in self.seeds)


#: every cell and every protocol on shares (``--full-secure``: an hour or more on 2 cores)
FULL_SECURE = SecureCell(combos=COMBOS, owners=(3, 5, 8), alphas=(0.1, 0.3, 1.0, 10.0),
                         seeds=None)


@dataclass(frozen=True)
class NoniidConfig:
    """The grid. Defaults: the issue's full plaintext grid, one seed, a small secure subset."""

    combos: tuple[tuple[str, str], ...] = COMBOS
    owners: tuple[int, ...] = (3, 5, 8)
    alphas: tuple[float, ...] = (0.1, 0.3, 1.0, 10.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    protocols: tuple[str, ...] | None = None  # None: every registered protocol (at run time)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides per protocol
    secure: SecureCell | None = SecureCell()
    secure_queries: int | None = None  # answer only the first N held-out queries on shares
    secure_repeats: int = 5  # runs on shares of each DP protocol per secure cell (fresh noise)
    timeout_s: float = 900.0
    samples: int | None = None  # MNIST-1D examples to generate (None: demos.MNIST1D_SAMPLES)

    def cells(self) -> list[tuple[tuple[str, str], int, float, int]]:
        return [(combo, n, a, s) for combo in self.combos for n in self.owners
                for a in self.alphas for s in self.seeds]


def _labels(pred_labels: Any) -> np.ndarray:
    labels = np.asarray(pred_labels)
    return labels[:, 0] if labels.ndim == 2 else labels  # top-k releases: the top label


def run_cell(combo: tuple[str, str], n: int, alpha: float, seed: int, cfg: NoniidConfig,
             workdir: Path, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Train one cell's owners and score owners and protocols; rows in long format."""
    import demos as demo  # noqa: PLC0415
    from mpc_fi.config import ProtocolConfig  # noqa: PLC0415

    dataset, arch = combo
    key = {"dataset": dataset, "arch": arch, "owners": n, "alpha": alpha, "seed": seed}
    t0 = time.perf_counter()
    setup = demo.prepare(workdir, dataset=dataset, num_owners=n, alpha=alpha, seed=seed, arch=arch,
                         samples=cfg.samples if dataset == "mnist1d" else None)
    x, y = setup.x_test, setup.y_test
    logits = demo.owner_logits(setup.models, x)
    num_classes = int(setup.federation.owners[0].model.kwargs.get("num_classes", y.max() + 1))
    rows: list[Row] = []
    accs = [float((lg.argmax(-1).numpy() == y).mean()) for lg in logits]
    for k, (a, size) in enumerate(zip(accs, setup.owner_sizes)):
        rows.append({**key, "system": f"owner{k}", "kind": "owner", "accuracy": a,
                     "train_size": size})
    rows.append({**key, "system": "best_owner", "kind": "summary", "accuracy": max(accs)})
    rows.append({**key, "system": "mean_owner", "kind": "summary", "accuracy": float(np.mean(accs))})
    train_s = time.perf_counter() - t0
    weights = [float(s) for s in setup.owner_sizes]
    run_secure = cfg.secure is not None and cfg.secure.selects(combo, n, alpha, seed)
    for spec in protocol_specs(n, only=cfg.protocols, overrides=cfg.params):
        base = {**key, "system": spec.name, "dp": spec.differentially_private}
        try:
            proto = spec.build(num_classes=num_classes, num_owners=n, owner_weights=weights)
            noise = study_noise(n + 1, seed, zlib.crc32(spec.name.encode())) \
                if spec.differentially_private else None
            twin = _labels(proto.plaintext(logits, noise_sources=noise).labels)
        except Exception as exc:  # noqa: BLE001 - one protocol's failure is a row, not a crash
            rows.append({**base, "kind": "plaintext", "note": "skipped: " + describe_failure(exc)})
            continue
        acc, acc_ans, cov = accuracy(twin, y)
        rows.append({**base, "kind": "plaintext", "accuracy": acc, "accuracy_answered": acc_ans,
                     "coverage": cov})
        wanted = cfg.secure.protocols if cfg.secure is not None else None
        if not run_secure or (wanted is not None and spec.name not in wanted):
            continue
        if progress:
            progress(f"{dataset}/{arch} N={n} a={alpha:g} {spec.name} on shares")
        fed = dataclasses.replace(
            setup.federation, protocol=ProtocolConfig(name=spec.name, params=dict(spec.params)),
            owners=tuple(dataclasses.replace(o, weight=w)
                         for o, w in zip(setup.federation.owners, weights)))
        xq, yq, tq = x, y, twin
        if cfg.secure_queries:
            xq, yq, tq = x[:cfg.secure_queries], y[:cfg.secure_queries], twin[:cfg.secure_queries]
        repeats = max(1, cfg.secure_repeats) if spec.differentially_private else 1
        for rep in range(repeats):
            t1 = time.perf_counter()
            try:
                from mpc_fi.federation import Federation  # noqa: PLC0415

                got = _labels(Federation(fed, timeout_s=cfg.timeout_s,
                                         run_dir=workdir / f"run-{spec.name}-{rep}"
                                         ).run(xq).prediction.labels)
            except Exception as exc:  # noqa: BLE001
                rows.append({**base, "kind": "secure", "repeat": rep,
                             "note": "failed: " + describe_failure(exc)})
                continue
            acc, acc_ans, cov = accuracy(got, yq)
            rows.append({**base, "kind": "secure", "repeat": rep, "accuracy": acc,
                         "accuracy_answered": acc_ans, "coverage": cov,
                         "agreement_with_twin": float((got == tq).mean()),
                         "queries": len(yq), "seconds": time.perf_counter() - t1,
                         "note": "fresh noise on shares: agreement < 1 expected"
                         if spec.differentially_private else ""})
    for row in rows:
        row.setdefault("train_seconds", train_s)
    return rows


def run_noniid(cfg: NoniidConfig = NoniidConfig(), *, show_progress: bool = True) -> list[Row]:
    """Run the whole grid; every row of every cell (long format)."""
    torch.set_num_threads(1)  # small models; leave the other core to the parties
    cells = cfg.cells()
    bar = Progress(len(cells), "noniid", enabled=show_progress)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mpc-fi-study-") as tmp:
        for i, (combo, n, alpha, seed) in enumerate(cells):
            work = Path(tmp) / f"cell{i}"
            rows += run_cell(combo, n, alpha, seed, cfg, work,
                             progress=(lambda msg: bar.stream.write(f"  ... {msg}\n"))
                             if show_progress else None)
            bar.step(f"{combo[0]}/{combo[1]} N={n} alpha={alpha:g} seed={seed}")
    return rows


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def _per_seed(rows: Sequence[Row]) -> dict[tuple, dict[str, dict[int, float]]]:
    """(dataset, arch, owners, alpha) -> system -> seed -> plaintext accuracy."""
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in rows:
        if r["kind"] not in ("summary", "plaintext") or "accuracy" not in r:
            continue
        cell = (r["dataset"], r["arch"], r["owners"], r["alpha"])
        groups.setdefault(cell, {}).setdefault(r["system"], {})[r["seed"]] = r["accuracy"]
    return groups


def summarise(rows: Sequence[Row]) -> dict[tuple, dict[str, Any]]:
    """(dataset, arch, owners, alpha) -> system -> :class:`~studies.common.Interval` of the
    plaintext accuracy over seeds."""
    return {cell: {sys: mean_ci(v.values()) for sys, v in systems.items()}
            for cell, systems in _per_seed(rows).items()}


def paired_gains(rows: Sequence[Row], reference: str = "best_owner"
                 ) -> dict[tuple, dict[str, Any]]:
    """(cell) -> protocol -> Interval of ``accuracy(protocol) - accuracy(reference)``, paired by
    seed (the same split and owners): the gain's interval, not the difference of two intervals."""
    out: dict[tuple, dict[str, Any]] = {}
    for cell, systems in _per_seed(rows).items():
        ref = systems.get(reference, {})
        out[cell] = {sys: mean_ci(v[s] - ref[s] for s in v if s in ref)
                     for sys, v in systems.items() if sys not in ("best_owner", "mean_owner")}
    return out


def best_protocols(rows: Sequence[Row]) -> dict[tuple, tuple[str, str, Any]]:
    """(cell) -> (best protocol by mean accuracy, runner-up, Interval of their paired gap)."""
    out = {}
    for cell, systems in _per_seed(rows).items():
        protos = {k: v for k, v in systems.items() if k not in ("best_owner", "mean_owner")}
        if len(protos) < 2:
            continue
        ranked = sorted(protos, key=lambda k: -float(np.mean(list(protos[k].values()))))
        a, b = protos[ranked[0]], protos[ranked[1]]
        out[cell] = (ranked[0], ranked[1], mean_ci(a[s] - b[s] for s in a if s in b))
    return out


def markdown_report(rows: Sequence[Row]) -> str:
    """Tables: plaintext accuracy per cell (mean and interval over seeds), paired gains over the
    best owner, the best protocol per cell, abstentions, and the secure runs."""
    summary = summarise(rows)
    gains = paired_gains(rows)
    systems = sorted({s for cell in summary.values() for s in cell}
                     - {"best_owner", "mean_owner"})
    seeds = sorted({r["seed"] for r in rows})
    out = [f"Accuracy on the querier's held-out split (plaintext twins; mean ± half-width of the "
           f"95 % t-interval over seeds {', '.join(map(str, seeds))}; abstentions count as "
           "wrong; DP twins draw seeded noise).\n"]
    for combo in sorted({(c[0], c[1]) for c in summary}):
        table = []
        for cell in sorted(c for c in summary if (c[0], c[1]) == combo):
            s = summary[cell]
            table.append([cell[2], f"{cell[3]:g}", s["best_owner"].short(),
                          s["mean_owner"].short()]
                         + [s[p].short() if p in s else "–" for p in systems])
        out.append(f"\n**{combo[0]}, {combo[1]} owners**\n\n")
        out.append(markdown_table(table, ["N", "alpha", "best owner", "mean owner", *systems]))
    out.append("\n**Gain over the best owner** (each protocol's accuracy minus the best single "
               "owner's, paired by seed: mean ± half-width of the 95 % interval; **bold**: the "
               "interval excludes 0).\n")
    for combo in sorted({(c[0], c[1]) for c in gains}):
        table = []
        for cell in sorted(c for c in gains if (c[0], c[1]) == combo):
            g = gains[cell]
            table.append([cell[2], f"{cell[3]:g}"] + [
                "–" if p not in g else (f"**{g[p].short()}**" if g[p].excludes(0.0)
                                        else g[p].short()) for p in systems])
        out.append(f"\n**{combo[0]}, {combo[1]} owners**\n\n")
        out.append(markdown_table(table, ["N", "alpha", *systems]))
    best = best_protocols(rows)
    if best:
        table = [[f"{c[0]}/{c[1]}", c[2], f"{c[3]:g}", b[0], b[1], b[2].text(),
                  "yes" if b[2].excludes(0.0) else "no"] for c, b in sorted(best.items())]
        out.append("\n**Best protocol per cell** (by mean accuracy) and its paired lead over the "
                   "runner-up (mean [95 % interval]).\n\n")
        out.append(markdown_table(table, ["cell", "N", "alpha", "best", "runner-up", "lead",
                                          "lead excludes 0"], align="lrrllrl"))
    out.append(_coverage_table(rows))
    out.append(_secure_table(rows))
    return "".join(out)


def _secure_table(rows: Sequence[Row]) -> str:
    secure = [r for r in rows if r["kind"] == "secure"]
    if not secure:
        return ""
    twins = {(r["dataset"], r["arch"], r["owners"], r["alpha"], r["seed"], r["system"]): r
             for r in rows if r["kind"] == "plaintext"}
    groups: dict[tuple, list[Row]] = {}
    for r in secure:
        groups.setdefault((r["dataset"], r["arch"], r["owners"], r["alpha"], r["seed"],
                           r["system"]), []).append(r)
    table = []
    for key, runs in groups.items():
        ok = [r for r in runs if "accuracy" in r]
        t = twins.get(key, {})
        notes = sorted({r.get("note", "") for r in runs} - {""})
        table.append([f"{key[0]}/{key[1]}", key[2], f"{key[3]:g}", key[4], key[5],
                      fmt(t.get("accuracy", math.nan)),
                      mean_ci(r["accuracy"] for r in ok).text(),
                      mean_ci(r["agreement_with_twin"] for r in ok).text(),
                      f"{len(ok)}/{len(runs)}", ok[0].get("queries", "") if ok else "",
                      fmt(mean_std(r["seconds"] for r in ok)[0], 1), "; ".join(notes)])
    return ("\n**On shares** (Federation, local launcher, output mode, TTP dealer). DP protocols "
            "run several times with fresh noise: accuracy and agreement are the mean [95 % "
            "interval] over those runs; the twin's accuracy is one seeded draw.\n\n"
            + markdown_table(table, ["cell", "N", "alpha", "seed", "protocol", "twin acc",
                                     "secure acc", "agreement with twin", "runs ok", "queries",
                                     "s (mean)", "note"], align="lrrrlrrrrrrl"))


def _coverage_table(rows: Sequence[Row]) -> str:
    """Accuracy on answered queries and coverage of the protocols that abstain somewhere."""
    plain_rows = [r for r in rows if r["kind"] == "plaintext" and "coverage" in r]
    abstaining = sorted({r["system"] for r in plain_rows if r["coverage"] < 1})
    if not abstaining:
        return ""
    groups: dict[tuple, dict[str, list[tuple[float, float]]]] = {}
    for r in plain_rows:
        if r["system"] in abstaining:
            cell = (r["dataset"], r["arch"], r["owners"], r["alpha"])
            groups.setdefault(cell, {}).setdefault(r["system"], []).append(
                (r["accuracy_answered"], r["coverage"]))
    table = []
    for cell in sorted(groups):
        line = [f"{cell[0]}/{cell[1]}", cell[2], f"{cell[3]:g}"]
        for p in abstaining:
            vals = groups[cell].get(p, [])
            acc = mean_ci(v[0] for v in vals)
            cov = mean_ci(v[1] for v in vals)
            line.append(f"{acc.short()} / {cov.short(2)}")
        table.append(line)
    return ("\n**Abstaining protocols**: accuracy on answered queries / coverage (fraction "
            "answered), each mean ± 95 % half-width over seeds.\n\n"
            + markdown_table(table, ["cell", "N", "alpha", *abstaining]))
