"""Every supported layer runs on shares and matches PyTorch; unsupported layers are all named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mpc_fi import InputError, UnsupportedModelError, models
from mpc_fi.graph import Graph
from mpc_fi.layers.merge import AddModule, ConcatModule
from mpc_fi.models import SUPPORTED_LAYERS, extract_architecture, secure_forward


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Non-default values everywhere (batch-norm statistics included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g) * 0.8 + 0.2 if "var" in str(t.shape) else
                    torch.randn(t.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def image_models() -> dict[str, nn.Module]:
    return {
        "conv_bn_relu_maxpool": nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16, 3)),
        "strided_grouped_conv_avgpool": nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=1, padding=1, groups=2), nn.AvgPool2d(2), nn.Sigmoid(),
            nn.Flatten(), nn.Linear(16, 3)),
        "adaptive_avgpool_dropout": nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Dropout(0.3), nn.Flatten(),
            nn.Identity(), nn.Linear(3, 3)),
    }


def graph_models() -> dict[str, nn.Module]:
    """Graphs on (2, 4, 4) inputs: a residual addition, a concatenation, a batch norm folded into
    the convolution before it and one that is not (it follows the addition)."""
    return {"residual_concat": Graph([
        ("conv", nn.Conv2d(2, 4, 3, padding=1), (-1,)),   # 0
        ("bn", nn.BatchNorm2d(4), (0,)),                 # 1: folded into 0
        ("relu", nn.ReLU(), (1,)),                       # 2
        ("conv2", nn.Conv2d(4, 4, 3, padding=1), (2,)),  # 3
        ("add", AddModule(), (2, 3)),                    # 4: residual
        ("bn2", nn.BatchNorm2d(4), (4,)),                # 5: a per-channel affine map
        ("cat", ConcatModule(1), (5, 2)),                # 6
        ("gap", nn.AdaptiveAvgPool2d(1), (6,)),          # 7
        ("flat", nn.Flatten(), (7,)),                    # 8
        ("fc", nn.Linear(8, 3), (8,)),                   # 9
    ])}


def vector_models() -> dict[str, nn.Module]:
    return {
        "mlp_bn1d_softmax": nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                          nn.Sequential(nn.Linear(8, 4), nn.Softmax(dim=-1))),
        "mlp_logsoftmax": nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3),
                                        nn.LogSoftmax(dim=1)),
    }


def _secure_models(rank: int, specs: dict, xs: dict) -> dict:
    """Rank 0 owns the parameters, rank 1 the inputs; both evaluate every model on shares."""
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    out = {}
    for name, (arch, params) in specs.items():
        x = crypten.cryptensor(xs[name] if rank == 1 else torch.zeros_like(xs[name]), src=1)
        shared = {k: crypten.cryptensor(v if rank == 0 else torch.zeros_like(v), src=0)
                  for k, v in params.items()}
        out[name] = secure_forward(arch, x, shared).get_plain_text().numpy()
    return out


def test_every_supported_layer_matches_pytorch_on_shares(mpc):
    models = {**image_models(), **vector_models(), **graph_models()}
    covered = {type(m) for model in models.values() for m in model.modules()}
    missing = set(SUPPORTED_LAYERS) - covered
    assert not missing, f"add these layers to the test: {missing}"
    g = torch.Generator().manual_seed(0)
    specs, xs, want = {}, {}, {}
    for i, (name, model) in enumerate(models.items()):
        randomized(model, i)
        shape = (6,) if name in vector_models() else (2, 4, 4)
        specs[name] = extract_architecture(model, shape)
        xs[name] = torch.randn((5, *shape), generator=g, dtype=torch.float64)
        with torch.no_grad():
            want[name] = model.double()(xs[name]).numpy()
    results = mpc(_secure_models, 2, specs, xs)
    # Tolerance: linear layers are exact up to fixed-point truncation (~1e-4); sigmoid, tanh,
    # softmax and log-softmax are CrypTen approximations (~1e-2 on these ranges).
    for name in models:
        for r in results:
            np.testing.assert_allclose(r[name], want[name], atol=3e-2, err_msg=name)


def test_a_graph_keeps_its_edges_and_folds_only_a_batch_norm_that_alone_reads_a_conv():
    model = randomized(graph_models()["residual_concat"], 3)
    arch, params = extract_architecture(model, (2, 4, 4))
    assert [(layer.path, layer.op, layer.inputs) for layer in arch.layers] == [
        ("conv+bn", "conv2d", ()), ("relu", "relu", ()), ("conv2", "conv2d", ()),
        ("add", "add", (1, 2)), ("bn2", "affine", ()), ("cat", "concat", (4, 1)),
        ("gap", "adaptive_avg_pool2d", ()), ("flat", "flatten", ()), ("fc", "linear", ())]
    assert "conv/weight" not in params and "bn/scale" not in params
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    folded = torch.nn.functional.conv2d(x, params["conv+bn/weight"], params["conv+bn/bias"],
                                        padding=1)
    torch.testing.assert_close(folded, model.double().layers[1](model.layers[0](x)))
    wire = json.loads(json.dumps(arch.to_wire()))
    assert models.Architecture.from_wire(wire) == arch


@pytest.mark.parametrize("inputs, words", [
    ([5, 1], "only earlier layers"), ([-2, 1], r"-2 is outside \[-1, 4096\]"),
    ([0], "takes two or more inputs, got 1"),
    ([0, -1], r"the graph's shapes do not fit: inputs of shapes \[\[1, 4, 4, 4\], \[1, 2, 4, 4\]\]"),
])
def test_a_peer_architecture_with_bad_edges_is_refused(inputs, words):
    from mpc_fi.errors import WireFormatError

    arch, _ = extract_architecture(randomized(graph_models()["residual_concat"], 3), (2, 4, 4))
    wire = json.loads(json.dumps(arch.to_wire()))
    wire["layers"][3]["inputs"] = inputs  # the addition
    with pytest.raises(WireFormatError, match=words):
        models.Architecture.from_wire(wire)
    del wire["layers"][3]["inputs"]
    with pytest.raises(WireFormatError, match="needs its inputs listed"):
        models.Architecture.from_wire(wire)


def test_architecture_holds_no_weights():
    model = randomized(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), 0)
    arch, params = extract_architecture(model, (4,))
    assert arch.num_classes == 2 and arch.input_shape == (4,)
    assert [layer.op for layer in arch.layers] == ["linear", "relu", "linear"]
    assert arch.layers[0].params == {"weight": (3, 4), "bias": (3,)}
    text = repr(arch)
    for p in model.parameters():
        for v in p.detach().flatten()[:3].tolist():
            assert f"{v:.4f}" not in text
    assert set(params) == {"0/weight", "0/bias", "2/weight", "2/bias"}


def test_batchnorm_is_folded_by_its_owner():
    bn = randomized(nn.Sequential(nn.BatchNorm1d(3)), 1)
    arch, params = extract_architecture(nn.Sequential(bn, nn.Linear(3, 2)), (3,))
    assert arch.layers[0].op == "affine"
    x = torch.randn(4, 3, dtype=torch.float64)
    folded = x * params["0.0/scale"] + params["0.0/shift"]
    torch.testing.assert_close(folded, bn.double()(x))


def test_every_unsupported_layer_is_listed_with_its_path_and_fix():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Sequential(nn.LayerNorm(8), nn.LeakyReLU()),
                          nn.Linear(8, 3), nn.MaxPool2d(2, ceil_mode=True))
    with pytest.raises(UnsupportedModelError) as err:
        extract_architecture(model, (4,))
    text = str(err.value)
    assert "1 (GELU): not supported on shares; use ReLU" in text
    assert "2.0 (LayerNorm)" in text and "BatchNorm1d" in text
    assert "2.1 (LeakyReLU)" in text
    assert "4 (MaxPool2d): ceil_mode" in text


def test_wrong_input_shape_is_an_input_error():
    with pytest.raises(InputError, match=r"queries of shape \('batch', 5\) do not fit"):
        extract_architecture(nn.Sequential(nn.Linear(4, 3)), (5,))


def test_model_must_return_batch_by_classes():
    with pytest.raises(UnsupportedModelError, match=r"\(batch, classes\)"):
        extract_architecture(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)), (4,))
    with pytest.raises(UnsupportedModelError, match="need >= 2"):
        extract_architecture(nn.Sequential(nn.Linear(4, 1)), (4,))


def test_each_layer_kind_is_one_object_that_every_part_of_the_engine_reads():
    import torch
    from torch import nn

    from mpc_fi import memory, models, ranges
    from mpc_fi.layers import LAYERS
    from mpc_fi.layers.base import Layer
    from mpc_fi.onnx_import import _CONVERTERS

    for op, layer in LAYERS.items():
        assert layer.op == op and layer.torch_types and layer.onnx, op
        assert all(t in models.SUPPORTED_LAYERS for t in layer.torch_types)
        assert all(_CONVERTERS[k] is v for k, v in layer.onnx.items())
    with pytest.raises(ValueError, match="registered already"):
        LAYERS.register(LAYERS["relu"])

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    class SquareLayer(Layer):  # a new kind: this class and one registry line
        op = "square"
        torch_types = (Square,)

        def forward(self, x, args, params):
            return x * x

        def interval(self, lo, hi, args, params):
            top = torch.maximum(lo.abs(), hi.abs())
            return torch.zeros_like(lo), top * top, float((top * top).max())

    LAYERS.register(SquareLayer())
    try:
        models.SUPPORTED_LAYERS[Square] = models._converter(LAYERS["square"])
        model = nn.Sequential(nn.Linear(3, 4), Square(), nn.Linear(4, 2)).eval()
        arch, params = models.extract_architecture(model, (3,))
        assert [layer.op for layer in arch.layers] == ["linear", "square", "linear"]
        bounds = ranges.activation_ranges(arch, params, (-1.0, 1.0))
        assert bounds[1].op == "square" and bounds[1].low == 0.0 and bounds[1].product > 0
        assert len(memory.layer_elements(arch)) == 4
        assert models.Architecture.from_wire(arch.to_wire()).layers[1].op == "square"
    finally:
        LAYERS.pop("square")
        models.SUPPORTED_LAYERS.pop(Square, None)
