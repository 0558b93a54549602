"""Small owner models the demo, the tests and example federation files use as factories
(``factory: "mpc_fi.demo:mlp"``). All run on shares in full mode; ``backbone`` and ``head``
split a model for a federation with a ``public_backbone``.

The demo itself (data, the non-IID split, the owners' training) lives beside the engine in the
``demos`` package.
"""

from __future__ import annotations

from torch import nn


def mlp(in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """A small multilayer perceptron (runs on shares in full mode)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def cnn(num_classes: int = 10, channels: int = 8) -> nn.Sequential:
    """A small CNN for 8x8 digit images shaped (batch, 1, 8, 8) (runs on shares in full mode)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * 16, num_classes))


def backbone(in_features: int = 64, features: int = 32) -> nn.Sequential:
    """A public feature extractor for ``public_backbone`` (features in [0, 1]: a sigmoid)."""
    return nn.Sequential(nn.Linear(in_features, features), nn.Sigmoid())


def head(features: int = 32, num_classes: int = 10) -> nn.Sequential:
    """An owner's private head on a public backbone's features (runs on shares)."""
    return nn.Sequential(nn.Linear(features, num_classes))
