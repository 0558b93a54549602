"""Output mode runs any model its owner can run; full mode keeps its supported-layer subset.

Federations here mix owner kinds (a torch factory with its own forward(), ONNX files run by
onnxruntime, scikit-learn models exported with skl2onnx) and reveal the averaged distribution
(soft voting), so that a wrong contribution from any single owner shows in the scores.

Reference: each owner's plaintext model (the torch module, or scikit-learn's ``predict_proba``
turned into ``log(max(p, 1e-12))`` as :mod:`mpc_fi.onnx_runtime` does), aggregated by the
protocol's plaintext twin as in ``test_federation.py``. Tolerances: onnxruntime and torch (or
scikit-learn in float64) differ by ~1e-6 before fixed-point encoding (2^-16 ~ 1.5e-5), so the
revealed distributions must agree within ``SCORE_TOL`` and the labels exactly wherever the
plaintext top-two margin is at least ``MARGIN`` (random forests tie often: their probabilities
are fractions of trees).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper
from torch import nn

from mpc_fi import Federation, FederationConfig, InputError, ModelSource, OwnerConfig, \
    ProtocolConfig, UnsupportedModelError
from mpc_fi.models import extract_architecture, load_owner_model, output_classes
from mpc_fi.onnx_runtime import PROBABILITY_FLOOR
from mpc_fi.plain import top_two_margin
from protocols import REGISTRY
from tests.models import layernorm_gelu_mlp, mini_resnet

SCORE_TOL = 1e-4
MARGIN = 1e-3
CLASSES = 3


# ---------------------------------------------------------------------------------------
# Owners of each kind, and their plaintext logits
# ---------------------------------------------------------------------------------------
def trained_torch(factory, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = factory(**kwargs)
    with torch.no_grad():  # non-trivial batch-norm statistics and spread-out logits
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        head = model[-1] if isinstance(model, nn.Sequential) else model.head
        head.weight.mul_(3.0)
    return model.eval()


def export(model: nn.Module, example: torch.Tensor, path: Path, *, dynamic: bool) -> str:
    """torch.onnx.export with its defaults; ``dynamic`` adds a dynamic batch dimension."""
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic else {}
    torch.onnx.export(model, (example,), str(path), **kwargs)
    return str(path)


def tabular(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = np.argmax(x @ np.random.default_rng(99).normal(size=(6, CLASSES)), axis=1)
    return x, y


def sklearn_onnx(clf, path: Path, *, zipmap: bool) -> str:
    from skl2onnx import to_onnx  # noqa: PLC0415

    options = None if zipmap else {id(clf): {"zipmap": False}}
    model = to_onnx(clf, np.zeros((1, 6), dtype=np.float32), options=options)
    path.write_bytes(model.SerializeToString())
    return str(path)


def sklearn_logits(clf, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.log(np.clip(clf.predict_proba(x), PROBABILITY_FLOOR, None)))


def torch_logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(x)).to(torch.float64)


def federation(sources: list[ModelSource]) -> FederationConfig:
    return FederationConfig(
        owners=tuple(OwnerConfig(name=f"owner{k}", model=s) for k, s in enumerate(sources)),
        mode="output", reveal="scores", protocol=ProtocolConfig(name="soft_vote"), batch_size=16)


def check_against_plaintext(fed: FederationConfig | str, x: np.ndarray,
                            logits: list[torch.Tensor]) -> None:
    result = Federation(fed, timeout_s=300).run(x)
    twin = REGISTRY["soft_vote"](num_classes=CLASSES, num_owners=len(logits),
                                 reveal="scores").plaintext(logits)
    avg = torch.stack([lg.softmax(-1) for lg in logits]).mean(0)
    stable = (top_two_margin(avg) >= MARGIN).numpy()
    assert stable.mean() > 0.8, "too few rows above the margin: the test would prove little"
    np.testing.assert_array_equal(result.prediction.labels[stable], twin.labels[stable])
    np.testing.assert_allclose(result.prediction.scores, twin.scores, atol=SCORE_TOL)


# ---------------------------------------------------------------------------------------
# Output mode: secure labels equal the plaintext ensemble
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnets(tmp_path_factory):
    """Three mini-ResNets: weights of the first, and the others exported by torch.onnx.export.

    One file comes from ``torch.onnx.export`` with its defaults (the batch fixed to the example's
    size, 1: fed row by row), one with a dynamic batch dimension.
    """
    folder = tmp_path_factory.mktemp("resnets")
    models = [trained_torch(mini_resnet, seed=k) for k in range(3)]
    torch.save(models[0].state_dict(), folder / "owner0.pt")
    return models, [
        ModelSource(factory="tests.models:mini_resnet", weights=str(folder / "owner0.pt")),
        ModelSource(onnx=export(models[1], torch.randn(1, 1, 8, 8), folder / "r1.onnx",
                                dynamic=False)),
        ModelSource(onnx=export(models[2], torch.randn(2, 1, 8, 8), folder / "r2.onnx",
                                dynamic=True)),
    ]


@pytest.mark.slow  # graph models in full mode run by default: test_graph_models.py
def test_resnet_factory_and_its_onnx_exports_in_output_mode(resnets):
    """A module with its own forward() and residual adds, as a factory and as ONNX files."""
    models, sources = resnets
    x = np.random.default_rng(1).normal(size=(40, 1, 8, 8)).astype(np.float32)
    check_against_plaintext(federation(sources), x, [torch_logits(m, x) for m in models])


def test_layernorm_gelu_onnx_and_sklearn_with_zipmap_in_output_mode(tmp_path):
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    mlp = trained_torch(layernorm_gelu_mlp, seed=0)
    x_train, y_train = tabular(300, seed=2)
    lr = LogisticRegression(max_iter=500).fit(x_train[:150], y_train[:150])
    rf = RandomForestClassifier(n_estimators=15, max_depth=4, random_state=0).fit(
        x_train[150:], y_train[150:])
    sources = [
        ModelSource(onnx=export(mlp, torch.randn(1, 6), tmp_path / "mlp.onnx", dynamic=True)),
        ModelSource(onnx=sklearn_onnx(lr, tmp_path / "lr.onnx", zipmap=True)),
        ModelSource(onnx=sklearn_onnx(rf, tmp_path / "rf.onnx", zipmap=False)),
    ]
    x, _ = tabular(36, seed=3)
    logits = [torch_logits(mlp, x), sklearn_logits(lr, x), sklearn_logits(rf, x)]
    check_against_plaintext(federation(sources), x, logits)


def test_sklearn_the_other_way_round_in_output_mode(tmp_path):
    """LogisticRegression without ZipMap, RandomForest with it."""
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    x_train, y_train = tabular(300, seed=4)
    lr = LogisticRegression(max_iter=500).fit(x_train[:150], y_train[:150])
    rf = RandomForestClassifier(n_estimators=15, max_depth=4, random_state=1).fit(
        x_train[150:], y_train[150:])
    sources = [ModelSource(onnx=sklearn_onnx(lr, tmp_path / "lr.onnx", zipmap=False)),
               ModelSource(onnx=sklearn_onnx(rf, tmp_path / "rf.onnx", zipmap=True))]
    x, _ = tabular(36, seed=5)
    check_against_plaintext(federation(sources), x, [sklearn_logits(lr, x), sklearn_logits(rf, x)])


# ---------------------------------------------------------------------------------------
# The ONNX runner on its own (no federation)
# ---------------------------------------------------------------------------------------
def test_probabilities_become_log_probabilities_with_and_without_zipmap(tmp_path):
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415

    x_train, y_train = tabular(200, seed=6)
    rf = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(x_train, y_train)
    x, _ = tabular(7, seed=7)
    want = sklearn_logits(rf, x)
    for zipmap in (True, False):
        model = load_owner_model(ModelSource(onnx=sklearn_onnx(rf, tmp_path / f"{zipmap}.onnx",
                                                               zipmap=zipmap)))
        got = model(torch.from_numpy(x))
        assert got.shape == (7, CLASSES) and bool((got >= np.log(PROBABILITY_FLOOR)).all())
        np.testing.assert_allclose(got.exp().numpy(), want.exp().numpy(), atol=1e-6)


def test_fixed_batch_dimension_is_fed_in_padded_chunks(tmp_path):
    model = trained_torch(layernorm_gelu_mlp, seed=1)
    path = export(model, torch.randn(4, 6), tmp_path / "fixed4.onnx", dynamic=False)
    runner = load_owner_model(ModelSource(onnx=path))
    assert runner.input_shape[0] == 4  # the default export fixes the example's batch size
    x, _ = tabular(10, seed=8)  # 4 + 4 + 2 (padded to 4)
    np.testing.assert_allclose(runner(torch.from_numpy(x)).numpy(), torch_logits(model, x).numpy(),
                               atol=1e-5)
    assert output_classes(runner, (6,)) == CLASSES


def test_queries_of_another_shape_are_refused_by_the_onnx_input(resnets):
    runner = load_owner_model(resnets[1][2])
    with pytest.raises(InputError, match=r"queries of shape \(N, 64\) do not fit this owner's "
                                         r"ONNX input 'x' of shape \(N, 1, 8, 8\) \(rank 4\)"):
        output_classes(runner, (64,))


def test_onnxruntime_is_imported_only_by_onnx_owners_in_output_mode():
    code = ("import sys, mpc_fi, mpc_fi.models, mpc_fi.party, mpc_fi.onnx_import; "
            "print('onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------
def test_sklearn_labels_must_be_0_to_c_minus_1(tmp_path):
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    x, y = tabular(120, seed=9)
    shifted = LogisticRegression(max_iter=300).fit(x, y + 1)
    path = sklearn_onnx(shifted, tmp_path / "shifted.onnx", zipmap=False)
    with pytest.raises(UnsupportedModelError, match=r"\(LinearClassifier\): class labels \[1, 2, 3\] "
                                                    r"are not 0..2 in order.*LabelEncoder"):
        load_owner_model(ModelSource(onnx=path))
    named = LogisticRegression(max_iter=300).fit(x, np.array(["cat", "dog", "eel"])[y])
    path = sklearn_onnx(named, tmp_path / "named.onnx", zipmap=False)
    with pytest.raises(UnsupportedModelError, match=r"class labels are strings \['cat', 'dog', 'eel'\]"):
        load_owner_model(ModelSource(onnx=path))


def test_onnx_without_a_float_scores_output_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["scores"], name="scores"),
         helper.make_node("ArgMax", ["scores"], ["label"], name="argmax", axis=1, keepdims=0)],
        "labels_only", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        [helper.make_tensor("w", TensorProto.FLOAT, [6, 3], np.ones(18, dtype=np.float32))])
    path = tmp_path / "labels.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedModelError, match=r"no float \(N, C\) output .*label "
                                                    r"\(tensor\(int64\), \(N\)\).*drop a final ArgMax"):
        load_owner_model(ModelSource(onnx=str(path)))


def test_wrong_class_count_is_refused_by_every_party(tmp_path):
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    x, y = tabular(120, seed=10)
    lr = LogisticRegression(max_iter=300).fit(x, y)  # 3 classes
    mlp = trained_torch(layernorm_gelu_mlp, seed=2, num_classes=4)
    fed = federation([ModelSource(onnx=sklearn_onnx(lr, tmp_path / "lr.onnx", zipmap=True)),
                      ModelSource(onnx=export(mlp, torch.randn(1, 6), tmp_path / "m.onnx",
                                              dynamic=True))])
    with pytest.raises(InputError, match="disagree on the number of classes: owner0=3, owner1=4"):
        Federation(fed, timeout_s=300).run(x[:4])


def test_full_mode_converts_the_resnet_factory_and_its_onnx_export_to_the_same_graph(resnets):
    """The module with its own forward() is traced by its owner; the exported file is imported:
    both give the same graph (residual adds, x.mean((2, 3)) as global average pooling)."""
    models, sources = resnets
    x = torch.randn(5, 1, 8, 8)
    graphs = []
    for model, source in ((models[0], sources[0]), (models[2], sources[2])):
        arch, params = extract_architecture(load_owner_model(source, mode="full"), (1, 8, 8))
        graphs.append([(layer.op, layer.inputs) for layer in arch.layers])
        assert [layer.op for layer in arch.layers].count("add") == 2
        assert ("adaptive_avg_pool2d", ()) in graphs[-1]
    assert graphs[0] == graphs[1]


def test_full_mode_refuses_layernorm_and_gelu_naming_them_and_the_alternative(tmp_path):
    with pytest.raises(UnsupportedModelError) as err:
        extract_architecture(load_owner_model(ModelSource(factory="tests.models:custom"),
                                              mode="full"), (6,))
    text = str(err.value)
    assert "body.1 (LayerNorm): not supported on shares; use BatchNorm1d/BatchNorm2d" in text
    assert "mode 'output'" in text
    path = export(trained_torch(layernorm_gelu_mlp, seed=3), torch.randn(1, 6),
                  tmp_path / "m.onnx", dynamic=True)
    with pytest.raises(UnsupportedModelError) as err:
        load_owner_model(ModelSource(onnx=path), mode="full")
    text = str(err.value)
    assert "(LayerNormalization): op LayerNormalization is not supported on shares; use " \
           "BatchNorm1d/BatchNorm2d" in text
    assert "(Gelu): op Gelu is not supported on shares; use ReLU" in text
    assert "or use mode 'output'" in text


def test_full_mode_names_sklearn_nodes_and_sends_them_to_output_mode(tmp_path):
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    x, y = tabular(120, seed=11)
    path = sklearn_onnx(LogisticRegression(max_iter=300).fit(x, y), tmp_path / "lr.onnx",
                        zipmap=False)
    with pytest.raises(UnsupportedModelError, match=r"\(LinearClassifier\): op ai.onnx.ml."
                                                    r"LinearClassifier is not supported on shares; "
                                                    r"use mode 'output'"):
        load_owner_model(ModelSource(onnx=path), mode="full")


# ---------------------------------------------------------------------------------------
# A factory module beside the federation file
# ---------------------------------------------------------------------------------------
FACTORY_MODULE = '''
from torch import nn


def build(num_classes=3):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, num_classes))
'''


def test_factory_beside_the_federation_file_imports_without_pythonpath(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "beside_fed_model.py").write_text(FACTORY_MODULE)
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, CLASSES)).eval())
        torch.save(models[-1].state_dict(), folder / f"w{k}.pt")
    owners = [{"name": f"owner{k}", "model": {"factory": "beside_fed_model:build",
                                              "weights": f"w{k}.pt"}} for k in range(2)]
    (folder / "federation.yaml").write_text(yaml.safe_dump(
        {"owners": owners, "mode": "output", "reveal": "scores"}))
    path_before = list(sys.path)
    x, _ = tabular(24, seed=12)
    check_against_plaintext(str(folder / "federation.yaml"), x, [torch_logits(m, x) for m in models])
    # the launching process never imported it, and its sys.path is unchanged
    assert "beside_fed_model" not in sys.modules and sys.path == path_before


def test_factory_folder_is_on_sys_path_only_while_loading(tmp_path):
    (tmp_path / "beside_fed_model2.py").write_text(FACTORY_MODULE)
    before = list(sys.path)
    try:
        model = load_owner_model(ModelSource(factory="beside_fed_model2:build",
                                             factory_dir=str(tmp_path)))
        assert isinstance(model, nn.Sequential) and sys.path == before
        with pytest.raises(UnsupportedModelError, match=r"cannot import model factory module "
                                                        r"'nowhere_module' \(looked in "):
            load_owner_model(ModelSource(factory="nowhere_module:build", factory_dir=str(tmp_path)))
    finally:
        sys.modules.pop("beside_fed_model2", None)


def test_a_model_that_raises_on_a_batch_stops_every_party_together():
    fed = federation([ModelSource(factory="tests.models:raises_when"),
                      ModelSource(factory="tests.models:raises_when")])
    x, _ = tabular(32, seed=13)
    x[:, 0] = np.clip(x[:, 0], -2, 2)
    x[20, 0] = 5.0  # in the second batch of 16
    with pytest.raises(InputError, match="the model failed on a batch: ValueError: feature 0 out "
                                         "of the training range"):
        Federation(fed, timeout_s=120).run(x)
