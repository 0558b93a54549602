"""Full mode's cheaper comparisons and softmax (:mod:`mpc_fi.secure`, :mod:`mpc_fi.compare`).

* ``activation_bound``: a public bound every owner checks its own model against before sharing;
  inside it, comparisons on shares carry only the bits it leaves, and labels stay those of the
  plaintext twin.
* Softmax on shares: its shift comes from a pair tournament that may stop within
  ``MAX_SLACK`` of the maximum, and its reciprocal is normalised by a power of two, so it
  holds for any number of classes (CrypTen's own diverges once the sum passes ~660).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mpc_fi import ConfigError, Federation, FederationConfig, InputError
from mpc_fi.bounds import full_mode_aggregate_range, states_secure_range
from mpc_fi.compare import ValueRange
from mpc_fi.config import QuerierConfig
from mpc_fi.demo import mlp
from mpc_fi.models import extract_architecture
from mpc_fi.ranges import activation_ranges, check_activation_bound, comparison_limit
from mpc_fi.secure import MAX_SLACK

from ..harness import run_parties


def _softmax_party(rank: int, cases: list) -> list:
    from mpc_fi import compare, secure  # noqa: PLC0415
    from mpc_fi._crypten import load_crypten  # noqa: PLC0415

    crypten = load_crypten()
    comm = crypten.communicator.get()
    out = []
    for x, limit in cases:
        x = torch.as_tensor(x, dtype=torch.float64)
        shared = crypten.cryptensor(x, src=0)
        before = comm.get_communication_stats()
        with compare.bounded(limit):
            p = secure.softmax(shared, -1).get_plain_text()
            shift = secure.shift_for_softmax(shared).get_plain_text()
        rounds = comm.get_communication_stats()["rounds"] - before["rounds"]
        out.append({"p": p.numpy(), "shift": shift.numpy(), "rounds": rounds})
    s = crypten.cryptensor(torch.tensor([1.0, 1.5, 2.0, 3.0, 7.9, 64.0, 400.0, 659.0, 660.0,
                                         900.0, 1000.0, 1077.0], dtype=torch.float64), src=0)
    out.append({"mine": secure.reciprocal_in(s, 1100.0).get_plain_text().numpy(),
                "crypten": s.reciprocal(input_in_01=False).get_plain_text().numpy()})
    return out


def _logits(rows: int, classes: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, classes)) * spread


def test_softmax_on_shares_holds_for_any_class_count_and_spread():
    cases = [(_logits(16, 10, 3.0, 0), None), (_logits(16, 10, 3.0, 1), 2 * 12.0 + 17),
             (_logits(16, 10, 150.0, 2), None),  # spread past exp's safe range: clamped
             (_logits(8, 1000, 0.05, 3), None),  # flat: the sum of exponentials is ~1000
             (_logits(8, 1000, 2.0, 4), 2 * 12.0 + 17)]
    out = run_parties(_softmax_party, 3, cases)[1]
    for (x, limit), got in zip(cases, out):
        ref = torch.softmax(torch.as_tensor(x), -1).numpy()
        # CrypTen's exp((1 + x/256)**256) is the same as before: its relative error is up to
        # x**2/512 where the probability is tiny; the absolute error stays small.
        assert np.abs(got["p"] - ref).max() < 5e-3, (x.shape, limit)
        # each product e * (1/s) is truncated to 16 fractional bits on shares, off by up to P-1
        # units (3 parties here): the sum of C of them is off by up to C * (P-1) units
        assert np.abs(got["p"].sum(-1) - 1).max() < 5e-3 + x.shape[1] * 2 * 2.0 ** -16
        top = x.max(-1, keepdims=True)
        assert np.all(got["shift"] <= top + 1e-4) and np.all(got["shift"] >= top - MAX_SLACK)
        flat = x.shape[1] == 1000 and np.ptp(x) < 1
        if flat:  # the case CrypTen's reciprocal got wrong: every probability near 1/1000
            assert np.abs(got["p"] - ref).max() < 8 * 2.0 ** -16  # a few units of 2**-16
    assert out[1]["rounds"] < out[0]["rounds"]  # a bound: narrower comparisons
    recip = out[-1]
    s = np.array([1.0, 1.5, 2.0, 3.0, 7.9, 64.0, 400.0, 659.0, 660.0, 900.0, 1000.0, 1077.0])
    assert np.abs(recip["mine"] - 1 / s).max() < 8 * 2.0 ** -16  # a few units of 2**-16
    assert np.abs(recip["crypten"][-3:] - 1 / s[-3:]).max() > 1e-3  # CrypTen's: wrong here


def test_activation_bound_is_validated_with_its_key_and_kept_out_of_unbounded_fingerprints(
        federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3, mode="full")
    for value, words in [(-1.0, "must be a number"), ("8", "must be a number"),
                         (float("inf"), "must be a number"), (2.0 ** 41, "must be a number")]:
        with pytest.raises(ConfigError, match="activation_bound") as info:
            dataclasses.replace(fed, activation_bound=value)
        assert words in str(info.value)
    output, _ = federation_factory(num_owners=2, num_classes=3, mode="output")
    with pytest.raises(ConfigError, match="only full mode"):
        dataclasses.replace(output, activation_bound=8.0)
    bounded = dataclasses.replace(fed, activation_bound=8.0)
    assert bounded.fingerprint() != fed.fingerprint()
    assert "activation_bound" not in json_keys(fed)
    again = FederationConfig.from_dict(bounded.to_dict())
    assert again.activation_bound == 8.0 and again.fingerprint() == bounded.fingerprint()


def json_keys(fed: FederationConfig) -> set:
    public = fed.to_dict()
    return {k for k, v in public.items() if v is not None}


def test_an_owner_checks_its_activations_against_the_bound_naming_the_layer():
    torch.manual_seed(0)
    model = mlp(in_features=6, hidden=5, num_classes=3).eval()
    arch, params = extract_architecture(model, (6,))
    ranges = activation_ranges(arch, params, (0.0, 1.0))
    top = max(r.magnitude for r in ranges)
    check_activation_bound(ranges, (0.0, 1.0), top * 1.01)
    with pytest.raises(InputError) as info:
        check_activation_bound(ranges, (0.0, 1.0), top * 0.99)
    worst = max(ranges, key=lambda r: r.magnitude)
    assert f"{worst.path} ({worst.op}): its output can reach" in str(info.value)
    assert "Raise activation_bound" in str(info.value)
    with pytest.raises(InputError, match="the inputs: querier.input_range"):
        check_activation_bound(ranges, (-4.0, 4.0), 2.0)
    # what the comparisons may see: ReLU inputs, differences, softmax's clamp argument
    assert comparison_limit(None) is None and comparison_limit(10.0) == 2 * 10 + 16 + 1


def test_full_mode_aggregate_ranges_come_from_what_the_protocol_computes_on_shares():
    from mpc_fi.plugins import build_protocol  # noqa: PLC0415

    def ranged(name: str, bound: float | None = None) -> ValueRange | None:
        fed = FederationConfig.from_dict({"owners": [{"name": f"o{i}", "model": {
            "factory": "mpc_fi.demo:mlp"}} for i in range(3)], "mode": "full",
            "protocol": name})
        return full_mode_aggregate_range(build_protocol(fed, num_classes=10), num_owners=3,
                                         num_classes=10, precision_bits=16,
                                         activation_bound=bound)

    assert ranged("hard_vote") == ValueRange(0, 3 << 16, 16)  # exact one-hot rows
    soft = ranged("soft_vote")
    # probabilities in [0, 1] widened by a quarter on each side, summed over 3 owners
    assert soft == ValueRange(-3 * (1 << 16) // 4, 15 * (1 << 16) // 4)
    assert soft.comparison_bits()[0] == 20
    assert ranged("logit_average") is None and ranged("logit_average", 8.0).hi >= 3 * 8 << 16
    assert ranged("top_k") == soft  # soft voting's contributions, ranked differently

    from protocols.soft_vote import SoftVote  # noqa: PLC0415

    class Doubled(SoftVote):  # computes something else on shares and states no range for it
        def secure_contribution(self, logits):
            return super().secure_contribution(logits) * 2

    proto = Doubled(num_classes=10, num_owners=3, reveal="label", precision_bits=16)
    assert full_mode_aggregate_range(proto, num_owners=3, num_classes=10, precision_bits=16,
                                     activation_bound=None) is None
    # nor do its steps on the owners' logits compare within the activation bound
    assert not states_secure_range(proto)
    assert states_secure_range(SoftVote(num_classes=10, num_owners=3, precision_bits=16))


def test_bounded_full_mode_gives_the_twin_labels_for_fewer_bytes(federation_factory, tmp_path):
    """End to end: the owners check the bound, comparisons narrow, and labels are the twin's."""
    fed, models = federation_factory(num_owners=3, num_classes=4, mode="full")
    fed = dataclasses.replace(fed, querier=QuerierConfig(input_range=(-3.0, 3.0)),
                              batch_size=8)
    x = np.clip(np.random.default_rng(5).normal(size=(8, 6)), -3, 3).astype(np.float32)
    bounds = []
    for m in models:
        arch, params = extract_architecture(m, (6,))
        bounds.append(max(r.magnitude for r in activation_ranges(arch, params, (-3.0, 3.0))))
    bound = float(2 ** math.ceil(math.log2(max(bounds))))
    runs = {}
    for name, value in (("full-width", None), ("bounded", bound)):
        runs[name] = Federation(dataclasses.replace(fed, activation_bound=value),
                                run_dir=tmp_path / name).run(x)
    from mpc_fi.plugins import build_protocol  # noqa: PLC0415

    with torch.no_grad():
        logits = [m(torch.from_numpy(x)).to(torch.float64) for m in models]
    twin = build_protocol(fed, num_classes=4).plaintext(logits).labels
    for run in runs.values():
        np.testing.assert_array_equal(run.prediction.labels, twin)
    cost = {k: max(c.bytes_sent for c in r.costs) for k, r in runs.items()}
    assert cost["bounded"] < 0.8 * cost["full-width"]
    with pytest.raises(InputError, match=r"\[owner\d\] this model's activations are not within"):
        Federation(dataclasses.replace(fed, activation_bound=min(bounds) / 2),
                   run_dir=tmp_path / "refused").run(x)


def _pool_party(rank: int, x: np.ndarray, cases: list) -> list:
    from mpc_fi import compare, secure  # noqa: PLC0415
    from mpc_fi._crypten import load_crypten  # noqa: PLC0415

    crypten = load_crypten()
    shared = crypten.cryptensor(torch.as_tensor(x, dtype=torch.float64), src=0)
    out = []
    for kernel, stride, padding, limit in cases:
        with compare.bounded(limit):
            out.append(secure.max_pool2d(shared, kernel, stride, padding).get_plain_text().numpy())
    return out


def test_max_pooling_on_shares_is_torchs_with_padding_that_never_wins():
    x = np.random.default_rng(2).normal(size=(3, 2, 7, 6)) * 5 - 4  # mostly negative
    x[0, 0, :2, :2] = -30.0  # an all-negative corner: zero padding would win there
    cases = [((2, 2), (2, 2), (0, 0), None), ((3, 3), (1, 1), (1, 1), None),
             ((3, 2), (2, 1), (1, 0), 2 * 40.0 + 17), ((2, 2), (2, 2), (1, 1), 2 * 40.0 + 17)]
    got = run_parties(_pool_party, 3, x, cases)[0]
    for (kernel, stride, padding, _), pooled in zip(cases, got):
        ref = torch.nn.functional.max_pool2d(torch.as_tensor(x), kernel, stride, padding).numpy()
        assert pooled.shape == ref.shape
        assert np.abs(pooled - ref).max() < 2e-4, (kernel, stride, padding)


def test_a_relu_read_only_by_max_pooling_runs_after_it():
    from mpc_fi.demo import cnn  # noqa: PLC0415
    from mpc_fi.models import relus_after_max_pooling  # noqa: PLC0415

    arch, _ = extract_architecture(cnn(10).eval(), (1, 8, 8))
    ops = [layer.op for layer in arch.layers]
    assert relus_after_max_pooling(arch.layers) == {ops.index("relu"): ops.index("max_pool2d")}
    plain = extract_architecture(torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(72, 3)).eval(), (1, 8, 8))[0]
    assert relus_after_max_pooling(plain.layers) == {}
