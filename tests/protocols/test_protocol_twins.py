"""Pure (no MPC) checks: fixed-point bookkeeping, the plaintext twins, parameters, registry."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mpc_fi import plain
from mpc_fi.config import FederationConfig, ModelSource, OwnerConfig, ProtocolConfig
from mpc_fi.errors import ConfigError, ProtocolError
from mpc_fi.plugins import build_protocol
from mpc_fi.privacy import confident_gnmax_cost, gnmax_cost
from mpc_fi.result import ABSTAIN
from protocols import REGISTRY, plain_ops
from protocols.noise import SeededNoise, SystemNoise

SCALE = 1 << 16
FAST = settings(max_examples=40, deadline=None)


def logits_strategy(owners: int | None = None):
    """(owners, rows, classes) logits on the fixed-point grid, many of them tied."""
    @st.composite
    def build(draw):
        n = owners or draw(st.integers(2, 5))
        rows, c = draw(st.integers(1, 6)), draw(st.integers(2, 6))
        values = st.integers(-8, 8).map(lambda v: v / 4)  # coarse: ties are frequent
        data = draw(st.lists(st.lists(st.lists(values, min_size=c, max_size=c), min_size=rows,
                                      max_size=rows), min_size=n, max_size=n))
        return [torch.tensor(x, dtype=torch.float64) for x in data]
    return build()


def make(name: str, logits, **kw):
    return REGISTRY[name](num_classes=logits[0].shape[1], num_owners=len(logits), **kw)


def quiet_seeded(seed: int) -> SeededNoise:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SeededNoise(seed)


# -- fixed-point bookkeeping ------------------------------------------------------------------

@FAST
@given(st.lists(st.fractions(min_value=Fraction(1, 64), max_value=64, max_denominator=64),
                min_size=1, max_size=6))
def test_rational_weights_become_exact_integers(fracs):
    ints, exact = plain_ops.integer_weights([float(f) for f in fracs])
    den = math.lcm(*(f.denominator for f in fracs))
    smallest = [int(f * den) for f in fracs]
    smallest = [i // math.gcd(*smallest) for i in smallest]
    if max(smallest) > plain_ops.MAX_INTEGER_WEIGHT:  # too fine for the range: quantised
        assert not exact
        return
    assert exact and list(ints) == smallest  # proportional, exactly, and reduced


@FAST
@given(st.lists(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=1, max_size=6))
def test_any_weights_are_integers_within_quantisation(ws):
    ints, exact = plain_ops.integer_weights(ws)
    assert all(1 <= i <= plain_ops.MAX_INTEGER_WEIGHT for i in ints)
    if exact:
        assert all(abs(i / ints[0] - w / ws[0]) <= 1e-9 * (w / ws[0]) for i, w in zip(ints, ws))
    else:  # each weight relative to the largest is off by at most half a step of 2**-16
        top = max(ws)
        for i, w in zip(ints, ws):
            assert abs(i / plain_ops.MAX_INTEGER_WEIGHT - w / top) <= 2 ** -17 or i == 1


def test_irrational_weights_are_quantised_and_flagged():
    ints, exact = plain_ops.integer_weights([math.pi, 1.0])
    assert not exact and ints == (65536, round(65536 / math.pi))


@FAST
@given(st.lists(st.lists(st.integers(-3, 3), min_size=4, max_size=4), min_size=1, max_size=5),
       st.integers(1, 4))
def test_top_k_lowest_is_a_stable_descending_sort(rows, k):
    x = torch.tensor(rows)
    got = plain_ops.top_k_lowest(x, k)
    for r, row in enumerate(rows):
        want = sorted(range(4), key=lambda j: (-row[j], j))[:k]
        assert got[r].tolist() == want


@FAST
@given(st.fractions(min_value=Fraction(1, 1000), max_value=10), st.integers(1, 5),
       st.integers(-10, 10 * 5 * SCALE))
def test_threshold_units_are_exact(threshold, per, units):
    t = plain_ops.threshold_units(threshold, per=per, precision_bits=16)
    assert (units >= t) == (Fraction(units) >= threshold * per * SCALE)


def test_effective_sigma_is_what_the_querier_cannot_subtract():
    assert plain_ops.effective_sigma(2.0, 4) == pytest.approx(2.0 * math.sqrt(3 / 4))
    with pytest.raises(ValueError):
        plain_ops.effective_sigma(1.0, 1)


# -- twins --------------------------------------------------------------------------------------

@FAST
@given(logits_strategy())
def test_equal_weights_reduce_to_the_unweighted_votes(logits):
    n = len(logits)
    for weighted, base in (("weighted_soft_vote", "soft_vote"),
                           ("weighted_hard_vote", "hard_vote")):
        w = make(weighted, logits, owner_weights=[2.5] * n, reveal="scores").plaintext(logits)
        b = make(base, logits, reveal="scores").plaintext(logits)
        np.testing.assert_array_equal(w.labels, b.labels)
        if base == "soft_vote":
            np.testing.assert_allclose(w.scores, b.scores, atol=1e-12)
        else:
            np.testing.assert_allclose(w.scores * n, b.scores, atol=1e-12)


@FAST
@given(logits_strategy(owners=3))
def test_weighted_hard_vote_counts_each_vote_with_its_weight(logits):
    proto = make("weighted_hard_vote", logits, owner_weights=[1, 2, 1])
    votes = [plain.argmax_lowest(lg) for lg in logits]
    c = logits[0].shape[1]
    for r, label in enumerate(proto.plaintext(logits).labels):
        totals = [sum(w for w, v in zip((1, 2, 1), votes) if v[r] == j) for j in range(c)]
        assert label == totals.index(max(totals))  # list.index: the lowest index on ties


@FAST
@given(logits_strategy())
def test_logit_average_is_the_argmax_of_the_summed_encodings(logits):
    pred = make("logit_average", logits, reveal="scores").plaintext(logits)
    total = sum(plain.encode(lg, 16) for lg in logits)
    np.testing.assert_array_equal(pred.labels, plain.argmax_lowest(total).numpy())
    np.testing.assert_allclose(pred.scores, torch.stack(logits).mean(0).numpy(), atol=1e-4)


@FAST
@given(logits_strategy(), st.integers(1, 6))
def test_top_k_starts_with_the_soft_vote_label(logits, k):
    assume(k <= logits[0].shape[1])
    labels = make("top_k", logits, k=k).plaintext(logits).labels
    np.testing.assert_array_equal(labels[:, 0], make("soft_vote", logits).plaintext(logits).labels)
    assert all(len(set(row)) == k for row in labels.tolist())


@FAST
@given(logits_strategy(), st.integers(1, 5))
def test_confident_vote_answers_exactly_when_the_top_count_reaches_the_threshold(logits, t):
    n = len(logits)
    assume(t <= n)
    pred = make("confident_vote", logits, threshold=t).plaintext(logits).labels
    hard = make("hard_vote", logits, reveal="scores").plaintext(logits)
    top = hard.scores.max(axis=1)
    np.testing.assert_array_equal(pred, np.where(top >= t, hard.labels, ABSTAIN))


@FAST
@given(logits_strategy())
def test_confident_probability_uses_the_averaged_distribution(logits):
    pred = make("confident_vote", logits, threshold=0.5, basis="probability").plaintext(logits)
    soft = make("soft_vote", logits, reveal="scores").plaintext(logits)
    top = soft.scores.max(axis=1)
    answered = pred.labels != ABSTAIN
    np.testing.assert_array_equal(pred.labels[answered], soft.labels[answered])
    assert (top[answered] >= 0.5 - 1e-9).all() and (top[~answered] < 0.5 + 1e-9).all()


@FAST
@given(logits_strategy())
def test_entropy_weights_equal_for_identical_owners_give_soft_voting(logits):
    same = [logits[0]] * len(logits)
    ent = make("entropy_weighted_vote", same, reveal="scores").plaintext(same)
    soft = make("soft_vote", same, reveal="scores").plaintext(same)
    np.testing.assert_allclose(ent.scores, soft.scores, atol=1e-4)


def test_a_confident_owner_outweighs_an_uncertain_one():
    sure = torch.tensor([[0.0, 6.0, 0.0]], dtype=torch.float64)
    unsure = torch.tensor([[0.4, 0.0, 0.0]], dtype=torch.float64)
    proto = make("entropy_weighted_vote", [sure, unsure], reveal="scores")
    # unweighted, class 0 would win nothing either way; what matters is the mix
    scores = proto.plaintext([sure, unsure]).scores[0]
    soft = make("soft_vote", [sure, unsure], reveal="scores").plaintext([sure, unsure]).scores[0]
    assert scores[1] > soft[1]
    assert proto.contribution_width == 4
    assert proto.local_contribution(sure).shape == (1, 4)


@FAST
@given(logits_strategy(), st.integers(0, 10 ** 6))
def test_gnmax_twin_with_negligible_noise_is_hard_voting(logits, seed):
    hard = make("hard_vote", logits, reveal="scores").plaintext(logits)
    top2 = np.sort(hard.scores, axis=1)[:, -2:]
    clear = top2[:, 1] > top2[:, 0]  # noise breaks exact ties at random
    proto = make("gnmax", logits, sigma=1e-4)
    sources = [quiet_seeded(seed + r) for r in range(len(logits) + 1)]
    labels = proto.plaintext(logits, noise_sources=sources).labels
    np.testing.assert_array_equal(labels[clear], hard.labels[clear])


@FAST
@given(logits_strategy(), st.integers(0, 10 ** 6))
def test_confident_gnmax_twin_with_negligible_noise_is_the_confident_vote(logits, seed):
    n = len(logits)
    hard = make("hard_vote", logits, reveal="scores").plaintext(logits)
    top2 = np.sort(hard.scores, axis=1)[:, -2:]
    clear = top2[:, 1] > top2[:, 0]
    proto = make("confident_gnmax", logits, threshold=n / 2 + 0.25, sigma_threshold=1e-4,
                 sigma=1e-4)
    sources = [quiet_seeded(seed + r) for r in range(n + 1)]
    got = proto.plaintext(logits, noise_sources=sources).labels
    want = make("confident_vote", logits, threshold=n / 2 + 0.25).plaintext(logits).labels
    np.testing.assert_array_equal(got[clear], want[clear])


def test_gnmax_scores_are_the_counts_plus_the_replayed_noise():
    logits = [torch.randn(50, 4, dtype=torch.float64) for _ in range(3)]
    proto = make("gnmax", logits, sigma=3.0, reveal="scores")
    noisy = proto.plaintext(logits, noise_sources=[quiet_seeded(r) for r in range(4)]).scores
    counts = make("hard_vote", logits, reveal="scores").plaintext(logits).scores
    noise = torch.stack([quiet_seeded(r).gaussian((50, 4), 3.0 / 2) for r in range(4)]).sum(0)
    np.testing.assert_allclose(noisy - counts, noise.numpy(), atol=4 / SCALE)


def test_system_noise_is_not_the_global_torch_rng():
    torch.manual_seed(0)
    a = SystemNoise().gaussian((8,), 1.0)
    torch.manual_seed(0)
    b = SystemNoise().gaussian((8,), 1.0)
    assert not torch.equal(a, b)


def test_seeded_noise_warns():
    from mpc_fi.errors import InsecureSettingWarning

    with pytest.warns(InsecureSettingWarning, match="tests"):
        SeededNoise(1)


# -- parameters, costs, registry ----------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, key", [
    ("top_k", {"k": 0}, "protocol.k"),
    ("top_k", {"k": 5}, "protocol.k"),
    ("top_k", {"k": True}, "protocol.k"),
    ("confident_vote", {"threshold": 4}, "protocol.threshold"),
    ("confident_vote", {"threshold": 0}, "protocol.threshold"),
    ("confident_vote", {"threshold": 1.5, "basis": "probability"}, "protocol.threshold"),
    ("confident_vote", {"threshold": 1, "basis": "logits"}, "protocol.basis"),
    ("entropy_weighted_vote", {"sharpness": 0}, "protocol.sharpness"),
    ("entropy_weighted_vote", {"sharpness": 1.5}, "protocol.sharpness"),
    ("entropy_weighted_vote", {"sharpness": 5}, "protocol.sharpness"),
    ("gnmax", {"sigma": -1}, "protocol.sigma"),
    ("gnmax", {"sigma": float("nan")}, "protocol.sigma"),
    ("confident_gnmax", {"threshold": 2, "sigma_threshold": 0, "sigma": 1},
     "protocol.sigma_threshold"),
    ("confident_gnmax", {"threshold": 9, "sigma_threshold": 1, "sigma": 1}, "protocol.threshold"),
])
def test_invalid_parameters_name_the_key(name, kwargs, key):
    with pytest.raises(ProtocolError, match=rf"^{key}: "):
        REGISTRY[name](num_classes=4, num_owners=3, **kwargs)


def test_scores_release_refused_where_it_would_leak_the_gate():
    for name, kwargs in (("confident_vote", {"threshold": 1}),
                         ("confident_gnmax", {"threshold": 1, "sigma_threshold": 1, "sigma": 1})):
        with pytest.raises(ProtocolError, match="cannot reveal 'scores'"):
            REGISTRY[name](num_classes=3, num_owners=2, reveal="scores", **kwargs)


def federation(protocol: str, **params) -> FederationConfig:
    owners = tuple(OwnerConfig(name=f"o{i}", model=ModelSource(factory="mpc_fi.demo:mlp"),
                               weight=w) for i, w in enumerate((1.0, 2.0, 0.5)))
    return FederationConfig(owners=owners, protocol=ProtocolConfig(name=protocol, params=params))


def test_unknown_and_missing_parameters_name_the_key():
    with pytest.raises(ConfigError, match=r"protocol\.sigmaa"):
        build_protocol(federation("gnmax", sigma=1.0, sigmaa=1.0), num_classes=3)
    with pytest.raises(ProtocolError, match=r"^protocol\.sigma: missing"):
        build_protocol(federation("gnmax"), num_classes=3)
    with pytest.raises(ProtocolError, match=r"^protocol\.threshold: missing"):
        build_protocol(federation("confident_vote"), num_classes=3)


def test_build_protocol_passes_the_federation_weights():
    proto = build_protocol(federation("weighted_hard_vote"), num_classes=3)
    assert proto.integer_weights == (2, 4, 1) and proto.weights_exact


def test_privacy_costs_come_from_the_accountant_at_the_unsubtractable_std():
    cost = REGISTRY["gnmax"].privacy_cost(params={"sigma": 4.0}, num_owners=3, queries=10)
    assert cost == gnmax_cost(sigma=4.0 * math.sqrt(3 / 4), queries=10)
    cg = REGISTRY["confident_gnmax"]
    params = {"threshold": 2, "sigma_threshold": 3.0, "sigma": 5.0}
    worst = cg.privacy_cost(params=params, num_owners=4, queries=7)
    assert worst == confident_gnmax_cost(threshold_sigma=3.0 * math.sqrt(4 / 5),
                                         sigma=5.0 * math.sqrt(4 / 5), checked=7, answered=7)
    actual = cg.privacy_cost(params=params, num_owners=4, queries=7, answered=2)
    assert actual.answered == 2 and actual.checked == 7
    for name in ("soft_vote", "logit_average", "confident_vote", "top_k"):
        assert REGISTRY[name].privacy_cost(params={}, num_owners=3, queries=5) is None
    with pytest.raises(ProtocolError, match=r"protocol\.sigma: missing"):
        REGISTRY["gnmax"].privacy_cost(params={}, num_owners=3, queries=1)
    with pytest.raises(ConfigError, match=r"protocol\.k: unknown"):
        REGISTRY["gnmax"].privacy_cost(params={"sigma": 1, "k": 2}, num_owners=3, queries=1)


def test_registry_entries_describe_themselves():
    assert {"logit_average", "weighted_soft_vote", "weighted_hard_vote", "entropy_weighted_vote",
            "top_k", "confident_vote", "gnmax", "confident_gnmax"} <= set(REGISTRY)
    for key, cls in REGISTRY.items():
        assert cls.name == key
        assert cls.summary and "\n" not in cls.summary
        assert "label" in cls.releases and all(cls.releases.values())
        assert cls.cost
        assert cls.differentially_private == (key in ("gnmax", "confident_gnmax"))


def test_dp_wrappers_take_a_protocol_instance_or_a_name():
    from protocols import GNMax, HardVote, SoftVote
    from protocols.ops import PlainOps

    inner = SoftVote(num_classes=4, num_owners=3)
    wrapped = GNMax(inner=inner, sigma=2.0)
    assert wrapped.inner is inner and (wrapped.num_classes, wrapped.num_owners) == (4, 3)
    by_name = REGISTRY["gnmax"](num_classes=4, num_owners=3, sigma=2.0, inner="soft_vote")
    assert isinstance(by_name.inner, SoftVote)
    assert isinstance(GNMax(num_classes=4, num_owners=3, sigma=1.0).inner, HardVote)
    with pytest.raises(ProtocolError, match=r"protocol\.inner"):
        GNMax(inner=REGISTRY["logit_average"](num_classes=4, num_owners=3), sigma=1.0)
    with pytest.raises(ProtocolError, match=r"protocol\.inner"):
        federation("gnmax", sigma=1.0, inner="logit_average")
    # the twin of a wrapped soft vote: the same release code on plaintext ops
    logits = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    sources = [quiet_seeded(11 + r) for r in range(4)]
    pred = wrapped.plaintext(logits, noise_sources=sources)
    again = [quiet_seeded(11 + r) for r in range(4)]
    aggregate = inner.plaintext_aggregate(logits).double() / wrapped.scale
    noisy = aggregate + PlainOps(precision_bits=16, noise_sources=again).joint_noise((5, 4), 2.0)
    assert (pred.labels == noisy.argmax(-1).numpy()).all()


def test_the_release_is_written_once():
    for cls in REGISTRY.values():
        assert "to_reveal" not in vars(cls) and "plaintext" not in vars(cls), cls.name
