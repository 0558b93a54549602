"""The layer kinds a full-mode model may use on shares, one module each (:mod:`.base`).

:data:`LAYERS` is the explicit registry (op name -> :class:`~.base.Layer`); registering an op
twice is refused. :mod:`mpc_fi.models` (torch conversion, wire form, secure forward),
:mod:`mpc_fi.onnx_import` (ONNX mapping), :mod:`mpc_fi.ranges` (interval bounds) and
:mod:`mpc_fi.memory` (memory estimate) all read it: adding a layer kind is one module here and
one line below.
"""

from __future__ import annotations

from .affine import Affine
from .base import Layer, Registry
from .conv2d import Conv2d
from .flatten import Flatten
from .identity import Identity
from .linear import Linear
from .merge import Add, Concat
from .relu import ReLU
from .sigmoid import Sigmoid
from .tanh import Tanh
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .softmax import LogSoftmax, Softmax

LAYERS = Registry()
for _layer in (Linear(), Conv2d(), Affine(), ReLU(), Sigmoid(), Tanh(), MaxPool2d(), AvgPool2d(),
               AdaptiveAvgPool2d(), Flatten(), Identity(), Softmax(), LogSoftmax(), Add(), Concat()):
    LAYERS.register(_layer)

__all__ = ["LAYERS", "Layer", "Registry"]
