"""Benchmark suites of mpc-fi (kept out of the default test run: ``testpaths = tests``).

Run them by path, with timing enabled (the project's ``addopts`` disables it)::

    python -m pytest benchmarks --benchmark-enable --benchmark-json=runs/bench.json
    python -m pytest benchmarks --benchmark-enable --bench-grid full     # every grid point

or through ``mpc-fi bench`` (:func:`mpc_fi.cost.bench_main`), which also prints the table and
draws the plots. Helper modules here are imported by file name (this folder is put first on
``sys.path``), never as ``benchmarks.<name>``: CrypTen installs an unrelated ``benchmarks``
package into site-packages.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mpcfi_bench  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mpc-fi benchmarks")
    group.addoption("--bench-grid", default="quick", choices=("smoke", "quick", "targets", "full"),
                    help="grid of the suites (default: quick; see mpcfi_bench.grid)")
    group.addoption("--bench-protocols", default="soft_vote,hard_vote",
                    help="comma-separated protocols of the suite (default: soft_vote,hard_vote)")
    group.addoption("--bench-timeout", type=float, default=900.0,
                    help="seconds allowed to one federation run")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: benchmark suites (run by path)")
    # A terminated session (mpc-fi bench stopped, a CI timeout) still stops the parties it
    # spawned: SystemExit runs the spawner's clean-up and multiprocessing's exit handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        protocols = tuple(p for p in metafunc.config.getoption("--bench-protocols").split(",") if p)
        cases = mpcfi_bench.grid(metafunc.config.getoption("--bench-grid"), protocols)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mpc-fi-bench")


@pytest.fixture(scope="session")
def baselines() -> dict:
    """Direct-CrypTen results by case, shared by the engine benchmarks of the same session."""
    return {}


@pytest.fixture(scope="session")
def bench_grid(request: pytest.FixtureRequest) -> str:
    """The grid asked for (``smoke``: one small point per suite, for `make test-all`)."""
    return request.config.getoption("--bench-grid")


@pytest.fixture(scope="session")
def bench_timeout(request: pytest.FixtureRequest) -> float:
    return request.config.getoption("--bench-timeout")
