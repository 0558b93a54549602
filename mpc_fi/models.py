"""Owner models: loading (owner process only), the supported-layer registry, and the
architecture that other parties may learn.

A model runs on shares as a graph of supported layers: a ``torch.nn.Sequential`` (nested is
fine) is a chain; any other module (its own ``forward()``: residual connections, concatenations,
``torch.flatten``...) is traced by the owner to ONNX with the legacy torch exporter and imported
as a graph (:func:`mpc_fi.onnx_import.trace_module`), and so is an ONNX file. Each layer names
the earlier layers whose outputs it takes (:attr:`LayerSpec.inputs`); the last layer's output is
the model's. A batch normalisation right after a Conv2d or Linear whose output nothing else reads
is folded into that layer's weights by the owner (:func:`fold_batchnorm`).

Other parties receive only :class:`Architecture`: layer kinds, hyper-parameters, parameter
shapes and the graph's edges, never values. In ``full`` mode every party evaluates the same
graph with :func:`secure_forward`, the owner being the source of the parameter shares.

Only the owner's process calls :func:`load_owner_model`; each load is recorded in
:data:`LOAD_AUDIT` so that tests can check which process read which file. In ``output`` mode an
owner runs its model itself, so any ``torch.nn.Module`` works, and an ONNX file runs as it is
through onnxruntime (:mod:`mpc_fi.onnx_runtime`); only ``full`` mode needs the supported-layer
subset below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ModelSource
from . import wire
from .errors import InputError, MpcFiError, UnsupportedModelError
from .layers import LAYERS

#: (pid, path) of every weights/ONNX file read by this process.
LOAD_AUDIT: list[tuple[int, str]] = []


# ---------------------------------------------------------------------------------------
# Architecture: what other parties learn
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One layer: its kind, public hyper-parameters, and the shapes of its secret parameters."""

    path: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: indices of the earlier layers whose outputs this one takes (-1: the model input);
    #: empty: the previous layer's output (a chain)
    inputs: tuple[int, ...] = ()


def input_indices(layers: Sequence[LayerSpec]) -> list[tuple[int, ...]]:
    """Every layer's inputs with the chain default made explicit (``i - 1``; -1 is the input)."""
    return [layer.inputs or (i - 1,) for i, layer in enumerate(layers)]


def run_graph(layers: Sequence[LayerSpec], x: Any, step: Callable[[int, LayerSpec, list[Any]], Any]
              ) -> Any:
    """Evaluate a graph: ``step(i, layer, inputs)`` gives layer ``i``'s output from its inputs'
    values; each value is dropped after its last reader. Returns the last layer's output."""
    edges = input_indices(layers)
    last_use: dict[int, int] = {}
    for i, ins in enumerate(edges):
        for j in ins:
            last_use[j] = i
    values: dict[int, Any] = {-1: x}
    for i, (layer, ins) in enumerate(zip(layers, edges)):
        values[i] = step(i, layer, [values[j] for j in ins])
        for j in set(ins):
            if last_use[j] == i:
                del values[j]
    return values[len(layers) - 1] if layers else x


@dataclass(frozen=True)
class Architecture:
    """The public description of a model: layers without weights, input shape, class count."""

    layers: tuple[LayerSpec, ...]
    input_shape: tuple[int, ...]  # per example, without the batch dimension
    num_classes: int

    def describe(self) -> str:
        return " -> ".join(layer.op for layer in self.layers)

    def to_wire(self) -> dict[str, Any]:
        """The JSON form other parties receive (:mod:`mpc_fi.wire`): kinds, arguments, shapes."""
        return {"layers": [{"path": layer.path, "op": layer.op, "args": dict(layer.args),
                            "params": {k: list(v) for k, v in layer.params.items()},
                            **({"inputs": list(layer.inputs)} if layer.inputs else {})}
                           for layer in self.layers],
                "input_shape": list(self.input_shape), "num_classes": self.num_classes}

    @staticmethod
    def from_wire(value: Any) -> "Architecture":
        """An architecture a peer sent, every field checked (:data:`ARCHITECTURE_WIRE`)."""
        return ARCHITECTURE_WIRE.check(value)


# What each layer kind may carry on the wire (its arguments, its parameters' dimensions) comes
# from its Layer (mpc_fi.layers), read when a message arrives. A kind outside the registry is
# refused.
#: Most layers, and most parameter elements in all, of an architecture from a peer.
MAX_LAYERS = 4096
MAX_PARAMETERS = 1 << 30


def _layer(value: dict[str, Any]) -> LayerSpec:
    op = value["op"]
    if op not in LAYERS:
        raise ValueError(f"layer {value['path']!r}: unknown kind {op[:40]!r} (known: "
                         f"{', '.join(LAYERS)})")
    args = LAYERS[op].args_wire.check(value["args"], f"layer {value['path']!r} args")
    params = LAYERS[op].params_schema().check(value["params"], f"layer {value['path']!r} params")
    inputs = tuple(value.get("inputs", ()))
    arity = LAYERS[op].arity
    if inputs and (len(inputs) < 2 if arity == 0 else len(inputs) != arity):
        raise ValueError(f"layer {value['path']!r}: {op} takes "
                         f"{'two or more inputs' if arity == 0 else f'{arity} input'}, "
                         f"got {len(inputs)}")
    if not inputs and arity == 0:
        raise ValueError(f"layer {value['path']!r}: {op} needs its inputs listed")
    return LayerSpec(path=value["path"], op=op, args=args, params=params, inputs=inputs)


def _architecture(value: dict[str, Any]) -> Architecture:
    layers = value["layers"]
    total = sum(math.prod(shape) for layer in layers for shape in layer.params.values())
    if total > MAX_PARAMETERS:
        raise ValueError(f"{total} parameters (at most {MAX_PARAMETERS})")
    if len({layer.path for layer in layers}) != len(layers):
        raise ValueError("two layers share a path")
    for i, layer in enumerate(layers):
        if any(not -1 <= j < i for j in layer.inputs):
            raise ValueError(f"layer {layer.path!r} (#{i}) takes inputs {list(layer.inputs)}; "
                             "only earlier layers (or -1, the model input) may feed a layer")
    # the tensors a graph adds or concatenates must fit together (every party checks the same)
    if any(LAYERS[layer.op].arity != 1 for layer in layers):
        try:
            layer_shapes(layers, value["input_shape"])
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"the graph's shapes do not fit: {exc}") from None
    return Architecture(layers, value["input_shape"], value["num_classes"])


#: Most inputs of one layer (a concatenation of many branches).
MAX_INPUTS = 64
_LAYER_WIRE = wire.Convert(wire.Record({"path": wire.Str(256), "op": wire.Str(64),
                                        "args": wire.Any_, "params": wire.Any_},
                                       {"inputs": wire.Array(wire.Int(-1, MAX_LAYERS), MAX_INPUTS,
                                                             min_len=1)}), _layer)
#: An :class:`Architecture` on the wire: known layer kinds only, each with exactly its
#: arguments (bounded integers) and parameter shapes (non-negative, bounded element counts).
ARCHITECTURE_WIRE = wire.Convert(
    wire.Record({"layers": wire.Array(_LAYER_WIRE, MAX_LAYERS),
                 "input_shape": wire.Shape(min_dims=1), "num_classes": wire.Int(2, 1 << 20)}),
    _architecture)


# ---------------------------------------------------------------------------------------
# Supported-layer registry: torch module type -> converter to (op, args, parameter tensors)
# ---------------------------------------------------------------------------------------
Converter = Callable[[nn.Module], tuple[str, dict[str, Any], dict[str, torch.Tensor]]]


def _converter(layer: Any) -> Converter:
    def convert(module: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
        args, params = layer.from_torch(module)
        return layer.op, args, params
    return convert


#: torch module type -> converter to (op, args, parameter tensors), from the layer registry.
SUPPORTED_LAYERS: dict[type, Converter] = {t: _converter(layer)
                                           for t, layer in LAYERS.torch_table().items()}

#: What to use instead of common layers that cannot run on shares.
ALTERNATIVES: dict[str, str] = {
    "GELU": "ReLU (exact on shares; GELU needs erf, which shares only approximate, with an "
            "error that grows outside a narrow input range)",
    "SiLU": "ReLU", "ELU": "ReLU", "LeakyReLU": "ReLU", "PReLU": "ReLU",
    "Mish": "ReLU", "Hardswish": "ReLU", "Softplus": "ReLU",
    "LayerNorm": "BatchNorm1d/BatchNorm2d (folded into an affine map at evaluation; a layer "
                 "norm divides by the square root of the secret input's own variance, an "
                 "iteration on shares without an error bound for small variances)",
    "GroupNorm": "BatchNorm2d", "InstanceNorm2d": "BatchNorm2d",
    "LSTM": "a feed-forward (Linear/Conv2d) model", "GRU": "a feed-forward (Linear/Conv2d) model",
    "RNN": "a feed-forward (Linear/Conv2d) model", "Embedding": "one-hot inputs and Linear",
    "MultiheadAttention": "a feed-forward (Linear/Conv2d) model",
    "Conv1d": "Conv2d with a kernel of height 1", "Conv3d": "Conv2d",
    "MaxPool1d": "MaxPool2d", "AvgPool1d": "AvgPool2d", "AdaptiveMaxPool2d": "AdaptiveAvgPool2d",
    "Upsample": "a fixed-size model without upsampling", "Dropout2d": "Dropout",
}


def _walk(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]],
          problems: list[str], custom: list[str]) -> None:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            _walk(child, f"{prefix}.{name}" if prefix else name, out, problems, custom)
        return
    kind = type(module).__name__
    where = prefix or "<model>"
    if type(module) in SUPPORTED_LAYERS:
        out.append((where, module))
    elif kind in ALTERNATIVES:
        problems.append(f"{where} ({kind}): not supported on shares; use {ALTERNATIVES[kind]}")
    elif list(module.children()) or type(module).forward is not nn.Module.forward:
        custom.append(f"{where} ({kind})")
    else:
        problems.append(f"{where} ({kind}): not supported on shares; use the supported layers "
                        f"({', '.join(sorted(t.__name__ for t in SUPPORTED_LAYERS))})")


def _known_unsupported(model: nn.Module) -> list[str]:
    """Submodules anywhere in ``model`` that cannot run on shares, with what to use instead."""
    return [f"{name or '<model>'} ({type(m).__name__}): not supported on shares; use "
            f"{ALTERNATIVES[type(m).__name__]}"
            for name, m in model.named_modules() if type(m).__name__ in ALTERNATIVES]


def _graph_layers(model: nn.Module, input_shape: tuple[int, ...], problems: list[str]
                  ) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """``(path, module, inputs)`` of every layer of ``model`` as a graph; problems collected."""
    from .graph import Graph  # noqa: PLC0415 - a small module; kept apart from the ONNX import

    if isinstance(model, Graph):
        found = list(zip(model.names, model.layers, model.inputs))
    else:
        chain: list[tuple[str, nn.Module]] = []
        custom: list[str] = []
        _walk(model, "", chain, problems, custom)
        if not custom:
            return [(path, m, ()) for path, m in chain]
        known = _known_unsupported(model)
        if problems or known:
            problems.extend(p for p in known if p not in problems)
            return []
        from .onnx_import import trace_module  # noqa: PLC0415 - imports onnx

        traced = trace_module(model, input_shape)  # raises UnsupportedModelError, every node named
        if not isinstance(traced, Graph):  # a chain: paths are its positions
            return [(str(i), m, ()) for i, m in enumerate(traced)]
        found = list(zip(traced.names, traced.layers, traced.inputs))
    for path, m, _ in found:
        if type(m) not in SUPPORTED_LAYERS:
            problems.append(f"{path} ({type(m).__name__}): not supported on shares")
    return found


def fold_batchnorm(layers: list[LayerSpec], params: dict[str, torch.Tensor],
                   input_shape: tuple[int, ...]) -> tuple[list[LayerSpec], dict[str, torch.Tensor]]:
    """Fold every batch normalisation (``affine``) that only reads a Conv2d or Linear, whose
    output nothing else reads, into that layer's weights and bias (owner side: the result has
    one secret multiplication and one truncation less per element, and says less about the
    model). Other affine layers stay (a per-channel multiplication by secret parameters). The
    folded layer's path is ``"<conv path>+<batch norm path>"``."""
    edges = input_indices(layers)
    readers: dict[int, int] = {}
    for ins in edges:
        for j in ins:
            readers[j] = readers.get(j, 0) + 1
    shapes = layer_shapes(layers, input_shape)
    folded: dict[int, int] = {}  # affine index -> the layer it is folded into
    params = dict(params)
    for i, (layer, ins) in enumerate(zip(layers, edges)):
        j = ins[0]
        if layer.op != "affine" or j < 0 or readers.get(j) != 1 \
                or layers[j].op not in ("conv2d", "linear"):
            continue
        rank, channel = len(shapes[j]), layer.args["channel_dim"] % len(shapes[j])
        if channel != (1 if layers[j].op == "conv2d" else rank - 1):
            continue  # e.g. BatchNorm1d over (N, C, L) after a Linear on L: channels differ
        scale, shift = params.pop(f"{layer.path}/scale"), params.pop(f"{layer.path}/shift")
        target = layers[j].path
        weight = params[f"{target}/weight"]
        bias = params.get(f"{target}/bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
        params[f"{target}/weight"] = weight * scale.view(-1, *[1] * (weight.dim() - 1))
        params[f"{target}/bias"] = bias * scale + shift
        # the folded layer computes what the batch norm returned: both paths name it
        path = f"{target}+{layer.path}" if len(target) + len(layer.path) < 256 else layer.path
        params[f"{path}/weight"] = params.pop(f"{target}/weight")
        params[f"{path}/bias"] = params.pop(f"{target}/bias")
        layers[j] = dataclasses.replace(layers[j], path=path, params={
            **layers[j].params, "bias": (weight.shape[0],)})
        folded[i] = j
    if not folded:
        return layers, params
    new_index: dict[int, int] = {-1: -1}
    kept: list[LayerSpec] = []
    for i, (layer, ins) in enumerate(zip(layers, edges)):
        if i in folded:
            new_index[i] = new_index[folded[i]]
            continue
        new_index[i] = len(kept)
        remapped = tuple(new_index[j] for j in ins)
        chain = LAYERS[layer.op].arity == 1 and remapped == (len(kept) - 1,)
        kept.append(dataclasses.replace(layer, inputs=() if chain else remapped))
    return kept, params


def layer_shapes(layers: Sequence[LayerSpec], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Every layer's output shape for one query (batch 1), by the layers' shape rules."""
    shapes: list[tuple[int, ...]] = []

    def step(i: int, layer: LayerSpec, xs: list[tuple[int, ...]]) -> tuple[int, ...]:
        arg = xs[0] if LAYERS[layer.op].arity == 1 else xs
        shapes.append(tuple(LAYERS[layer.op].shape(arg, layer.args, layer.params)[0]))
        return shapes[-1]

    run_graph(layers, (1, *input_shape), step)
    return shapes


def extract_architecture(model: nn.Module, input_shape: tuple[int, ...]
                         ) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """Convert ``model`` into its public architecture plus its secret parameter tensors.

    A ``Sequential`` of supported layers converts layer by layer; any other module is traced to
    a graph first (see the module docstring). Raises :class:`UnsupportedModelError` listing
    every unsupported layer or node with its path and what to use instead; checks that the
    output is ``(batch, classes)``.
    """
    model = model.eval()
    problems: list[str] = []
    found = _graph_layers(model, tuple(input_shape), problems)
    layers: list[LayerSpec] = []
    params: dict[str, torch.Tensor] = {}
    for path, module, inputs in found:
        if type(module) not in SUPPORTED_LAYERS:
            continue
        try:
            op, args, tensors = SUPPORTED_LAYERS[type(module)](module)
        except ValueError as exc:
            problems.append(f"{path} ({type(module).__name__}): {exc}")
            continue
        layers.append(LayerSpec(path=path, op=op, args=args,
                                params={k: tuple(v.shape) for k, v in tensors.items()},
                                inputs=tuple(inputs)))
        for k, v in tensors.items():
            params[f"{path}/{k}"] = v.detach().to(torch.float64).clone()
    if problems:
        raise UnsupportedModelError(
            "the model cannot run on shares (mode 'full'):\n  - " + "\n  - ".join(problems)
            + "\n(or use mode 'output': there each owner runs its own model locally, so any "
            "PyTorch model works)")
    num_classes = output_classes(model, input_shape)
    layers, params = fold_batchnorm(layers, params, tuple(input_shape))
    layers = [dataclasses.replace(layer, inputs=()) if layer.inputs == (i - 1,)
              and LAYERS[layer.op].arity == 1 else layer for i, layer in enumerate(layers)]
    return Architecture(tuple(layers), tuple(input_shape), num_classes), params


def output_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Run one zero example through ``model`` and return its class count (checks the shape)."""
    with torch.no_grad():
        try:
            out = model(torch.zeros((2, *input_shape)))
        except MpcFiError:  # the model's own explanation (e.g. an ONNX input that does not fit)
            raise
        except Exception as exc:  # the user's model on the querier's announced shape
            raise InputError(
                f"queries of shape ('batch', {', '.join(map(str, input_shape))}) do not fit this "
                f"owner's model: {type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedModelError(
            f"the model must return (batch, classes) scores, got {shape} for a batch of 2")
    if out.shape[1] < 2:
        raise UnsupportedModelError(f"the model returns {out.shape[1]} class score(s); need >= 2")
    return int(out.shape[1])


# ---------------------------------------------------------------------------------------
# Loading (owner process only)
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _importable_from(folder: str | None) -> Iterator[None]:
    """Let imports find modules in ``folder`` (first) for the duration of the block only."""
    if folder is None:
        yield
        return
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _import_factory(spec: str, folder: str | None = None) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        with _importable_from(folder):
            module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f" (looked in {folder} and on sys.path)" if folder else ""
        raise UnsupportedModelError(
            f"cannot import model factory module {module_name!r}{where}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UnsupportedModelError(f"{spec!r}: {module_name} has no callable {attr!r}")
    return factory


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Load a ``state_dict`` with ``weights_only=True``; refuse pickled code and corrupt files."""
    if not os.path.isfile(path):
        raise UnsupportedModelError(f"weights file not found: {path}")
    LOAD_AUDIT.append((os.getpid(), os.path.abspath(path)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (zip), EOFError, ...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UnsupportedModelError(
                f"refused {path}: it is not a plain state_dict (it holds pickled objects, which "
                f"could run code when loaded). Save it with torch.save(model.state_dict(), path). "
                f"Detail: {text}") from None
        raise UnsupportedModelError(f"cannot read weights file {path} (corrupt or truncated?): "
                                    f"{type(exc).__name__}: {text}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedModelError(f"{path} does not hold a state_dict (a mapping of name to tensor)")
    return state


def load_owner_model(source: ModelSource, *, mode: str = "output") -> nn.Module:
    """Build an owner's model from its source, in evaluation mode. Owner process only.

    ``mode="output"`` (the owner runs the model itself): an ONNX file becomes an
    :class:`~mpc_fi.onnx_runtime.OnnxRuntimeModel` (any graph onnxruntime runs; probabilities of
    scikit-learn models become log-probabilities). ``mode="full"``: an ONNX file is converted to
    layers that run on shares (:mod:`mpc_fi.onnx_import`: a ``torch.nn.Sequential`` for a chain,
    a :class:`~mpc_fi.graph.Graph` otherwise), refusing anything else. A factory is imported from ``source.factory_dir`` (the federation file's
    folder) first, then from ``sys.path``; that folder is on ``sys.path`` only while the factory
    module is imported and the factory runs.
    """
    if source.onnx is not None:
        if not os.path.isfile(source.onnx):
            raise UnsupportedModelError(f"ONNX file not found: {source.onnx}")
        LOAD_AUDIT.append((os.getpid(), os.path.abspath(source.onnx)))
        if mode == "full":
            from .onnx_import import load_onnx_model  # noqa: PLC0415 - only ONNX owners need it

            return load_onnx_model(source.onnx).eval()
        from .onnx_runtime import OnnxRuntimeModel  # noqa: PLC0415 - imports onnxruntime

        return OnnxRuntimeModel(source.onnx).eval()
    factory = _import_factory(source.factory or "", source.factory_dir)
    try:
        with _importable_from(source.factory_dir):  # the factory may import its neighbours
            model = factory(**dict(source.kwargs))
    except TypeError as exc:
        raise UnsupportedModelError(f"model factory {source.factory} rejected its kwargs: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{source.factory} returned {type(model).__name__}, not a torch.nn.Module")
    if source.weights is not None:
        state = load_state_dict_file(source.weights)
        missing, unexpected = [], []
        try:
            result = model.load_state_dict(state, strict=False)
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        except RuntimeError as exc:  # shape mismatch
            raise UnsupportedModelError(f"weights in {source.weights} do not fit {source.factory}: "
                                        f"{str(exc).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise UnsupportedModelError(
                f"weights in {source.weights} do not fit {source.factory}: missing keys "
                f"{missing or 'none'}, unexpected keys {unexpected or 'none'}")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise UnsupportedModelError(f"parameter {name} holds NaN or inf")
    return model.eval()


# ---------------------------------------------------------------------------------------
# Secure forward pass: the same chain on shares
# ---------------------------------------------------------------------------------------
def secure_forward(arch: Architecture, x: Any, params: dict[str, Any], first: Any = None) -> Any:
    """Evaluate ``arch`` on the shared input ``x`` with shared ``params`` (CrypTen MPCTensors):
    every layer on the outputs of its inputs, each shared activation dropped after its last
    reader. ``first``: the first layer's output, already computed (:func:`fused_first_layers`)."""
    deferred = relus_after_max_pooling(arch.layers)

    def step(i: int, layer: LayerSpec, xs: list[Any]) -> Any:
        kind = LAYERS.get(layer.op)
        if kind is None:
            raise UnsupportedModelError(f"{layer.path}: unknown op {layer.op!r} in architecture")
        if i == 0 and first is not None:
            return first
        if i in deferred:  # this ReLU runs after the max pooling that alone reads it
            return xs[0]
        out = kind.forward(xs[0] if kind.arity == 1 else xs, layer.args,
                           {k: params[f"{layer.path}/{k}"] for k in layer.params})
        if i - 1 in deferred and deferred[i - 1] == i:
            out = out.relu()
        return out

    return run_graph(arch.layers, x, step)


def _fusable_first(arch: Architecture) -> tuple | None:
    """What must match for owners' first layers to run as one product: the layer reads the
    input and nothing else does, and is a Linear or an ungrouped Conv2d."""
    edges = input_indices(arch.layers)
    if not arch.layers or edges[0] != (-1,) or any(-1 in ins for ins in edges[1:]):
        return None
    layer = arch.layers[0]
    if layer.op not in ("linear", "conv2d") or layer.args.get("groups", 1) != 1:
        return None
    weight = layer.params.get("weight")
    return (layer.op, tuple(sorted(layer.args.items())), tuple(sorted(layer.params)),
            weight[1:] if weight else None)


def fused_first_layers(archs: Sequence[Architecture], x: Any,
                       params: Sequence[dict[str, Any]]) -> list[Any]:
    """The first layer's output of every owner's model on the shared input ``x``, with the
    owners whose first layers are alike (Linear, or Conv2d of the same hyper-parameters, all
    reading the input) computed as one product of ``x`` with their concatenated weights: the
    masked query is opened once for all of them instead of once per owner. ``None`` for an
    owner left to :func:`secure_forward`."""
    crypten = sys.modules["crypten"]
    groups: dict[tuple, list[int]] = {}
    for k, arch in enumerate(archs):
        key = _fusable_first(arch)
        if key is not None:
            groups.setdefault(key, []).append(k)
    out: list[Any] = [None] * len(archs)
    for key, members in groups.items():
        if len(members) < 2:
            continue
        layer = archs[members[0]].layers[0]
        kind = LAYERS[layer.op]
        names = [f"{archs[k].layers[0].path}/" for k in members]
        joined = {p: crypten.cat([params[k][n + p] for k, n in zip(members, names)], dim=0)
                  for p in layer.params}
        y = kind.forward(x, layer.args, joined)
        sizes = [archs[k].layers[0].params["weight"][0] for k in members]
        dim = 1 if layer.op == "conv2d" else -1
        start = 0
        for k, size in zip(members, sizes):
            index = [slice(None)] * y.dim()
            index[dim] = slice(start, start + size)
            out[k] = y[tuple(index)]
            start += size
    return out


def relus_after_max_pooling(layers: Sequence[LayerSpec]) -> dict[int, int]:
    """``{relu index: max pooling index}`` for every ReLU whose only reader is the max pooling
    right after it. ``maxpool(relu(x)) = relu(maxpool(x))`` exactly (padding never wins a
    window), so on shares the ReLU runs on the pooled values: ``k*k`` times fewer comparisons."""
    edges = input_indices(layers)
    readers: dict[int, list[int]] = {}
    for i, ins in enumerate(edges):
        for j in ins:
            readers.setdefault(j, []).append(i)
    return {i: i + 1 for i, layer in enumerate(layers[:-1])
            if layer.op == "relu" and layers[i + 1].op == "max_pool2d"
            and readers.get(i) == [i + 1] and edges[i + 1] == (i,)}


def param_count(arch: Architecture) -> int:
    return sum(math.prod(shape) for layer in arch.layers for shape in layer.params.values())
