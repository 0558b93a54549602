"""``nn.BatchNorm1d``/``nn.BatchNorm2d`` in evaluation mode, folded by the owner into a per-channel
affine map: no square root or reciprocal runs on shares; scale and shift stay secret."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import wire
from ..onnx_nodes import NodeError, tensor
from .base import Layer


def _previous_rank(ctx: Any) -> int | None:
    for layer in reversed(ctx.layers):
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                              nn.BatchNorm2d)):
            return 4
        if isinstance(layer, (nn.Linear, nn.Flatten, nn.BatchNorm1d)):
            return 2
    return None


def _batchnorm(n: Any, ctx: Any) -> nn.Module:
    if n.attrs.get("training_mode", 0) or not n.attrs.get("spatial", 1):
        raise NodeError("only inference-mode, spatial batch normalization is supported")
    scale, bias, mean, var = (ctx.const(n, i, what) for i, what in
                              enumerate(("scale", "B", "input_mean", "input_var"), start=1))
    channels = scale.size
    if any(v.shape != (channels,) for v in (scale, bias, mean, var)):
        raise NodeError("scale, B, mean and var must be 1-D of the same length")
    rank = ctx.rank(n.inputs[0])
    rank = rank if rank is not None else _previous_rank(ctx)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(rank)  # type: ignore[arg-type]
    if cls is None:
        raise NodeError(f"input of rank {rank if rank is not None else 'unknown'}; "
                        "need rank 2 or 3 (BatchNorm1d) or 4 (BatchNorm2d)")
    bn = cls(channels, eps=float(n.attrs.get("epsilon", 1e-5)))
    with torch.no_grad():
        bn.weight.copy_(tensor(scale, "scale"))
        bn.bias.copy_(tensor(bias, "B"))
        bn.running_mean.copy_(tensor(mean, "input_mean"))
        bn.running_var.copy_(tensor(var, "input_var"))
    return bn.eval()


def _view(t: Any, dims: int, channel_dim: int) -> Any:
    shape = [1] * dims
    shape[channel_dim] = -1
    return t.view(*shape)


class Affine(Layer):
    op = "affine"
    torch_types = (nn.BatchNorm1d, nn.BatchNorm2d)
    onnx = {"BatchNormalization": _batchnorm}
    args_wire = wire.Record({"channel_dim": wire.Int(0, 7)})
    params_dims = ({"scale": 1, "shift": 1}, {})

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if m.running_mean is None or m.running_var is None:
            raise ValueError("track_running_stats=False; evaluation needs running statistics")
        scale = 1.0 / torch.sqrt(m.running_var.detach() + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.detach()
        shift = -m.running_mean.detach() * scale
        if m.bias is not None:
            shift = shift + m.bias.detach()
        return {"channel_dim": 1}, {"scale": scale, "shift": shift}

    def forward(self, x: Any, a: dict[str, Any], p: dict[str, Any]) -> Any:
        dims, c = x.dim(), a["channel_dim"]
        return x * _view(p["scale"], dims, c) + _view(p["shift"], dims, c)

    def interval(self, lo, hi, a, p):
        scale = _view(p["scale"], lo.dim(), a["channel_dim"])
        shift = _view(p["shift"], lo.dim(), a["channel_dim"])
        lo, hi = torch.minimum(lo * scale, hi * scale), torch.maximum(lo * scale, hi * scale)
        product = float(torch.maximum(lo.abs(), hi.abs()).max())
        return lo + shift, hi + shift, product
