"""Graph models in full mode, end to end through the real launcher: CIFAR-style ResNets (their
own forward(), residual additions with identity and projection shortcuts, batch norms folded by
their owners, global average pooling), as a factory and as an ONNX file, on shares.

The owners' logits are averaged and revealed (``logit_average``, ``reveal: scores``), so the
forward passes themselves are compared. Tolerance: full mode's logit tolerance
(``tests/mpc_fi/test_federation.py``): the revealed average logits must equal the plaintext
twin's within ``FULL_LOGIT_TOL``, and the labels wherever the twin's top-two margin is at least
that. On shares each product is truncated to 16 fractional bits (2^-16 ~ 1.5e-5 per step); the
largest logit error measured on ResNet-20 here was 2.3e-4 (logits up to 5).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpc_fi import Federation, FederationConfig, InputError, ModelSource, OwnerConfig, \
    ProtocolConfig
from mpc_fi.config import QuerierConfig
from mpc_fi.demo import resnet
from mpc_fi.models import LOAD_AUDIT, extract_architecture
from mpc_fi.plain import top_two_margin
from mpc_fi.ranges import check_model_ranges
from protocols import REGISTRY

FULL_LOGIT_TOL = 1e-2
CLASSES = 4
SHAPE = (3, 16, 16)


def trained_resnet(depth: int, seed: int, width: int = 4) -> nn.Module:
    """PyTorch's default initialisation, random batch-norm statistics, a head that spreads the
    logits over a few units.

    What such a model can be is bounded by the owners' range check (:mod:`mpc_fi.ranges`): its
    sound interval bounds over the whole input box compound with depth, so weights that keep
    more of the query's signal through 19 layers (smaller batch-norm variances, a head that
    standardises the features) are refused at 16 fractional bits. Here the products stay below
    2^21; the logits vary little from query to query, so the test compares the revealed
    average logits themselves."""
    torch.manual_seed(seed)
    model = resnet(depth=depth, width=width, num_classes=CLASSES)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.2, 0.2)
        model.head.weight.mul_(20.0)
    return model.eval()


def export_onnx(model: nn.Module, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *SHAPE),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return str(path)


def resnet_federation(folder: Path, depth: int) -> tuple[FederationConfig, list[nn.Module]]:
    """Two owners: a factory with its weights file, and the same architecture as an ONNX file."""
    models = [trained_resnet(depth, seed=k) for k in range(2)]
    torch.save(models[0].state_dict(), folder / "owner0.pt")
    sources = [ModelSource(factory="mpc_fi.demo:resnet", weights=str(folder / "owner0.pt"),
                           kwargs={"depth": depth, "width": 4, "num_classes": CLASSES}),
               ModelSource(onnx=export_onnx(models[1], folder / "owner1.onnx"))]
    fed = FederationConfig(
        owners=tuple(OwnerConfig(name=f"owner{k}", model=s) for k, s in enumerate(sources)),
        mode="full", reveal="scores", protocol=ProtocolConfig(name="logit_average"), batch_size=32,
        querier=QuerierConfig(input_range=(0.0, 1.0)))
    return fed, models


def queries(n: int, seed: int) -> np.ndarray:
    """Images in [0, 1] whose channels differ in brightness from one query to the next (global
    average pooling would otherwise give every query nearly the same features)."""
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0, 1, size=(n, SHAPE[0], 1, 1))
    return np.clip(brightness + 0.2 * rng.normal(size=(n, *SHAPE)), 0, 1).astype(np.float32)


def check_resnet_on_shares(folder: Path, depth: int, n: int) -> None:
    fed, models = resnet_federation(folder, depth)
    x = queries(n, seed=depth)
    before = list(LOAD_AUDIT)
    result = Federation(fed, timeout_s=600).run(x)
    assert LOAD_AUDIT == before, "the launching process must not read any owner's weights"
    with torch.no_grad():
        logits = [m(torch.from_numpy(x)).to(torch.float64) for m in models]
    twin = REGISTRY["logit_average"](num_classes=CLASSES, num_owners=2,
                                     reveal="scores").plaintext(logits)
    got = result.prediction
    np.testing.assert_allclose(got.scores, twin.scores, atol=FULL_LOGIT_TOL)
    stable = (top_two_margin(torch.as_tensor(np.asarray(twin.scores))) >= FULL_LOGIT_TOL).numpy()
    assert stable.mean() > 0.6, "too few rows above the tolerance: the test would prove little"
    np.testing.assert_array_equal(got.labels[stable], np.asarray(twin.labels)[stable])
    assert all(c.rounds > 0 and c.bytes_sent > 0 for c in result.costs)


def test_resnet20_on_shares_equals_plaintext(tmp_path):
    """ResNet-20 (three basic blocks per stage, identity and projection shortcuts), 4-16
    channels, 3x16x16 queries."""
    check_resnet_on_shares(tmp_path, depth=20, n=24)


def test_the_resnet_architecture_is_its_graph_without_any_weight():
    model = trained_resnet(20, seed=3)
    arch, params = extract_architecture(model, SHAPE)
    ops = [layer.op for layer in arch.layers]
    # 19 convolutions (+ 2 projections), every batch norm folded into its convolution
    assert ops.count("conv2d") == 21 and "affine" not in ops and ops.count("add") == 9
    assert ops[-3:] == ["adaptive_avg_pool2d", "flatten", "linear"]
    adds = [layer for layer in arch.layers if layer.op == "add"]
    assert all(len(layer.inputs) == 2 for layer in adds)
    wire = json.dumps(arch.to_wire())

    def numbers(value):
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in numbers(v)]
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    assert all(isinstance(v, int) for v in numbers(json.loads(wire)))  # shapes, edges, strides
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]  # each gets a folded bias
    assert sum(p.numel() for p in params.values()) == sum(
        m.weight.numel() + m.out_channels for m in convs) + model.head.weight.numel() + CLASSES


def test_the_range_check_refuses_a_resnet20_with_data_batch_norm_statistics_naming_layers():
    """What training leaves (every channel normalised on data) keeps the query's signal through
    19 layers, and the sound interval bounds then compound past what 16 fractional bits hold:
    the owner refuses before sharing, naming each layer (README: deep models)."""
    torch.manual_seed(0)
    model = resnet(depth=20, width=4, num_classes=CLASSES)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # running statistics: the plain average over the batch
        model.train()(torch.from_numpy(queries(64, seed=99)))
    model.eval()
    arch, params = extract_architecture(model, SHAPE)
    with pytest.raises(InputError) as err:
        check_model_ranges(arch, params, (0.0, 1.0), 16)
    text = str(err.value)
    assert "/stages/stages.2/stages.2.2/conv2/Conv (conv2d): its product of input and weights " \
           "can reach 2^" in text and "/stages/stages.0/" not in text
    with torch.no_grad():
        assert float(model(torch.from_numpy(queries(64, seed=5))).abs().max()) < 2.0 ** 4
