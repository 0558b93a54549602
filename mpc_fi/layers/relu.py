"""``nn.ReLU``: ``max(x, 0)``: one comparison per element on shares (:mod:`mpc_fi.compare`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Layer


class ReLU(Layer):
    op = "relu"
    torch_types = (nn.ReLU,)
    onnx = {"Relu": lambda n, ctx: nn.ReLU()}

    def forward(self, x: Any, args: dict[str, Any], params: dict[str, Any]) -> Any:
        return x.relu()

    def interval(self, lo, hi, args, params):
        return lo.clamp(min=0), hi.clamp(min=0), None
