"""The owners' defences of the contribution protocol (studies.owner_defences), on shares.

Tolerances: the noise on shares is drawn fresh from each party's CSPRNG, so it is compared with
the twin's by distribution (two-sample Kolmogorov-Smirnov at 2,000 draws, refused below
p = 1e-3: a false alarm in one run out of a thousand). Counts without noise are exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpc_fi.errors import BudgetExceededError, ProtocolError
from studies import contribution as contrib
from studies import owner_defences as od
from studies import valuation_leakage as vleak
from studies.runner import run_parties

SIGMA = 3.0
DRAWS = 2000


def _noise_party(rank: int, payload: dict) -> list[float] | None:
    """Shared zero counts (precision 0) through the noisy opening; the querier's values."""
    from mpc_fi import runtime
    from protocols.noise import SystemNoise

    session = runtime.current()
    zeros = session.crypten.cryptensor(torch.zeros(DRAWS, dtype=torch.long), src=0, precision=0)
    noisy = od.noisy_counts_on_shares(zeros, SIGMA, SystemNoise(), 16)
    opened = noisy.get_plain_text(dst=payload["querier"])
    return opened.tolist() if rank == payload["querier"] else None


def _key_party(rank: int, payload: dict) -> list[int]:
    from mpc_fi import runtime

    return od.sample_indices(od.joint_key(runtime.current()), 50, 10).tolist()


# ---------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------
def test_sample_indices_depend_on_the_key_only_and_cover_the_pool():
    a = od.sample_indices(b"k" * 32, 100, 30)
    assert np.array_equal(a, od.sample_indices(b"k" * 32, 100, 30))
    assert len(set(a.tolist())) == 30 and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, od.sample_indices(b"j" * 32, 100, 30))
    hits = np.zeros(20)
    for i in range(400):
        hits[od.sample_indices(i.to_bytes(32, "big"), 20, 5)] += 1
    assert hits.sum() == 2000 and hits.min() > 50 and hits.max() < 150  # 100 expected each
    with pytest.raises(ProtocolError, match="cannot sample"):
        od.sample_indices(b"k" * 32, 10, 11)


def test_a_reveal_that_does_not_match_its_commitment_is_named():
    import hashlib

    seeds = [bytes([i]) * 32 for i in range(3)]
    commits = [hashlib.sha256(s).hexdigest() for s in seeds]
    key = od.check_reveals(commits, [s.hex() for s in seeds], ["a", "b", "c"])
    assert key == od.combine_reveals(seeds)
    with pytest.raises(ProtocolError, match="b revealed"):
        od.check_reveals(commits, [seeds[0].hex(), seeds[2].hex(), seeds[2].hex()],
                         ["a", "b", "c"])


def test_twin_noise_reproduces_from_a_seed_and_has_std_sigma():
    a = od.twin_noise((4000,), SIGMA, np.random.default_rng(5), parties=4)
    b = od.twin_noise((4000,), SIGMA, np.random.default_rng(5), parties=4)
    assert np.array_equal(a, b)
    assert abs(a.mean()) < 4 * SIGMA / math.sqrt(4000)
    assert abs(a.std() / SIGMA - 1) < 0.05


def test_a_run_is_priced_as_k_sensitivity_one_gaussians():
    from mpc_fi.privacy import epsilon_for, gnmax_cost

    # K counts of sensitivity 1 at sigma: the RDP curve of one Gaussian with L2 sensitivity
    # sqrt(K), i.e. noise multiplier sigma / sqrt(K)
    k, sigma = 7, 20.0
    eps = od.epsilon_of_runs(k, sigma, 1, delta=1e-5)
    same = epsilon_for([gnmax_cost(sigma=sigma * math.sqrt(2) / math.sqrt(k), queries=1)],
                       delta=1e-5)
    assert math.isclose(eps, same, rel_tol=1e-9)
    w = vleak.ValuationOracle.__new__(vleak.ValuationOracle)  # the twin's oracle prices alike
    w.sigma, w.delta, w.coalitions = sigma, 1e-5, np.zeros((k, 3))
    assert math.isclose(w.epsilon_per_run(), eps, rel_tol=1e-12)
    assert od.epsilon_of_runs(k, sigma, 0, delta=1e-5) == 0.0


# ---------------------------------------------------------------------------------------
# on shares
# ---------------------------------------------------------------------------------------
def test_joint_noise_on_shares_has_the_twins_distribution():
    from scipy.stats import kstest

    out = run_parties(_noise_party, [{"querier": 2}] * 3, timeout_s=120)
    shares = np.asarray(out[2])
    twin = od.twin_noise((DRAWS,), SIGMA, np.random.default_rng(0), parties=3)
    assert kstest(shares, twin).pvalue > 1e-3
    assert kstest(shares, "norm", args=(0.0, SIGMA)).pvalue > 1e-3
    assert np.mean(shares == np.round(shares)) < 0.01  # real numbers, not rounded counts


def test_the_parties_agree_on_a_sample_none_of_them_chose():
    out = run_parties(_key_party, [None] * 3, timeout_s=120)
    assert out[0] == out[1] == out[2] and len(set(out[0])) == 10
    again = run_parties(_key_party, [None] * 3, timeout_s=120)
    assert again[0] != out[0]  # a fresh key each run (equal with probability 1/C(50, 10))


@pytest.fixture(scope="module")
def federation3(tmp_path_factory):
    import demos as demo

    torch.set_num_threads(1)
    return demo.prepare(tmp_path_factory.mktemp("owners"), num_owners=3, alpha=0.5, seed=0)


def test_noisy_counts_on_a_sampled_set_and_the_budget(federation3, tmp_path):
    s = federation3
    sources = [o.model for o in s.federation.owners]
    coal = contrib.all_coalitions(3)
    x, y = s.x_test[:80], s.y_test[:80]
    ledgers = [tmp_path / f"owner{i}.json" for i in range(3)]
    one, two = (od.epsilon_of_runs(len(coal), SIGMA, r, delta=1e-5) for r in (1, 2))
    budget = ((one + two) / 2, 1e-5)  # one run fits, a second does not
    vals = contrib.secure_coalition_values(sources, x, y, coal, sample=40, min_pool=60,
                                           count_sigma=SIGMA, ledgers=ledgers, budget=budget,
                                           timeout_s=300)
    assert vals.sample is not None and len(vals.sample) == 40 and vals.agreement_units is None
    units = contrib.encoded_contributions(
        registry_soft_vote(), [m(torch.as_tensor(x[vals.sample])).double() for m in s.models])
    exact = contrib.plaintext_coalition_values(units, y[vals.sample], coal,
                                               [torch.zeros(40)] * 3).correct
    assert np.all(np.abs(vals.correct - exact) < 6 * SIGMA)
    assert not np.array_equal(vals.correct, np.round(vals.correct))
    from mpc_fi.privacy import PrivacyBudget

    def charges() -> list[int]:
        return [len(PrivacyBudget(p, epsilon=budget[0], delta=1e-5).history("name:querier"))
                for p in ledgers]

    assert charges() == [1, 1, 1]
    with pytest.raises(BudgetExceededError, match="exceed its privacy budget"):
        contrib.secure_coalition_values(sources, x, y, coal, sample=40, count_sigma=SIGMA,
                                        ledgers=ledgers, budget=budget, timeout_s=300)
    assert charges() == [1, 1, 1]  # refused at the check: nothing charged, nothing opened


def registry_soft_vote():
    from mpc_fi.plugins import PROTOCOLS, registry

    return registry(PROTOCOLS)["soft_vote"](num_classes=10, num_owners=3)


def test_owners_refuse_a_small_pool_and_too_little_noise(federation3):
    s = federation3
    sources = [o.model for o in s.federation.owners]
    with pytest.raises(contrib.ValidationRefusedError, match="pool of 30.*at least 50"):
        contrib.secure_coalition_values(sources, s.x_test[:30], s.y_test[:30],
                                        contrib.all_coalitions(3), sample=20,
                                        min_pool=[1, 50, 1], min_count_sigma=[0, 0, 10],
                                        count_sigma=2.0, timeout_s=120)


# ---------------------------------------------------------------------------------------
# the attacks against the defences (studies.valuation_leakage)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return vleak.build_world("digits", 3, 0.1, 0, workdir=tmp_path_factory.mktemp("vworld"))


def test_the_twin_with_a_seed_reproduces_its_samples_and_noise_exactly(world):
    pool = np.arange(150)
    runs = [vleak.ValuationOracle(world, sample=50, min_pool=100, sigma=10.0, seed=3).run(pool)
            for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    other = vleak.ValuationOracle(world, sample=50, min_pool=100, sigma=10.0, seed=4).run(pool)
    assert not np.array_equal(runs[0], other)
    small = vleak.ValuationOracle(world, sample=50, min_pool=100)
    assert small.run(np.arange(99)) is None and small.refused == 1


def test_mislabelled_padding_passes_a_minimum_size_with_one_run_per_class(world):
    naive = vleak.chosen_subset_attack(vleak.ValuationOracle(world), differencing=False, pad=100,
                                       seed=0)
    guarded = vleak.ValuationOracle(world, min_validation=100)
    padded = vleak.mislabelled_padding_attack(guarded, pad=100, seed=0)
    assert guarded.refused == 0 and guarded.runs == world.num_classes
    # an owner that predicts few classes answers some padding "right" (up to +0.4 here), which
    # does not move the guesses: the same pair accuracy as the naive attack
    assert np.all(padded >= naive - 1e-12)
    res = vleak.attack_success(padded, world.class_counts, 5)
    assert res["pair_accuracy"] >= 0.9 > res["trivial_accuracy"] and res["spearman"] > 0.6


def test_on_shares_oracle_equals_the_twin_without_noise(world):
    oracle = vleak.SecureValuationOracle(world, min_validation=40, timeout_s=120)
    idx = np.flatnonzero(world.y == 3)
    assert np.array_equal(oracle.run(idx), vleak.ValuationOracle(world).run(idx))
    assert oracle.checked == 1 and oracle.mismatches == 0
    assert oracle.run(idx[:30]) is None and oracle.refused == 1  # below min_validation


def test_on_shares_refuses_two_settings_at_once(tmp_path, capsys):
    from studies.cli import study_main

    code = study_main(["valuation-leakage", "--on-shares", "--owners", "3", "5", "--quiet",
                       "--out", str(tmp_path)])
    assert code != 0 and "--owners" in capsys.readouterr().err


@pytest.mark.slow
def test_before_and_after_on_shares_tiny(tmp_path):
    cfg = vleak.SecureLeakageConfig(seeds=(0,))
    rows = vleak.run_secure_valuation_leakage(cfg, show_progress=False)
    assert {(r["defence"], r["attack"]) for r in rows} == set(vleak.SECURE_SETTINGS)
    shares = {(r["defence"], r["attack"]): r for r in rows if r["where"] == "shares"}
    assert all(r["twin_mismatches"] == 0 for r in shares.values())
    assert shares[("none", "naive")]["twin_checked"] == 10
    capped = shares[("pool+dp+budget", "mislabelled")]
    assert 0 < capped["runs"] - capped["refused"] < capped["runs"]
    assert capped["epsilon_spent"] <= cfg.budget
    assert "runs = twin" in vleak.markdown_secure_report(rows)
