"""Per-query wall time of output mode for each owner-model family, on the demo's digits split.

    python benchmarks/any_model_output_mode.py [--repeats 2]

Every family gets the demo's data (scikit-learn's digits, 3 non-IID owners, Dirichlet alpha 0.5,
seed 0, the held-out 540 queries), soft voting, label release, TTP dealer, batches of 256; each
owner model is trained on its owner's share. Printed per family: accuracy of the secure ensemble,
its agreement with the plaintext ensemble, the querier's inference wall time (the party's own
timer, from the first batch to the last answer: sharing, aggregation, opening, and the owners'
local forward passes it waits for) per query, and the whole ``Federation.run`` wall time (process
start, handshake, model loading, inference), the best of ``--repeats`` runs.

Not a pytest-benchmark suite (not collected); the factories below are imported by owner
processes through ``ModelSource.factory_dir``, so this file must stay importable without side
effects.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class MiniResNet(nn.Module):
    def __init__(self, channels: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(_Block(channels), _Block(channels))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def mini_resnet(channels: int = 8, num_classes: int = 10) -> nn.Module:
    return MiniResNet(channels, num_classes)


def layernorm_gelu(in_features: int = 64, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 32), nn.LayerNorm(32), nn.GELU(),
                         nn.Linear(32, num_classes))


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    torch.onnx.export(model.eval(), (example,), str(path), verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    return str(path)


def _families(work: Path):
    """(family, sources, plaintext logits of the queries, queries, labels) for each family."""
    from skl2onnx import to_onnx  # noqa: PLC0415
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    import demos as demo  # noqa: PLC0415
    from mpc_fi import ModelSource  # noqa: PLC0415

    setup = demo.prepare(work / "demo", num_owners=3, seed=0)
    x_test, y_test = setup.x_test, setup.y_test
    x, y = demo.load_dataset("digits")
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    parts = demo.dirichlet_split(y_train, 3, 0.5, np.random.default_rng(0))
    images = x_test.reshape(-1, 1, 8, 8)

    def logits(models, q):
        with torch.no_grad():
            return [m(torch.from_numpy(q)).to(torch.float64) for m in models]

    yield ("MLP, Sequential factory", [o.model for o in setup.federation.owners],
           demo.owner_logits(setup.models, x_test), x_test, y_test)
    yield ("MLP, Sequential as ONNX", [ModelSource(onnx=_export(m, torch.zeros(1, 64),
                                                                work / f"mlp{k}.onnx"))
                                       for k, m in enumerate(setup.models)],
           demo.owner_logits(setup.models, x_test), x_test, y_test)

    resnets, sources = [], []
    for k, idx in enumerate(parts):
        torch.manual_seed(k)
        model = demo.train(mini_resnet(), x_train[idx].reshape(-1, 1, 8, 8), y_train[idx], seed=k)
        torch.save(model.state_dict(), work / f"resnet{k}.pt")
        resnets.append(model)
        sources.append(ModelSource(factory="any_model_output_mode:mini_resnet",
                                   weights=str(work / f"resnet{k}.pt"), factory_dir=str(HERE)))
    yield "ResNet (own forward), factory", sources, logits(resnets, images), images, y_test
    yield ("ResNet (residual adds) as ONNX",
           [ModelSource(onnx=_export(m, torch.zeros(1, 1, 8, 8), work / f"resnet{k}.onnx"))
            for k, m in enumerate(resnets)], logits(resnets, images), images, y_test)

    lns = []
    for k, idx in enumerate(parts):
        torch.manual_seed(k)
        lns.append(demo.train(layernorm_gelu(), x_train[idx], y_train[idx], seed=k))
    yield ("LayerNorm+GELU MLP as ONNX",
           [ModelSource(onnx=_export(m, torch.zeros(1, 64), work / f"ln{k}.onnx"))
            for k, m in enumerate(lns)], logits(lns, x_test), x_test, y_test)

    for name, make, zipmap in (("LogisticRegression", lambda: LogisticRegression(max_iter=2000), False),
                               ("RandomForest (ZipMap)", lambda: RandomForestClassifier(
                                   n_estimators=50, random_state=0), True)):
        clfs, sources = [], []
        for k, idx in enumerate(parts):
            clf = make().fit(x_train[idx], y_train[idx])
            if list(clf.classes_) != list(range(10)):  # an owner without every class
                raise SystemExit(f"{name}: owner {k} lacks classes; pick another split")
            options = None if zipmap else {id(clf): {"zipmap": False}}
            path = work / f"{name}{k}.onnx"
            path.write_bytes(to_onnx(clf, x_train[:1], options=options).SerializeToString())
            clfs.append(clf)
            sources.append(ModelSource(onnx=str(path)))
        plain = [torch.from_numpy(np.log(np.clip(c.predict_proba(x_test), 1e-12, None)))
                 for c in clfs]
        yield f"scikit-learn {name} via skl2onnx", sources, plain, x_test, y_test


def main() -> None:
    from mpc_fi import Federation, FederationConfig, OwnerConfig, ProtocolConfig  # noqa: PLC0415
    from protocols import REGISTRY  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'family':48s} {'acc':>6s} {'agree':>6s} {'ms/query':>9s} {'run s':>6s}")
        for family, sources, plain, x, y in _families(Path(tmp)):
            fed = FederationConfig(
                owners=tuple(OwnerConfig(name=f"owner{k}", model=s) for k, s in enumerate(sources)),
                protocol=ProtocolConfig(name="soft_vote"), mode="output", batch_size=256)
            twin = REGISTRY["soft_vote"](num_classes=10, num_owners=3).plaintext(plain).labels
            best = None
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = Federation(fed, timeout_s=600).run(x)
                total = time.perf_counter() - start
                querier = next(c for c in result.costs if c.role == "querier")
                if best is None or querier.wall_s < best[0]:
                    best = (querier.wall_s, total, result.prediction.labels)
            wall, total, labels = best
            print(f"{family:48s} {np.mean(labels == y):6.3f} {np.mean(labels == twin):6.3f} "
                  f"{1000 * wall / len(x):9.2f} {total:6.1f}", flush=True)


if __name__ == "__main__":
    main()
