"""Figures of the studies (matplotlib with the Agg backend, imported only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import Row

DPI = 72  # small files for docs/study


def _pyplot() -> Any:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def noniid_plots(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """One figure per (data set, model): accuracy vs alpha, one panel per N."""
    from .noniid import summarise  # noqa: PLC0415

    plt = _pyplot()
    summary = summarise(rows)
    secure = [r for r in rows if r["kind"] == "secure" and "accuracy" in r]
    paths = []
    for combo in sorted({(c[0], c[1]) for c in summary}):
        ns = sorted({c[2] for c in summary if (c[0], c[1]) == combo})
        fig, axes = plt.subplots(1, len(ns), figsize=(4.2 * len(ns), 3.6), sharey=True,
                                 squeeze=False)
        systems = sorted({s for c, v in summary.items() if (c[0], c[1]) == combo for s in v})
        protos = [s for s in systems if s not in ("best_owner", "mean_owner")]
        cmap = plt.get_cmap("tab10" if len(protos) <= 10 else "tab20")
        for ax, n in zip(axes[0], ns):
            cells = sorted(c for c in summary if (c[0], c[1], c[2]) == (*combo, n))
            alphas = [c[3] for c in cells]
            for name, style in (("mean_owner", dict(color="k", ls="--", lw=2)),
                                ("best_owner", dict(color="k", ls=":", lw=2))):
                ax.plot(alphas, [summary[c][name].mean for c in cells],
                        label=name.replace("_", " "), **style)
            for j, p in enumerate(protos):
                vals = [summary[c][p].mean if p in summary[c] else np.nan for c in cells]
                ax.plot(alphas, vals, marker="o", ms=3, lw=1, color=cmap(j), label=p)
                pts = [(r["alpha"], r["accuracy"]) for r in secure if r["system"] == p
                       and (r["dataset"], r["arch"], r["owners"]) == (*combo, n)]
                if pts:
                    ax.scatter(*zip(*pts), marker="s", s=40, facecolors="none",
                               edgecolors=[cmap(j)], zorder=5)
            ax.set_xscale("log")
            ax.set_xlabel("Dirichlet alpha (log; small = non-IID)")
            ax.set_title(f"{combo[0]}, {combo[1]}, N={n}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy on held-out split")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   title="squares: single runs on shares", title_fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"noniid_{combo[0]}_{combo[1]}.png"
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def shapley_plot(reports: Sequence[Any], out_dir: str | Path) -> Path:
    """Grouped bars per federation (the first seed of each cell): the two merit measures
    (clipped Shapley, own accuracy) vs each label-free reward share."""
    plt = _pyplot()
    first = min(rep.extra.get("seed", 0) for rep in reports)
    reports = [rep for rep in reports if rep.extra.get("seed", 0) == first]
    k = len(reports)
    cols = min(3, k)
    rows_ = -(-k // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.2 * rows_), squeeze=False)
    series = (("Shapley merit (clipped)", "shapley", "k"), ("own-accuracy merit", "own_accuracy",
                                                           "0.45"),
              ("equal", "equal", "0.8"), ("agreement", "agreement", "tab:blue"),
              ("entropy", "entropy", "tab:orange"))
    for ax, rep in zip(axes.flat, reports):
        n = rep.num_owners
        x = np.arange(n)
        w = 0.8 / len(series)
        merits = rep.merits
        for j, (label, key, color) in enumerate(series):
            vals = merits[key] if key in merits else rep.rewards[key]
            ax.bar(x + (j - (len(series) - 1) / 2) * w, vals, w, label=label, color=color)
        ax.set_xticks(x)
        ax.set_xlabel("owner")
        ax.set_title(f"N={n}, alpha={rep.extra['alpha']:g}, seed {first}: L1 to Shapley: eq "
                     f"{rep.fairness['equal']:.2f}, agr {rep.fairness['agreement']:.2f}, "
                     f"ent {rep.fairness['entropy']:.2f}", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    axes[0][0].set_ylabel("share of the reward")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = Path(out_dir) / "shapley_rewards.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def leakage_plot(rows: Sequence[Row], out_dir: str | Path) -> Path:
    """Left: surrogate agreement vs queries; right: membership advantage vs queries/candidate."""
    from .leakage import POLICIES, summary_for_plot  # noqa: PLC0415

    plt = _pyplot()
    s = summary_for_plot(rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = dict(zip(POLICIES, ("tab:red", "tab:orange", "tab:blue", "tab:green")))
    for p in POLICIES:
        pts = sorted((q, v) for (pp, q), v in s["agreement"].items() if pp == p)
        q, mv = zip(*[(q, v[0]) for q, v in pts])
        sd = [v[1] for _, v in pts]
        a1.errorbar(q, mv, yerr=sd, marker="o", ms=3, capsize=2, label=p, color=colors[p])
        pts = sorted((k, v) for (pp, k), v in s["advantage"].items() if pp == p)
        null = sorted((k, v[0]) for (pp, k), v in s["advantage_null"].items() if pp == p)
        if len(pts) == 1:
            a2.axhline(pts[0][1][0], color=colors[p], ls="--", label=f"{p} (1 query)")
            a2.axhline(null[0][1], color=colors[p], ls=":", lw=1)
        else:
            k, mv = zip(*[(k, v[0]) for k, v in pts])
            a2.errorbar(k, mv, yerr=[v[1] for _, v in pts], marker="o", ms=3, capsize=2,
                        label=p, color=colors[p])
            a2.plot(*zip(*null), color=colors[p], ls=":", lw=1)
    a1.set_xscale("log")
    a1.set_xlabel("queries")
    a1.set_ylabel("surrogate agreement with federation label")
    a1.set_title("model extraction")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("queries per candidate (label policies)")
    a2.set_ylabel("membership advantage (TPR - FPR, best threshold)")
    a2.set_title("membership inference on owner 0 (dotted: membership shuffled)", fontsize=9)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "leakage.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def local_dp_plot(rows: Sequence[Row], out_dir: str | Path) -> Path:
    """One panel per N: accuracy vs total epsilon for k-RR (local DP), GNMax and Confident-GNMax
    (central DP), the non-private ensemble, Confident-GNMax's answered rate, and the runs of
    GNMax on shares; error bars are the 95 % intervals over seeds."""
    from .local_dp import MECHANISMS, interval  # noqa: PLC0415

    plt = _pyplot()
    ns = sorted({r["owners"] for r in rows})
    eps = sorted({r["epsilon"] for r in rows if r["kind"] == "plaintext"})
    mechs = [m for m in MECHANISMS if any(r["mechanism"] == m for r in rows)]
    colors = {"krr": "tab:red", "gnmax": "tab:blue", "confident_gnmax": "tab:green"}
    labels = {"krr": "k-RR per owner (local DP)", "gnmax": "GNMax on shares (central DP)",
              "confident_gnmax": "Confident-GNMax (accuracy)"}
    fig, axes = plt.subplots(1, len(ns), figsize=(3.8 * len(ns), 3.6), sharey=True,
                             squeeze=False)

    def bars(cis: Sequence[Any]) -> tuple[list[float], list[float]]:
        return [c.mean for c in cis], [0.0 if np.isnan(c.half) else c.half for c in cis]

    for ax, n in zip(axes[0], ns):
        ref = interval(rows, "reference", "non_private", n, None)
        ax.axhline(ref.mean, color="k", ls="--", lw=1.5, label="non-private ensemble")
        for m in mechs:
            mean, half = bars([interval(rows, "plaintext", m, n, e) for e in eps])
            ax.errorbar(eps, mean, yerr=half, marker="o", ms=3, capsize=2, color=colors[m],
                        label=labels[m])
        if "confident_gnmax" in mechs:
            mean, half = bars([interval(rows, "plaintext", "confident_gnmax", n, e, "answered")
                               for e in eps])
            ax.errorbar(eps, mean, yerr=half, ls=":", marker=".", capsize=2,
                        color=colors["confident_gnmax"], label="Confident-GNMax answered rate")
        sec = sorted({r["epsilon"] for r in rows if r["kind"] == "secure" and r["owners"] == n
                      and "accuracy" in r})
        if sec:
            mean, half = bars([interval(rows, "secure", "gnmax", n, e) for e in sec])
            ax.errorbar(sec, mean, yerr=half, ls="none", marker="s", ms=7, mfc="none",
                        capsize=3, color=colors["gnmax"], label="GNMax, runs on shares")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ε per owner over all queries (log)")
        ax.set_title(f"N={n} owners")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (abstentions wrong) / answered rate")
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in names:
                handles.append(h)
                names.append(lab)
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "local_dp.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def attacks_plot(rows: Sequence[Row], out_dir: str | Path) -> Path | None:
    """Left: LiRA TPR at 1 % FPR per policy and regime; right: label-release student agreement
    against the query budget, one line per query source (means, bars: 95 % half-widths)."""
    from .attacks import POLICIES  # noqa: PLC0415
    from .common import mean_ci  # noqa: PLC0415

    mem = [r for r in rows if r["experiment"] == "membership"]
    ext = [r for r in rows if r["experiment"] == "extraction"]
    if not mem and not ext:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    regimes = list(dict.fromkeys(r["regime"] for r in mem))
    policies = [p for p in POLICIES if any(r["policy"] == p for r in mem)]
    width = 0.8 / max(2 * len(regimes), 1)
    for j, (regime, attack) in enumerate((g, a) for g in regimes for a in ("lira", "global")):
        ci = [mean_ci(r["tpr_at_1pct_fpr"] for r in mem if r["regime"] == regime
                      and r["policy"] == p and r["attack"] == attack) for p in policies]
        xs = np.arange(len(policies)) + (j - len(regimes) + 0.5) * width
        a1.bar(xs, [c.mean for c in ci], width, yerr=[0 if c.n < 2 else c.half for c in ci],
               capsize=2, label=f"{regime}, {attack}", hatch="" if attack == "lira" else "//")
    a1.set_xticks(np.arange(len(policies)), policies, fontsize=8)
    a1.set_ylabel("TPR at 1 % FPR")
    a1.set_title("membership inference on owner 0", fontsize=9)
    a1.grid(alpha=0.3, axis="y")
    a1.legend(fontsize=7)
    for source in dict.fromkeys(r["source"] for r in ext):
        pts = sorted({r["queries"] for r in ext if r["source"] == source})
        ci = [mean_ci(r["agreement"] for r in ext if r["source"] == source
                      and r["policy"] == "label" and r["queries"] == q) for q in pts]
        a2.errorbar(pts, [c.mean for c in ci], yerr=[0 if c.n < 2 else c.half for c in ci],
                    marker="o", ms=3, capsize=2, label=source)
    a2.set_xscale("log")
    a2.set_xlabel("queries")
    a2.set_ylabel("student agreement (label release)")
    a2.set_title("extraction by query source", fontsize=9)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "attacks.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def split_inference_plot(rows: Sequence[Row], out_dir: str | Path) -> Path:
    """MSE and the evaluator's accuracy on the reconstructions, per backbone and view (mean and
    95 % interval over seeds)."""
    from .common import mean_ci  # noqa: PLC0415
    from .split_inference import VIEWS  # noqa: PLC0415

    plt = _pyplot()
    backbones = sorted({(r["depth"], r["width"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(VIEWS)
    labels = {"features": "plaintext features", "shares": "shares + openings",
              "mean": "mean image"}
    for ax, metric, title in ((axes[0], "mse", "MSE of the reconstructions (lower: more leakage)"),
                              (axes[1], "classifier_accuracy",
                               "evaluator accuracy on the reconstructions")):
        for i, view in enumerate(VIEWS):
            stats = [mean_ci(r[metric] for r in rows if r["view"] == view and metric in r
                             and (r["depth"], r["width"]) == b) for b in backbones]
            x = np.arange(len(backbones)) + (i - (len(VIEWS) - 1) / 2) * width
            ax.bar(x, [s.mean for s in stats], width, yerr=[np.nan_to_num(s.half) for s in stats],
                   label=labels[view], capsize=2)
        ax.set_xticks(np.arange(len(backbones)), [f"{d} x {w}" for d, w in backbones])
        ax.set_xlabel("backbone (depth x width)")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "split_inference.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
