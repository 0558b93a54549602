"""Fixed-point safety: sound activation bounds, refusals that name the layer, a softmax that is
exact for any logit spread, and the querier's declared input range."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from mpc_fi import ConfigError, Federation, FederationConfig, InputError
from mpc_fi.config import QuerierConfig
from mpc_fi.demo import cnn, mlp
from mpc_fi.models import extract_architecture
from mpc_fi.ranges import Limits, activation_ranges, check_model_ranges

from .test_models import graph_models, image_models, randomized, vector_models


def layer_outputs(model: nn.Module, arch, x: torch.Tensor,
                  modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Every converted layer's real output, keyed by its path (a Conv2d/Linear with the batch
    norm folded into it, ``"conv+bn"``: the batch norm's output). ``modules``: the layers by
    path (default: the model's named modules)."""
    modules = dict(model.named_modules()) if modules is None else modules
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[layer.path.split("+")[-1]].register_forward_hook(
        lambda _m, _i, out, path=layer.path: seen.__setitem__(path, out.detach()))
        for layer in arch.layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("input_range", [(-1.0, 1.0), (0.0, 16.0), (-3.0, 0.5)])
def test_bounds_contain_every_reachable_activation(input_range):
    models = {**image_models(), **vector_models()}
    g = torch.Generator().manual_seed(1)
    low, high = input_range
    for i, (name, model) in enumerate(models.items()):
        model = randomized(model, i)
        shape = (2, 4, 4) if name in image_models() else (6,)
        arch, params = extract_architecture(model, shape)
        model = model.double()
        bounds = {r.path: r for r in activation_ranges(arch, params, input_range)}
        # random points, and the corners of the box, where linear maps reach their extremes
        x = torch.rand((400, *shape), generator=g, dtype=torch.float64) * (high - low) + low
        corners = torch.randint(0, 2, (200, *shape), generator=g).double() * (high - low) + low
        for path, out in layer_outputs(model, arch, torch.cat([x, corners])).items():
            r = bounds[path]
            # float32 batch-norm statistics are folded into a float64 affine map: 1e-6 relative
            slack = 1e-6 * max(1.0, r.magnitude)
            assert out.min() >= r.low - slack and out.max() <= r.high + slack, (name, path, r)


@pytest.mark.parametrize("input_range", [(-1.0, 1.0), (0.0, 4.0)])
def test_bounds_of_a_graph_contain_every_reachable_activation(input_range):
    """Addition: the sum of its inputs' bounds; concatenation: each part keeps its own; global
    average pooling: its input's; a folded batch norm: through the folded weights."""
    model = randomized(graph_models()["residual_concat"], 5)
    arch, params = extract_architecture(model, (2, 4, 4))
    model = model.double()
    bounds = {r.path: r for r in activation_ranges(arch, params, input_range)}
    low, high = input_range
    g = torch.Generator().manual_seed(2)
    x = torch.rand((400, 2, 4, 4), generator=g, dtype=torch.float64) * (high - low) + low
    seen = layer_outputs(model, arch, x, dict(zip(model.names, model.layers)))
    assert set(seen) == set(bounds)
    for path, out in seen.items():
        r = bounds[path]
        slack = 1e-6 * max(1.0, r.magnitude)
        assert out.min() >= r.low - slack and out.max() <= r.high + slack, (path, r)
    add, cat = bounds["add"], bounds["cat"]
    relu, conv2 = bounds["relu"], bounds["conv2"]
    assert add.high == pytest.approx(relu.high + conv2.high)  # sums of bounds
    assert cat.high == max(bounds["bn2"].high, relu.high)   # union of the parts


def test_bounds_of_a_linear_layer_are_tight():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]]))
        layer.bias.copy_(torch.tensor([1.0, 0.0]))
    arch, params = extract_architecture(nn.Sequential(layer), (3,))
    (r,) = activation_ranges(arch, params, (-1.0, 1.0))
    assert (r.low, r.high) == (1.0 - 3.5, 1.0 + 3.5)  # reached at the corners
    assert r.product == 3.5  # before the bias is added


def test_the_demo_models_pass_for_their_declared_range():
    for model, shape in ((mlp(), (64,)), (cnn(), (1, 8, 8))):
        arch, params = extract_architecture(model.eval(), shape)
        check_model_ranges(arch, params, (0.0, 1.0), 16)


def test_a_product_past_the_limit_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    with torch.no_grad():
        model[2][0].weight.fill_(2.0 ** 14)
    arch, params = extract_architecture(model.eval(), (4,))
    with pytest.raises(InputError) as info:
        check_model_ranges(arch, params, (-2.0 ** 15, 2.0 ** 15), 16)
    msg = str(info.value)
    assert "2.0 (linear): its product of input and weights can reach 2^" in msg
    assert "past the 2^30.0" in msg and "querier.input_range" in msg and "precision_bits" in msg


def test_a_tighter_input_range_or_fewer_fractional_bits_fix_a_product_overflow():
    model = nn.Sequential(nn.Linear(1, 2, bias=False))
    arch, params = extract_architecture(model.eval(), (1,))
    params["0/weight"].fill_(2.0 ** 16)  # |x * w| up to 2^31 for |x| <= 2^15
    with pytest.raises(InputError, match=r"can reach 2\^31.0, past the 2\^30.0"):
        check_model_ranges(arch, params, (-2.0 ** 15, 2.0 ** 15), 16)
    check_model_ranges(arch, params, (-2.0 ** 13, 2.0 ** 13), 16)
    check_model_ranges(arch, params, (-2.0 ** 15, 2.0 ** 15), 15)


@pytest.mark.parametrize("op, limit", [(nn.Sigmoid, 896.0), (nn.Tanh, 448.0)])
def test_exp_based_activations_are_checked_against_their_input_limit(op, limit):
    assert getattr(Limits(16), f"{op.__name__.lower()}_input") == limit
    model = nn.Sequential(nn.Linear(1, 1, bias=False), op(), nn.Linear(1, 2))
    arch, params = extract_architecture(model.eval(), (1,))
    params["0/weight"].fill_(1.0)
    check_model_ranges(arch, params, (-limit, limit), 16)
    with pytest.raises(InputError, match=rf"1 \({op.__name__.lower()}\): its input can reach"):
        check_model_ranges(arch, params, (-limit - 1, limit + 1), 16)


def _softmaxes(rank: int, x: torch.Tensor) -> dict[str, np.ndarray]:
    from mpc_fi import secure
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    enc = crypten.cryptensor(x if rank == 0 else torch.zeros_like(x), src=0)
    return {"softmax": secure.softmax(enc, -1).get_plain_text().numpy(),
            "log_softmax": secure.log_softmax(enc, -1).get_plain_text().numpy(),
            "crypten": enc.softmax(-1).get_plain_text().numpy()}


def test_softmax_on_shares_is_exact_for_logits_far_apart(mpc):
    g = torch.Generator().manual_seed(3)
    x = torch.randn((64, 5), generator=g, dtype=torch.float64) * 300  # spreads up to ~2000
    x[0] = torch.tensor([0.0, -600.0, -1000.0, 5.0, -2.0])
    out = mpc(_softmaxes, 2, x)[0]
    want = torch.softmax(x, -1).numpy()
    # Tolerance: CrypTen's exp and reciprocal approximations at 16 fractional bits.
    np.testing.assert_allclose(out["softmax"], want, atol=2e-3)
    # log_softmax of entries far below the top is exact (x - max), near it the log's accuracy
    np.testing.assert_allclose(out["log_softmax"], torch.log_softmax(x, -1).numpy(),
                               atol=2e-2, rtol=1e-3)
    # Why the clamp: CrypTen's own softmax is badly wrong on these inputs.
    assert np.abs(out["crypten"] - want).max() > 0.1


def test_input_range_is_validated_with_its_key():
    cases = [([1, 0], "low must be below high"), ("0..1", "must be [low, high]"),
             ([0, 1e6], "within +-32768"), ([0, "1"], "input_range[1]")]
    for value, words in cases:
        with pytest.raises(ConfigError, match="querier.input_range") as info:
            QuerierConfig.from_dict({"input_range": value}, "querier")
        assert words in str(info.value)
    assert QuerierConfig.from_dict({"input_range": [0, 16]}, "q").input_range == (0.0, 16.0)


def test_input_range_is_part_of_the_federation_fingerprint(federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    ranged = dataclasses.replace(fed, querier=QuerierConfig(input_range=(0, 1)))
    assert ranged.fingerprint() != fed.fingerprint()
    again = FederationConfig.from_dict(ranged.to_dict())
    assert again.querier.input_range == (0.0, 1.0) and again.fingerprint() == ranged.fingerprint()


def test_queries_outside_the_declared_range_are_refused(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    fed = dataclasses.replace(fed, querier=QuerierConfig(input_range=(-1, 1)))
    x = np.zeros((5, 6), dtype=np.float32)
    x[2, 3] = 1.5
    with pytest.raises(InputError, match=r"1 query row\(s\) hold values outside "
                                         r"querier.input_range \[-1, 1\]"):
        Federation(fed, run_dir=tmp_path).run(x)


def test_an_owner_whose_model_could_overflow_is_refused_before_sharing(federation_factory,
                                                                        tmp_path):
    fed, models = federation_factory(num_owners=3, num_classes=3, mode="full")
    with torch.no_grad():
        models[1][2].weight.mul_(2.0 ** 20)
    torch.save(models[1].state_dict(), fed.owners[1].model.weights)
    with pytest.raises(InputError) as info:
        Federation(fed, run_dir=tmp_path).run(np.zeros((4, 6), dtype=np.float32))
    assert "[owner1] on shares this model could leave the fixed-point range" in str(info.value)
    assert "2 (linear): its product" in str(info.value)
    logs = {p.name: p.read_text() for p in tmp_path.glob("party-*.log")}
    assert len(logs) == 5
    for name, text in logs.items():
        if "dealer" in name:
            continue
        assert "could leave the fixed-point range" in text, name
        assert "parameters secret-shared" not in text, name  # nothing was shared
