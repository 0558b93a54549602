"""``nn.Identity`` and ``nn.Dropout`` (evaluation mode): nothing to do on shares."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..onnx_nodes import NodeError
from .base import Layer


def _dropout(n: Any, ctx: Any) -> nn.Module:
    training = ctx.const(n, 2, "training_mode", optional=True)
    if training is not None and bool(training.reshape(-1)[0]):
        raise NodeError("training_mode=True; export the model in eval mode")
    return nn.Identity()


class Identity(Layer):
    op = "identity"
    torch_types = (nn.Identity, nn.Dropout)
    onnx = {"Dropout": _dropout, "Identity": lambda n, ctx: nn.Identity()}

    def forward(self, x: Any, args: dict[str, Any], params: dict[str, Any]) -> Any:
        return x

    def interval(self, lo, hi, args, params):
        return lo, hi, None
