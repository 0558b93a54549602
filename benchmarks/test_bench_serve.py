"""Warm calls: per-call latency and throughput of a served session, beside the cold call.

Each case starts a long-lived local federation (``Federation(cfg).start()``: 3 or 16 owners +
querier + TTP dealer, loopback, transport ``zmq`` unless the case says ``curve``; the dealer
prepares each call's material between calls unless the case says ``online-dealer``), answers one
warm-up request, then times ``CALLS`` requests of 1 query and ``CALLS`` of 32 queries, and
(output mode) a few of 1,024 queries for throughput. The cold call of the same case -- a
one-shot ``Federation(cfg).run`` of 32 queries, every process started for it -- is measured
in the same test. ``extra_info``: p50/p95 per size, queries/s at B=1024, cold-call wall time;
every answer is checked against the plaintext twin.

    .venv/bin/python -m pytest benchmarks/test_bench_serve.py --benchmark-enable -s \\
        --benchmark-json=benchmarks/results/serve.json
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

import mpcfi_bench as mb

CALLS = 30
SMOKE = "output-soft-N3"  # the one case of the smoke grid (3 calls per size)
#: name: (case, transport, the dealer prepares each call's material between calls)
CASES = {
    "output-hard-N3": (mb.Case("hard_vote", "output", 3, 10, 1024), "zmq", True),
    "output-soft-N3": (mb.Case("soft_vote", "output", 3, 10, 1024), "zmq", True),
    "output-soft-N3-curve": (mb.Case("soft_vote", "output", 3, 10, 1024), "curve", True),
    "output-soft-N16": (mb.Case("soft_vote", "output", 16, 10, 1024), "zmq", True),
    "full-soft-N3-digits": (mb.Case("soft_vote", "full", 3, 10, 32, workload="digits"), "zmq",
                            True),
    "full-soft-N3-digits-online-dealer": (
        mb.Case("soft_vote", "full", 3, 10, 32, workload="digits"), "zmq", False),
}


def _percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


@pytest.mark.parametrize("name", list(CASES))
def test_warm_calls(benchmark, name, bench_dir: Path, bench_timeout, bench_grid):
    from mpc_fi import Federation

    if bench_grid == "smoke" and name != SMOKE:
        pytest.skip(f"the smoke grid runs {SMOKE} only")
    calls = 3 if bench_grid == "smoke" else CALLS
    case, transport, prefetch = CASES[name]
    wl = mb.workload(case, bench_dir / f"serve-{name}")
    fed = dataclasses.replace(wl.federation, batch_size=None, network=dataclasses.replace(
        wl.federation.network, transport=transport, prefetch=prefetch))
    x = np.asarray(wl.x, dtype=np.float32)
    twin = np.asarray(mb.plaintext_labels(dataclasses.replace(case), wl))
    if len(x) < 32:
        raise RuntimeError(f"{name}: the workload has {len(x)} queries, 32 are needed")

    t0 = time.perf_counter()
    cold = Federation(fed, timeout_s=bench_timeout).run(x[:32])
    cold_s = time.perf_counter() - t0
    np.testing.assert_array_equal(cold.prediction.labels, twin[:32])

    figures: dict[str, float] = {}
    with Federation(fed, timeout_s=bench_timeout).start() as served:
        served.predict(x[:32])  # warm-up: the session's one-time set-up happens here
        sizes = {"1": x[:1], "32": x[:32]}
        for label, batch in sizes.items():
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                labels = served.predict(batch)
                times.append(time.perf_counter() - t)
                np.testing.assert_array_equal(labels, twin[:len(batch)])
            figures[f"p50_{label}_s"], figures[f"p95_{label}_s"] = _percentiles(times)
        if case.mode == "output" and len(x) >= 1024:
            big = x[:1024]

            def throughput_call() -> None:
                np.testing.assert_array_equal(served.predict(big), twin[:1024])

            benchmark.pedantic(throughput_call, rounds=5, warmup_rounds=1)
            figures["queries_per_s_b1024"] = 1024 / benchmark.stats.stats.median
        else:
            benchmark.pedantic(lambda: served.predict(x[:32]), rounds=5, warmup_rounds=0)
    benchmark.extra_info.update({"case": case.id, "transport": transport, "prefetch": prefetch,
                                 "cold_call_s": cold_s,
                                 **figures})
    rate = figures.get("queries_per_s_b1024")
    print(f"\n{name} ({case.id}, {transport}): warm p50/p95 1 query "
          f"{figures['p50_1_s'] * 1e3:.1f}/{figures['p95_1_s'] * 1e3:.1f} ms, 32 queries "
          f"{figures['p50_32_s'] * 1e3:.1f}/{figures['p95_32_s'] * 1e3:.1f} ms"
          + (f", {rate:,.0f} queries/s at B=1024" if rate else "")
          + f"; cold call (32 queries, one-shot) {cold_s:.2f} s")
