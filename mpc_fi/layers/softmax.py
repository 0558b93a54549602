"""``nn.Softmax`` and ``nn.LogSoftmax`` on shares, with the exponent clamped so that any spread
of inputs is safe (:func:`mpc_fi.secure.softmax`, :func:`mpc_fi.secure.log_softmax`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import secure, wire
from ..onnx_nodes import NodeError
from .base import AXIS, Layer

DIM_WIRE = wire.Record({"dim": AXIS})


def _softmax(n: Any, ctx: Any) -> nn.Module:
    axis = n.attrs.get("axis", -1 if ctx.opset >= 13 else 1)
    rank = ctx.rank(n.inputs[0])
    if axis not in (1, -1) or (ctx.opset < 13 and rank not in (None, 2)):
        raise NodeError(f"only axis 1 or -1 is supported (on a 2-D input before opset 13), "
                        f"got axis={axis} at opset {ctx.opset}")
    return (nn.Softmax if n.op == "Softmax" else nn.LogSoftmax)(dim=axis)


class Softmax(Layer):
    op = "softmax"
    torch_types = (nn.Softmax,)
    onnx = {"Softmax": _softmax}
    args_wire = DIM_WIRE

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"dim": -1 if m.dim is None else m.dim}, {}

    def forward(self, x: Any, a: dict[str, Any], params: dict[str, Any]) -> Any:
        return secure.softmax(x, a["dim"])

    def interval(self, lo, hi, a, params):
        return torch.zeros_like(lo), torch.ones_like(hi), None


class LogSoftmax(Layer):
    op = "log_softmax"
    torch_types = (nn.LogSoftmax,)
    onnx = {"LogSoftmax": _softmax}
    args_wire = DIM_WIRE

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"dim": -1 if m.dim is None else m.dim}, {}

    def forward(self, x: Any, a: dict[str, Any], params: dict[str, Any]) -> Any:
        return secure.log_softmax(x, a["dim"])

    def interval(self, lo, hi, a, params):
        dim = a["dim"]
        classes = lo.shape[dim]
        top_lo = lo.max(dim=dim, keepdim=True).values
        top_hi = hi.max(dim=dim, keepdim=True).values
        return lo - top_hi - math.log(classes), (hi - top_lo).clamp(max=0), None
