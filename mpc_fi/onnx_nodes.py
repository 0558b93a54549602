"""What the ONNX importer and the layers' ONNX mappings share: one node, the import context, and
the small helpers that read a node's attributes and constant inputs (no ``onnx`` import here).

A converter (``layer.onnx[op_type]``, :mod:`mpc_fi.layers`) takes a :class:`Node` and the
:class:`Ctx` and returns the torch module the node stands for (an ``nn.Sequential`` when it
stands for a short chain of layers, e.g. ``ReduceMean`` for pooling then flattening), or raises
:class:`NodeError`, which :mod:`mpc_fi.onnx_import` collects and reports with every other
node's problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


class NodeError(Exception):
    """A problem with one node; collected, then reported together."""


@dataclass
class Node:
    label: str  # "name (OpType)"
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]


@dataclass
class Ctx:
    consts: dict[str, np.ndarray]
    shapes: dict[str, list[int | None]]  # per tensor; None for a symbolic dimension
    opset: int
    layers: list[nn.Module]

    def const(self, n: Node, i: int, what: str, optional: bool = False) -> np.ndarray | None:
        name = n.inputs[i] if i < len(n.inputs) else ""
        if not name:
            if optional:
                return None
            raise NodeError(f"missing input {what}")
        value = self.consts.get(name)
        if value is None or value.dtype == object:
            raise NodeError(f"input {what} ({name!r}) must be an initializer or a constant, "
                             "not a computed tensor")
        return value

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def tensor(value: np.ndarray, what: str) -> torch.Tensor:
    if not np.issubdtype(value.dtype, np.number):
        raise NodeError(f"{what} has dtype {value.dtype}, not a number")
    t = torch.tensor(np.asarray(value, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise NodeError(f"{what} holds NaN or inf")
    return t


def linear_module(w: np.ndarray, b: np.ndarray | None) -> nn.Linear:
    """``w`` is (out, in) as in torch."""
    if w.ndim != 2:
        raise NodeError(f"the weight must be a matrix, got shape {list(w.shape)}")
    out_f, in_f = w.shape
    if b is not None and b.size not in (1, out_f):
        raise NodeError(f"bias of shape {list(b.shape)} does not fit {out_f} outputs")
    layer = nn.Linear(in_f, out_f, bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(tensor(w, "weight"))
        if b is not None:
            layer.bias.copy_(tensor(b, "bias").reshape(-1).expand(out_f))
    return layer


def pads(n: Node) -> tuple[int, int]:
    if n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NodeError(f"auto_pad={n.attrs['auto_pad']} is not supported; export with explicit "
                         "integer padding")
    pads = list(n.attrs.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise NodeError(f"only 2-D operations are supported, got pads {pads}")
    if pads[:2] != pads[2:]:
        raise NodeError(f"asymmetric pads {pads} (begin {pads[:2]}, end {pads[2:]}); torch pads "
                         "both sides equally: use symmetric padding (e.g. an odd kernel with k//2)")
    return pads[0], pads[1]


def pair(n: Node, key: str, default: int | None = None) -> tuple[int, int]:
    value = list(n.attrs[key]) if key in n.attrs else [default, default]
    if len(value) != 2 or None in value:
        raise NodeError(f"only 2-D operations are supported, got {key}={value}")
    return value[0], value[1]


def pool_args(n: Node) -> dict[str, tuple[int, int]]:
    if n.attrs.get("ceil_mode", 0) or pair(n, "dilations", 1) != (1, 1):
        raise NodeError("ceil_mode and dilations are not supported; use the defaults")
    kernel, padding = pair(n, "kernel_shape"), pads(n)
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise NodeError(f"padding {padding} exceeds half the kernel {kernel}")
    return {"kernel_size": kernel, "stride": pair(n, "strides", 1), "padding": padding}
