"""The embedded default federation: scikit-learn's bundled digits, owners trained at start-up.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn, and MNIST-1D
(:func:`make_mnist1d`) is generated procedurally by the ``mnist1d`` package on this machine.
The training set is split among the owners by a Dirichlet(alpha) draw over classes (non-IID),
each owner trains a small model on its share, and the querier keeps the held-out split.

This package plays every organisation at once *before* the federation starts (it trains all the
owners so the demo is self-contained) and therefore can also compute the plaintext reference.
In a real federation each owner trains on its own premises and nobody holds all the models. It
sits beside the engine: ``mpc-fi run`` without a federation file finds it through the
``mpc_fi.demo`` entry point (``setup.cfg``); the owners' model factories it uses are the engine's
:func:`mpc_fi.demo.mlp` and :func:`mpc_fi.demo.cnn`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpc_fi.config import FederationConfig, ModelSource, OwnerConfig, ProtocolConfig, QuerierConfig
from mpc_fi.demo import cnn, mlp

DATASETS = ("digits", "breast_cancer", "mnist1d")
#: MNIST-1D examples generated when no count is given (the ``mnist1d`` package's default).
MNIST1D_SAMPLES = 5000
#: The generator seed of MNIST-1D (the package's default: its published data set uses it).
MNIST1D_SEED = 42


def load_dataset(name: str = "digits", *, samples: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Features scaled to about [-3, 3] (MNIST-1D: standardised, about [-6, 6]) and integer
    labels. ``digits`` and ``breast_cancer`` are bundled with scikit-learn and have a fixed size
    (``samples`` must be None); ``mnist1d`` is generated here with ``samples`` examples (default
    :data:`MNIST1D_SAMPLES`)."""
    from sklearn import datasets  # noqa: PLC0415 - only the demo and the study need it

    if name == "mnist1d":
        return make_mnist1d(MNIST1D_SAMPLES if samples is None else samples)
    if samples is not None:
        raise ValueError(f"{name!r} has a fixed size; a sample count applies to mnist1d only")
    if name == "digits":
        bunch = datasets.load_digits()
        x = bunch.data.astype(np.float32) / 16.0
    elif name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        x = bunch.data.astype(np.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    return x.astype(np.float32), bunch.target.astype(np.int64)


def make_mnist1d(samples: int = MNIST1D_SAMPLES, seed: int = MNIST1D_SEED
                 ) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D (Greydanus 2020): ``samples`` 40-point signals of the ten digit templates, shifted,
    scaled, sheared and noised by the ``mnist1d`` package's generator; ``samples // 10`` per class.

    Nothing is downloaded: only the generator (``mnist1d.data.make_dataset``) runs, never
    ``get_dataset`` (which fetches a pickle). The generator seeds numpy's and ``random``'s global
    state; both are restored afterwards, so loading the data changes no other draw. The result is
    a function of ``(samples, seed)`` alone (cached; callers get copies).
    """
    if isinstance(samples, bool) or int(samples) != samples or samples < 10:
        raise ValueError(f"MNIST-1D needs at least 10 samples (one per class), got {samples!r}")
    x, y = _mnist1d(int(samples), int(seed))
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=4)
def _mnist1d(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import random  # noqa: PLC0415

    from mnist1d.data import get_dataset_args, make_dataset  # noqa: PLC0415 - optional use

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = samples, seed, 1.0  # one pool: split here
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def dirichlet_split(labels: np.ndarray, num_owners: int, alpha: float,
                    rng: np.random.Generator, min_size: int = 10) -> list[np.ndarray]:
    """Split example indices among owners: class c's examples go out in Dirichlet(alpha) shares.

    Redraws until every owner holds at least ``min_size`` examples (the usual non-IID recipe).
    """
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_owners)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet([alpha] * num_owners)
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for owner, chunk in enumerate(np.split(idx, cuts)):
                parts[owner].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise RuntimeError("could not draw a split giving every owner enough examples; raise alpha")


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 60, lr: float = 0.01,
          seed: int = 0) -> nn.Module:
    """Full-batch Adam with cross-entropy: a few seconds on CPU for these sizes."""
    torch.manual_seed(seed)  # the training order is fixed; build the model under a seed too
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class DemoSetup:
    """A ready federation plus what only the demo can know (test labels, every model)."""

    federation: FederationConfig
    x_test: np.ndarray
    y_test: np.ndarray
    models: list[nn.Module]
    owner_sizes: list[int]


def prepare(workdir: str | Path, *, dataset: str = "digits", num_owners: int = 3,
            alpha: float = 0.5, seed: int = 0, arch: str = "mlp", mode: str = "output",
            protocol: str = "soft_vote", protocol_params: dict | None = None, reveal: str = "label",
            dealer: str = "ttp", batch_size: int | None = None, test_fraction: float = 0.3,
            samples: int | None = None, activation_bound: float | None = None) -> DemoSetup:
    """Split the data, train every owner, save each owner's weights to its own file.

    ``samples``: how many MNIST-1D examples to generate (``dataset="mnist1d"`` only).
    ``activation_bound``: full mode's public bound on every activation (the owners check their
    trained models against it at set-up)."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x, y = load_dataset(dataset, samples=samples)
    num_classes = int(y.max()) + 1
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if arch == "cnn":
        if dataset != "digits":
            raise ValueError("the CNN owner model is for the 8x8 digits images")
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    rng = np.random.default_rng(seed)
    parts = dirichlet_split(y_train, num_owners, alpha, rng)
    owners, models = [], []
    for k, idx in enumerate(parts):
        torch.manual_seed(seed + k)  # reproducible initial weights for each owner
        if arch == "cnn":
            factory, kwargs = "mpc_fi.demo:cnn", {"num_classes": num_classes}
            model = cnn(num_classes)
        else:
            kwargs = {"in_features": x.shape[1], "hidden": 32, "num_classes": num_classes}
            factory, model = "mpc_fi.demo:mlp", mlp(**kwargs)
        train(model, x_train[idx], y_train[idx], seed=seed + k)
        path = workdir / f"owner{k}.pt"
        torch.save(model.state_dict(), path)
        models.append(model)
        owners.append(OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory=factory, weights=str(path.resolve()), kwargs=kwargs)))
    # The public range of the features (whole units around the data set's scaling): the querier
    # refuses queries outside it, and full-mode owners check their models against it.
    input_range = (float(np.floor(x.min())), float(np.ceil(x.max())))
    fed = FederationConfig(owners=tuple(owners),
                           querier=QuerierConfig(name="querier", input_range=input_range), mode=mode,
                           protocol=ProtocolConfig(name=protocol, params=protocol_params or {}),
                           reveal=reveal, dealer=dealer, batch_size=batch_size,
                           activation_bound=activation_bound)
    return DemoSetup(fed, x_test, y_test, models, [len(p) for p in parts])


def owner_logits(models: list[nn.Module], x: np.ndarray) -> list[torch.Tensor]:
    """Every owner's plaintext logits: only the demo, which trained them all, can do this."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        return [m(xt).to(torch.float64) for m in models]
