"""Run an owner's ONNX file as it is, with onnxruntime, for ``output`` mode.

In ``output`` mode an owner evaluates its own model locally and shares only its contribution,
so any graph that onnxruntime can run is fine: residual connections, LayerNorm, GELU, and the
``ai.onnx.ml`` operators of scikit-learn models exported with skl2onnx. (``full`` mode instead
converts the graph to layers that run on shares: :mod:`mpc_fi.onnx_import`.)

Only the owner's process imports onnxruntime (this module is imported lazily by
:func:`mpc_fi.models.load_owner_model`); sessions use the CPU execution provider.

Which output is used
    The one float tensor output of shape ``(N, C)``; with several, the one whose name contains
    ``prob``; without any, a ZipMap output (a sequence of ``{class: probability}`` maps, as
    skl2onnx writes by default), turned into an ``(N, C)`` array in class order. A graph with
    none of these is refused (:class:`~mpc_fi.errors.UnsupportedModelError`).

Logits or probabilities
    The protocols expect logits (soft voting takes their softmax, hard voting their argmax).
    Outputs of scikit-learn models (a ZipMap output, a graph using ``ai.onnx.ml`` operators, or a
    file written by skl2onnx/onnxmltools) are probabilities ``p``; the model returns
    ``log(max(p, 1e-12))`` instead, so that ``softmax`` gives back ``p`` (up to the floor) and
    the argmax is unchanged; logit averaging then averages log-probabilities. Probabilities
    outside ``[0, 1]`` are refused. Any other graph's output is taken as logits, as returned
    (a torch model ending in Softmax is used as it is, as in ``full`` mode).

Class labels
    The federation counts class ``k`` as column ``k`` of every owner's output. A scikit-learn
    graph whose classifier lists its class labels (``classlabels_*``) must list ``0..C-1`` in
    order; string labels or any other list are refused, naming the node.

Inputs
    One float input (float32; float64 inputs get the query cast), whose declared rank and fixed
    per-example dimensions must match the queries. A dynamic batch dimension takes the whole
    batch; a batch dimension fixed to ``k`` (the default ``torch.onnx.export`` fixes it to the
    example's batch size) is fed in chunks of ``k`` rows, the last one padded with zero rows
    that are dropped again (rows of an inference graph do not interact).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .errors import InputError, UnsupportedModelError

#: Probabilities are floored here before their logarithm (so every contribution is finite).
PROBABILITY_FLOOR = 1e-12
LOG_PROBABILITY_FLOOR = math.log(PROBABILITY_FLOOR)
_PROB_TOLERANCE = 1e-4  # float32 probabilities may stray this far outside [0, 1]
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_FLOAT_OUTPUTS = ("tensor(float)", "tensor(double)", "tensor(float16)")
_ML_DOMAIN = "ai.onnx.ml"
_ML_PRODUCERS = ("skl2onnx", "onnxmltools")
_ZIPMAP_OFF = "options={id(clf): {'zipmap': False}}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.name or f'node #{index}'} ({node.op_type})"


def _dims(shape: Any) -> list[int | None] | None:
    """onnxruntime's shape (ints, symbolic names, None) with every non-int as None."""
    if shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _show(shape: list[int | None] | None) -> str:
    if shape is None:
        return "unknown shape"
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def check_class_labels(model: onnx.ModelProto, path: str) -> None:
    """Refuse scikit-learn class labels that are not ``0..C-1`` in order (names the node)."""
    problems = []
    for i, node in enumerate(model.graph.node):
        if node.domain != _ML_DOMAIN:
            continue
        for attr in node.attribute:
            if not attr.name.startswith("classlabels_"):
                continue
            labels = list(onnx.helper.get_attribute_value(attr))
            if attr.name == "classlabels_strings":
                shown = [v.decode() if isinstance(v, bytes) else v for v in labels][:10]
                problems.append(
                    f"{_node_label(node, i)}: class labels are strings {shown}; the federation "
                    "counts classes as columns 0..C-1: fit on integer labels 0..C-1 (e.g. "
                    "sklearn.preprocessing.LabelEncoder with the same classes at every owner)")
            elif [int(v) for v in labels] != list(range(len(labels))):
                problems.append(
                    f"{_node_label(node, i)}: class labels {[int(v) for v in labels][:20]} are "
                    f"not 0..{len(labels) - 1} in order, so column k would not mean class k as "
                    "at the other owners: fit on labels 0..C-1, every class present (e.g. "
                    "sklearn.preprocessing.LabelEncoder with the same classes at every owner)")
    if problems:
        raise UnsupportedModelError(f"ONNX model {path}:\n  - " + "\n  - ".join(problems))


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime, called like a torch model: ``(N, ...) -> (N, C)``.

    See the module docstring for the output it picks, how probabilities become log-probabilities
    and how batches are fed. Raises :class:`~mpc_fi.errors.UnsupportedModelError` at
    construction for an unreadable file, several inputs, a non-float input, no usable output or
    bad class labels; :class:`~mpc_fi.errors.InputError` when called with queries whose shape
    the graph does not accept.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:  # the graph only (weights may sit in a separate .data file; the session reads them)
            proto = onnx.load(path, load_external_data=False)
        except FileNotFoundError:
            raise UnsupportedModelError(f"ONNX file not found: {path}") from None
        except Exception as exc:  # DecodeError, OSError: a bad file
            raise UnsupportedModelError(f"{path} is not a valid ONNX model (corrupt, truncated or "
                                        f"another format): {_first_line(exc)}") from None
        check_class_labels(proto, path)
        try:
            import onnxruntime  # noqa: PLC0415 - only ONNX owners in output mode need it
        except ImportError:
            raise UnsupportedModelError("ONNX owners in output mode run their file with "
                                        "onnxruntime: pip install onnxruntime") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: the party log stays readable
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                path, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own errors (unknown op, bad graph, ...)
            raise UnsupportedModelError(
                f"onnxruntime cannot load {path}: {_first_line(exc)}") from None

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"ONNX model {path} takes {len(inputs)} inputs "
                f"({', '.join(i.name for i in inputs)}); a model must take exactly one input tensor "
                "(the query)")
        inp = inputs[0]
        if inp.type not in _FLOAT_INPUTS:
            raise UnsupportedModelError(
                f"ONNX model {path}: input {inp.name!r} is {inp.type}; queries are float32: "
                "export the model with a float input (skl2onnx: FloatTensorType)")
        self.input_name, self.input_dtype = inp.name, _FLOAT_INPUTS[inp.type]
        self.input_shape = _dims(inp.shape)

        self.output_name, self.zipmap_labels = self._pick_output(proto)
        self.probabilities = (self.zipmap_labels is not None
                              or proto.producer_name in _ML_PRODUCERS
                              or any(n.domain == _ML_DOMAIN for n in proto.graph.node))

    # -- set-up --------------------------------------------------------------------------
    def _pick_output(self, proto: onnx.ModelProto) -> tuple[str, list[int] | None]:
        outputs = self.session.get_outputs()
        tensors = [o for o in outputs if o.type in _FLOAT_OUTPUTS
                   and (_dims(o.shape) is None or len(_dims(o.shape)) == 2)]
        if len(tensors) > 1:
            named = [o for o in tensors if "prob" in o.name.lower()]
            if len(named) != 1:
                raise UnsupportedModelError(
                    f"ONNX model {self.path} has {len(tensors)} float (N, C) outputs "
                    f"({', '.join(o.name for o in tensors)}); export only the class scores (or "
                    "name the probability output '...prob...')")
            tensors = named
        if tensors:
            return tensors[0].name, None
        zipmaps = [o for o in outputs if o.type.startswith("seq(map(")]
        if len(zipmaps) == 1:
            name = zipmaps[0].name
            node = next((n for n in proto.graph.node if name in n.output), None)
            labels = None
            if node is not None and node.op_type == "ZipMap":
                labels = next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute
                               if a.name == "classlabels_int64s"), None)
            if labels is None:
                raise UnsupportedModelError(
                    f"ONNX model {self.path}: output {name!r} is a sequence of maps without "
                    f"integer class labels; convert with skl2onnx's {_ZIPMAP_OFF} to get an "
                    "(N, C) probability tensor")
            return name, [int(v) for v in labels]
        listed = ", ".join(f"{o.name} ({o.type}, {_show(_dims(o.shape))})" for o in outputs)
        raise UnsupportedModelError(
            f"ONNX model {self.path} has no float (N, C) output to use as class scores (outputs: "
            f"{listed}); export the logits or probabilities, not only labels (drop a final ArgMax; "
            f"skl2onnx writes a probability output by default, or with {_ZIPMAP_OFF})")

    def _check_query(self, x: np.ndarray) -> None:
        want = self.input_shape
        if want is None:
            return
        ok = len(want) == x.ndim and all(w is None or w == d for w, d in zip(want[1:], x.shape[1:]))
        if not ok:
            raise InputError(
                f"queries of shape {_show([None, *x.shape[1:]])} do not fit this owner's ONNX "
                f"input {self.input_name!r} of shape {_show(want)} (rank {len(want)}); the "
                "querier's data and the model must agree on the shape of one example")

    # -- inference -----------------------------------------------------------------------
    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        if self.zipmap_labels is not None:
            return np.array([[row[k] for k in self.zipmap_labels] for row in out], dtype=np.float64)
        return np.asarray(out, dtype=np.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self.input_dtype)
        self._check_query(data)
        fixed = self.input_shape[0] if self.input_shape else None
        if fixed is None or fixed == data.shape[0]:
            out = self._run(data)
        else:  # a batch dimension fixed at export: chunks of that size, the last one padded
            parts = []
            for start in range(0, data.shape[0], fixed):
                chunk = data[start:start + fixed]
                rows = chunk.shape[0]
                if rows < fixed:
                    pad = np.zeros((fixed - rows, *chunk.shape[1:]), dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                parts.append(self._run(chunk)[:rows])
            out = np.concatenate(parts)
        if self.probabilities:
            finite = np.isfinite(out)
            if finite.all() and (out.min() < -_PROB_TOLERANCE or out.max() > 1 + _PROB_TOLERANCE):
                raise UnsupportedModelError(
                    f"ONNX model {os.path.basename(self.path)}: output {self.output_name!r} of a "
                    f"scikit-learn model holds values in [{out.min():.3g}, {out.max():.3g}], not "
                    "probabilities; export a classifier with predict_proba (e.g. SVC(probability="
                    "True)), not a decision function")
            out = np.where(finite, np.log(np.clip(out, PROBABILITY_FLOOR, None)), out)
        return torch.from_numpy(out)
