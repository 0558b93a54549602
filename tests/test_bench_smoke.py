"""The benchmark suites cannot rot: ``mpc-fi bench --grid smoke`` end to end (< 30 s).

Runs the real suite (``benchmarks/``, through ``python -m pytest`` in a subprocess, as
``mpc-fi bench`` does) on its smallest grid point -- the engine, the direct CrypTen path and the
plaintext ensemble -- then reads the JSON back into the summary table.
"""

from __future__ import annotations

import pytest

from mpc_fi import cost

# About a minute: the direct CrypTen path is costly. In make test-all, with the suites.
pytestmark = [pytest.mark.bench, pytest.mark.slow]


def test_smoke_benchmark_runs_and_summarises(tmp_path, capsys):
    if not (cost.SUITE_DIR / "conftest.py").is_file():
        pytest.skip("no source checkout: the benchmark suites are not installed")
    code = cost.bench_main(["--grid", "smoke", "--out", str(tmp_path), "--no-plots",
                            "--timeout", "120"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = cost.load(tmp_path / "bench.json")
    kinds = {row.kind for row in rows}
    assert {"engine", "direct", "plaintext"} <= kinds, out
    engine = next(row for row in rows if row.kind == "engine")
    assert engine.get("agreement") == 1.0  # output mode: equal to the plaintext twin
    assert engine.get("max_rounds") > 0 and engine.get("ratio_max_bytes") is not None
    assert "engine" in (tmp_path / "table.txt").read_text()
