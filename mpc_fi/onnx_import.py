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

Side computations that only produce constants are evaluated here, not converted: ``Constant``
nodes, ``Identity`` nodes aliasing initializers (the legacy torch exporter merges equal
parameters that way, cf. CrypTen issues #418/#455/#508) and the ``Shape -> Gather -> Unsqueeze
-> Concat`` pattern that ``x.view(x.size(0), -1)`` exports to. Anything else (unsupported ops,
branches such as skip connections, several inputs or outputs) raises
:class:`~mpc_fi.errors.UnsupportedModelError` listing every offending node at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from .errors import UnsupportedModelError

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


class _NodeError(Exception):
    """A problem with one node; collected, then reported together."""


@dataclass
class _Node:
    label: str  # "name (OpType)"
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]


@dataclass
class _Ctx:
    consts: dict[str, np.ndarray]
    shapes: dict[str, list[int | None]]  # per tensor; None for a symbolic dimension
    opset: int
    layers: list[nn.Module]

    def const(self, n: _Node, i: int, what: str, optional: bool = False) -> np.ndarray | None:
        name = n.inputs[i] if i < len(n.inputs) else ""
        if not name:
            if optional:
                return None
            raise _NodeError(f"missing input {what}")
        value = self.consts.get(name)
        if value is None or value.dtype == object:
            raise _NodeError(f"input {what} ({name!r}) must be an initializer or a constant, "
                             "not a computed tensor")
        return value

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


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
def _tensor(value: np.ndarray, what: str) -> torch.Tensor:
    if not np.issubdtype(value.dtype, np.number):
        raise _NodeError(f"{what} has dtype {value.dtype}, not a number")
    t = torch.tensor(np.asarray(value, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise _NodeError(f"{what} holds NaN or inf")
    return t


def _linear(w: np.ndarray, b: np.ndarray | None) -> nn.Linear:
    """``w`` is (out, in) as in torch."""
    if w.ndim != 2:
        raise _NodeError(f"the weight must be a matrix, got shape {list(w.shape)}")
    out_f, in_f = w.shape
    if b is not None and b.size not in (1, out_f):
        raise _NodeError(f"bias of shape {list(b.shape)} does not fit {out_f} outputs")
    layer = nn.Linear(in_f, out_f, bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(_tensor(w, "weight"))
        if b is not None:
            layer.bias.copy_(_tensor(b, "bias").reshape(-1).expand(out_f))
    return layer


def _gemm(n: _Node, ctx: _Ctx) -> nn.Module:
    a = n.attrs
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        raise _NodeError(f"only alpha=1, beta=1, transA=0 are supported, got alpha="
                         f"{a.get('alpha', 1.0)}, beta={a.get('beta', 1.0)}, transA={a.get('transA', 0)}")
    w = ctx.const(n, 1, "B")
    return _linear(w if a.get("transB", 0) else w.T, ctx.const(n, 2, "C", optional=True))


def _matmul(n: _Node, ctx: _Ctx) -> nn.Module:  # also "MatMul+Add", with the bias as input 2
    w = ctx.const(n, 1, "B")
    bias = ctx.const(n, 2, "bias", optional=True)
    if bias is not None and bias.ndim != 1:
        raise _NodeError(f"the Add after MatMul must add a 1-D bias, got shape {list(bias.shape)}")
    return _linear(w.T if w.ndim == 2 else w, bias)


def _pads(n: _Node) -> tuple[int, int]:
    if n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _NodeError(f"auto_pad={n.attrs['auto_pad']} is not supported; export with explicit "
                         "integer padding")
    pads = list(n.attrs.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise _NodeError(f"only 2-D operations are supported, got pads {pads}")
    if pads[:2] != pads[2:]:
        raise _NodeError(f"asymmetric pads {pads} (begin {pads[:2]}, end {pads[2:]}); torch pads "
                         "both sides equally: use symmetric padding (e.g. an odd kernel with k//2)")
    return pads[0], pads[1]


def _pair(n: _Node, key: str, default: int | None = None) -> tuple[int, int]:
    value = list(n.attrs[key]) if key in n.attrs else [default, default]
    if len(value) != 2 or None in value:
        raise _NodeError(f"only 2-D operations are supported, got {key}={value}")
    return value[0], value[1]


def _conv(n: _Node, ctx: _Ctx) -> nn.Module:
    w = ctx.const(n, 1, "W")
    if w.ndim != 4:
        raise _NodeError(f"only 2-D convolutions are supported, got a {w.ndim - 2}-D kernel")
    if tuple(n.attrs.get("kernel_shape", w.shape[2:])) != w.shape[2:]:
        raise _NodeError(f"kernel_shape {n.attrs['kernel_shape']} does not match the weight {w.shape}")
    b = ctx.const(n, 2, "B", optional=True)
    groups = n.attrs.get("group", 1)
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2:], stride=_pair(n, "strides", 1),
                     padding=_pads(n), dilation=_pair(n, "dilations", 1), groups=groups,
                     bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(_tensor(w, "weight"))
        if b is not None:
            conv.bias.copy_(_tensor(b, "bias").reshape(-1))
    return conv


def _pool_args(n: _Node) -> dict[str, tuple[int, int]]:
    if n.attrs.get("ceil_mode", 0) or _pair(n, "dilations", 1) != (1, 1):
        raise _NodeError("ceil_mode and dilations are not supported; use the defaults")
    kernel, padding = _pair(n, "kernel_shape"), _pads(n)
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise _NodeError(f"padding {padding} exceeds half the kernel {kernel}")
    return {"kernel_size": kernel, "stride": _pair(n, "strides", 1), "padding": padding}


def _maxpool(n: _Node, ctx: _Ctx) -> nn.Module:
    return nn.MaxPool2d(**_pool_args(n))


def _avgpool(n: _Node, ctx: _Ctx) -> nn.Module:
    args = _pool_args(n)
    if args["padding"] != (0, 0) and not n.attrs.get("count_include_pad", 0):
        raise _NodeError("count_include_pad=0 with padding is not supported on shares; export "
                         "AvgPool2d with count_include_pad=True (the torch default)")
    return nn.AvgPool2d(**args)


def _global_avgpool(n: _Node, ctx: _Ctx) -> nn.Module:
    if ctx.rank(n.inputs[0]) not in (None, 4):
        raise _NodeError(f"only 2-D pooling is supported, got a rank-{ctx.rank(n.inputs[0])} input")
    return nn.AdaptiveAvgPool2d(1)


def _flatten(n: _Node, ctx: _Ctx) -> nn.Module:
    axis, rank = n.attrs.get("axis", 1), ctx.rank(n.inputs[0])
    if axis != 1 and not (rank is not None and axis == 1 - rank):
        raise _NodeError(f"only Flatten(axis=1) is supported, got axis={axis}")
    return nn.Flatten()


def _reshape(n: _Node, ctx: _Ctx) -> nn.Module:
    target = ctx.consts.get(n.inputs[1])
    if target is None:
        raise _NodeError(f"the target shape {n.inputs[1]!r} is computed at run time")
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
    raise _NodeError(f"reshape to ({', '.join(shown)}) is not a flattening to (batch, features); "
                     "use nn.Flatten(), x.view(x.size(0), -1) or x.view(-1, features)")


def _previous_rank(ctx: _Ctx) -> int | None:
    for layer in reversed(ctx.layers):
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                              nn.BatchNorm2d)):
            return 4
        if isinstance(layer, (nn.Linear, nn.Flatten, nn.BatchNorm1d)):
            return 2
    return None


def _batchnorm(n: _Node, ctx: _Ctx) -> nn.Module:
    if n.attrs.get("training_mode", 0) or not n.attrs.get("spatial", 1):
        raise _NodeError("only inference-mode, spatial batch normalization is supported")
    scale, bias, mean, var = (ctx.const(n, i, what) for i, what in
                              enumerate(("scale", "B", "input_mean", "input_var"), start=1))
    channels = scale.size
    if any(v.shape != (channels,) for v in (scale, bias, mean, var)):
        raise _NodeError("scale, B, mean and var must be 1-D of the same length")
    rank = ctx.rank(n.inputs[0])
    rank = rank if rank is not None else _previous_rank(ctx)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(rank)  # type: ignore[arg-type]
    if cls is None:
        raise _NodeError(f"input of rank {rank if rank is not None else 'unknown'}; "
                         "need rank 2 or 3 (BatchNorm1d) or 4 (BatchNorm2d)")
    bn = cls(channels, eps=float(n.attrs.get("epsilon", 1e-5)))
    with torch.no_grad():
        bn.weight.copy_(_tensor(scale, "scale"))
        bn.bias.copy_(_tensor(bias, "B"))
        bn.running_mean.copy_(_tensor(mean, "input_mean"))
        bn.running_var.copy_(_tensor(var, "input_var"))
    return bn.eval()


def _dropout(n: _Node, ctx: _Ctx) -> nn.Module:
    training = ctx.const(n, 2, "training_mode", optional=True)
    if training is not None and bool(training.reshape(-1)[0]):
        raise _NodeError("training_mode=True; export the model in eval mode")
    return nn.Identity()


def _softmax(n: _Node, ctx: _Ctx) -> nn.Module:
    axis = n.attrs.get("axis", -1 if ctx.opset >= 13 else 1)
    rank = ctx.rank(n.inputs[0])
    if axis not in (1, -1) or (ctx.opset < 13 and rank not in (None, 2)):
        raise _NodeError(f"only axis 1 or -1 is supported (on a 2-D input before opset 13), "
                         f"got axis={axis} at opset {ctx.opset}")
    return (nn.Softmax if n.op == "Softmax" else nn.LogSoftmax)(dim=axis)


_CONVERTERS: dict[str, Callable[[_Node, _Ctx], nn.Module]] = {
    "Gemm": _gemm, "MatMul": _matmul, "MatMul+Add": _matmul, "Conv": _conv,
    "Relu": lambda n, ctx: nn.ReLU(), "Sigmoid": lambda n, ctx: nn.Sigmoid(),
    "Tanh": lambda n, ctx: nn.Tanh(), "MaxPool": _maxpool, "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avgpool, "Flatten": _flatten, "Reshape": _reshape,
    "BatchNormalization": _batchnorm, "Dropout": _dropout,
    "Identity": lambda n, ctx: nn.Identity(), "Softmax": _softmax, "LogSoftmax": _softmax,
}


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
