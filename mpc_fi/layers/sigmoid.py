"""``nn.Sigmoid``: CrypTen's sigmoid on shares (``exp`` with 9 iterations: its input is bounded by :mod:`mpc_fi.ranges`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Layer


class Sigmoid(Layer):
    op = "sigmoid"
    torch_types = (nn.Sigmoid,)
    onnx = {"Sigmoid": lambda n, ctx: nn.Sigmoid()}

    def forward(self, x: Any, args: dict[str, Any], params: dict[str, Any]) -> Any:
        return x.sigmoid()

    def interval(self, lo, hi, args, params):
        return torch.sigmoid(lo), torch.sigmoid(hi), None
