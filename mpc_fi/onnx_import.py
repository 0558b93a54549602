"""Import an ONNX model as a ``torch.nn.Sequential`` of layers that can run on secret shares.

This is ``full`` mode's importer. In ``output`` mode an owner runs its ONNX file as it is with
onnxruntime (:mod:`mpc_fi.onnx_runtime`), so none of the restrictions below apply there.

Only a *single chain* of layers is supported: one graph input, one graph output, and every
computing node consumes the previous node's output plus initializers/constants. This is the
subset :data:`mpc_fi.models.SUPPORTED_LAYERS` can evaluate on shares (CrypTen), so every model this
module returns can be handed to :func:`mpc_fi.models.extract_architecture`. Supported ops:

=========================================  ===============================================
ONNX                                       torch
=========================================  ===============================================
Gemm (alpha=beta=1, transA=0)              nn.Linear
MatMul [+ Add of a 1-D constant]           nn.Linear (with/without bias)
Conv (2-D, symmetric pads)                 nn.Conv2d
BatchNormalization (inference)             nn.BatchNorm1d / nn.BatchNorm2d by input rank
Relu, Sigmoid, Tanh                        nn.ReLU, nn.Sigmoid, nn.Tanh
MaxPool, AveragePool (2-D)                 nn.MaxPool2d, nn.AvgPool2d
GlobalAveragePool                          nn.AdaptiveAvgPool2d(1)
Flatten (axis=1), flattening Reshape       nn.Flatten()
Dropout, Identity                          nn.Identity
Softmax, LogSoftmax (axis 1 or -1)         nn.Softmax, nn.LogSoftmax
=========================================  ===============================================

Each row is the ONNX mapping of one layer kind (``Layer.onnx`` in :mod:`mpc_fi.layers`).

Side computations that only produce constants are evaluated here, not converted: ``Constant``
nodes, ``Identity`` nodes aliasing initializers (the legacy torch exporter merges equal
parameters that way, cf. CrypTen issues #418/#455/#508) and the ``Shape -> Gather -> Unsqueeze
-> Concat`` pattern that ``x.view(x.size(0), -1)`` exports to. Anything else (unsupported ops,
branches such as skip connections, several inputs or outputs) raises
:class:`~mpc_fi.errors.UnsupportedModelError` listing every offending node at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from .errors import UnsupportedModelError
from .layers import LAYERS
from .onnx_nodes import Ctx as _Ctx
from .onnx_nodes import Node as _Node
from .onnx_nodes import NodeError as _NodeError

_HINT = ("export a torch.nn.Sequential of Linear/Conv2d/BatchNorm1d/BatchNorm2d/ReLU/Sigmoid/Tanh/"
         "MaxPool2d/AvgPool2d/AdaptiveAvgPool2d(1)/Flatten/Dropout/Softmax/LogSoftmax layers")
_FEED_FORWARD = "a feed-forward (Linear/Conv2d) model"

#: What to use instead of common ONNX ops that cannot run on shares.
_ALTERNATIVES: dict[str, str] = {
    "Gelu": "ReLU", "Erf": "ReLU (Erf comes from GELU)", "Elu": "ReLU", "Selu": "ReLU",
    "LeakyRelu": "ReLU", "PRelu": "ReLU", "Softplus": "ReLU", "Mish": "ReLU", "HardSwish": "ReLU",
    "HardSigmoid": "Sigmoid", "LayerNormalization": "BatchNorm1d/BatchNorm2d",
    "GroupNormalization": "BatchNorm2d", "InstanceNormalization": "BatchNorm2d",
    "LSTM": _FEED_FORWARD, "GRU": _FEED_FORWARD, "RNN": _FEED_FORWARD,
    "Gather": "one-hot inputs and Linear (instead of Embedding)",
    "ConvTranspose": "Conv2d", "Resize": "a fixed-size model without upsampling",
    "Upsample": "a fixed-size model without upsampling",
    "GlobalMaxPool": "AdaptiveAvgPool2d(1) (GlobalAveragePool)",
    "Add": "a bias only right after MatMul (i.e. nn.Linear); no skip connections",
    "ReduceMean": "nn.AdaptiveAvgPool2d(1) + nn.Flatten() (GlobalAveragePool), not x.mean(...)",
    "ArgMax": "the class scores as output (the protocol takes the argmax on shares)",
}

_BATCH = "batch"  # the batch dimension inside folded shape vectors (e.g. from Shape(x)[0])


# ---------------------------------------------------------------------------------------
# Reading and constant folding
# ---------------------------------------------------------------------------------------
def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _read(path: str) -> onnx.ModelProto:
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise UnsupportedModelError(f"ONNX file not found: {path}") from None
    except Exception as exc:  # DecodeError, ValidationError, OSError, ...: all mean a bad file
        raise UnsupportedModelError(
            f"{path} is not a valid ONNX model (corrupt, truncated or another format): "
            f"{_first_line(exc)}") from None
    return model


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes are only a help (BatchNorm rank, Reshape checks)
        pass
    g = model.graph
    shapes = {}
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if v.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _attr(a: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(a)
    return value.decode() if isinstance(value, bytes) else value


def _axes(n: _Node, args: list[np.ndarray]) -> list[int] | None:
    if "axes" in n.attrs:
        return list(n.attrs["axes"])
    return [int(v) for v in args[1].reshape(-1)] if len(args) > 1 else None


def _fold(n: _Node, consts: dict[str, np.ndarray],
          shapes: dict[str, list[int | None]]) -> list[np.ndarray] | None:
    """The outputs of ``n`` if it only computes constants (or shapes), else None."""
    if n.domain not in ("", "ai.onnx"):
        return None
    a = n.attrs
    if n.op == "Constant":
        if "value" in a:
            return [numpy_helper.to_array(a["value"])]
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in a:
                return [np.array(a[key], dtype=dtype)]
        return None
    if n.op == "Shape":  # Shape of a chain tensor: dim 0 is the batch, the rest must be fixed
        dims = shapes.get(n.inputs[0])
        if dims is None or any(d is None for d in dims[1:]):
            return None
        return [np.array([_BATCH, *dims[1:]], dtype=object)[a.get("start", 0):a.get("end")]]
    if any(i and i not in consts for i in n.inputs):
        return None
    args = [consts[i] for i in n.inputs if i]
    try:
        out = _fold_op(n, args)
    except (ValueError, IndexError, TypeError, KeyError):
        return None
    if out is not None and any(v.dtype == object for v in args):  # keep the batch marker an object
        out = np.asarray(out, dtype=object)
    return None if out is None else [out]


def _fold_op(n: _Node, args: list[np.ndarray]) -> np.ndarray | None:
    a = n.attrs
    if n.op == "Identity":
        return args[0]
    if n.op == "Gather":
        return np.take(args[0], args[1], axis=a.get("axis", 0))
    if n.op == "Unsqueeze":
        v = args[0]
        for ax in sorted(_axes(n, args) or []):
            v = np.expand_dims(v, ax)
        return v
    if n.op == "Squeeze":
        axes = _axes(n, args)
        return np.squeeze(args[0], axis=None if axes is None else tuple(axes))
    if n.op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in args], axis=a["axis"])
    if n.op == "Cast":
        v = args[0]
        return v if v.dtype == object else v.astype(helper.tensor_dtype_to_np_dtype(a["to"]))
    return None


# ---------------------------------------------------------------------------------------
# Op converters: (node, context) -> torch module
# ---------------------------------------------------------------------------------------
#: ONNX op type -> converter of one node into the torch module it stands for: the ONNX mapping
#: of each layer kind (mpc_fi.layers), gathered here.
_CONVERTERS: dict[str, Callable[[_Node, _Ctx], nn.Module]] = LAYERS.onnx_table()


# ---------------------------------------------------------------------------------------
# Graph structure
# ---------------------------------------------------------------------------------------
def _chain(nodes: list[_Node], inp: str | None, out: str | None,
           consts: dict[str, np.ndarray], problems: list[str]) -> list[_Node]:
    """Order ``nodes`` as a chain from ``inp`` to ``out``; report anything that is not."""
    consumers: dict[str, list[_Node]] = {}
    ok = inp is not None and out is not None
    for n in nodes:
        dynamic = list(dict.fromkeys(i for i in n.inputs if i and i not in consts))
        if len(dynamic) != 1:
            ok = False
            problems.append(f"{n.label}: takes {len(dynamic)} computed inputs "
                            f"({', '.join(dynamic) or 'none'}); only a single chain of layers is "
                            "supported (no skip connections, concatenations or extra inputs)")
        for i in dynamic:
            consumers.setdefault(i, []).append(n)
    for tensor, users in consumers.items():
        if len(users) > 1:
            ok = False
            problems.append(f"tensor {tensor!r} feeds {len(users)} nodes "
                            f"({', '.join(u.label for u in users)}): the graph branches; "
                            "only a single chain of layers is supported")
    if not ok:
        return nodes
    order: list[_Node] = []
    cur = inp
    while cur in consumers and cur != out and len(order) < len(nodes):
        n = consumers[cur][0]
        order.append(n)
        extra = [o for o in n.outputs[1:] if o and (o in consumers or o == out)]
        if extra:
            problems.append(f"{n.label}: its extra outputs {extra} are used; only the first "
                            "output of a layer may be used")
        cur = n.outputs[0]
    if cur != out:
        problems.append(f"the chain from input {inp!r} ends at {cur!r}, not at the output {out!r}")
    on_chain = {id(n) for n in order}
    for n in nodes:
        if id(n) not in on_chain:
            problems.append(f"{n.label}: not on the chain from input {inp!r} to output {out!r}")
    return order


def _fuse_bias(chain: list[_Node], consts: dict[str, np.ndarray]) -> list[_Node]:
    """Merge each ``MatMul`` followed by an ``Add`` of a constant into one ``MatMul+Add`` node."""
    fused: list[_Node] = []
    for n in chain:
        prev = fused[-1] if fused else None
        if (n.op == "Add" and prev is not None and prev.op == "MatMul" and len(n.inputs) == 2
                and prev.outputs[0] in n.inputs):
            bias = [i for i in n.inputs if i != prev.outputs[0]]
            if len(bias) == 1 and bias[0] in consts:
                fused[-1] = _Node(f"{prev.label} + {n.label}", "MatMul+Add", prev.domain,
                                  [*prev.inputs[:2], bias[0]], n.outputs, {})
                continue
        fused.append(n)
    return fused


def load_onnx_model(path: str) -> nn.Sequential:
    """Convert the ONNX model at ``path`` into an equivalent ``nn.Sequential`` in eval mode.

    Raises :class:`UnsupportedModelError` for an unreadable file, or listing every node that is
    not part of a single chain of supported ops.
    """
    model = _read(path)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes = _shapes(model)
    problems: list[str] = []

    inputs = [v.name for v in graph.input if v.name not in consts]
    outputs = [v.name for v in graph.output]
    if len(inputs) != 1:
        problems.append(f"the graph has {len(inputs)} inputs ({', '.join(inputs) or 'none'}); "
                        "a model must take exactly one input tensor")
    if len(outputs) != 1:
        problems.append(f"the graph has {len(outputs)} outputs ({', '.join(outputs) or 'none'}); "
                        "a model must return exactly one tensor")

    data: list[_Node] = []
    for i, proto in enumerate(graph.node):
        n = _Node(f"{proto.name or f'node #{i}'} ({proto.op_type})", proto.op_type, proto.domain,
                  list(proto.input), list(proto.output), {a.name: _attr(a) for a in proto.attribute})
        values = _fold(n, consts, shapes)
        if values is None:
            data.append(n)
        else:
            consts.update(zip(n.outputs, values))

    chain = _chain(data, inputs[0] if len(inputs) == 1 else None,
                   outputs[0] if len(outputs) == 1 else None, consts, problems)
    ctx = _Ctx(consts, shapes, opset, [])
    for n in _fuse_bias(chain, consts):
        converter = _CONVERTERS.get(n.op) if n.domain in ("", "ai.onnx") else None
        try:
            if converter is None:
                op = n.op if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op}"
                alt = _ALTERNATIVES.get(n.op) if n.domain in ("", "ai.onnx") else (
                    "mode 'output' (scikit-learn models run there, at their owner)"
                    if n.domain == "ai.onnx.ml" else None)
                raise _NodeError(f"op {op} is not supported on shares" + (f"; use {alt}" if alt else ""))
            ctx.layers.append(converter(n, ctx))
        except _NodeError as exc:
            problems.append(f"{n.label}: {exc}")
    if problems:
        raise UnsupportedModelError(
            f"ONNX model {path} cannot be converted to layers that run on shares:\n  - "
            + "\n  - ".join(problems) + f"\n(to fix: {_HINT}; or use mode 'output', where the "
            "owner runs this file as it is with onnxruntime)")
    return nn.Sequential(*ctx.layers).eval()
