"""``nn.Linear``: ``x W^T + b``, a Beaver matrix product on shares (weights secret)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..onnx_nodes import NodeError, linear_module
from .base import Layer


def _gemm(n: Any, ctx: Any) -> nn.Module:
    """``Y = alpha * A' B' + beta * C`` with A the computed input (rows: the batch): the owner
    folds ``alpha`` and ``transB`` into the weight and ``beta`` into the bias."""
    a = n.attrs
    if n.inputs and n.inputs[0] in ctx.consts:
        raise NodeError("A is a constant and B the computed input, which puts the batch in the "
                        "columns of the output; export x @ W with x first (nn.Linear)")
    if a.get("transA", 0):
        raise NodeError("transA=1 reads the batch along the columns of A; the rows of A must be "
                        "the queries (export nn.Linear, or x @ W with x of shape (batch, in))")
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    w = ctx.const(n, 1, "B").astype(np.float64)
    if w.ndim != 2:
        raise NodeError(f"B must be a matrix, got shape {list(w.shape)}")
    w = alpha * (w if a.get("transB", 0) else w.T)  # (out, in) as in torch
    c = ctx.const(n, 2, "C", optional=True)
    if c is not None:
        out_f = w.shape[0]
        if c.size == 1:
            c = np.full(out_f, float(c.reshape(-1)[0]))
        elif c.shape in ((out_f,), (1, out_f)):
            c = c.reshape(-1).astype(np.float64)
        else:
            raise NodeError(f"C of shape {list(c.shape)} differs between rows; only a bias of "
                            f"shape ({out_f},), (1, {out_f}) or a scalar is supported")
        c = beta * c
    return linear_module(w, c)


def _matmul(n: Any, ctx: Any) -> nn.Module:  # also "MatMul+Add", with the bias as input 2
    w = ctx.const(n, 1, "B")
    bias = ctx.const(n, 2, "bias", optional=True)
    if bias is not None and bias.ndim != 1:
        raise NodeError(f"the Add after MatMul must add a 1-D bias, got shape {list(bias.shape)}")
    return linear_module(w.T if w.ndim == 2 else w, bias)


def interval_linear(lo: torch.Tensor, hi: torch.Tensor, fn: Any, weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``fn(x, weight)`` (linear in both) for ``lo <= x <= hi``: centre and radius."""
    centre, radius = (lo + hi) / 2, (hi - lo) / 2
    mid = fn(centre, weight)
    spread = fn(radius, weight.abs())
    return mid - spread, mid + spread


class Linear(Layer):
    op = "linear"
    torch_types = (nn.Linear,)
    onnx = {"Gemm": _gemm, "MatMul": _matmul, "MatMul+Add": _matmul}
    params_dims = ({"weight": 2}, {"bias": 1})

    def from_torch(self, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        params = {"weight": m.weight.detach()}
        if m.bias is not None:
            params["bias"] = m.bias.detach()
        return {}, params

    def forward(self, x: Any, args: dict[str, Any], p: dict[str, Any]) -> Any:
        x = x.matmul(p["weight"].t())
        return x + p["bias"] if "bias" in p else x

    def interval(self, lo, hi, args, p):
        lo, hi = interval_linear(lo, hi, lambda x, w: x.matmul(w.t()), p["weight"])
        product = float(torch.maximum(lo.abs(), hi.abs()).max())
        if "bias" in p:
            lo, hi = lo + p["bias"], hi + p["bias"]
        return lo, hi, product

    def shape(self, shape, args, shapes):
        return (*shape[:-1], shapes["weight"][0]), []
