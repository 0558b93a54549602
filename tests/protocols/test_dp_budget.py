"""Differential privacy: the noise really added on shares, and the budget around a run.

* The noise: GNMax with ``reveal: scores`` opens noisy vote counts; minus the exact counts, they
  are the joint noise the secure path added (every party's real ``SystemNoise``). A
  Kolmogorov-Smirnov test compares them with ``N(0, sigma**2)``; the same for the threshold
  noise of Confident-GNMax (``joint_gaussian`` of shape ``(batch,)``). A wrong scale (the
  per-party ``sigma / sqrt(m)``, or ``2 sigma``) is rejected by the same test: it has power.
* The querier's own ledger (``privacy.budget_file``, a convenience of :class:`mpc_fi.Federation`):
  a query that would overspend it is refused before any party starts and leaves it byte for
  byte intact; a successful run is charged to it afterwards (Confident-GNMax: the answered count
  from the released labels). The owners' ledgers, which bind, are tested in
  ``tests/mpc_fi/test_owner_budget.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from scipy import stats

from mpc_fi import Federation
from mpc_fi.config import FederationConfig, PrivacyConfig
from mpc_fi.errors import BudgetExceededError, ConfigError, InsecureSettingWarning
from mpc_fi.privacy import PrivacyBudget, confident_gnmax_cost, epsilon_for, gnmax_cost
from mpc_fi.result import ABSTAIN, PartyCost
from protocols import REGISTRY
from tests.conftest import logits_of
from tests.harness import run_parties
from tests.protocols import proto_cases as pc

#: A sample is accepted as N(0, sigma**2) above ACCEPT_P (a true sample fails 1 time in 100,000)
#: and a wrong scale must be rejected below REJECT_P. With 1,024 draws per sample, one party's
#: share (std / sqrt(3)) or twice the scale gives p-values far below it (256 draws were not
#: enough: a wrong scale escaped about 1.5 % of the time).
ACCEPT_P = 1e-5
REJECT_P = 1e-3


def party_noise_samples(rank: int, n: int, rows: int, c: int, sigma: float,
                        sigma_threshold: float) -> dict:
    """Open GNMax's noisy counts and a threshold-noise vector (test-only run)."""
    from protocols import secure_ops

    logits = pc.make_logits(7, n, rows, c)
    proto = pc.build("gnmax", c, n, {"sigma": sigma, "reveal": "scores"})
    first = pc.run_hooks(proto, logits, "output", rank)
    second = pc.run_hooks(proto, logits, "output", rank)  # fresh noise for every batch
    check = secure_ops.joint_gaussian((4 * rows,), sigma_threshold, proto.noise_source)
    opened = check.get_plain_text(dst=n)
    if rank != n:
        return {}
    return {"first": first.scores, "second": second.scores, "threshold": opened.numpy()}


def test_joint_noise_on_shares_has_the_configured_scale():
    n, rows, c, sigma, sigma_t = 2, 256, 4, 3.0, 1.5
    out = run_parties(party_noise_samples, n + 1, n, rows, c, sigma, sigma_t, timeout_s=300)[n]
    logits = pc.make_logits(7, n, rows, c)
    counts = REGISTRY["hard_vote"](num_classes=c, num_owners=n, reveal="scores") \
        .plaintext(logits).scores
    first = (out["first"] - counts).ravel()
    second = (out["second"] - counts).ravel()
    for sample, scale in ((first, sigma), (second, sigma), (out["threshold"], sigma_t)):
        assert sample.size >= 1024
        assert stats.kstest(sample, "norm", args=(0.0, scale)).pvalue > ACCEPT_P
        # power: one party's share alone, or twice the scale, are rejected
        assert stats.kstest(sample, "norm", args=(0.0, scale / math.sqrt(n + 1))).pvalue < REJECT_P
        assert stats.kstest(sample, "norm", args=(0.0, 2 * scale)).pvalue < REJECT_P
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.15  # independent draws per batch


# -- the budget around Federation.run -------------------------------------------------------------

class NoPartyMayStart:
    """A launcher that fails the test if the federation gets as far as building it."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("a party was about to start")


def fake_launcher(labels: np.ndarray):
    """A launcher whose parties 'answer' ``labels`` (accounting logic without MPC)."""
    class Fake:
        started = 0

        def __init__(self, federation, *, run_dir=None, timeout_s=None, memory_limit_mb=None):
            self.federation, self.run_dir = federation, run_dir or "."

        def run(self, *, query=None):
            Fake.started += 1
            fed = self.federation
            cost = asdict(PartyCost(party="p", role="owner", wall_s=0.0, rounds=1, bytes_sent=1,
                                    peak_rss_mb=1.0))
            out = {r: {"cost": cost} for r in range(fed.compute_world_size)}
            out[fed.querier_rank].update(labels=labels, scores=None)
            return out
    return Fake


def with_privacy(fed: FederationConfig, path, *, epsilon: float, protocol: str | None = None,
                 params: dict | None = None) -> FederationConfig:
    """``fed`` with the querier's ledger at ``path`` and each owner's beside it."""
    protocol_cfg = fed.protocol if protocol is None else dataclasses.replace(
        fed.protocol, name=protocol, params=params or {})
    owners = tuple(dataclasses.replace(o, ledger=str(owner_ledger(path, o.name)))
                   for o in fed.owners)
    return dataclasses.replace(fed, owners=owners, protocol=protocol_cfg, privacy=PrivacyConfig(
        budget_file=str(path), epsilon=epsilon, delta=1e-5))


def owner_ledger(path, owner: str):
    return path.with_name(f"{owner}-ledger.json")


GNMAX = {"sigma": 20.0}
CONFIDENT = {"threshold": 1.5, "sigma_threshold": 1.0, "sigma": 2.0}


def test_overspending_query_is_refused_before_any_party_starts(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=3, num_classes=3)
    ledger = tmp_path / "budget.json"
    fed = with_privacy(fed, ledger, epsilon=3.0, protocol="gnmax", params=GNMAX)
    budget = PrivacyBudget(ledger, epsilon=3.0, delta=1e-5)
    earlier = gnmax_cost(sigma=20.0 * math.sqrt(3 / 4), queries=5)  # epsilon ~0.7
    budget.charge("querier", earlier)
    before = ledger.read_bytes()
    federation = Federation(fed)
    federation._launcher_cls = NoPartyMayStart
    x = np.zeros((500, 6), dtype=np.float32)  # 500 answers alone: epsilon ~9.6
    with pytest.raises(BudgetExceededError, match="would exceed the privacy budget"):
        federation.run(x)
    assert ledger.read_bytes() == before
    assert budget.history("querier") == [earlier]
    # the querier's data file is priced too, when no X is passed
    path = tmp_path / "queries.npy"
    np.save(path, x)
    federation.config = dataclasses.replace(fed, querier=dataclasses.replace(fed.querier,
                                                                            data=str(path)))
    with pytest.raises(BudgetExceededError):
        federation.run()
    assert ledger.read_bytes() == before


def test_confident_gnmax_charges_the_worst_case_first_and_the_answers_after(federation_factory,
                                                                            tmp_path):
    fed, _ = federation_factory(num_owners=3, num_classes=3)
    ledger = tmp_path / "budget.json"
    labels = np.array([0, ABSTAIN, 2, ABSTAIN, ABSTAIN, 1])
    fed = with_privacy(fed, ledger, epsilon=50.0, protocol="confident_gnmax", params=CONFIDENT)
    federation = Federation(fed)
    federation._launcher_cls = fake_launcher(labels)
    result = federation.run(np.zeros((6, 6), dtype=np.float32))
    np.testing.assert_array_equal(result.prediction.labels, labels)
    eff = math.sqrt(3 / 4)
    want = confident_gnmax_cost(threshold_sigma=1.0 * eff, sigma=2.0 * eff, checked=6, answered=3)
    budget = PrivacyBudget(ledger, epsilon=50.0, delta=1e-5)
    assert budget.history("querier") == [want]
    assert budget.spent("querier") == pytest.approx(epsilon_for([want], delta=1e-5))


def test_worst_case_must_fit_even_if_few_queries_would_be_answered(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=3, num_classes=3)
    ledger = tmp_path / "budget.json"
    eff = math.sqrt(3 / 4)
    all_answered = confident_gnmax_cost(threshold_sigma=eff, sigma=2.0 * eff, checked=40,
                                        answered=40)
    none_answered = confident_gnmax_cost(threshold_sigma=eff, sigma=2.0 * eff, checked=40,
                                         answered=0)
    between = (epsilon_for([none_answered], delta=1e-5) + epsilon_for([all_answered], delta=1e-5)) / 2
    fed = with_privacy(fed, ledger, epsilon=between, protocol="confident_gnmax", params=CONFIDENT)
    federation = Federation(fed)
    launcher = federation._launcher_cls = fake_launcher(np.full(40, ABSTAIN))
    with pytest.raises(BudgetExceededError):
        federation.run(np.zeros((40, 6), dtype=np.float32))
    assert launcher.started == 0


def test_budget_needs_a_dp_protocol_and_dp_without_budget_warns(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    federation = Federation(with_privacy(fed, tmp_path / "b.json", epsilon=1.0))
    federation._launcher_cls = NoPartyMayStart
    with pytest.raises(ConfigError, match=r"^privacy: protocol 'soft_vote' is not differentially "
                                          r"private.*confident_gnmax, gnmax"):
        federation.run(np.zeros((2, 6), dtype=np.float32))
    dp = dataclasses.replace(fed, protocol=dataclasses.replace(fed.protocol, name="gnmax",
                                                               params=GNMAX))
    federation = Federation(dp)
    federation._launcher_cls = fake_launcher(np.zeros(2, dtype=np.int64))
    with pytest.warns(InsecureSettingWarning, match="no budget is checked or charged"):
        federation.run(np.zeros((2, 6), dtype=np.float32))


def test_privacy_section_in_a_federation_file(tmp_path):
    text = """
owners:
  - {name: a, model: {factory: "mpc_fi.demo:mlp"}}
  - {name: b, model: {factory: "mpc_fi.demo:mlp"}}
protocol: {name: gnmax, sigma: 4.0}
privacy: {budget_file: ledgers/budget.json, epsilon: 2.0, delta: %s}
"""
    path = tmp_path / "fed.yaml"
    path.write_text(text % "1.0e-6")
    fed = FederationConfig.load(path)
    assert fed.privacy == PrivacyConfig(budget_file=str(tmp_path / "ledgers" / "budget.json"),
                                        epsilon=2.0, delta=1e-6)
    path.write_text(text % "1e-6")  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match=r"^privacy\.delta: .*write 1\.0e-5"):
        FederationConfig.load(path)
    for bad, key in (({"budget_file": "b.json", "epsilon": -1, "delta": 1e-5}, "privacy.epsilon"),
                     ({"budget_file": "b.json", "epsilon": 1, "delta": 1.0}, "privacy.delta"),
                     ({"budget_file": "", "epsilon": 1, "delta": 1e-5}, "privacy.budget_file"),
                     ({"budget_file": "b.json", "delta": 1e-5}, "privacy.epsilon"),
                     ({"budget": "b.json", "epsilon": 1, "delta": 1e-5}, "privacy.budget")):
        data = {"owners": [{"name": "a", "model": {"factory": "m.x:f"}},
                           {"name": "b", "model": {"factory": "m.x:f"}}], "privacy": bad}
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            FederationConfig.from_dict(data)
    # every party computes the same fingerprint whatever the local ledger path
    one = FederationConfig.from_dict({**data, "privacy": {"budget_file": "/x/b.json",
                                                          "epsilon": 1, "delta": 1e-5}})
    two = dataclasses.replace(one, privacy=dataclasses.replace(one.privacy, budget_file="/y/c"))
    assert one.fingerprint() == two.fingerprint()


# -- end to end through the real launcher ----------------------------------------------------------

def test_confident_gnmax_end_to_end_is_charged_for_its_answers(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3, protocol="confident_gnmax",
                                params={"threshold": 1.5, "sigma_threshold": 0.5, "sigma": 0.5})
    ledger = tmp_path / "budget.json"
    fed = with_privacy(fed, ledger, epsilon=1000.0)  # small sigmas: ~314 for 24 queries
    x = np.random.default_rng(3).normal(size=(24, 6)).astype(np.float32)
    result = Federation(fed, timeout_s=300).run(x)
    labels = result.prediction.labels
    assert labels.shape == (24,) and set(labels.tolist()) <= {ABSTAIN, 0, 1, 2}
    answered = int((labels != ABSTAIN).sum())
    eff = math.sqrt(2 / 3)
    want = confident_gnmax_cost(threshold_sigma=0.5 * eff, sigma=0.5 * eff, checked=24,
                                answered=answered)
    assert PrivacyBudget(ledger, epsilon=1000.0, delta=1e-5).history("querier") == [want]
    # The owners do not see which queries were answered: each charged the worst case.
    worst = confident_gnmax_cost(threshold_sigma=0.5 * eff, sigma=0.5 * eff, checked=24,
                                 answered=24)
    for owner in fed.owners:
        assert PrivacyBudget(owner_ledger(ledger, owner.name), epsilon=1000.0, delta=1e-5) \
            .history("name:querier") == [worst]
    assert result.budget.spent == pytest.approx(epsilon_for([worst], delta=1e-5))


def test_entropy_weighting_end_to_end_shares_its_wider_contribution(federation_factory):
    """The engine shares C + 1 columns per owner (contribution_width) in output mode."""
    fed, models = federation_factory(num_owners=3, num_classes=4, protocol="entropy_weighted_vote",
                                     reveal="scores", batch_size=16)
    x = np.random.default_rng(4).normal(size=(40, 6)).astype(np.float32)
    got = Federation(fed, timeout_s=300).run(x).prediction
    twin = REGISTRY["entropy_weighted_vote"](num_classes=4, num_owners=3, reveal="scores") \
        .plaintext(logits_of(models, x))
    tol = 1e-3  # ENTROPY_TOL["output"] of test_protocol_mpc
    np.testing.assert_allclose(got.scores, twin.scores, atol=tol)
    top2 = np.sort(twin.scores, axis=1)[:, -2:]
    stable = top2[:, 1] - top2[:, 0] >= tol
    assert stable.mean() > 0.5
    np.testing.assert_array_equal(got.labels[stable], twin.labels[stable])
    np.testing.assert_allclose(got.scores.sum(axis=1), 1.0, atol=tol)
    torch.testing.assert_close(torch.as_tensor(got.scores).argmax(1)[stable],
                               torch.as_tensor(twin.labels)[stable])
