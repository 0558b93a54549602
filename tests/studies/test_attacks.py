"""The stronger-attacks study (issue 13): LiRA scores, TPR at a fixed FPR, the label-skew
estimator, the query sources, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from studies import attacks as at
from studies.cli import study_main


# ---------------------------------------------------------------------------------------
# TPR at a fixed FPR
# ---------------------------------------------------------------------------------------
def test_tpr_at_fpr_on_a_hand_made_example():
    # 10 non-members scored 0..9, 4 members scored 9.5, 8.5, 5.5, -1
    non = np.arange(10.0)
    mem = np.array([9.5, 8.5, 5.5, -1.0])
    score = np.concatenate([non, mem])
    member = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    # FPR 0: threshold at the top non-member (9): only 9.5 is above
    assert at.tpr_at_fpr(score, member, 0.0) == 0.25
    assert at.tpr_at_fpr(score, member, 0.05) == 0.25  # 0.5 false positives allowed -> none
    # FPR 10 %: one false positive (9) allowed, threshold 8: 9.5 and 8.5 flagged
    assert at.tpr_at_fpr(score, member, 0.1) == 0.5
    # FPR 40 %: threshold 5: 5.5 flagged too
    assert at.tpr_at_fpr(score, member, 0.4) == 0.75
    assert at.tpr_at_fpr(score, member, 1.0) == 1.0


def test_tpr_at_fpr_counts_ties_with_a_non_member_against_the_attacker():
    score = np.array([1.0, 1.0, 0.0, 0.0])
    member = np.array([True, False, False, False])
    assert at.tpr_at_fpr(score, member, 0.0) == 0.0


def test_tpr_at_fpr_agrees_with_the_roc_curve():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    member = rng.random(2000) < 0.5
    score = rng.normal(member * 1.0, 1.0)  # continuous: no ties
    fpr, tpr, _ = roc_curve(member, score)
    for target in (0.001, 0.01, 0.1):
        assert at.tpr_at_fpr(score, member, target) == pytest.approx(tpr[fpr <= target].max())


# ---------------------------------------------------------------------------------------
# LiRA
# ---------------------------------------------------------------------------------------
def _toy(separation: float, seed: int = 0):
    """Per-example statistics: a random example offset plus ``separation`` when a member."""
    rng = np.random.default_rng(seed)
    m, shadows, targets = 500, 16, 4
    offset = rng.normal(0.0, 3.0, m)  # per-example difficulty: hides membership from a global threshold
    s_in = rng.random((shadows, m)) < 0.5
    t_in = rng.random((targets, m)) < 0.5
    shadow = offset + separation * s_in + rng.normal(0.0, 0.1, (shadows, m))
    target = offset + separation * t_in + rng.normal(0.0, 0.1, (targets, m))
    return shadow, s_in, target, t_in


def test_lira_separates_members_at_low_fpr_where_a_global_threshold_cannot():
    shadow, s_in, target, t_in = _toy(separation=1.0)
    score = at.lira_scores(shadow, s_in, target)
    assert score.shape == target.shape
    assert at.tpr_at_fpr(score.ravel(), t_in.ravel(), 0.001) > 0.95
    # the same statistic thresholded globally is drowned by the per-example offsets
    assert at.tpr_at_fpr(target.ravel(), t_in.ravel(), 0.01) < 0.2


def test_lira_is_at_chance_when_membership_changes_nothing():
    shadow, s_in, target, t_in = _toy(separation=0.0)
    m = at.mia_metrics(at.lira_scores(shadow, s_in, target).ravel(), t_in.ravel())
    assert abs(m["auc"] - 0.5) < 0.05
    assert m["tpr_at_1pct_fpr"] < 0.05


def test_lira_falls_back_when_no_shadow_saw_an_example():
    shadow = np.array([[1.0, 0.0], [3.0, 0.0]])
    s_in = np.array([[True, False], [True, False]])  # example 1: never in
    score = at.lira_scores(shadow, s_in, np.array([3.0, 2.0]))
    assert np.isfinite(score).all()


def test_logit_confidence_is_finite_at_the_ends():
    v = at.logit_confidence(np.array([0.0, 0.5, 1.0]))
    assert np.isfinite(v).all() and v[1] == 0.0 and v[0] < 0 < v[2]


# ---------------------------------------------------------------------------------------
# Releases and the label-skew estimator
# ---------------------------------------------------------------------------------------
def _logits(n_owners: int = 3, n: int = 50, c: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(n_owners)]


def test_releases_are_the_soft_vote_twin():
    lg = _logits()
    allo = at.release("all_outputs", lg)
    avg = at.release("averaged", lg)
    lab = at.release("label", lg)
    assert allo.shape == (3, 50, 4) and avg.shape == (50, 4) and lab.shape == (50,)
    np.testing.assert_allclose(avg, allo.mean(0), atol=1e-4)  # 16-bit fixed point
    assert (lab == avg.argmax(-1)).mean() > 0.95
    with pytest.raises(ValueError, match="rng"):
        at.release("dp_label", lg)
    a = at.release("dp_label", lg, rng=np.random.default_rng(1))
    b = at.release("dp_label", lg, rng=np.random.default_rng(1))
    assert (a == b).all()  # seeded


def test_skew_estimator_recovers_a_known_skew_from_individual_outputs():
    rng = np.random.default_rng(0)
    c, n = 10, 2000
    truth = rng.dirichlet([0.3] * c, size=3)
    # each owner answers with (a smoothed) one-hot drawn from its own class distribution
    outs = np.stack([0.9 * np.eye(c)[rng.choice(c, n, p=p)] + 0.01 for p in truth])
    est = at.estimate_skew("all_outputs", outs, 3, c)
    m = at.skew_metrics(est, truth)
    assert m["r_owner"] > 0.95 and m["tv_owner"] < 0.1 and m["top_class_found"] == 1.0


def test_normalised_skew_estimate_removes_the_query_mix():
    # two owners answer a query set that is 80 % class 0: owner 0 trained on classes {0, 1}
    # equally, owner 1 on class 0 only; their mean outputs both favour class 0, the normalised
    # estimate puts owner 0's mass where owner 1 has none
    outs = np.array([[[0.8, 0.2, 0.0]], [[1.0, 0.0, 0.0]]])
    plain = at.estimate_skew("all_outputs", outs, 2, 3, "mean")
    norm = at.estimate_skew("all_outputs", outs, 2, 3, "normalised")
    assert plain[0].argmax() == 0 and norm[0].argmax() == 1 and norm[1].argmax() == 0
    np.testing.assert_allclose(norm.sum(1), 1.0)
    with pytest.raises(ValueError, match="estimators"):
        at.estimate_skew("label", np.array([0, 1]), 2, 3, "normalised")


def test_an_aggregate_gives_one_estimate_for_every_owner():
    lg = _logits()
    for policy in ("averaged", "label"):
        est = at.estimate_skew(policy, at.release(policy, lg), 3, 4)
        assert est.shape == (3, 4)
        np.testing.assert_allclose(est, np.tile(est[0], (3, 1)))
        np.testing.assert_allclose(est.sum(1), 1.0)


@pytest.mark.parametrize("source", at.SOURCES)
def test_query_sources_have_the_digits_shape_and_range(source):
    pool = np.random.default_rng(0).random((120, 64)).astype(np.float32)
    x = at.make_queries(source, 100, pool, np.random.default_rng(1))
    assert x.shape == (100, 64) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert at.make_queries(source, 200, pool, np.random.default_rng(1)) is None \
        or source not in ("in_distribution", "ood_permuted")


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_run_writes_every_table(tmp_path):
    code = study_main(["attacks", "--seeds", "0", "1", "--shadows", "4", "--nonmembers", "60",
                       "--label-queries", "4", "--budgets", "50", "--sources",
                       "in_distribution", "uniform", "--skew-owners", "3", "--skew-alphas",
                       "0.3", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    for name in ("attacks.csv", "attacks.md", "attacks.json", "attacks.png"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "attacks.json").read_text())
    assert summary["seeds"] == [0, 1]
    keys = {tuple(e["key"]) for e in summary["membership.tpr_at_0.1pct_fpr"]}
    assert keys == {(g, p, a) for g in ("demo", "overfit", "overfit_small") for p in at.POLICIES
                    for a in ("lira", "global")}
    assert {e["n"] for e in summary["extraction.agreement"]} == {2}
    text = (tmp_path / "attacks.md").read_text()
    assert "LiRA − global" in text and "Label-skew inference" in text
    # the spot-check on shares opens the twin's scores (fixed point: 16 fractional bits)
    (check,) = summary["secure_check"]
    assert check["max_abs_score_difference"] < 1e-3
    assert check["auc_secure"] == pytest.approx(check["auc_twin"], abs=0.01)


def test_tiny_run_rows_have_the_table_columns():
    # the extraction table is checked by the slow run above (its federation takes seconds)
    cfg = at.small_config(regimes=(at.Regime("overfit", 30, 40, 0.0),), shadows=2,
                          nonmembers=30, experiments=("membership", "skew"), skew_queries=50)
    rows = at.run_attacks(cfg, show_progress=False)
    kinds = {r["experiment"] for r in rows}
    assert kinds == {"membership", "skew"}
    mem = [r for r in rows if r["experiment"] == "membership"]
    assert len(mem) == 2 * len(at.POLICIES) * 2  # seeds x policies x (lira, global)
    for r in mem:
        assert 0.0 <= r["tpr_at_0.1pct_fpr"] <= r["tpr_at_1pct_fpr"] <= 1.0
        assert r["members"] + r["nonmembers"] == 60
    skew = [r for r in rows if r["experiment"] == "skew"]
    assert {r["policy"] for r in skew} == set(at.POLICIES)
    assert "Label-skew inference" in at.markdown_report(rows)
