"""What one layer kind of a full-mode model is, in one place, and the registry of them.

A :class:`Layer` holds everything the engine needs to know about one operation on shares:

* its **torch conversion** (:attr:`torch_types`, :meth:`from_torch`: a module to the public
  arguments and the secret parameter tensors; a ``ValueError`` explains what to change);
* its **ONNX mapping** (:attr:`onnx`: ONNX op type -> a converter of one node into the torch
  module it stands for, :mod:`mpc_fi.onnx_nodes`);
* its **wire form** (:attr:`args_wire`, :attr:`params_dims`: what a peer may send for it);
* its **secure forward** (:meth:`forward` on CrypTen shares);
* its **interval bound** (:meth:`interval`: sound output bounds for bounded inputs, and the
  largest raw product it forms, :mod:`mpc_fi.ranges`);
* its **memory estimate** (:meth:`shape`: the output shape by plain arithmetic, and the extra
  elements it works on, :mod:`mpc_fi.memory`; no meta tensors, whose first use costs about a
  second in a fresh process).

Most kinds take one tensor (:attr:`arity` 1). A kind that combines computed tensors (a residual
``Add``, ``Concat``: :attr:`arity` 0, meaning two or more) receives lists in :meth:`forward`
(the shared inputs), :meth:`interval` (their bounds) and :meth:`shape` (their shapes), in the
order of the layer's ``inputs`` (:class:`mpc_fi.models.LayerSpec`).

Adding a layer kind is one module in this package and one line in :data:`mpc_fi.layers.LAYERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .. import wire

#: Arguments of a layer without any.
NO_ARGS = wire.Record({})
POS, NONNEG, AXIS = wire.Int(1, 1 << 16), wire.Int(0, 1 << 16), wire.Int(-8, 7)
POS2, NONNEG2 = wire.Tuple(POS, POS), wire.Tuple(NONNEG, NONNEG)

OnnxConverter = Callable[[Any, Any], nn.Module]


def window_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a convolution or pooling window along one dimension (floor mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # type: ignore[return-value]


class Layer:
    """One layer kind (see the module docstring). Subclasses set the class attributes and
    override what differs from an element-wise, parameter-free, shape-preserving operation."""

    op: ClassVar[str]
    torch_types: ClassVar[tuple[type, ...]] = ()
    onnx: ClassVar[dict[str, OnnxConverter]] = {}
    args_wire: ClassVar[wire.Record] = NO_ARGS
    #: computed inputs: 1, or 0 for "two or more" (lists in forward, interval and shape)
    arity: ClassVar[int] = 1
    #: secret parameters and their dimensions: (required, optional)
    params_dims: ClassVar[tuple[dict[str, int], dict[str, int]]] = ({}, {})

    def from_torch(self, module: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Public arguments and secret parameter tensors of ``module``."""
        return {}, {}

    def forward(self, x: Any, args: dict[str, Any], params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def interval(self, lo: torch.Tensor, hi: torch.Tensor, args: dict[str, Any],
                 params: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Sound bounds of the output for ``lo <= x <= hi``, and the largest raw product."""
        raise NotImplementedError

    def shape(self, shape: tuple[int, ...], args: dict[str, Any],
              param_shapes: dict[str, tuple[int, ...]]) -> tuple[tuple[int, ...], list[int]]:
        """The output shape for an input of ``shape``, and extra element counts beyond it."""
        return shape, []

    def params_schema(self) -> wire.Record:
        required, optional = self.params_dims
        shape = {d: wire.Shape(min_dims=d, max_dims=d) for d in (1, 2, 4)}
        return wire.Record({k: shape[d] for k, d in required.items()},
                           {k: shape[d] for k, d in optional.items()})


class Registry(dict):
    """op -> :class:`Layer`; registering an op twice is refused unless ``force``."""

    def register(self, layer: Layer, *, force: bool = False) -> Layer:
        if layer.op in self and not force:
            raise ValueError(f"layer op {layer.op!r} is registered already")
        self[layer.op] = layer
        return layer

    def torch_table(self) -> dict[type, Layer]:
        return {t: layer for layer in self.values() for t in layer.torch_types}

    def onnx_table(self) -> dict[str, OnnxConverter]:
        out: dict[str, OnnxConverter] = {}
        for layer in self.values():
            for op_type, convert in layer.onnx.items():
                if op_type in out:
                    raise ValueError(f"ONNX op {op_type} is mapped by two layers")
                out[op_type] = convert
        return out
