"""Import an ONNX model (or trace a torch module) as a graph of layers that run on secret shares.

This is ``full`` mode's importer. In ``output`` mode an owner runs its ONNX file as it is with
onnxruntime (:mod:`mpc_fi.onnx_runtime`), so none of the restrictions below apply there.

The graph must have one input and one output; every computing node reads the model input or
other nodes' outputs (plus initializers/constants), and only ``Add``/``Sum`` and ``Concat`` read
more than one computed tensor (residual connections, concatenations). A chain of layers becomes
a ``torch.nn.Sequential``, any other graph a :class:`mpc_fi.graph.Graph`; both can be handed to
:func:`mpc_fi.models.extract_architecture`. Supported ops:

=========================================  ===============================================
ONNX                                       layer on shares (torch module)
=========================================  ===============================================
Gemm (any alpha, beta, transB; transA=0)   nn.Linear (alpha, transB folded into the weight,
                                           beta into the bias)
MatMul [+ Add of a 1-D constant]           nn.Linear (with/without bias)
Conv (2-D, symmetric pads)                 nn.Conv2d
BatchNormalization (inference)             folded into the Conv/Gemm before it when that is
                                           its only reader, else a per-channel affine map
                                           (nn.BatchNorm1d / nn.BatchNorm2d by input rank)
Add, Sum of computed tensors (one shape)   residual addition (local on shares)
Concat (axis >= 1)                         concatenation (local on shares)
Relu, Sigmoid, Tanh                        nn.ReLU, nn.Sigmoid, nn.Tanh
MaxPool, AveragePool (2-D)                 nn.MaxPool2d, nn.AvgPool2d
GlobalAveragePool, ReduceMean over (2, 3)  nn.AdaptiveAvgPool2d(1) [+ nn.Flatten()]
Flatten (axis=1), flattening Reshape       nn.Flatten()
Dropout, Identity                          nn.Identity
Softmax, LogSoftmax (axis 1 or -1)         nn.Softmax, nn.LogSoftmax
=========================================  ===============================================

Each row is the ONNX mapping of one layer kind (``Layer.onnx`` in :mod:`mpc_fi.layers`).
LayerNormalization, Gelu (or the Erf that older exporters write for it) and the other ops in
:data:`_ALTERNATIVES` are refused, naming the node and what to use instead: a layer norm
divides by a square root of statistics of the secret input, a Newton iteration on shares whose
error the owner cannot bound without knowing the input; BatchNorm (statistics fixed at
training, folded into the weights) and ReLU (exact) cost less and are exact.

A module with its own ``forward()`` is traced by its owner to ONNX in memory with the legacy
torch exporter and imported the same way (:func:`trace_module`).

Side computations that only produce constants are evaluated here, not converted: ``Constant``
nodes, ``Identity`` nodes aliasing initializers (the legacy torch exporter merges equal
parameters that way, cf. CrypTen issues #418/#455/#508) and the ``Shape -> Gather -> Unsqueeze
-> Concat`` pattern that ``x.view(x.size(0), -1)`` exports to. Anything else (unsupported ops,
nodes off the path from input to output, several inputs or outputs) raises
:class:`~mpc_fi.errors.UnsupportedModelError` listing every offending node at once.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from .errors import MpcFiError, UnsupportedModelError
from .graph import Graph
from .layers import LAYERS
from .onnx_nodes import Ctx as _Ctx
from .onnx_nodes import Node as _Node
from .onnx_nodes import NodeError as _NodeError

_HINT = ("build the model from Linear/Conv2d/BatchNorm1d/BatchNorm2d/ReLU/Sigmoid/Tanh/MaxPool2d/"
         "AvgPool2d/AdaptiveAvgPool2d(1)/Flatten/Dropout/Softmax/LogSoftmax layers, residual "
         "additions and concatenations")
_FEED_FORWARD = "a feed-forward (Linear/Conv2d) model"
_NO_GELU = ("ReLU (exact on shares; GELU needs erf, which shares only approximate, with an "
            "error that grows outside a narrow input range)")
_NO_LAYERNORM = ("BatchNorm1d/BatchNorm2d (statistics fixed at training, folded into the weights; "
                 "a layer norm divides by the square root of the secret input's own variance, "
                 "an iteration on shares without an error bound for small variances)")

#: What to use instead of common ONNX ops that cannot run on shares.
_ALTERNATIVES: dict[str, str] = {
    "Gelu": _NO_GELU, "Erf": f"{_NO_GELU} (Erf comes from GELU)", "Elu": "ReLU", "Selu": "ReLU",
    "LeakyRelu": "ReLU", "PRelu": "ReLU", "Softplus": "ReLU", "Mish": "ReLU", "HardSwish": "ReLU",
    "HardSigmoid": "Sigmoid", "LayerNormalization": _NO_LAYERNORM,
    "GroupNormalization": "BatchNorm2d", "InstanceNormalization": "BatchNorm2d",
    "LSTM": _FEED_FORWARD, "GRU": _FEED_FORWARD, "RNN": _FEED_FORWARD,
    "Gather": "one-hot inputs and Linear (instead of Embedding)",
    "ConvTranspose": "Conv2d", "Resize": "a fixed-size model without upsampling",
    "Upsample": "a fixed-size model without upsampling",
    "GlobalMaxPool": "AdaptiveAvgPool2d(1) (GlobalAveragePool)",
    "Mul": "weights inside Conv2d/Linear, or BatchNorm (folded into them)",
    "Div": "weights inside Conv2d/Linear, or BatchNorm (folded into them)",
    "Sub": "a bias inside Conv2d/Linear, or BatchNorm (folded into them)",
    "Transpose": "a model whose tensors keep the batch first (nn.Flatten, nn.Linear)",
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
def _computed(n: _Node, consts: dict[str, np.ndarray]) -> list[str]:
    return [i for i in n.inputs if i and i not in consts]


def _fuse_bias(nodes: list[_Node], consts: dict[str, np.ndarray]) -> list[_Node]:
    """Merge each ``MatMul`` whose only reader is an ``Add`` of a constant into one
    ``MatMul+Add`` node (how exporters write ``nn.Linear`` without Gemm)."""
    readers: dict[str, list[_Node]] = {}
    for n in nodes:
        for i in _computed(n, consts):
            readers.setdefault(i, []).append(n)
    fused: dict[int, _Node] = {}
    dropped: set[int] = set()
    for n in nodes:
        users = readers.get(n.outputs[0], []) if n.op == "MatMul" and n.outputs else []
        if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
            continue
        add = users[0]
        bias = [i for i in add.inputs if i != n.outputs[0]]
        if len(bias) == 1 and bias[0] in consts:
            fused[id(n)] = _Node(f"{n.label} + {add.label}", "MatMul+Add", n.domain,
                                 [*n.inputs[:2], bias[0]], add.outputs, {})
            dropped.add(id(add))
    return [fused.get(id(n), n) for n in nodes if id(n) not in dropped]


def _order(nodes: list[_Node], inp: str | None, out: str | None,
           consts: dict[str, np.ndarray], problems: list[str]) -> list[_Node]:
    """The nodes on a path from ``inp`` to ``out``, in the file's (topological) order; every
    node that is not, or that reads a tensor the model input does not lead to, is reported."""
    producer: dict[str, _Node] = {}
    for n in nodes:
        if not _computed(n, consts):
            problems.append(f"{n.label}: takes 0 computed inputs (none); every layer must read "
                            "the model input or another layer's output")
        for o in n.outputs:
            if o:
                producer[o] = n
    if inp is None or out is None:
        return []
    needed: set[int] = set()
    stack = [producer[out]] if out in producer else []
    while stack:
        n = stack.pop()
        if id(n) in needed:
            continue
        needed.add(id(n))
        stack.extend(producer[i] for i in _computed(n, consts) if i in producer)
    available, order = {inp}, []
    for n in nodes:
        if id(n) not in needed:
            if _computed(n, consts):
                problems.append(f"{n.label}: not on a path from input {inp!r} to output {out!r}")
            continue
        missing = [i for i in _computed(n, consts) if i not in available]
        if missing:
            problems.append(f"{n.label}: reads {', '.join(map(repr, missing))}, which the model "
                            f"input {inp!r} does not lead to (a second input or an out-of-order "
                            "graph); a model takes one input tensor")
        extra = [o for o in n.outputs[1:] if o and any(
            o in m.inputs for m in nodes if id(m) in needed) or o == out]
        if extra:
            problems.append(f"{n.label}: its extra outputs {extra} are used; only the first "
                            "output of a layer may be used")
        available.add(n.outputs[0])
        order.append(n)
    if out != inp and out not in producer:
        problems.append(f"the output {out!r} is not computed from the input {inp!r}")
    return order


#: torch module type -> layer kind, to check how many computed inputs a converted node may take.
_KINDS = LAYERS.torch_table()


def _convert(model: onnx.ModelProto, where: str) -> nn.Module:
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

    # with several inputs or outputs (reported above), the first ones: every node reading
    # another input is named too
    inp = inputs[0] if inputs else None
    order = _order(_fuse_bias(data, consts), inp, outputs[0] if outputs else None,
                   consts, problems)
    ctx = _Ctx(consts, shapes, opset, [])
    index: dict[str, int] = {inp: -1} if inp is not None else {}
    layers: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    names: set[str] = set()
    for n in order:
        converter = _CONVERTERS.get(n.op) if n.domain in ("", "ai.onnx") else None
        try:
            if converter is None:
                op = n.op if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op}"
                alt = _ALTERNATIVES.get(n.op) if n.domain in ("", "ai.onnx") else (
                    "mode 'output' (scikit-learn models run there, at their owner)"
                    if n.domain == "ai.onnx.ml" else None)
                raise _NodeError(f"op {op} is not supported on shares" + (f"; use {alt}" if alt else ""))
            module = converter(n, ctx)
            computed = _computed(n, consts)
            parts = list(module) if isinstance(module, nn.Sequential) else [module]
            kind = _KINDS.get(type(parts[0]))
            if kind is not None and kind.arity == 1 and len(computed) != 1:
                raise _NodeError(f"takes {len(computed)} computed inputs ({', '.join(computed)}); "
                                 "only Add/Sum and Concat combine computed tensors (a weight "
                                 "must be an initializer or a constant)")
        except _NodeError as exc:
            problems.append(f"{n.label}: {exc}")
            continue
        ctx.layers.extend(parts)
        ins = tuple(index.get(i, -1) for i in computed)
        base = n.label.rsplit(" (", 1)[0][:200] or f"node{len(layers)}"
        for k, part in enumerate(parts):
            name = base if len(parts) == 1 else f"{base}#{k}"
            while name in names:
                name += "'"
            names.add(name)
            layers.append((name, part, ins if k == 0 else (len(layers) - 1,)))
        if n.outputs:
            index[n.outputs[0]] = len(layers) - 1
    if not layers and not problems:
        problems.append("the graph computes nothing: a model needs at least one layer")
    if problems:
        raise UnsupportedModelError(
            f"ONNX model {where} cannot be converted to layers that run on shares:\n  - "
            + "\n  - ".join(problems) + f"\n(to fix: {_HINT}; or use mode 'output', where the "
            "owner runs its model as it is)")
    dag = Graph(layers)
    if dag.is_chain():
        return nn.Sequential(*dag.layers).eval()
    return dag.eval()


def load_onnx_model(path: str) -> nn.Module:
    """Convert the ONNX model at ``path`` into an equivalent module in eval mode: an
    ``nn.Sequential`` for a chain of layers, a :class:`~mpc_fi.graph.Graph` otherwise.

    Raises :class:`UnsupportedModelError` for an unreadable file, or listing every node that
    cannot run on shares (with why, and what to use instead).
    """
    return _convert(_read(path), path)


#: Largest difference, relative to the output's scale, between a module and its traced graph.
TRACE_TOLERANCE = 1e-4


def trace_module(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Trace ``model`` (a module with its own ``forward()``) to an ONNX graph in memory with the
    legacy torch exporter (``dynamo=False``, evaluation mode, a dynamic batch; batch
    normalisation after a convolution is folded by the exporter) and convert it as
    :func:`load_onnx_model` does. Owner process only: the weights never leave this process.

    A trace records the operations one example ran: a forward() whose control flow depends on
    the values would be recorded along one branch only. The graph is therefore run against the
    module on a few random queries (and zeros) and refused if they differ by more than
    :data:`TRACE_TOLERANCE` of the output's scale.
    """
    kind = type(model).__name__
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (torch.zeros((1, *input_shape)),), buffer,
                              dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                              training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
    except MpcFiError:
        raise
    except Exception as exc:  # the user's forward(), whatever it raises while traced
        raise UnsupportedModelError(
            f"<model> ({kind}): its forward() cannot be traced to a graph of layers "
            f"(torch.onnx.export, legacy exporter): {_first_line(exc)}; express it with torch "
            "operations on one input tensor, or use mode 'output'") from None
    traced = _convert(onnx.load_from_string(buffer.getvalue()), f"traced from {kind}")
    generator = torch.Generator().manual_seed(0)  # public probes, masking nothing
    x = torch.cat([torch.zeros((1, *input_shape)),
                   torch.randn((3, *input_shape), generator=generator)])
    with torch.no_grad():
        want, got = model(x), traced(x)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        raise UnsupportedModelError(
            f"<model> ({kind}): its traced graph returns {tuple(got.shape)}, the module "
            f"{tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__}")
    error = float((want - got).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not error <= TRACE_TOLERANCE * scale:
        raise UnsupportedModelError(
            f"<model> ({kind}): its traced graph differs from forward() by {error:.3g} on the "
            "same queries: forward() likely branches on the values (if/while on a tensor), "
            "which a graph cannot follow; compute both branches, or use mode 'output'")
    return traced
