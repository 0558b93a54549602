"""2-D pooling: ``nn.MaxPool2d`` (comparisons on shares), ``nn.AvgPool2d`` and
``nn.AdaptiveAvgPool2d`` (local sums and a public division)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import secure, wire
from ..onnx_nodes import NodeError, pool_args
from .base import NONNEG2, POS2, Layer, pair, window_out

POOL_WIRE = wire.Record({"kernel_size": POS2, "stride": POS2, "padding": NONNEG2})


def _maxpool(n: Any, ctx: Any) -> nn.Module:
    return nn.MaxPool2d(**pool_args(n))


def _avgpool(n: Any, ctx: Any) -> nn.Module:
    args = pool_args(n)
    if args["padding"] != (0, 0) and not n.attrs.get("count_include_pad", 0):
        raise NodeError("count_include_pad=0 with padding is not supported on shares; export "
                        "AvgPool2d with count_include_pad=True (the torch default)")
    return nn.AvgPool2d(**args)


def _global_avgpool(n: Any, ctx: Any) -> nn.Module:
    if ctx.rank(n.inputs[0]) not in (None, 4):
        raise NodeError(f"only 2-D pooling is supported, got a rank-{ctx.rank(n.inputs[0])} input")
    return nn.AdaptiveAvgPool2d(1)


def _reduce_mean(n: Any, ctx: Any) -> nn.Module:
    """``x.mean((2, 3))`` over the spatial axes of an image batch: global average pooling."""
    rank = ctx.rank(n.inputs[0])
    axes = n.attrs.get("axes")
    if axes is None and len(n.inputs) > 1:
        axes = ctx.const(n, 1, "axes").reshape(-1).tolist()
    if rank != 4 or axes is None or sorted(int(v) % 4 for v in axes) != [2, 3]:
        raise NodeError(f"only a mean over the two spatial axes (2, 3) of a rank-4 input is "
                        f"supported, got axes={axes} on rank {rank}; use nn.AdaptiveAvgPool2d(1) "
                        "+ nn.Flatten()")
    if n.attrs.get("keepdims", 1):
        return nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _pooled(shape: tuple[int, ...], a: dict[str, Any]) -> tuple[int, ...]:
    return (*shape[:-2], *(window_out(n, k, s, p) for n, k, s, p in
                           zip(shape[-2:], a["kernel_size"], a["stride"], a["padding"])))


def _window(a: dict[str, Any]) -> dict[str, Any]:
    return {"kernel_size": a["kernel_size"], "stride": a["stride"], "padding": a["padding"]}


class MaxPool2d(Layer):
    op = "max_pool2d"
    torch_types = (nn.MaxPool2d,)
    onnx = {"MaxPool": _maxpool}
    args_wire = POOL_WIRE

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if m.ceil_mode or m.return_indices or pair(m.dilation) != (1, 1):
            raise ValueError("ceil_mode, return_indices and dilation are not supported; use the "
                             "defaults")
        return {"kernel_size": pair(m.kernel_size), "stride": pair(m.stride or m.kernel_size),
                "padding": pair(m.padding)}, {}

    def forward(self, x: Any, a: dict[str, Any], params: dict[str, Any]) -> Any:
        return secure.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"])

    def interval(self, lo, hi, a, params):
        lo, hi = F.max_pool2d(lo, **_window(a)), F.max_pool2d(hi, **_window(a))
        if any(a["padding"]):  # a padded border may count as 0
            lo, hi = torch.minimum(lo, torch.zeros_like(lo)), hi.clamp(min=0)
        return lo, hi, None

    def shape(self, shape, a, shapes):
        out = _pooled(shape, a)
        # every window element is compared: kernel_h * kernel_w times the output
        return out, [math.prod(out) * math.prod(a["kernel_size"])]


class AvgPool2d(Layer):
    op = "avg_pool2d"
    torch_types = (nn.AvgPool2d,)
    onnx = {"AveragePool": _avgpool}
    args_wire = POOL_WIRE

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if m.ceil_mode or (m.padding not in (0, (0, 0)) and not m.count_include_pad) \
                or m.divisor_override is not None:
            raise ValueError("ceil_mode, divisor_override and count_include_pad=False with "
                             "padding are not supported; use the defaults")
        return {"kernel_size": pair(m.kernel_size), "stride": pair(m.stride or m.kernel_size),
                "padding": pair(m.padding)}, {}

    def forward(self, x: Any, a: dict[str, Any], params: dict[str, Any]) -> Any:
        return x.avg_pool2d(a["kernel_size"], stride=a["stride"], padding=a["padding"])

    def interval(self, lo, hi, a, params):
        return F.avg_pool2d(lo, **_window(a)), F.avg_pool2d(hi, **_window(a)), None

    def shape(self, shape, a, shapes):
        return _pooled(shape, a), []


class AdaptiveAvgPool2d(Layer):
    op = "adaptive_avg_pool2d"
    torch_types = (nn.AdaptiveAvgPool2d,)
    onnx = {"GlobalAveragePool": _global_avgpool, "ReduceMean": _reduce_mean}
    args_wire = wire.Record({"output_size": POS2})

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"output_size": pair(m.output_size)}, {}

    def forward(self, x: Any, a: dict[str, Any], params: dict[str, Any]) -> Any:
        return x.adaptive_avg_pool2d(a["output_size"])

    def interval(self, lo, hi, a, params):
        size = a["output_size"]
        return F.adaptive_avg_pool2d(lo, size), F.adaptive_avg_pool2d(hi, size), None

    def shape(self, shape, a, shapes):
        return (*shape[:-2], *a["output_size"]), []
