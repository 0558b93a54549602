"""Small owner models the demo, the tests and example federation files use as factories
(``factory: "mpc_fi.demo:mlp"``). All run on shares in full mode; ``backbone`` and ``head``
split a model for a federation with a ``public_backbone``; ``resnet`` and ``resnet18`` are
graph models (their own forward(), residual additions), traced by their owner in full mode.

The demo itself (data, the non-IID split, the owners' training) lives beside the engine in the
``demos`` package.
"""

from __future__ import annotations

import torch
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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norms, added to a shortcut: the identity, or a strided
    1x1 convolution with a batch norm (a projection) where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of basic blocks for small images: a 3x3 stem, stages of blocks (the first block
    of each later stage halves the resolution and doubles the width), global average pooling
    and a linear head."""

    def __init__(self, blocks: tuple[int, ...], width: int, num_classes: int,
                 in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for k, count in enumerate(blocks):
            out = width * 2 ** k
            stage = [BasicBlock(channels, out, stride=1 if k == 0 else 2)]
            stage += [BasicBlock(out, out) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.head(torch.flatten(x, 1))


def resnet(depth: int = 20, width: int = 16, num_classes: int = 10,
           in_channels: int = 3) -> ResNet:
    """The CIFAR ResNet of He et al. (2016): ``depth = 6n + 2`` (20, 32, 44, 56, ...; 8 is one
    block per stage), three stages of ``n`` basic blocks at ``width``, ``2 width``, ``4 width``
    channels, projection shortcuts where the shape changes. Any input size divisible by 4."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    return ResNet(((depth - 2) // 6,) * 3, width, num_classes, in_channels)


def resnet18(width: int = 64, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 as used on CIFAR-10: a 3x3 stem without max pooling, four stages of two basic
    blocks at ``width`` .. ``8 width`` channels. Any input size divisible by 8."""
    return ResNet((2, 2, 2, 2), width, num_classes, in_channels)
