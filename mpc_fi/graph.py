"""A model as a graph of layers, in plaintext: what an ONNX graph or a traced module with residual
connections or concatenations becomes before it runs on shares (:mod:`mpc_fi.onnx_import`).

:class:`Graph` is an ordinary ``torch.nn.Module`` (the owner can run it and compare it with its
own model); :func:`mpc_fi.models.extract_architecture` reads its layers and edges into the
public :class:`~mpc_fi.models.Architecture`, whose :attr:`~mpc_fi.models.LayerSpec.inputs` are
the same edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Graph(nn.Module):
    """Layers in an order where every layer comes after its inputs; the last one's output is the
    model's. ``layers[i]`` takes the outputs of ``inputs[i]`` (indices of earlier layers; -1
    is the model input) as positional arguments."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module, Sequence[int]]]) -> None:
        super().__init__()
        self.names = [name for name, _, _ in layers]
        self.inputs = [tuple(ins) for _, _, ins in layers]
        self.layers = nn.ModuleList([m for _, m, _ in layers])
        for i, ins in enumerate(self.inputs):
            if not ins or any(not -1 <= j < i for j in ins):
                raise ValueError(f"layer {self.names[i]!r} (#{i}) takes inputs {list(ins)}; "
                                 "only earlier layers or the input (-1) may feed a layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: list[torch.Tensor] = []
        for layer, ins in zip(self.layers, self.inputs):
            values.append(layer(*[x if j < 0 else values[j] for j in ins]))
        return values[-1]

    def is_chain(self) -> bool:
        return all(ins == (i - 1,) for i, ins in enumerate(self.inputs))
