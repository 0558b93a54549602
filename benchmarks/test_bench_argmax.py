"""Argmax ablation: each step of :mod:`mpc_fi.compare` against CrypTen's argmax, same values.

``crypten``: CrypTen's argmax on tie-free values (64-bit comparisons, log-reduction);
``full64``: ours without a value range (64-bit carry-save comparisons, all pairs at once);
``bounded``: only the bits the range allows; ``bounded_lowbits``: also dropping the 16 zero
fractional bits of vote counts; ``-gK``: a forced group size (``g = C`` all pairs at once,
``g = 2`` binary tournament; ``auto`` = the cost model on a LAN). Every run must return the
plaintext argmax (lowest index among equal values). ``wan_est_s`` prices the measured rounds
and bytes on the WAN profile (40 ms a round, 100 Mbit/s) plus the measured wall time.
"""

from __future__ import annotations

import numpy as np
import pytest

import mpcfi_bench as mb

pytestmark = pytest.mark.bench


def pytest_generate_tests(metafunc):
    if "acase" in metafunc.fixturenames:
        cases = mb.argmax_grid(metafunc.config.getoption("--bench-grid"))
        metafunc.parametrize("acase", cases, ids=[c.id for c in cases])


def test_argmax(benchmark, acase, bench_timeout):
    from mpc_fi.compare import WAN

    values, bound = mb.argmax_values(acase)
    results = benchmark.pedantic(
        lambda: mb.spawn(mb.argmax_party, acase.owners + 1, acase, values, bound,
                         timeout_s=bench_timeout),
        rounds=1, iterations=1)
    labels = results[acase.owners]["labels"]
    expected = np.argmax(values, axis=-1)
    summary = mb.cost_summary([r["cost"] for r in results])
    wan = (summary["max_rounds"] * WAN.latency_s + summary["max_bytes"] / WAN.bandwidth_bytes_s
           + summary["max_wall_s"])
    benchmark.extra_info.update({"kind": "argmax", "case": acase.id, "method": acase.method,
                                 "values": acase.kind, "classes": acase.classes,
                                 "batch": acase.batch, "owners": acase.owners,
                                 "group_size": acase.group_size, "wan_est_s": wan,
                                 "agreement": float(np.mean(labels == expected)), **summary})
    assert np.array_equal(labels, expected)
