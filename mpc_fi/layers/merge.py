"""Layers that combine computed tensors: a residual ``Add`` (or ``Sum``) and ``Concat``. Both are
local on shares (no round): additive shares add, and concatenating shares concatenates the
values. They make a model a graph rather than a chain (:class:`mpc_fi.graph.Graph`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import wire
from ..onnx_nodes import NodeError
from .base import AXIS, Layer


class AddModule(nn.Module):
    """``x1 + x2 + ...`` of tensors of one shape (no broadcasting): a residual connection."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class ConcatModule(nn.Module):
    """``torch.cat(xs, dim)`` along a feature dimension (never the batch)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _computed(n: Any, ctx: Any, what: str) -> list[str]:
    constant = [i for i in n.inputs if i and i in ctx.consts]
    if constant:
        raise NodeError(f"{what} of a constant ({', '.join(constant)}) is not supported on shares: "
                        "a bias belongs right after MatMul (nn.Linear) or in Conv/Gemm; combine "
                        "only computed tensors (residual connections, concatenations)")
    return [i for i in n.inputs if i]


def _same_shapes(n: Any, ctx: Any, names: list[str], skip: int | None = None) -> None:
    shapes = [ctx.shapes.get(i) for i in names]
    if any(s is None for s in shapes):
        return
    def key(s: list[int | None]) -> list[int | None]:
        return [d for k, d in enumerate(s) if k not in (0, skip)]
    if len({len(s) for s in shapes}) != 1 or any(key(s) != key(shapes[0]) for s in shapes):
        shown = ", ".join(str(["N", *s[1:]]) for s in shapes)
        raise NodeError(f"inputs of shapes {shown} "
                        + ("differ outside the concatenated axis" if skip is not None else
                           "differ: broadcasting is not supported on shares; add tensors of one "
                           "shape (e.g. a 1x1 Conv2d projection shortcut)"))


def _add(n: Any, ctx: Any) -> nn.Module:
    names = _computed(n, ctx, "addition")
    _same_shapes(n, ctx, names)
    return AddModule()


def _concat(n: Any, ctx: Any) -> nn.Module:
    names = _computed(n, ctx, "concatenation")
    axis = int(n.attrs.get("axis", 1))
    rank = ctx.rank(names[0])
    if rank is not None:
        axis = axis % rank
    if axis == 0:
        raise NodeError("concatenation along the batch axis (0) is not supported; concatenate "
                        "features (axis >= 1)")
    _same_shapes(n, ctx, names, skip=axis)
    return ConcatModule(axis)


def _check_shapes(shapes: list[tuple[int, ...]], skip: int | None) -> None:
    def key(s: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(d for k, d in enumerate(s) if k != skip)
    if len({len(s) for s in shapes}) != 1 or len({key(s) for s in shapes}) != 1:
        raise ValueError(f"inputs of shapes {[list(s) for s in shapes]} do not fit together")


class Add(Layer):
    op = "add"
    torch_types = (AddModule,)
    onnx = {"Add": _add, "Sum": _add}
    arity = 0

    def forward(self, xs: list[Any], args: dict[str, Any], params: dict[str, Any]) -> Any:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def interval(self, lo, hi, args, params):
        return sum(lo[1:], lo[0]), sum(hi[1:], hi[0]), None

    def shape(self, shapes, args, param_shapes):
        _check_shapes(list(shapes), None)
        return shapes[0], []


class Concat(Layer):
    op = "concat"
    torch_types = (ConcatModule,)
    onnx = {"Concat": _concat}
    args_wire = wire.Record({"dim": AXIS})
    arity = 0

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"dim": m.dim}, {}

    def forward(self, xs: list[Any], a: dict[str, Any], params: dict[str, Any]) -> Any:
        if isinstance(xs[0], torch.Tensor):
            return torch.cat(xs, dim=a["dim"])
        return type(xs[0]).cat(list(xs), dim=a["dim"])  # CrypTen's MPCTensor.cat

    def interval(self, lo, hi, a, params):
        return torch.cat(lo, dim=a["dim"]), torch.cat(hi, dim=a["dim"]), None

    def shape(self, shapes, a, param_shapes):
        rank = len(shapes[0])
        dim = a["dim"] % rank
        if dim == 0:
            raise ValueError("concatenation along the batch axis")
        _check_shapes(list(shapes), dim)
        out = list(shapes[0])
        out[dim] = sum(s[dim] for s in shapes)
        return tuple(out), []
