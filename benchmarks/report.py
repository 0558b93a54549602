"""Benchmark results: run the suites, summarise pytest-benchmark JSON into a table and plots.

:func:`bench_main` is what ``python benchmarks/report.py`` (``make bench``) runs: it starts
``python -m pytest benchmarks/...`` in a subprocess, shows one progress line per benchmark, then
prints the table and writes the plots. It lives beside the suites in the source checkout (the
engine package does not ship them; they are never imported as a package ``benchmarks`` because
CrypTen installs an unrelated top-level package of that name).

Figures are CrypTen's own counters, per party, for the inference phase only: ``rounds`` are
collective calls (not network latency rounds), ``bytes`` are elements x 8 with CrypTen's
per-collective factors (``all_reduce`` x 2). Every engine figure is also given as a ratio to the
direct CrypTen path measured in the same session (``x0.05`` = 20 times fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

#: Where the suites live: this file's own folder.
SUITE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Row:
    """One benchmark of the JSON: a kind (engine, direct, plaintext, ...) at one grid point."""

    kind: str
    case: str
    info: dict[str, Any]
    seconds: float  # pytest-benchmark's mean time of the benchmarked call

    def get(self, key: str, default: Any = None) -> Any:
        return self.info.get(key, default)


def load(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a pytest-benchmark JSON file written by the mpc-fi suites."""
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "kind" not in info:
            continue
        label = info["case"] if info["kind"] != "direct_reference" \
            else f"reference-{info['variant']}"
        rows.append(Row(info["kind"], label, info, float(bench["stats"]["mean"])))
    return rows


# ---------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------
def _kb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:,.1f} KB" if n < 10 * 1024 * 1024 else f"{n / 2**20:,.1f} MB"


def _ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"x{x:.3f}" if x < 0.1 else f"x{x:.2f}"


def table(rows: Sequence[Row]) -> str:
    """One line per grid point and kind; engine lines carry the ratios to the direct path."""
    head = (f"{'grid point':<38} {'kind':<10} {'rounds':>7} {'(q)':>5} {'bytes/party':>12} "
            f"{'wall s':>8} {'RSS MB':>7} {'x rounds':>9} {'x bytes':>9} {'x wall':>8} "
            f"{'agree':>7}")
    lines = [head, "-" * len(head)]
    order = {"plaintext": 0, "direct": 1, "direct_reference": 1, "engine": 2}
    for row in sorted(rows, key=lambda r: (r.case, order.get(r.kind, 9))):
        if row.kind == "argmax":
            continue
        if row.kind == "plaintext":
            lines.append(f"{row.case:<38} {'plaintext':<10} {'-':>7} {'-':>5} {'-':>12} "
                         f"{row.seconds:>8.4f} {'-':>7} {'':>9} {'':>9} {'':>8} {'':>7}")
            continue
        kind = row.kind if row.kind != "direct_reference" else "direct"
        agree = row.get("agreement")
        lines.append(
            f"{row.case:<38} {kind:<10} {row.get('max_rounds', 0):>7} "
            f"{row.get('querier_rounds', '-'):>5} {_kb(row.get('max_bytes')):>12} "
            f"{row.get('max_wall_s', 0.0):>8.3f} {row.get('max_rss_mb', 0.0):>7.0f} "
            f"{_ratio(row.get('ratio_max_rounds')):>9} {_ratio(row.get('ratio_max_bytes')):>9} "
            f"{_ratio(row.get('ratio_max_wall_s')):>8} "
            f"{(f'{agree:.4f}' if agree is not None else '-'):>7}")
    lines.append("rounds/bytes/wall/RSS: the maximum over parties (inference phase); (q): the "
                 "querier's rounds; x ...: engine / direct CrypTen path at the same grid point")
    ablation = [r for r in rows if r.kind == "argmax"]
    if ablation:
        lines += ["", _argmax_table(ablation)]
    return "\n".join(lines)


def _argmax_table(rows: Sequence[Row]) -> str:
    """The argmax ablation, each line also as a ratio to CrypTen's argmax on the same values."""
    head = (f"{'argmax on shares':<44} {'rounds':>7} {'bytes/party':>12} {'wall s':>8} "
            f"{'WAN est s':>10} {'x rounds':>9} {'x bytes':>9}")
    lines = [head, "-" * len(head)]
    base = {(r.get("values"), r.get("classes"), r.get("batch"), r.get("owners")): r
            for r in rows if r.get("method") == "crypten"}
    for r in sorted(rows, key=lambda r: (r.get("values"), r.get("classes"), r.get("batch"),
                                         r.get("owners"), r.case)):
        ref = base.get((r.get("values"), r.get("classes"), r.get("batch"), r.get("owners")))
        xr = r.get("max_rounds") / ref.get("max_rounds") if ref else None
        xb = r.get("max_bytes") / ref.get("max_bytes") if ref else None
        lines.append(f"{r.case:<44} {r.get('max_rounds'):>7} {_kb(r.get('max_bytes')):>12} "
                     f"{r.get('max_wall_s'):>8.3f} {r.get('wan_est_s'):>10.2f} {_ratio(xr):>9} "
                     f"{_ratio(xb):>9}")
    lines.append("x ...: against CrypTen's argmax on the same values (the 'crypten-' line)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------
def plots(rows: Sequence[Row], out_dir: str | os.PathLike[str]) -> list[Path]:
    """PNG plots of whatever the rows cover; returns the files written."""
    import matplotlib  # noqa: PLC0415 - optional, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    measured = [r for r in rows if r.kind in ("engine", "direct")]

    # 1. bytes and rounds per party against the number of owners, per (protocol, mode, C, B)
    series: dict[tuple, dict[str, list[tuple[int, float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in measured:
        key = (r.get("protocol"), r.get("mode"), r.get("classes"), r.get("batch"),
               r.get("workload"))
        series[key][r.kind].append((r.get("owners"), r.get("max_bytes"), r.get("max_rounds")))
    for key, kinds in sorted(series.items(), key=lambda kv: str(kv[0])):
        if not any(len(pts) >= 2 for pts in kinds.values()):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for kind, pts in sorted(kinds.items()):
            pts.sort()
            n = [p[0] for p in pts]
            axes[0].plot(n, [p[1] for p in pts], marker="o", label=kind)
            axes[1].plot(n, [p[2] for p in pts], marker="o", label=kind)
        axes[0].set(xlabel="owners N", ylabel="bytes sent per party (max)", yscale="log")
        axes[1].set(xlabel="owners N", ylabel="rounds per party (max)", yscale="log")
        for ax in axes:
            ax.grid(True, alpha=0.3)
            ax.legend()
        protocol, mode, classes, batch, _ = key
        fig.suptitle(f"{protocol}, {mode} mode, C={classes}, B={batch}: cost against owners")
        fig.tight_layout()
        path = out / f"owners-{protocol}-{mode}-C{classes}-B{batch}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 2. engine / direct ratios for every grid point
    engine = sorted((r for r in rows if r.kind == "engine" and r.get("ratio_max_bytes")),
                    key=lambda r: r.case)
    if engine:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(engine) + 2), 4.5))
        xs = range(len(engine))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], [r.get("ratio_max_rounds") for r in engine], width,
               label="rounds")
        ax.bar([x + width / 2 for x in xs], [r.get("ratio_max_bytes") for r in engine], width,
               label="bytes")
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), [r.case for r in engine], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("engine / direct CrypTen (per party, max)")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / "ratios.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------
# python benchmarks/report.py
# ---------------------------------------------------------------------------------------
_RESULT = re.compile(
    r"::(test_\w+)\[([^\]]+)\]\s+(PASSED|FAILED|ERROR|SKIPPED)(?:.*?\[\s*(\d+)%\])?")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/report.py",
        description="Benchmark every protocol against the direct CrypTen path and plaintext.")
    p.add_argument("--grid", default="quick", choices=("smoke", "quick", "targets", "full"),
                   help="quick (default, minutes): N=3 owners, C=10, B=32, both modes, and the "
                        "argmax ablation; targets: + N in {2,5,8,16}, digits full mode, 10,000 "
                        "queries (about an hour on 2 cores); full: protocol x mode x "
                        "N{2,3,5,8,16} x C{2,10,100} x B{1,32,1024} (many hours)")
    p.add_argument("--protocols", default="soft_vote,hard_vote",
                   help="comma-separated protocols (default: soft_vote,hard_vote)")
    p.add_argument("--out", default=None,
                   help="folder for bench.json, table.txt and plots (default: runs/bench-<time>)")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select cases")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per federation run")
    p.add_argument("--from-json", default=None,
                   help="summarise an existing pytest-benchmark JSON instead of running")
    p.add_argument("--suite", default=str(SUITE_DIR), help="the benchmarks folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _command(args: argparse.Namespace, json_path: Path) -> list[str]:
    suite = Path(args.suite)
    cmd = [sys.executable, "-m", "pytest", str(suite), "--rootdir", str(suite.parent),
           "-p", "no:cacheprovider", "-v", "--benchmark-enable",
           f"--benchmark-json={json_path}", "--benchmark-disable-gc",
           "--bench-grid", args.grid, "--bench-protocols", args.protocols,
           "--bench-timeout", str(args.timeout)]
    if args.keyword:
        cmd += ["-k", args.keyword]
    return cmd


def _run_suite(cmd: list[str], cwd: Path, log_path: Path) -> int:
    start = time.monotonic()
    last = start
    with open(log_path, "w") as log, subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1) as proc:
        for line in proc.stdout or ():  # stdout=PIPE: never None
            log.write(line)
            match = _RESULT.search(line)
            if match:
                test, case, status, pct = match.groups()
                now = time.monotonic()
                print(f"[{(pct or '?'):>3}%] {test.removeprefix('test_'):<16} {case:<40} "
                      f"{status:<8} {now - last:6.1f} s", flush=True)
                last = now
            elif line.startswith(("FAILED", "ERROR", "E   ")) or "Error" in line[:40]:
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    print(f"suite finished in {time.monotonic() - start:.0f} s (exit code {code}); log: {log_path}")
    return code


def bench_main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark suites (or read ``--from-json``), print the table, write the plots."""
    args = _parser().parse_args(argv)
    if args.from_json:
        json_path = Path(args.from_json)
        out = Path(args.out) if args.out else json_path.parent
        code = 0
    else:
        suite = Path(args.suite)
        if not (suite / "conftest.py").is_file():
            print(f"report.py: no benchmark suite at {suite}; pass --suite PATH", file=sys.stderr)
            return 2
        out = Path(args.out or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")).resolve()
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / "bench.json"
        cmd = _command(args, json_path)
        print("running: " + " ".join(cmd), flush=True)
        code = _run_suite(cmd, suite.parent, out / "pytest.log")
        if not json_path.is_file():
            print("report.py: the suite wrote no results", file=sys.stderr)
            return code or 1
    rows = load(json_path)
    text = table(rows)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text + "\n")
    if not args.no_plots:
        for path in plots(rows, out):
            print(f"plot: {path}")
    print(f"results: {json_path}")
    return code


if __name__ == "__main__":
    sys.exit(bench_main())
