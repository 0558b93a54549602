"""``nn.Tanh``: CrypTen's tanh on shares (``2 sigmoid(2x) - 1``: its input is bounded by :mod:`mpc_fi.ranges`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Layer


class Tanh(Layer):
    op = "tanh"
    torch_types = (nn.Tanh,)
    onnx = {"Tanh": lambda n, ctx: nn.Tanh()}

    def forward(self, x: Any, args: dict[str, Any], params: dict[str, Any]) -> Any:
        return x.tanh()

    def interval(self, lo, hi, args, params):
        return torch.tanh(lo), torch.tanh(hi), None
