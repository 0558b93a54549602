"""Tests of mpc_fi.privacy: RDP accounting via dp_accounting and the persistent budget ledger."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_fi.errors import BudgetExceededError, ConfigError
from mpc_fi.privacy import (
    DEFAULT_ORDERS,
    LedgerCorruptError,
    PrivacyBudget,
    QueryCost,
    confident_gnmax_cost,
    epsilon_for,
    gnmax_cost,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5


def _library_epsilon(event: dp_accounting.DpEvent, delta: float = DELTA) -> float:
    accountant = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def _ledger_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- accounting


def test_gnmax_matches_library_computed_by_hand():
    # 1000 GNMax answers at sigma=40: Gaussian on a histogram of L2 sensitivity sqrt(2).
    by_hand = dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(40 / math.sqrt(2)), 1000)
    got = epsilon_for([gnmax_cost(sigma=40, queries=1000)], delta=DELTA)
    assert got == pytest.approx(_library_epsilon(by_hand), rel=1e-12)
    assert got == pytest.approx(5.3777, abs=1e-3)  # the value quoted in the docs


def test_confident_gnmax_matches_library_computed_by_hand():
    by_hand = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(150.0), 500),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(40 / math.sqrt(2)), 120),
    ])
    cost = confident_gnmax_cost(threshold_sigma=150, sigma=40, checked=500, answered=120)
    assert epsilon_for([cost], delta=DELTA) == pytest.approx(_library_epsilon(by_hand), rel=1e-12)
    assert _library_epsilon(cost.to_dp_event()) == pytest.approx(_library_epsilon(by_hand),
                                                                 rel=1e-12)


def test_composition_of_batches_equals_one_big_batch():
    split = [gnmax_cost(sigma=30, queries=100), gnmax_cost(sigma=30, queries=250),
             confident_gnmax_cost(threshold_sigma=100, sigma=30, checked=80, answered=10)]
    by_hand = dp_accounting.ComposedDpEvent([c.to_dp_event() for c in split])
    assert epsilon_for(split, delta=DELTA) == pytest.approx(_library_epsilon(by_hand), rel=1e-9)
    merged = [gnmax_cost(sigma=30, queries=360),
              confident_gnmax_cost(threshold_sigma=100, sigma=30, checked=80, answered=0)]
    assert epsilon_for(split, delta=DELTA) == pytest.approx(epsilon_for(merged, delta=DELTA),
                                                            rel=1e-9)


def test_epsilon_monotone_in_queries_and_decreasing_in_sigma():
    by_queries = [epsilon_for([gnmax_cost(sigma=40, queries=q)], delta=DELTA)
                  for q in (1, 10, 100, 1000, 5000)]
    assert all(a < b for a, b in zip(by_queries, by_queries[1:]))
    by_sigma = [epsilon_for([gnmax_cost(sigma=s, queries=500)], delta=DELTA)
                for s in (5, 10, 20, 40, 80, 160)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))


def test_confident_gnmax_abstentions_cost_less_than_answers():
    def eps(answered: int) -> float:
        return epsilon_for([confident_gnmax_cost(threshold_sigma=150, sigma=40, checked=1000,
                                                 answered=answered)], delta=DELTA)
    none, half, every = eps(0), eps(500), eps(1000)
    assert 0 < none < half < every
    # The check is always paid: answering everything costs more than plain GNMax.
    assert every > epsilon_for([gnmax_cost(sigma=40, queries=1000)], delta=DELTA)


def test_nothing_released_costs_exactly_zero():
    assert epsilon_for([], delta=DELTA) == 0.0
    assert epsilon_for([gnmax_cost(sigma=1, queries=0)], delta=DELTA) == 0.0


@pytest.mark.parametrize("call, key", [
    (lambda: gnmax_cost(sigma=0, queries=1), "sigma"),
    (lambda: gnmax_cost(sigma=-1.0, queries=1), "sigma"),
    (lambda: gnmax_cost(sigma=float("nan"), queries=1), "sigma"),
    (lambda: gnmax_cost(sigma=1.0, queries=-1), "queries"),
    (lambda: gnmax_cost(sigma=1.0, queries=2.0), "queries"),
    (lambda: gnmax_cost(sigma=1.0, queries=True), "queries"),
    (lambda: confident_gnmax_cost(threshold_sigma=0, sigma=1, checked=1, answered=0),
     "threshold_sigma"),
    (lambda: confident_gnmax_cost(threshold_sigma=1, sigma=1, checked=1, answered=2), "answered"),
    (lambda: confident_gnmax_cost(threshold_sigma=1, sigma=1, checked=-3, answered=0), "checked"),
    (lambda: QueryCost(gnmax_sigma=None, threshold_sigma=None, answered=1, checked=0),
     "answered"),
    (lambda: QueryCost(gnmax_sigma=1.0, threshold_sigma=None, answered=0, checked=1), "checked"),
    (lambda: epsilon_for([], delta=0), "delta"),
    (lambda: epsilon_for([], delta=1.0), "delta"),
    (lambda: epsilon_for([], delta=1e-5, orders=[0.5, 2]), "orders[0]"),
    (lambda: epsilon_for(["x"], delta=1e-5), "events[0]"),
])
def test_invalid_arguments_raise_config_error_naming_the_argument(call, key):
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.key == key


@settings(max_examples=40, deadline=None)
@given(threshold_sigma=st.floats(0.5, 500), sigma=st.floats(0.5, 500),
       checked=st.integers(0, 10_000), data=st.data())
def test_query_cost_round_trips_through_json(threshold_sigma, sigma, checked, data):
    answered = data.draw(st.integers(0, checked))
    cost = confident_gnmax_cost(threshold_sigma=threshold_sigma, sigma=sigma, checked=checked,
                                answered=answered)
    assert QueryCost.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost


# ----------------------------------------------------------------------------- budget


def test_charges_accumulate_and_reopen_restores_spent(tmp_path):
    path = tmp_path / "ledger.json"
    budget = PrivacyBudget(path, epsilon=10.0, delta=DELTA)
    assert budget.spent("alice") == 0.0 and budget.remaining("alice") == 10.0
    cost = gnmax_cost(sigma=40, queries=200)
    first = budget.charge("alice", cost)
    second = budget.charge("alice", cost)
    assert 0 < first < second
    # Epsilon is recomputed from the whole composition, not summed.
    assert second == pytest.approx(epsilon_for([cost, cost], delta=DELTA))
    assert second < 2 * first
    assert budget.spent("alice") == second
    assert budget.remaining("alice") == pytest.approx(10.0 - second)
    assert budget.spent("bob") == 0.0  # per querier

    reopened = PrivacyBudget(str(path), epsilon=10.0, delta=DELTA)
    assert reopened.spent("alice") == second
    assert reopened.history("alice") == [cost, cost]
    assert reopened.queriers() == ["alice"]


def test_overspending_query_is_refused_and_ledger_unchanged(tmp_path):
    path = tmp_path / "ledger.json"
    budget = PrivacyBudget(path, epsilon=3.0, delta=DELTA)
    small = gnmax_cost(sigma=40, queries=100)
    spent = budget.charge("alice", small)
    before = path.read_bytes()
    big = gnmax_cost(sigma=40, queries=1000)
    would_be = epsilon_for([small, big], delta=DELTA)
    assert would_be > 3.0

    with pytest.raises(BudgetExceededError) as info:
        budget.check("alice", big)
    with pytest.raises(BudgetExceededError) as info2:
        budget.charge("alice", big)
    for message in (str(info.value), str(info2.value)):
        assert "'alice'" in message and "epsilon=3" in message
        assert f"{spent:.6g}" in message and f"{would_be:.6g}" in message
        assert "1000 GNMax answer(s) at sigma=40" in message
    assert path.read_bytes() == before
    assert budget.spent("alice") == spent

    # check() prices without writing; a query that fits is accepted.
    assert budget.check("alice", small) == pytest.approx(epsilon_for([small, small], delta=DELTA))
    assert path.read_bytes() == before
    assert budget.charge("alice", small) > spent


def test_mismatched_budget_on_reopen_raises_config_error(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyBudget(path, epsilon=2.0, delta=DELTA).charge("alice", gnmax_cost(sigma=50, queries=3))
    with pytest.raises(ConfigError, match="epsilon: ledger has 2.0, opened with 4.0") as info:
        PrivacyBudget(path, epsilon=4.0, delta=DELTA)
    assert info.value.key == "epsilon"
    with pytest.raises(ConfigError, match="delta: ledger has 1e-05, opened with 1e-06") as info:
        PrivacyBudget(path, epsilon=2.0, delta=1e-6)
    assert info.value.key == "delta"
    assert not isinstance(info.value, LedgerCorruptError)


@pytest.mark.parametrize("content", [
    b"", b"{not json", b"\xff\xfe", b"[]",
    b'{"format": "something-else", "version": 1}',
    b'{"format": "mpc-fi-privacy-ledger", "version": 1, "epsilon": 2.0, "delta": 1e-05,'
    b' "queriers": {"alice": [{"gnmax_sigma": -1, "threshold_sigma": null,'
    b' "answered": 1, "checked": 0}]}}',
])
def test_corrupt_ledger_raises_clear_error_and_is_not_reset(tmp_path, content):
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    with pytest.raises(LedgerCorruptError, match="corrupt or unreadable.*NOT reset"):
        PrivacyBudget(path, epsilon=2.0, delta=DELTA)
    assert path.read_bytes() == content


def test_ledger_corrupted_after_open_is_detected(tmp_path):
    path = tmp_path / "ledger.json"
    budget = PrivacyBudget(path, epsilon=2.0, delta=DELTA)
    budget.charge("alice", gnmax_cost(sigma=50, queries=3))
    path.write_text(path.read_text()[:40])
    with pytest.raises(LedgerCorruptError):
        budget.spent("alice")
    with pytest.raises(LedgerCorruptError):
        budget.charge("alice", gnmax_cost(sigma=50, queries=3))
    path.unlink()
    with pytest.raises(LedgerCorruptError, match="disappeared"):
        budget.charge("alice", gnmax_cost(sigma=50, queries=3))
    assert not path.exists()


def test_budget_argument_validation(tmp_path):
    with pytest.raises(ConfigError) as info:
        PrivacyBudget(tmp_path / "l.json", epsilon=0, delta=DELTA)
    assert info.value.key == "epsilon"
    with pytest.raises(ConfigError) as info:
        PrivacyBudget(tmp_path / "l.json", epsilon=1.0, delta=1.5)
    assert info.value.key == "delta"
    with pytest.raises(ConfigError) as info:
        PrivacyBudget(tmp_path / "missing" / "l.json", epsilon=1.0, delta=DELTA)
    assert info.value.key == "path"
    budget = PrivacyBudget(tmp_path / "l.json", epsilon=1.0, delta=DELTA)
    with pytest.raises(ConfigError) as info:
        budget.charge("", gnmax_cost(sigma=1, queries=1))
    assert info.value.key == "querier"
    with pytest.raises(ConfigError) as info:
        budget.charge("alice", 0.5)
    assert info.value.key == "cost"


# ----------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_interrupted_write_leaves_old_state(tmp_path, monkeypatch, failing):
    path = tmp_path / "ledger.json"
    budget = PrivacyBudget(path, epsilon=50.0, delta=DELTA)
    cost = gnmax_cost(sigma=40, queries=10)
    budget.charge("alice", cost)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated crash"):
        budget.charge("alice", cost)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert _ledger_json(path)["queriers"]["alice"] == [cost.to_dict()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert budget.charge("alice", cost) == pytest.approx(epsilon_for([cost] * 2, delta=DELTA))


_CHARGE_FOREVER = textwrap.dedent("""
    import sys
    from mpc_fi.privacy import PrivacyBudget, gnmax_cost
    budget = PrivacyBudget(sys.argv[1], epsilon=1e9, delta=1e-5)
    cost = gnmax_cost(sigma=40, queries=1)
    while True:
        budget.charge("alice", cost)
""")


def test_sigkill_while_charging_leaves_old_or_new_state(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyBudget(path, epsilon=1e9, delta=DELTA)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    seen = 0
    for delay in (0.05, 0.23):  # two kills at different points of the loop
        proc = subprocess.Popen([sys.executable, "-c", _CHARGE_FOREVER, str(path)], env=env)
        try:
            deadline = time.monotonic() + 300  # a hang guard: a busy machine starts slowly
            while len(_ledger_json(path)["queriers"].get("alice", [])) < seen + 5:
                assert proc.poll() is None, "charging subprocess died on its own"
                if time.monotonic() > deadline:  # a hang guard, not a speed check
                    pytest.fail("charging subprocess made no progress in 300 s")
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # The file is a complete ledger (old or new state), every record a valid cost.
        data = _ledger_json(path)
        records = data["queriers"]["alice"]
        assert len(records) >= seen + 5
        assert all(QueryCost.from_dict(r) == gnmax_cost(sigma=40, queries=1) for r in records)
        seen = len(records)
        budget = PrivacyBudget(path, epsilon=1e9, delta=DELTA)
        assert budget.spent("alice") == pytest.approx(
            epsilon_for([gnmax_cost(sigma=40, queries=seen)], delta=DELTA))
    # The ledger still accepts charges after the kills (no stale lock).
    assert budget.charge("alice", gnmax_cost(sigma=40, queries=1)) > 0
    assert len(budget.history("alice")) == seen + 1


# ----------------------------------------------------------------------------- concurrency


def _charge_worker(path: str, querier: str, charges: int, start) -> None:
    budget = PrivacyBudget(path, epsilon=1e6, delta=DELTA)
    start.wait()
    for _ in range(charges):
        budget.charge(querier, gnmax_cost(sigma=40, queries=1))
        budget.charge("shared", gnmax_cost(sigma=40, queries=1))


def test_concurrent_chargers_lose_no_charge(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyBudget(path, epsilon=1e6, delta=DELTA)
    workers, charges = 4, 15
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_charge_worker, args=(str(path), f"q{i}", charges, start))
             for i in range(workers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * workers

    budget = PrivacyBudget(path, epsilon=1e6, delta=DELTA)
    assert len(budget.history("shared")) == workers * charges
    for i in range(workers):
        assert len(budget.history(f"q{i}")) == charges
    assert budget.spent("shared") == pytest.approx(
        epsilon_for([gnmax_cost(sigma=40, queries=workers * charges)], delta=DELTA))
