"""The benchmark suites cannot rot: ``python benchmarks/report.py --grid smoke`` end to end.

Runs the real suite (``benchmarks/``, through ``python -m pytest`` in a subprocess, as
``make bench`` does) on its smallest grid point -- the engine, the direct CrypTen path and the
plaintext ensemble -- then reads the JSON back into the summary table.
"""

from __future__ import annotations

import pytest

import importlib.util
import sys
from pathlib import Path

# The report script lives beside the suites in the checkout, not in the engine package.
_SPEC = importlib.util.spec_from_file_location(
    "mpcfi_bench_report", Path(__file__).resolve().parents[1] / "benchmarks" / "report.py")
cost = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = cost  # dataclasses look their module up there
_SPEC.loader.exec_module(cost)

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
