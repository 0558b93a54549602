"""ONNX import: round trips through the legacy torch exporter, hand-built graphs, and errors."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from mpc_fi.config import ModelSource
from mpc_fi.errors import UnsupportedModelError
from mpc_fi.graph import Graph
from mpc_fi.models import SUPPORTED_LAYERS, extract_architecture, load_owner_model
from mpc_fi import onnx_import
from mpc_fi.onnx_import import load_onnx_model


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def export(model: nn.Module, dummy: torch.Tensor, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), dummy, str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return str(path)


def randomize(model: nn.Module) -> nn.Module:
    """Non-default weights and batch-norm statistics, so that nothing matches by luck."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


def leaf_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not isinstance(m, nn.Sequential)]


def check_round_trip(model: nn.Module, input_shape: tuple[int, ...], tmp_path) -> nn.Sequential:
    torch.manual_seed(1)
    model = randomize(model)
    path = export(model, torch.randn(2, *input_shape), tmp_path / "model.onnx")
    loaded = load_onnx_model(path)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    assert all(type(m) in SUPPORTED_LAYERS for m in leaf_layers(loaded)), loaded
    x = torch.randn(7, *input_shape)  # another batch size than at export
    with torch.no_grad():
        err = (loaded(x) - model(x)).abs().max().item()
    assert err < 1e-5, (err, loaded)
    extract_architecture(loaded, input_shape)  # the converted model can run on shares
    return loaded


class ViewFlatten(nn.Module):
    """``x.view(x.size(0), -1)``: exported as Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""

    def __init__(self, by_batch: bool):
        super().__init__()
        self.by_batch = by_batch
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h.view(h.size(0), -1) if self.by_batch else h.view(-1, 3 * 4 * 4)
        return self.fc(h)


ROUND_TRIPS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (6,)),
    "sigmoid_tanh_bn1d": (lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Sigmoid(),
                                                nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)), (6,)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)), (3, 8, 8)),
    "cnn_unfused_bn2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                               nn.BatchNorm2d(4), nn.MaxPool2d(3, stride=2, padding=1),
                                               nn.Flatten(), nn.Linear(4 * 4 * 4, 2)), (3, 8, 8)),
    "pools": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1),
                                    nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 6, 1, groups=2),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)),
              (3, 16, 16)),
    "dilated_conv": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2, padding=2, bias=False),
                                           nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
                     (2, 6, 6)),
    "dropout": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5),
                                      nn.Linear(16, 3)), (6,)),
    "softmax": (lambda: nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3),
                                      nn.Softmax(dim=1)), (6,)),
    "log_softmax": (lambda: nn.Sequential(nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3),
                                          nn.LogSoftmax(dim=-1)), (6,)),
    "view_batch": (lambda: ViewFlatten(by_batch=True), (2, 6, 6)),
    "view_features": (lambda: ViewFlatten(by_batch=False), (2, 6, 6)),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_matches_torch(name, tmp_path):
    factory, input_shape = ROUND_TRIPS[name]
    torch.manual_seed(0)
    check_round_trip(factory(), input_shape, tmp_path)


def test_round_trip_layer_types(tmp_path):
    torch.manual_seed(0)
    factory, shape = ROUND_TRIPS["cnn_unfused_bn2d"]
    loaded = check_round_trip(factory(), shape, tmp_path)
    assert [type(m) for m in loaded] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d,
                                         nn.Flatten, nn.Linear]
    factory, shape = ROUND_TRIPS["sigmoid_tanh_bn1d"]
    loaded = check_round_trip(factory(), shape, tmp_path)
    assert isinstance(loaded[1], nn.BatchNorm1d)
    factory, shape = ROUND_TRIPS["dropout"]  # the exporter drops eval-mode Dropout
    assert [type(m) for m in check_round_trip(factory(), shape, tmp_path)] == [nn.Linear, nn.ReLU,
                                                                              nn.Linear]


def test_equal_weights_become_identity_aliases(tmp_path):
    torch.manual_seed(0)
    first, second = nn.Linear(5, 5), nn.Linear(5, 5)
    second.load_state_dict(first.state_dict())
    model = nn.Sequential(first, nn.ReLU(), second, nn.Tanh(), nn.Linear(5, 3))
    path = export(model, torch.randn(2, 5), tmp_path / "shared.onnx")
    # the legacy exporter keeps one copy and aliases the other through Identity nodes
    aliases = [n for n in onnx.load(path).graph.node if n.op_type == "Identity"]
    assert aliases, "expected Identity nodes aliasing the equal initializers"
    loaded = check_round_trip(model, (5,), tmp_path)
    assert torch.equal(loaded[0].weight, loaded[2].weight)
    assert torch.equal(loaded[0].bias, first.bias) and torch.equal(loaded[2].bias, second.bias)


def test_default_batchnorm_stats_alias_parameters(tmp_path):
    # default BatchNorm: weight == running_var == 1 and bias == running_mean == 0 -> Identity nodes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    path = export(model, torch.randn(2, 4), tmp_path / "bn.onnx")
    loaded = load_onnx_model(path)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() < 1e-5


def test_load_owner_model_uses_the_importer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    path = export(model, torch.randn(2, 4), tmp_path / "owner.onnx")
    loaded = load_owner_model(ModelSource(onnx=path))
    with torch.no_grad():
        x = torch.randn(3, 4)
        assert (loaded(x) - model(x)).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------
# Hand-built graphs (MatMul + Add, Constant weights, no shape information)
# ---------------------------------------------------------------------------------------
def save_graph(path, nodes, inits, in_shape, out_shape, *, extra_inputs=(), extra_outputs=(),
               opset=17) -> str:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape), *extra_outputs],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return str(path)


def check_against_reference(path, x: np.ndarray) -> nn.Sequential:
    loaded = load_onnx_model(path)
    expected = ReferenceEvaluator(onnx.load(path)).run(None, {"x": x})[0]
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    return loaded


def test_matmul_add_and_matmul_alone(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Add", ["h1", "b1"], ["h2"], name="add1"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("MatMul", ["h3", "w2"], ["y"], name="mm2")]
    inits = {"w1": rng.normal(size=(4, 6)), "b1": rng.normal(size=6), "w2": rng.normal(size=(6, 3))}
    path = save_graph(tmp_path / "mm.onnx", nodes, inits, ["N", 4], ["N", 3])
    loaded = check_against_reference(path, rng.normal(size=(5, 4)).astype(np.float32))
    assert [type(m) for m in loaded] == [nn.Linear, nn.ReLU, nn.Linear]
    assert loaded[0].bias is not None and loaded[2].bias is None


def test_constant_nodes_gemm_and_reshape_without_shapes(tmp_path, monkeypatch):
    # no shape information at all: the BatchNorm rank comes from the previous layer (Linear)
    monkeypatch.setattr(onnx_import, "_shapes", lambda model: {})
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2 * 3 * 3, 4)).astype(np.float32)  # transB=0: (in, out)
    c = helper.make_tensor("c", TensorProto.FLOAT, w.shape, w.reshape(-1).tolist())
    nodes = [helper.make_node("Constant", [], ["shape"], value_ints=[-1, 18]),
             helper.make_node("Constant", [], ["w"], value=c),
             helper.make_node("Identity", ["w"], ["w_alias"]),  # alias of a constant
             helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "w_alias", "b"], ["h"], name="gemm"),
             helper.make_node("Dropout", ["h"], ["d"], name="drop"),
             helper.make_node("Identity", ["d"], ["i"], name="ident"),
             helper.make_node("BatchNormalization", ["i", "s", "bb", "m", "v"], ["y"], name="bn")]
    inits = {"b": rng.normal(size=4), "s": rng.uniform(0.5, 2, 4), "bb": rng.normal(size=4),
             "m": rng.normal(size=4), "v": rng.uniform(0.5, 2, 4)}
    path = save_graph(tmp_path / "c.onnx", nodes, inits, ["N", 2, 3, 3], ["N", 4])
    loaded = check_against_reference(path, rng.normal(size=(3, 2, 3, 3)).astype(np.float32))
    assert [type(m) for m in loaded] == [nn.Flatten, nn.Linear, nn.Identity, nn.Identity,
                                         nn.BatchNorm1d]


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def error_of(path) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        load_onnx_model(str(path))
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    return str(exc)


def test_truncated_file(tmp_path):
    torch.manual_seed(0)
    path = export(nn.Sequential(nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 3)), torch.randn(2, 30),
                  tmp_path / "full.onnx")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    message = error_of(cut)
    assert str(cut) in message and "not a valid ONNX model" in message


@pytest.mark.parametrize("content", [b"this is a text file, not a model\n", b"", b"\x00\xff" * 40])
def test_not_onnx(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    message = error_of(path)
    assert str(path) in message and "not a valid ONNX model" in message


def test_missing_file(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.onnx")


@pytest.mark.parametrize("layer, op", [(nn.GELU(), "Gelu"), (nn.LeakyReLU(), "LeakyRelu"),
                                       (nn.LayerNorm(8), "LayerNormalization")])
def test_unsupported_torch_layer(tmp_path, layer, op):
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 3))
    message = error_of(export(model, torch.randn(2, 4), tmp_path / "m.onnx"))
    assert f"({op})" in message and "not supported" in message and "use " in message


def test_lstm_is_reported(tmp_path):
    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    message = error_of(export(Rnn(), torch.randn(2, 3, 4), tmp_path / "lstm.onnx"))
    assert "(LSTM)" in message and "feed-forward" in message


def test_hand_built_erf(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="r"),
             helper.make_node("Erf", ["h"], ["e"], name="my_erf"),
             helper.make_node("Sigmoid", ["e"], ["y"], name="s")]
    message = error_of(save_graph(tmp_path / "erf.onnx", nodes, {}, ["N", 4], ["N", 4]))
    assert "my_erf (Erf)" in message and message.count("\n  - ") == 1


def test_residual_with_gelu_names_the_gelu_and_its_alternative(tmp_path):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.GELU()

        def forward(self, x):
            h = self.fc(x)
            return self.act(h) + h

    message = error_of(export(Residual(), torch.randn(2, 4), tmp_path / "res.onnx"))
    assert "(Gelu): op Gelu is not supported on shares; use ReLU" in message
    assert "(Add)" not in message and message.count("\n  - ") == 1  # the residual Add is fine


def test_asymmetric_pads_and_bad_attributes(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[0, 0, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], ceil_mode=1),
             helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=2),
             helper.make_node("Gemm", ["f", "fw"], ["y"], name="gemm", transA=1)]
    inits = {"w": rng.normal(size=(2, 1, 3, 3)), "fw": rng.normal(size=(3, 8))}
    message = error_of(save_graph(tmp_path / "pads.onnx", nodes, inits, ["N", 1, 6, 6], ["N", 3]))
    for part in ("conv (Conv): asymmetric pads", "pool (MaxPool): ceil_mode",
                 "flat (Flatten): only Flatten(axis=1)", "gemm (Gemm): transA=1"):
        assert part in message


def test_two_inputs_and_two_outputs(tmp_path):
    nodes = [helper.make_node("Add", ["x", "x2"], ["y"], name="sum"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    extra_in = [helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 4])]
    extra_out = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])]
    message = error_of(save_graph(tmp_path / "two.onnx", nodes, {}, ["N", 4], ["N", 4],
                                  extra_inputs=extra_in, extra_outputs=extra_out))
    assert "2 inputs (x, x2)" in message and "2 outputs (y, z)" in message
    assert "sum (Add): reads 'x2', which the model input 'x' does not lead to" in message


def test_reshape_that_is_not_a_flatten(tmp_path):
    class Unflatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).view(x.size(0), 2, 4)

    message = error_of(export(Unflatten(), torch.randn(2, 8), tmp_path / "r.onnx"))
    assert "(Reshape)" in message and "not a flattening" in message


def test_dangling_and_unconnected_nodes(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("Tanh", ["y"], ["t"], name="dangling"),
             helper.make_node("RandomNormal", [], ["r"], name="noise", shape=[1, 4])]
    message = error_of(save_graph(tmp_path / "d.onnx", nodes, {"unused": rng.normal(size=3)},
                                  ["N", 4], ["N", 4]))
    assert "noise (RandomNormal): takes 0 computed inputs" in message
    assert "tensor 'y'" not in message  # y feeds one node; the problem is elsewhere
    nodes = nodes[:2]  # Tanh consumes the output but is not part of the chain to it
    message = error_of(save_graph(tmp_path / "d2.onnx", nodes, {}, ["N", 4], ["N", 4]))
    assert "dangling (Tanh): not on a path from input 'x' to output 'y'" in message


def test_reshape_with_wrong_feature_count(tmp_path):
    nodes = [helper.make_node("Constant", [], ["shape"], value_ints=[-1, 4]),
             helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    message = error_of(save_graph(tmp_path / "r.onnx", nodes, {}, ["N", 2, 4], ["N", 4]))
    assert "reshape (Reshape): reshape to (-1, 4) is not a flattening" in message


# ---------------------------------------------------------------------------------------
# Graphs: residual additions, concatenations, global pooling, Gemm in any layout
# ---------------------------------------------------------------------------------------
def residual_graph(tmp_path, *, reduce_mean: bool, trans_b: int, alpha: float, beta: float):
    rng = np.random.default_rng(3)
    pool = (helper.make_node("ReduceMean", ["cat"], ["f"], name="mean", axes=[2, 3], keepdims=0)
            if reduce_mean else helper.make_node("GlobalAveragePool", ["cat"], ["g"], name="gap"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "s", "bb", "m", "v"], ["n2"], name="bn2"),
             helper.make_node("Sum", ["r1", "n2"], ["res"], name="residual"),
             helper.make_node("Concat", ["res", "r1"], ["cat"], name="cat", axis=-3), pool]
    if not reduce_mean:
        nodes.append(helper.make_node("Flatten", ["g"], ["f"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["f", "wf", "cf"], ["y"], name="head", transB=trans_b,
                                  alpha=alpha, beta=beta))
    wf = rng.normal(size=(3, 8))
    inits = {"w1": rng.normal(size=(4, 2, 3, 3)) * 0.3, "b1": rng.normal(size=4),
             "w2": rng.normal(size=(4, 4, 3, 3)) * 0.3, "s": rng.uniform(0.5, 2, 4),
             "bb": rng.normal(size=4), "m": rng.normal(size=4), "v": rng.uniform(0.5, 2, 4),
             "wf": wf if trans_b else wf.T, "cf": rng.normal(size=(1, 3))}
    return save_graph(tmp_path / "res.onnx", nodes, inits, ["N", 2, 4, 4], ["N", 3])


@pytest.mark.parametrize("reduce_mean, trans_b, alpha, beta", [
    (False, 1, 1.0, 1.0), (True, 0, 0.5, 2.0), (False, 0, -1.5, 0.0)])
def test_residual_concat_pooling_and_gemm_layouts(tmp_path, reduce_mean, trans_b, alpha, beta):
    path = residual_graph(tmp_path, reduce_mean=reduce_mean, trans_b=trans_b, alpha=alpha,
                          beta=beta)
    loaded = check_against_reference(path, np.random.default_rng(4).normal(
        size=(5, 2, 4, 4)).astype(np.float32))
    assert isinstance(loaded, Graph) and not loaded.training
    arch, params = extract_architecture(loaded, (2, 4, 4))
    assert [(layer.op, layer.inputs) for layer in arch.layers] == [
        ("conv2d", ()), ("relu", ()), ("conv2d", ()), ("add", (1, 2)), ("concat", (3, 1)),
        ("adaptive_avg_pool2d", ()), ("flatten", ()), ("linear", ())]
    assert arch.layers[2].path == "conv2+bn2"  # the batch norm folded into its convolution
    assert arch.layers[4].args == {"dim": 1}


def test_graph_nodes_that_cannot_run_on_shares_are_named(tmp_path):
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "r"], ["mm"], name="square"),
             helper.make_node("ReduceSum", ["r"], ["rs"], name="rowsum", keepdims=1),
             helper.make_node("Add", ["mm", "rs"], ["bc"], name="broadcast"),
             helper.make_node("Add", ["bc", "k"], ["a"], name="plus_const"),
             helper.make_node("Concat", ["a", "r"], ["c"], name="batch_cat", axis=0),
             helper.make_node("Gemm", ["w", "c"], ["y"], name="gemm_b", transB=1)]
    message = error_of(save_graph(tmp_path / "bad.onnx", nodes,
                                  {"k": rng.normal(size=(1, 4)), "w": rng.normal(size=(4, 4))},
                                  ["N", 4], ["N", 4]))
    for part in ("square (MatMul): input B ('r') must be an initializer or a constant",
                 "rowsum (ReduceSum): op ReduceSum is not supported on shares",
                 "broadcast (Add): inputs of shapes", "broadcasting is not supported",
                 "plus_const (Add): addition of a constant (k) is not supported on shares",
                 "batch_cat (Concat): concatenation along the batch axis (0)",
                 "gemm_b (Gemm): A is a constant and B the computed input"):
        assert part in message, part


def test_a_module_with_its_own_forward_is_traced_and_checked(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))

    torch.manual_seed(0)
    model = Branchy().eval()
    arch, params = extract_architecture(model, (4,))
    assert [(layer.op, layer.inputs) for layer in arch.layers] == [
        ("linear", ()), ("linear", (-1,)), ("concat", (0, 1)), ("relu", ()), ("linear", ())]

    class ValueBranch(nn.Module):  # a trace follows one branch: refused, not silently wrong
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if x.max() > 1 else self.fc(torch.relu(x))

    with pytest.raises(UnsupportedModelError, match=r"<model> \(ValueBranch\): its traced graph "
                                                    r"differs from forward\(\).*branches on the values"):
        extract_architecture(ValueBranch().eval(), (4,))


def test_common_forward_idioms_trace_to_supported_layers():
    """torchvision-style code: an in-place residual ``out += identity``, ``F.relu(inplace=True)``,
    ``torch.cat``, a batch norm after a concatenation (not foldable: a per-channel affine map),
    ``F.avg_pool2d(x, x.size()[3])`` and ``x.view(x.size(0), -1)``."""
    import torch.nn.functional as F  # noqa: PLC0415

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            identity = x
            out = F.relu(self.b1(self.c1(x)), inplace=True)
            out = self.b2(self.c2(out))
            out += identity
            return F.relu(out)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block = nn.Conv2d(3, 4, 3, padding=1), Block(4)
            self.bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 3)

        def forward(self, x):
            x = self.block(F.relu(self.stem(x)))
            x = self.bn(torch.cat([x, x], 1))
            out = F.avg_pool2d(x, x.size()[3])
            return self.fc(out.view(out.size(0), -1))

    torch.manual_seed(0)
    arch, params = extract_architecture(randomize(Net()), (3, 8, 8))
    assert [(layer.op, layer.inputs) for layer in arch.layers] == [
        ("conv2d", ()), ("relu", ()), ("conv2d", ()), ("relu", ()), ("conv2d", ()),
        ("add", (4, 1)), ("relu", ()), ("concat", (6, 6)), ("affine", ()), ("avg_pool2d", ()),
        ("flatten", ()), ("linear", ())]
