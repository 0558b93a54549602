"""End-to-end protocol suite: the engine through its launcher, against two baselines.

For every grid point (protocol x mode x owners N x classes C x batch B):

* ``test_plaintext`` -- the plaintext ensemble (owners' models + the protocol's twin);
* ``test_direct`` -- the direct CrypTen path (:func:`mpcfi_bench.direct_party`);
* ``test_engine`` -- ``Federation(config).run(X)`` with the local launcher.

Each records per-party wall time, communication rounds, bytes sent and peak RSS in
``extra_info`` (from ``RunResult.costs``; inference phase only, CrypTen's counters), and the
engine's figures as ratios to the direct path of the same grid point. Output-mode labels must
equal the plaintext twin's exactly; full-mode label agreement is recorded.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import mpcfi_bench as mb

pytestmark = pytest.mark.bench

_WORKLOADS: dict[str, mb.Workload] = {}


def _workload(case: mb.Case, bench_dir: Path) -> mb.Workload:
    if case.id not in _WORKLOADS:
        wl = mb.workload(case, bench_dir / case.id)
        wl.extra["plain"] = mb.plaintext_labels(case, wl)
        _WORKLOADS[case.id] = wl
    return _WORKLOADS[case.id]


def _info(benchmark, kind: str, case: mb.Case, **extra) -> None:
    benchmark.extra_info.update({"kind": kind, "case": case.id, **asdict(case), **extra})


def _direct(case: mb.Case, bench_dir: Path, baselines: dict, timeout_s: float
            ) -> dict | None:
    if case.direct == "none":
        return None
    if case.id not in baselines:
        baselines[case.id] = mb.run_direct(case, _workload(case, bench_dir), bench_dir / case.id,
                                           timeout_s=timeout_s)
    return baselines[case.id]


def test_plaintext(benchmark, case, bench_dir):
    from mpc_fi.plugins import build_protocol

    wl = _workload(case, bench_dir)
    protocol = build_protocol(wl.federation, num_classes=10 if case.workload == "digits"
                              else case.classes)
    x = torch.from_numpy(wl.x)

    def run():
        with torch.no_grad():
            return protocol.plaintext([m(x).to(torch.float64) for m in wl.models]).labels

    labels = benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=1)
    assert np.array_equal(labels, wl.extra["plain"])
    _info(benchmark, "plaintext", case, queries=len(wl.x), max_rounds=0, max_bytes=0)


def test_direct(benchmark, case, bench_dir, baselines, bench_timeout):
    if case.direct == "none":
        pytest.skip("engine-only grid point (no direct baseline)")
    wl = _workload(case, bench_dir)
    result = benchmark.pedantic(
        lambda: mb.run_direct(case, wl, bench_dir / case.id, timeout_s=bench_timeout),
        rounds=1, iterations=1)
    baselines[case.id] = result
    agreement = float(np.mean(result["labels"] == wl.extra["plain"]))
    _info(benchmark, "direct", case, variant=result["variant"], queries=len(wl.x),
          agreement=agreement, **mb.cost_summary(result["costs"]))


def test_engine(benchmark, case, bench_dir, baselines, bench_timeout):
    from mpc_fi.federation import Federation

    wl = _workload(case, bench_dir)
    run = benchmark.pedantic(
        lambda: Federation(wl.federation, timeout_s=bench_timeout,
                           run_dir=bench_dir / case.id / "engine").run(wl.x),
        rounds=1, iterations=1)
    labels = run.prediction.labels
    agreement = float(np.mean(labels == wl.extra["plain"]))
    ours = mb.cost_summary(mb.as_dicts(run.costs))
    baseline = _direct(case, bench_dir, baselines, bench_timeout)
    direct = mb.cost_summary(baseline["costs"]) if baseline else {}
    ratios = {f"ratio_{k}": ours[k] / direct[k] if direct.get(k) else None
              for k in ("max_rounds", "max_bytes", "max_wall_s", "max_rss_mb")}
    extra = {}
    if case.workload == "digits" and wl.y is not None:
        extra["accuracy"] = float(np.mean(labels == wl.y))
    _info(benchmark, "engine", case, queries=len(wl.x), agreement=agreement,
          direct_max_rounds=direct.get("max_rounds"), direct_max_bytes=direct.get("max_bytes"),
          direct_max_wall_s=direct.get("max_wall_s"), **ratios, **ours, **extra)
    if case.mode == "output":  # exact equality with the plaintext twin
        assert np.array_equal(labels, wl.extra["plain"])
    elif case.workload == "digits":
        assert agreement >= 0.995


REFERENCE = mb.Case("reference", "output", 3, 10, 32)


@pytest.mark.parametrize("variant", mb.DIRECT_VARIANTS)
def test_direct_reference(benchmark, variant, bench_dir, request):
    """The issue's reference figures: the three direct CrypTen aggregations, N=3, C=10, B=32."""
    if request.config.getoption("--bench-grid") == "smoke":
        pytest.skip("reference figures are part of the quick and full grids")
    case = mb.Case("soft_vote", "output", 3, 10, 32)
    wl = _workload(case, bench_dir)
    result = benchmark.pedantic(lambda: mb.run_direct(case, wl, bench_dir / "reference", variant),
                                rounds=1, iterations=1)
    _info(benchmark, "direct_reference", REFERENCE, variant=variant,
          **mb.cost_summary(result["costs"]))
