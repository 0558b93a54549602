"""``nn.Conv2d``: a Beaver convolution on shares (kernel secret), zero padding only."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..onnx_nodes import NodeError, pads, pair, tensor
from .base import NONNEG2, POS, POS2, Layer, window_out
from .base import pair as as_pair
from .. import wire
from .linear import interval_linear


def _conv(n: Any, ctx: Any) -> nn.Module:
    w = ctx.const(n, 1, "W")
    if w.ndim != 4:
        raise NodeError(f"only 2-D convolutions are supported, got a {w.ndim - 2}-D kernel")
    if tuple(n.attrs.get("kernel_shape", w.shape[2:])) != w.shape[2:]:
        raise NodeError(f"kernel_shape {n.attrs['kernel_shape']} does not match the weight {w.shape}")
    b = ctx.const(n, 2, "B", optional=True)
    groups = n.attrs.get("group", 1)
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2:], stride=pair(n, "strides", 1),
                     padding=pads(n), dilation=pair(n, "dilations", 1), groups=groups,
                     bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(tensor(w, "weight"))
        if b is not None:
            conv.bias.copy_(tensor(b, "bias").reshape(-1))
    return conv


class Conv2d(Layer):
    op = "conv2d"
    torch_types = (nn.Conv2d,)
    onnx = {"Conv": _conv}
    args_wire = wire.Record({"stride": POS2, "padding": NONNEG2, "dilation": POS2, "groups": POS})
    params_dims = ({"weight": 4}, {"bias": 1})

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if m.padding_mode != "zeros":
            raise ValueError(f"padding_mode={m.padding_mode!r}; use padding_mode='zeros'")
        if isinstance(m.padding, str):
            raise ValueError(f"padding={m.padding!r}; give the padding as integers")
        params = {"weight": m.weight.detach()}
        if m.bias is not None:
            params["bias"] = m.bias.detach()
        return {"stride": as_pair(m.stride), "padding": as_pair(m.padding),
                "dilation": as_pair(m.dilation), "groups": m.groups}, params

    def forward(self, x: Any, a: dict[str, Any], p: dict[str, Any]) -> Any:
        x = x.conv2d(p["weight"], stride=a["stride"], padding=a["padding"],
                     dilation=a["dilation"], groups=a["groups"])
        return x + p["bias"].view(1, -1, 1, 1) if "bias" in p else x

    def interval(self, lo, hi, a, p):
        def conv(x, w):
            return F.conv2d(x, w, stride=a["stride"], padding=a["padding"],
                            dilation=a["dilation"], groups=a["groups"])
        lo, hi = interval_linear(lo, hi, conv, p["weight"])
        product = float(torch.maximum(lo.abs(), hi.abs()).max())
        if "bias" in p:
            lo, hi = lo + p["bias"].view(1, -1, 1, 1), hi + p["bias"].view(1, -1, 1, 1)
        return lo, hi, product

    def shape(self, shape, a, shapes):
        w = shapes["weight"]
        spatial = [window_out(n, k, s, p, d) for n, k, s, p, d in
                   zip(shape[2:], w[2:], a["stride"], a["padding"], a["dilation"])]
        return (shape[0], w[0], *spatial), []
