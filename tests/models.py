"""Model factories used by the tests (imported by owner processes through ``tests.models:NAME``)."""

from __future__ import annotations

from torch import nn


def gelu_mlp(in_features: int = 6, num_classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 8), nn.GELU(), nn.Linear(8, num_classes))


class Custom(nn.Module):
    def __init__(self, in_features: int = 6, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def custom(in_features: int = 6, num_classes: int = 3) -> nn.Module:
    return Custom(in_features, num_classes)


def wrong_output(in_features: int = 6, num_classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, num_classes), nn.Flatten(0))
