"""What the parties' channels cost: W1/W2/W3 over each transport, gloo as the baseline.

``test_transport`` runs ``Federation(config).run(X)`` on the randomness suite's three workloads
(3 owners + querier + TTP dealer, loopback, B=32, C=10; W1 hard voting and W2 soft voting in
output mode, W3 soft voting in full mode) with ``network.transport`` set to

* ``gloo``: torch's plaintext backend (the baseline, measured in the same session);
* ``zmq``: mpc-fi's channels (:mod:`mpc_fi.channel`) without encryption;
* ``curve``: the same, every party authenticated and every message encrypted (CurveZMQ; on
  loopback the launcher makes one-run keys, exactly as it would use identities' keys).

``extra_info``: inference wall time (median over 4 runs after a warm-up, max over parties),
whole-call wall time, rounds and bytes per party, label agreement with the plaintext twin.
Network delays on emulated links: ``tests/launchers/measure_links.py --transports``
(benchmarks/RESULTS.md has both commands and the figures).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import mpcfi_bench as mb

WORKLOADS = {
    "W1": mb.Case("hard_vote", "output", 3, 10, 32),
    "W2": mb.Case("soft_vote", "output", 3, 10, 32),
    "W3": mb.Case("soft_vote", "full", 3, 10, 32),
}


@pytest.mark.parametrize("transport", ["gloo", "zmq", "curve"])
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_transport(benchmark, name, transport, bench_dir: Path, bench_timeout, bench_grid):
    if bench_grid == "smoke" and name != "W1":
        pytest.skip("the smoke grid runs W1 only")
    case = WORKLOADS[name]
    wl = mb.workload(case, bench_dir / f"transport-{name}")
    fed = dataclasses.replace(wl.federation, network=dataclasses.replace(
        wl.federation.network, transport=transport))
    out = mb.timed_federation_runs(benchmark, fed, wl.x, timeout_s=bench_timeout)
    cost = out["cost"]
    if not (out["labels"] == mb.plaintext_labels(case, wl)).all():
        raise RuntimeError(f"{name} over {transport}: labels differ from the plaintext twin")
    benchmark.extra_info.update({
        "workload": name, "transport": transport, "case": case.id,
        "inference_wall_s_median": out["inference_s"], "call_wall_s_median": out["call_s"],
        "max_rounds": cost["max_rounds"], "max_bytes": cost["max_bytes"], "agreement": 1.0})
    print(f"\n{name} ({case.id}) over {transport}: inference {out['inference_s']:.3f} s "
          f"(median of {out['runs']}, max over parties), call {out['call_s']:.2f} s, "
          f"{cost['max_rounds']} rounds, {cost['max_bytes']:,} bytes per party (max)")
