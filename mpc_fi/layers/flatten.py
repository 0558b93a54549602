"""``nn.Flatten``: a reshape, local on shares (ONNX: ``Flatten`` and flattening ``Reshape``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import wire
from ..onnx_nodes import NodeError
from .base import AXIS, Layer


def _flatten(n: Any, ctx: Any) -> nn.Module:
    axis, rank = n.attrs.get("axis", 1), ctx.rank(n.inputs[0])
    if axis != 1 and not (rank is not None and axis == 1 - rank):
        raise NodeError(f"only Flatten(axis=1) is supported, got axis={axis}")
    return nn.Flatten()


def _reshape(n: Any, ctx: Any) -> nn.Module:
    target = ctx.consts.get(n.inputs[1])
    if target is None:
        raise NodeError(f"the target shape {n.inputs[1]!r} is computed at run time")
    t = list(target.reshape(-1))
    dims = ctx.shapes.get(n.inputs[0])
    features = math.prod(dims[1:]) if dims and None not in dims[1:] else None

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer))

    def fits(v: Any) -> bool:  # the feature count: -1, or k (= features when that is known)
        return is_int(v) and (v == -1 or (v > 0 and features in (None, v)))

    if len(t) == 2:
        batch = isinstance(t[0], str) or (is_int(t[0]) and t[0] == 0 and not n.attrs.get("allowzero", 0)) \
            or (is_int(t[0]) and dims is not None and dims[0] is not None and t[0] == dims[0])
        if (batch and fits(t[1])) or (is_int(t[0]) and t[0] == -1 and fits(t[1]) and t[1] != -1):
            return nn.Flatten()
    shown = [str(v) for v in t]
    raise NodeError(f"reshape to ({', '.join(shown)}) is not a flattening to (batch, features); "
                    "use nn.Flatten(), x.view(x.size(0), -1) or x.view(-1, features)")


class Flatten(Layer):
    op = "flatten"
    torch_types = (nn.Flatten,)
    onnx = {"Flatten": _flatten, "Reshape": _reshape}
    args_wire = wire.Record({"start_dim": AXIS, "end_dim": AXIS})

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"start_dim": m.start_dim, "end_dim": m.end_dim}, {}

    def forward(self, x: Any, a: dict[str, Any], params: dict[str, Any]) -> Any:
        return x.flatten(start_dim=a["start_dim"], end_dim=a["end_dim"])

    def interval(self, lo, hi, a, params):
        dims = (a["start_dim"], a["end_dim"])
        return lo.flatten(*dims), hi.flatten(*dims), None

    def shape(self, shape, a, shapes):
        start, end = (d % len(shape) for d in (a["start_dim"], a["end_dim"]))
        return (*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:]), []
