"""Model factories used by the tests (imported by owner processes through ``tests.models:NAME``)."""

from __future__ import annotations

import torch
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


class NanWhen(nn.Module):
    """A linear model whose logits are NaN for every query with a first feature above ``above``."""

    def __init__(self, in_features: int = 6, num_classes: int = 3, above: float = 3.0):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.above = above

    def forward(self, x):
        out = self.linear(x)
        return torch.where(x[:, :1] > self.above, torch.full_like(out, float("nan")), out)


def nan_when(in_features: int = 6, num_classes: int = 3, above: float = 3.0) -> nn.Module:
    return NanWhen(in_features, num_classes, above)


def huge_logits(in_features: int = 6, num_classes: int = 3) -> nn.Sequential:
    """Logits far beyond the fixed-point range accepted for sharing (|y| <= 2^15)."""
    model = nn.Sequential(nn.Linear(in_features, num_classes))
    with torch.no_grad():
        model[0].weight.mul_(1e7)
    return model


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class MiniResNet(nn.Module):
    """A two-block ResNet for (batch, 1, 8, 8) images: its own forward(), residual adds, a mean."""

    def __init__(self, channels: int = 4, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def mini_resnet(channels: int = 4, num_classes: int = 3) -> nn.Module:
    return MiniResNet(channels, num_classes)


def layernorm_gelu_mlp(in_features: int = 6, num_classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 16), nn.LayerNorm(16), nn.GELU(),
                         nn.Linear(16, num_classes))


class RaisesWhen(nn.Module):
    """A linear model that raises for any batch holding a first feature above ``above``."""

    def __init__(self, in_features: int = 6, num_classes: int = 3, above: float = 3.0):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.above = above

    def forward(self, x):
        if bool((x[:, 0] > self.above).any()):
            raise ValueError("feature 0 out of the training range")
        return self.linear(x)


def raises_when(in_features: int = 6, num_classes: int = 3, above: float = 3.0) -> nn.Module:
    return RaisesWhen(in_features, num_classes, above)
