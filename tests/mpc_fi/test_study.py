"""The collaboration studies (issues 7 and 13) on tiny settings.

Tolerances: coalition values on shares are integer counts (fixed-point sums are exact and the
argmax is exact), so they must equal the plaintext twin exactly, and so must the Shapley values
computed from them. Efficiency is checked to 1e-12 (floating-point sums of 2**N terms).
"""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
import torch

from mpc_fi import PartyFailedError, ProtocolError
from mpc_fi.plugins import PROTOCOLS, registry
from studies import contribution as contrib
from studies import leakage, noniid
from studies.cli import study_main
from studies import valuation_leakage as vleak
from studies.common import mean_ci, parse_param_overrides, protocol_specs, study_noise
from studies.runner import run_parties


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def values_from(acc: dict[int, float], n: int, m: int = 1000, c: int = 10) -> contrib.CoalitionValues:
    """CoalitionValues of a made-up game (accuracies given per bitmask)."""
    coal = contrib.all_coalitions(n)
    correct = np.array([round(acc[contrib.mask_of(r)] * m) for r in coal])
    z = np.zeros(n, dtype=np.int64)
    return contrib.CoalitionValues(coal, correct, m, c, z, 1, z, z, 16)


def brute_shapley(v: dict[int, float], n: int) -> np.ndarray:
    phi = np.zeros(n)
    perms = list(permutations(range(n)))
    for perm in perms:
        mask = 0
        for i in perm:
            phi[i] += v[mask | 1 << i] - v[mask]
            mask |= 1 << i
    return phi / len(perms)


@pytest.fixture(scope="module")
def federation3(tmp_path_factory):
    import demos as demo

    torch.set_num_threads(1)
    return demo.prepare(tmp_path_factory.mktemp("owners"), num_owners=3, alpha=0.5, seed=0)


# ---------------------------------------------------------------------------------------
# Shapley values: pure functions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4])
def test_exact_shapley_matches_the_permutation_definition(n):
    rng = np.random.default_rng(n)
    acc = {m: float(rng.integers(0, 1000)) / 1000 for m in range(1, 1 << n)}
    values = values_from(acc, n)
    for empty in contrib.EMPTY_VALUES:
        v = {0: values.empty_value(empty), **values.accuracy()}
        phi = contrib.shapley_exact(values, empty=empty)
        np.testing.assert_allclose(phi, brute_shapley(v, n), atol=1e-12)
        assert math.isclose(phi.sum(), v[(1 << n) - 1] - v[0], abs_tol=1e-12)  # efficiency


def test_additive_game_pays_each_owner_its_own_value():
    own = [0.1, 0.25, 0.3, 0.2]
    acc = {m: sum(own[i] for i in range(4) if m >> i & 1) for m in range(1, 16)}
    np.testing.assert_allclose(contrib.shapley_exact(values_from(acc, 4)), own, atol=1e-9)


def test_permutation_estimate_is_within_its_standard_error():
    n = 6
    rng = np.random.default_rng(1)
    acc = {m: float(rng.integers(0, 1000)) / 1000 for m in range(1, 1 << n)}
    values = values_from(acc, n)
    exact = contrib.shapley_exact(values)
    perms = contrib.sample_permutations(n, 400, seed=0)
    est, se = contrib.shapley_permutation(values, perms)
    assert np.all(np.abs(est - exact) <= 4 * se + 1e-12)
    # the sampled coalitions are the distinct prefixes plus every singleton
    coal = contrib.permutation_coalitions(n, perms[:3])
    masks = {contrib.mask_of(r) for r in coal}
    assert {1 << i for i in range(n)} <= masks and (1 << n) - 1 in masks


def test_label_free_rewards_and_fairness():
    coal = contrib.all_coalitions(3)
    v = contrib.CoalitionValues(coal, np.arange(7), 10, 10, np.array([6, 3, 0]), 6,
                                np.array([4, 2, 0]), np.array([2, 1, 1]), 16)
    r = contrib.label_free_rewards(v)
    for split in r.values():
        assert math.isclose(split.sum(), 1.0)
    np.testing.assert_allclose(r["agreement"], [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(r["entropy"], [0.5, 0.25, 0.25])
    assert contrib.l1_fairness(r["equal"], np.array([1.0, 1.0, 1.0])) == pytest.approx(0)
    assert contrib.l1_fairness(np.array([1.0, 0, 0]), np.array([0, 0, 1.0])) == pytest.approx(2)


def test_agreement_twin_splits_each_query_among_agreeing_owners():
    # 2 queries, 3 owners, 2 classes; query 0: all vote class 0; query 1: owners 0, 1 vote 1
    units = [torch.tensor([[9, 1], [1, 9]]), torch.tensor([[9, 1], [2, 8]]),
             torch.tensor([[9, 1], [9, 1]])]
    cert = [torch.zeros(2)] * 3
    v = contrib.plaintext_coalition_values(units, np.array([0, 1]), contrib.all_coalitions(3), cert)
    assert v.agreement_scale == 6
    np.testing.assert_array_equal(v.agreement_units, [2 + 3, 2 + 3, 2])
    np.testing.assert_array_equal(v.agreeing, [2, 2, 1])
    assert v.accuracy()[7] == 1.0 and v.accuracy()[4] == 0.5


def test_only_additive_protocols_can_score_coalitions():
    table = registry(PROTOCOLS)
    contrib.check_additive(table["soft_vote"](num_classes=4, num_owners=3))
    contrib.check_additive(table["hard_vote"](num_classes=4, num_owners=3))
    if "gnmax" in table:
        with pytest.raises(ProtocolError, match="noisy"):
            contrib.check_additive(table["gnmax"](num_classes=4, num_owners=3, sigma=1.0))


# ---------------------------------------------------------------------------------------
# Shapley values on shares
# ---------------------------------------------------------------------------------------
def test_shapley_on_shares_equals_plaintext_exactly(federation3):
    s = federation3
    x, y = s.x_test[:90], s.y_test[:90]
    sources = [o.model for o in s.federation.owners]
    secure = contrib.contribution_scores(s.models, x, y, model_sources=sources, secure=True,
                                         timeout_s=300)
    plain = contrib.contribution_scores(s.models, x, y, secure=False)
    assert secure.twin_equal is True
    np.testing.assert_array_equal(secure.values.correct, plain.values.correct)
    np.testing.assert_array_equal(secure.shapley, plain.shapley)
    for name in contrib.REWARDS:
        np.testing.assert_array_equal(secure.rewards[name], plain.rewards[name])
    # efficiency with v(empty) = 0: the values share out the grand coalition's accuracy
    assert math.isclose(secure.shapley.sum(), secure.grand_accuracy, abs_tol=1e-12)
    chance = contrib.shapley_exact(secure.values, empty="chance")
    assert math.isclose(chance.sum(), secure.grand_accuracy - 0.1, abs_tol=1e-12)
    # the grand coalition is the soft-vote ensemble
    twin = registry(PROTOCOLS)["soft_vote"](num_classes=10, num_owners=3)
    from demos import owner_logits

    labels = twin.plaintext(owner_logits(s.models, x)).labels
    assert secure.grand_accuracy == float((labels == y).mean())


@pytest.mark.slow
def test_permutation_shapley_on_shares_equals_twin(federation3):
    s = federation3
    x, y = s.x_test[:60], s.y_test[:60]
    rep = contrib.contribution_scores(s.models, x, y, secure=True, method="permutation",
                                      permutations=4, protocol="hard_vote",
                                      model_sources=[o.model for o in s.federation.owners])
    assert rep.twin_equal is True and rep.shapley_se is not None


def test_coalition_blocks_give_the_same_counts(federation3):
    s = federation3
    x, y = s.x_test[:40], s.y_test[:40]
    sources = [o.model for o in s.federation.owners]
    coal = contrib.all_coalitions(3)
    # 2 coalitions per argmax block: 4 blocks, singletons and grand coalition in different ones
    blocked = contrib.secure_coalition_values(sources, x, y, coal, max_argmax_rows=80,
                                              protocol="hard_vote", timeout_s=300)
    table = registry(PROTOCOLS)["hard_vote"](num_classes=10, num_owners=3)
    from demos import owner_logits

    logits = owner_logits(s.models, x)
    twin = contrib.plaintext_coalition_values(contrib.encoded_contributions(table, logits), y, coal,
                                              [contrib.certainty(lg) for lg in logits])
    assert contrib.same_values(blocked, twin)


@pytest.mark.slow
def test_a_broken_owner_stops_every_party(federation3, tmp_path):
    import dataclasses

    s = federation3
    sources = [o.model for o in s.federation.owners]
    sources[1] = dataclasses.replace(sources[1], weights=str(tmp_path / "missing.pt"))
    with pytest.raises(PartyFailedError, match="owner1"):
        contrib.secure_coalition_values(sources, s.x_test[:10], s.y_test[:10],
                                        contrib.all_coalitions(3), timeout_s=120)


def _fails_on_rank_1(rank, payload):
    if rank == 1:
        raise RuntimeError("boom")
    return rank


@pytest.mark.slow
def test_runner_names_the_failing_party():
    with pytest.raises(PartyFailedError, match="rank 1"):
        run_parties(_fails_on_rank_1, [None, None, None], timeout_s=120)


# ---------------------------------------------------------------------------------------
# Non-IID study
# ---------------------------------------------------------------------------------------
def test_noniid_tiny_grid_shape_and_ensemble_beats_mean_owner():
    cfg = noniid.NoniidConfig(combos=(("digits", "mlp"),), owners=(3,), alphas=(0.5,),
                              seeds=(0,), protocols=None, secure=None)
    rows = noniid.run_noniid(cfg, show_progress=False)
    names = sorted(registry(PROTOCOLS))
    plaintext = {r["system"]: r for r in rows if r["kind"] == "plaintext"}
    assert sorted(plaintext) == names  # every protocol registered at run time has a row
    assert len([r for r in rows if r["kind"] == "owner"]) == 3
    assert {r["system"] for r in rows if r["kind"] == "summary"} == {"best_owner", "mean_owner"}
    assert len(rows) == 3 + 2 + len(names)
    mean_owner = next(r["accuracy"] for r in rows if r["system"] == "mean_owner")
    assert plaintext["soft_vote"]["accuracy"] > mean_owner + 0.05
    assert plaintext["hard_vote"]["accuracy"] > mean_owner
    report = noniid.markdown_report(rows)
    assert "| 3 | 0.5 |" in report and "soft_vote" in report


@pytest.mark.slow
def test_noniid_secure_cell_agrees_with_twin():
    cfg = noniid.NoniidConfig(combos=(("breast_cancer", "mlp"),), owners=(3,), alphas=(1.0,),
                              protocols=("soft_vote",), secure=noniid.SecureCell(
                                  combos=(("breast_cancer", "mlp"),), owners=(3,), alphas=(1.0,)),
                              secure_queries=60)
    rows = noniid.run_noniid(cfg, show_progress=False)
    sec = [r for r in rows if r["kind"] == "secure"]
    assert len(sec) == 1 and sec[0]["agreement_with_twin"] == 1.0


def test_protocol_parameters():
    assert parse_param_overrides(["gnmax.sigma=2", "top_k.k=3", "x.y=z"]) == {
        "gnmax": {"sigma": 2}, "top_k": {"k": 3}, "x": {"y": "z"}}
    specs = {s.name: s for s in protocol_specs(5, overrides={"soft_vote": {"a": 1}})}
    assert specs["soft_vote"].params == {"a": 1}
    if "confident_vote" in specs:
        assert specs["confident_vote"].params["threshold"] == 3.0  # a strict majority of 5


# ---------------------------------------------------------------------------------------
# Leakage
# ---------------------------------------------------------------------------------------
def test_leakage_label_only_leaks_less_than_full_outputs():
    cfg = leakage.LeakageConfig(budgets=(60,), queries_per_candidate=(1, 4), seeds=(0,),
                                surrogate_epochs=120)
    rows = leakage.run_leakage(cfg, show_progress=False)
    agree = {r["policy"]: r["agreement"] for r in rows if r["experiment"] == "extraction"}
    assert set(agree) == set(leakage.POLICIES)
    margin = 0.02
    assert agree["label"] <= agree["all_outputs"] + margin
    assert agree["label"] <= agree["averaged"] + margin
    assert agree["dp_label"] <= agree["label"] + margin
    mi = [r for r in rows if r["experiment"] == "membership"]
    assert len(mi) == 2 + 2 * 2
    assert all(0 <= r["advantage"] <= 1 and 0 <= r["auc"] <= 1 for r in mi)
    eps = [r["epsilon"] for r in rows if r["policy"] == "dp_label"]
    assert all(e > 0 for e in eps)
    assert "ε (dp_label)" in leakage.markdown_report(rows)


def test_membership_candidates_are_class_matched():
    cfg = leakage.LeakageConfig()
    world = leakage.build_world(cfg, 0)
    x, y, member = leakage.candidates(world, 0, seed=0)
    for c in np.unique(y):
        assert (member & (y == c)).sum() == (~member & (y == c)).sum()


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def test_study_main_leakage_writes_table_csv_and_plot(tmp_path, capsys):
    code = study_main(["leakage", "--budgets", "30", "--queries-per-candidate", "1",
                       "--seeds", "0", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    for name in ("leakage.csv", "leakage.md", "leakage.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Model extraction" in capsys.readouterr().out


def test_study_main_rejects_a_noisy_protocol_for_shapley(tmp_path, capsys):
    if "gnmax" not in registry(PROTOCOLS):
        pytest.skip("no gnmax registered")
    code = study_main(["shapley", "--protocol", "gnmax", "--plaintext", "--owners", "3",
                       "--alphas", "1", "--seeds", "0", "--out", str(tmp_path), "--quiet",
                       "--no-plots"])
    assert code == ProtocolError.exit_code
    assert "soft_vote" in capsys.readouterr().err


def test_study_subcommand_attaches_to_a_parent_cli(tmp_path):
    import argparse

    from studies.cli import add_study_subcommand, run_study

    parent = argparse.ArgumentParser(prog="mpc-fi")
    add_study_subcommand(parent.add_subparsers(dest="command", required=True))
    args = parent.parse_args(["study", "shapley", "--owners", "3", "--alphas", "2", "--plaintext",
                              "--validation", "50", "--seeds", "0", "1", "--out", str(tmp_path),
                              "--quiet", "--no-plots"])
    assert args.func is run_study and args.func(args) == 0
    text = (tmp_path / "shapley.md").read_text()
    assert "shares = twin" in text and "Fairness over seeds" in text and "own acc" in text


def test_study_main_usage_errors():
    with pytest.raises(SystemExit) as exc:
        study_main(["noniid", "--combos", "breast_cancer:cnn"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------
# Statistics (issue 13)
# ---------------------------------------------------------------------------------------
def test_mean_ci_is_the_student_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{4, 0.975} = 2.7764451; s = sqrt(2.5)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert ci.mean == 3.0 and ci.n == 5
    assert ci.lo == pytest.approx(3.0 - half, abs=1e-6) and ci.hi == pytest.approx(3.0 + half, abs=1e-6)
    assert ci.excludes(0.0) and not ci.excludes(3.5)
    assert math.isnan(mean_ci([0.4]).lo) and mean_ci([0.4]).text() == "0.400"
    assert mean_ci([math.nan, 1.0, 1.0]).n == 2


def test_study_noise_reproduces_and_streams_differ():
    a, b = study_noise(3, seed=4), study_noise(3, seed=4)
    np.testing.assert_array_equal(a[1].gaussian((2, 5), 1.0), b[1].gaussian((2, 5), 1.0))
    c = study_noise(3, seed=4, stream=1)
    assert not np.array_equal(c[1].gaussian((2, 5), 1.0).numpy(),
                              study_noise(3, seed=4)[1].gaussian((2, 5), 1.0).numpy())


def test_noniid_dp_twins_reproduce_from_their_seed():
    noisy = [n for n in ("gnmax", "confident_gnmax") if n in registry(PROTOCOLS)]
    if not noisy:
        pytest.skip("no DP protocol registered")
    cfg = noniid.NoniidConfig(combos=(("breast_cancer", "mlp"),), owners=(3,), alphas=(1.0,),
                              seeds=(0, 1), protocols=tuple(noisy), secure=None)
    first = noniid.run_noniid(cfg, show_progress=False)
    again = noniid.run_noniid(cfg, show_progress=False)
    assert [r.get("accuracy") for r in first] == [r.get("accuracy") for r in again]
    gains = noniid.paired_gains(first)
    cell = ("breast_cancer", "mlp", 3, 1.0)
    assert set(gains[cell]) == set(noisy) and all(g.n == 2 for g in gains[cell].values())
    assert "Gain over the best owner" in noniid.markdown_report(first)


# ---------------------------------------------------------------------------------------
# Merit measures and negative Shapley values
# ---------------------------------------------------------------------------------------
def test_negative_shapley_values_earn_nothing_in_the_clipped_merit():
    # owner 2 hurts every coalition it joins: its Shapley value is negative
    own = {1: 0.6, 2: 0.5, 4: 0.1, 3: 0.8, 5: 0.4, 6: 0.3, 7: 0.5}
    values = values_from(own, 3)
    phi = contrib.shapley_exact(values)
    assert phi[2] < 0
    merits = contrib.merit_shares(phi, np.array([0.6, 0.5, 0.1]))
    assert merits["shapley"][2] == 0 and math.isclose(merits["shapley"].sum(), 1.0)
    np.testing.assert_allclose(merits["own_accuracy"], np.array([0.6, 0.5, 0.1]) / 1.2)
    # with the clipped merit every L1 distance stays in [0, 2]
    for reward in (np.array([1, 0, 0.0]), np.array([0, 0, 1.0]), np.full(3, 1 / 3)):
        assert 0 <= contrib.l1_fairness(reward, merits["shapley"]) <= 2


# ---------------------------------------------------------------------------------------
# The contribution protocol's leakage and the owners' defences
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valuation_world():
    torch.set_num_threads(1)
    return vleak.build_world("digits", 3, 0.1, 0)


def test_chosen_subset_attack_reads_the_owners_classes(valuation_world):
    w = valuation_world
    plain = vleak.chosen_subset_attack(vleak.ValuationOracle(w), differencing=False, pad=100,
                                       seed=0)
    res = vleak.attack_success(plain, w.class_counts, holds_min=5)
    assert res["classes_learned"] == w.num_classes
    assert res["pair_accuracy"] >= 0.9 > res["trivial_accuracy"] and res["spearman"] > 0.6
    # the owners' minimum size refuses every single-class run (classes hold ~54 queries) ...
    guarded = vleak.ValuationOracle(w, min_validation=100)
    refused = vleak.chosen_subset_attack(guarded, differencing=False, pad=100, seed=0)
    assert guarded.refused == guarded.runs == w.num_classes and np.isnan(refused).all()
    assert vleak.attack_success(refused, w.class_counts, 5)["pair_accuracy"] == 0.5
    # ... and differencing two padded runs recovers each owner's exact accuracy on the class's
    # examples outside the padding: the same guesses as the naive attack
    adaptive = vleak.chosen_subset_attack(vleak.ValuationOracle(w, min_validation=100),
                                          differencing=True, pad=100, seed=0)
    assert not np.isnan(adaptive).any() and np.abs(adaptive - plain).max() < 0.15
    assert vleak.attack_success(adaptive, w.class_counts, 5)["pair_accuracy"] == \
        res["pair_accuracy"]


def test_dp_counts_are_charged_and_the_budget_stops_the_attack(valuation_world, tmp_path):
    from mpc_fi.privacy import PrivacyBudget

    w = valuation_world
    oracle = vleak.ValuationOracle(w, sigma=50.0, seed=0)
    eps = oracle.epsilon_per_run()
    assert 0 < eps < math.inf
    budget = PrivacyBudget(tmp_path / "ledger.json", epsilon=2.5 * eps, delta=1e-5)
    capped = vleak.ValuationOracle(w, sigma=50.0, budget=budget, seed=0)
    scores = vleak.chosen_subset_attack(capped, differencing=False, pad=100, seed=0)
    answered = capped.runs - capped.refused
    assert 2 <= answered < w.num_classes  # composition: more than 2 runs, fewer than 10
    assert (~np.isnan(scores).any(axis=0)).sum() == answered
    assert budget.spent("querier") <= 2.5 * eps + 1e-9


def test_valuation_leakage_report(valuation_world):
    cfg = vleak.ValuationLeakageConfig(owners=(3,), alphas=(0.1,), seeds=(0,), sigmas=(20.0,),
                                       budget=1.0)
    rows = vleak.run_valuation_leakage(cfg, show_progress=False)
    assert {r["defence"] for r in rows} == set(vleak.DEFENCES)
    text = vleak.markdown_report(rows)
    assert "differencing" in text and "ε spent" in text
    none = next(r for r in rows if r["defence"] == "none")
    assert none["shapley_max_error"] == 0.0


def test_owners_refuse_a_small_validation_set_on_shares(federation3):
    s = federation3
    sources = [o.model for o in s.federation.owners]
    with pytest.raises(contrib.ValidationRefusedError, match="owner1.*at least 20"):
        contrib.secure_coalition_values(sources, s.x_test[:10], s.y_test[:10],
                                        contrib.all_coalitions(3), min_validation=[1, 20, 1],
                                        timeout_s=120)
