"""The local vs central DP study (issue 13): k-RR, the equal-(epsilon, delta) calibration, and a
tiny end-to-end run.

Tolerances: the k-RR frequencies are checked within 6 standard errors of a binomial proportion
(a false failure about once in 10^8 runs per check); calibrations must fit their budget exactly
(at most epsilon) and miss it by at most a relative 1e-6 (the bisection stops at 1e-9).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpc_fi import BudgetExceededError, ConfigError
from mpc_fi.plugins import PROTOCOLS, registry
from mpc_fi.privacy import PrivacyBudget, epsilon_for, gnmax_cost
from studies import local_dp as ldp
from studies.cli import study_main


def _within(observed: int, total: int, p: float, k_se: float = 6.0) -> bool:
    se = math.sqrt(p * (1 - p) / total)
    return abs(observed / total - p) <= k_se * se


# ---------------------------------------------------------------------------------------
# k-ary randomized response
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon0", [0.1, 1.0, 3.0])
def test_krr_keeps_with_p_and_spreads_the_rest_uniformly(epsilon0):
    k, draws, true = 10, 200_000, 3
    rng = np.random.default_rng(7)
    out = ldp.randomized_response(np.full(draws, true), epsilon0=epsilon0, num_classes=k, rng=rng)
    p = math.exp(epsilon0) / (math.exp(epsilon0) + k - 1)
    counts = np.bincount(out, minlength=k)
    assert counts.sum() == draws and out.min() >= 0 and out.max() < k
    assert _within(counts[true], draws, p)
    for c in range(k):
        if c != true:
            assert _within(counts[c], draws, (1 - p) / (k - 1))


def test_krr_probabilities_are_eps0_ldp_and_match_dp_accounting():
    for k in (2, 10):
        for e0 in (0.01, 0.5, 2.0):
            p = ldp.krr_keep_probability(e0, k)
            q = (1 - p) / (k - 1)
            assert p / q == pytest.approx(math.exp(e0), rel=1e-12)  # the LDP ratio, exactly e^eps0
            r = ldp.krr_noise_parameter(e0, k)  # RandomizedResponseDpEvent's parameter
            assert 1 - r + r / k == pytest.approx(p, rel=1e-12)
            assert r / k == pytest.approx(q, rel=1e-12)


def test_krr_composition_is_the_smaller_valid_bound():
    # one query: the pure bound eps0 is the smaller; many: RDP beats basic composition
    assert ldp.krr_epsilon(epsilon0=0.5, num_classes=10, queries=1, delta=1e-5) == 0.5
    many = ldp.krr_epsilon(epsilon0=0.1, num_classes=10, queries=540, delta=1e-5)
    assert many == ldp.krr_rdp_epsilon(epsilon0=0.1, num_classes=10, queries=540, delta=1e-5)
    assert many < 54.0


def test_debiasing_does_not_change_the_plurality():
    rng = np.random.default_rng(0)
    k, n, e0 = 10, 40, 0.3
    votes = rng.integers(0, k, size=(n, 500))
    noisy = ldp.randomized_response(votes, epsilon0=e0, num_classes=k, rng=rng)
    counts = np.stack([(noisy == c).sum(0) for c in range(k)], -1)
    p = ldp.krr_keep_probability(e0, k)
    q = (1 - p) / (k - 1)
    debiased = (counts - n * q) / (p - q)
    np.testing.assert_array_equal(debiased.argmax(-1), ldp.plurality(noisy, k))


def test_plurality_is_the_hard_vote_twin():
    rng = np.random.default_rng(1)
    logits = [torch.from_numpy(rng.integers(0, 3, size=(200, 4)).astype(np.float64))
              for _ in range(6)]  # many ties, in the logits and in the counts
    votes = np.stack([lg.numpy().argmax(-1) for lg in logits])
    hard = registry(PROTOCOLS)["hard_vote"](num_classes=4, num_owners=6)
    np.testing.assert_array_equal(ldp.plurality(votes, 4), hard.plaintext(logits).labels)


# ---------------------------------------------------------------------------------------
# Calibration: equal (epsilon, delta) per the accountants
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,queries,epsilon", [(5, 540, 4.0), (250, 540, 64.0), (25, 1, 1.0)])
def test_calibration_spends_the_same_epsilon_for_every_mechanism(n, queries, epsilon):
    delta = 1e-5
    cal = ldp.calibrate(epsilon=epsilon, delta=delta, num_owners=n, queries=queries,
                        num_classes=10, ratio=2.0, threshold=float(n // 2 + 1))
    for mech in ("krr", "gnmax", "confident_gnmax"):
        assert epsilon * (1 - 1e-6) <= cal.spent[mech] <= epsilon, mech
    # GNMax's epsilon is the engine's: the std the querier cannot subtract, epsilon_for
    eff = cal.gnmax_sigma * math.sqrt(n / (n + 1))
    assert epsilon_for([gnmax_cost(sigma=eff, queries=queries)], delta=delta) == cal.spent["gnmax"]


def test_the_engine_budget_accepts_the_calibrated_gnmax_and_nothing_noisier_is_needed(tmp_path):
    n, queries, epsilon, delta = 5, 100, 8.0, 1e-5
    sigma = ldp.calibrate_gnmax(epsilon=epsilon, num_owners=n, queries=queries, delta=delta)
    cls = registry(PROTOCOLS)["gnmax"]
    budget = PrivacyBudget(tmp_path / "ledger.json", epsilon=epsilon, delta=delta)
    assert budget.check("q", cls.privacy_cost(params={"sigma": sigma}, num_owners=n,
                                              queries=queries)) <= epsilon
    with pytest.raises(BudgetExceededError):  # a slightly smaller sigma no longer fits
        budget.check("q", cls.privacy_cost(params={"sigma": sigma * 0.999}, num_owners=n,
                                           queries=queries))


def test_config_names_the_option_at_fault():
    with pytest.raises(ConfigError, match="secure-epsilons"):
        ldp.LocalDpConfig(epsilons=(1.0, 4.0), secure_epsilons=(64.0,))
    with pytest.raises(ConfigError, match="owners"):
        ldp.LocalDpConfig(owners=(1,))
    assert ldp.LocalDpConfig().threshold(250) == 126.0  # a strict majority


# ---------------------------------------------------------------------------------------
# End to end (plaintext twins)
# ---------------------------------------------------------------------------------------
TINY = ldp.LocalDpConfig(owners=(3, 6), epsilons=(8.0, 256.0), seeds=(0, 1), queries=60,
                         secure=False)


@pytest.fixture(scope="module")
def tiny_run():
    return ldp.run_local_dp(TINY, show_progress=False)


def test_tiny_run_has_one_row_per_cell_and_mechanism(tiny_run):
    rows, cals = tiny_run
    assert len(cals) == 2 * 2
    plain = [r for r in rows if r["kind"] == "plaintext"]
    refs = [r for r in rows if r["kind"] == "reference"]
    assert len(plain) == 2 * 2 * 2 * len(ldp.MECHANISMS)  # seeds x N x epsilons x mechanisms
    assert len(refs) == 2 * 2 * len(ldp.REFERENCES)
    for r in plain:
        assert {"seed", "owners", "epsilon", "queries", "mechanism", "accuracy", "agreement",
                "answered", "epsilon_charged", "param"} <= set(r)
        assert r["queries"] == 60 and 0 <= r["accuracy"] <= r["answered"] <= 1
        assert r["epsilon_charged"] <= r["epsilon"]
        if r["mechanism"] != "confident_gnmax":
            assert r["answered"] == 1.0
    assert not any(r["kind"] == "secure" for r in rows)


def test_tiny_run_intervals_contain_their_means_and_reproduce(tiny_run):
    rows, _ = tiny_run
    for n in TINY.owners:
        for eps in TINY.epsilons:
            for m in ldp.MECHANISMS:
                for field in ("accuracy", "agreement", "answered"):
                    ci = ldp.interval(rows, "plaintext", m, n, eps, field)
                    assert ci.n == 2 and ci.lo <= ci.mean <= ci.hi
            d = ldp.paired(rows, "gnmax", "krr", n, eps)
            assert d.n == 2 and d.lo <= d.mean <= d.hi
    again, _ = ldp.run_local_dp(ldp.LocalDpConfig(**{**TINY.__dict__, "owners": (3,)}),
                                show_progress=False)
    first = [(r["seed"], r["epsilon"], r["mechanism"], r["accuracy"]) for r in rows
             if r["kind"] == "plaintext" and r["owners"] == 3]
    assert first == [(r["seed"], r["epsilon"], r["mechanism"], r["accuracy"]) for r in again
                     if r["kind"] == "plaintext"]


def test_tiny_run_report(tiny_run):
    text = ldp.markdown_report(*tiny_run)
    for heading in ("**Calibration**", "**Owners**", "**Accuracy**", "**Agreement",
                    "**Confident-GNMax**"):
        assert heading in text
    assert "| 6 | 256 |" in text and "GNMax on shares" not in text


def test_study_main_local_dp_writes_tables(tmp_path, capsys):
    code = study_main(["local-dp", "--owners", "3", "--epsilons", "64", "--seeds", "0",
                       "--queries", "20", "--no-secure", "--no-confident", "--out",
                       str(tmp_path), "--quiet", "--no-plots"])
    assert code == 0
    for name in ("local_dp.csv", "local_dp.md", "local_dp_calibration.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert "k-RR eps0" in capsys.readouterr().out


@pytest.mark.slow
def test_gnmax_on_shares_spends_the_calibrated_budget(tmp_path):
    # Two cells and two runs each: every run must get fresh owner ledgers (owners check their
    # own budgets; shared default ledgers made every run after the first refuse).
    cfg = ldp.LocalDpConfig(owners=(3,), epsilons=(64.0, 256.0), seeds=(0,), queries=30,
                            confident=False, secure_owners=(3,), secure_epsilons=(64.0, 256.0),
                            secure_repeats=2)
    rows, _ = ldp.run_local_dp(cfg, show_progress=False)
    secure = [r for r in rows if r["kind"] == "secure"]
    assert len(secure) == 4 and all("accuracy" in r for r in secure), secure
    for r in secure:
        assert r["epsilon"] * (1 - 1e-6) <= r["epsilon_charged"] <= r["epsilon"]
        assert 0 <= r["accuracy"] <= 1
    assert "GNMax on shares" in ldp.markdown_report(rows, _)


def test_paired_difference_against_the_reference_ignores_epsilon(tiny_run):
    rows, _ = tiny_run
    d = ldp.paired(rows, "gnmax", "non_private", 3, 8.0, kind_b="reference")
    per_seed = [next(r["accuracy"] for r in rows if r["kind"] == "plaintext" and r["seed"] == s
                     and r["owners"] == 3 and r["epsilon"] == 8.0 and r["mechanism"] == "gnmax")
                - next(r["accuracy"] for r in rows if r["kind"] == "reference" and r["seed"] == s
                       and r["owners"] == 3 and r["mechanism"] == "non_private")
                for s in TINY.seeds]
    assert d.n == 2 and d.mean == pytest.approx(float(np.mean(per_seed)))
