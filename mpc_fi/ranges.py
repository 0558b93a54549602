"""Fixed-point safety of a model evaluated on shares (``full`` mode), checked before sharing.

CrypTen encodes a value ``v`` as the 64-bit integer ``round(v * 2**p)`` (``p`` =
``precision_bits``). Three things go silently wrong when values grow, and none of them raises:

* **products**: a product of two shared values (every ``Linear``, ``Conv2d`` and folded batch
  norm: the input and the weights are both secret) is formed at scale ``2**(2p)`` before it is
  truncated, so a result ``|y| >= 2**(63 - 2p)`` (``2**31`` at ``p = 16``) wraps around the ring
  and comes out as garbage;
* **representation**: any ``|v| >= 2**(63 - p)`` wraps, and comparisons (ReLU, max pooling,
  argmax) then return the wrong sign;
* **exponentials**: CrypTen's ``exp(x)`` is ``(1 + x / 2**n)**(2**n)``: for ``x`` below about
  ``-2**(n+1)`` the base falls under ``-1`` and the result explodes. ``sigmoid`` evaluates
  ``exp(-|x|)`` with ``n = 9``, ``tanh(x)`` is ``2 sigmoid(2x) - 1``. (Softmax and log-softmax
  clamp their exponent at :data:`mpc_fi.secure.EXP_FLOOR` and are safe for any input.)

Nobody may look at the shared values, so the check is static: the owner, who alone knows its
weights, propagates the public input range (``querier.input_range``; the querier checks its
queries against it) through its own model in plain interval arithmetic and refuses to share a
model that could leave the safe range, naming the layer. In a graph (residual additions,
concatenations) every layer's bounds come from its inputs' bounds: an addition's are the sums
of its inputs', a concatenation's the union (each part keeps its own), global average pooling
keeps its input's, and a batch normalisation folded into the convolution before it is bounded
through the folded weights. Interval bounds are sound (every reachable value lies inside them)
but can be loose, and in deep models very loose (they compound with depth: see the README on
ResNets): a model refused here may never have overflowed in practice; a tighter
``querier.input_range`` or fewer ``precision_bits`` widen the margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError
from .layers import LAYERS
from .models import Architecture, LayerSpec, run_graph

#: ``exp`` iterations CrypTen uses inside ``sigmoid`` (hard-coded there); ``tanh`` doubles x.
SIGMOID_EXP_ITERATIONS = 9
#: Keep exponent inputs this fraction of the way to the point where the base reaches -1.
EXP_MARGIN = 0.875


@dataclass(frozen=True)
class LayerRange:
    """Sound bounds of one layer's output (and of its raw product, where it forms one)."""

    path: str
    op: str
    low: float
    high: float
    product: float | None = None  # max |x * w| before truncation (product layers only)

    @property
    def magnitude(self) -> float:
        return max(abs(self.low), abs(self.high))


@dataclass(frozen=True)
class Limits:
    """The largest magnitudes that are still exact at ``precision_bits``."""

    precision_bits: int

    @property
    def product(self) -> float:  # one bit of margin below the wrap at 2**(63 - 2p)
        return 2.0 ** (62 - 2 * self.precision_bits)

    @property
    def value(self) -> float:
        return 2.0 ** (62 - self.precision_bits)

    @property
    def sigmoid_input(self) -> float:
        return EXP_MARGIN * 2.0 ** (SIGMOID_EXP_ITERATIONS + 1)

    @property
    def tanh_input(self) -> float:
        return self.sigmoid_input / 2


def activation_ranges(arch: Architecture, params: dict[str, torch.Tensor],
                      input_range: tuple[float, float]) -> list[LayerRange]:
    """Sound output bounds of every layer of ``arch`` for inputs in ``input_range``.

    ``params`` are the owner's plaintext parameters (``"<path>/<name>"``, as returned by
    :func:`mpc_fi.models.extract_architecture`); only the owner can run this.
    """
    return [r for r, _ in _ranges(arch, params, input_range)]


def _ranges(arch: Architecture, params: dict[str, torch.Tensor], input_range: tuple[float, float]
            ) -> list[tuple[LayerRange, float]]:
    """Every layer's range, and the largest magnitude of its inputs."""
    low, high = (float(v) for v in input_range)
    lo = torch.full((1, *arch.input_shape), low, dtype=torch.float64)
    hi = torch.full((1, *arch.input_shape), high, dtype=torch.float64)
    out: list[tuple[LayerRange, float]] = []

    def step(i: int, layer: LayerSpec, xs: list[tuple[torch.Tensor, torch.Tensor]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        p = {k: params[f"{layer.path}/{k}"].to(torch.float64) for k in layer.params}
        kind = LAYERS.get(layer.op)
        if kind is None:
            raise InputError(f"{layer.path}: no range rule for op {layer.op!r}")
        los, his = [x[0] for x in xs], [x[1] for x in xs]
        single = kind.arity == 1
        y_lo, y_hi, product = kind.interval(los[0] if single else los, his[0] if single else his,
                                            layer.args, p)
        seen = max(max(float(a.abs().max()), float(b.abs().max())) for a, b in xs)
        out.append((LayerRange(layer.path, layer.op, float(y_lo.min()), float(y_hi.max()),
                               product), seen))
        return y_lo, y_hi

    run_graph(arch.layers, (lo, hi), step)
    return out


def _pow2(x: float) -> str:
    return f"2^{math.log2(x):.1f}" if x > 0 else "0"


def check_model_ranges(arch: Architecture, params: dict[str, torch.Tensor],
                       input_range: tuple[float, float], precision_bits: int, *,
                       range_key: str = "querier.input_range") -> list[LayerRange]:
    """Raise :class:`InputError` naming every layer that could leave the exact fixed-point range.

    Returns the per-layer ranges when the model is safe.
    """
    limits = Limits(precision_bits)
    found = _ranges(arch, params, input_range)
    problems: list[str] = []
    for r, previous in found:
        where = f"{r.path} ({r.op})"
        if r.product is not None and r.product >= limits.product:
            problems.append(
                f"{where}: its product of input and weights can reach {_pow2(r.product)}, past the "
                f"{_pow2(limits.product)} that a product at {precision_bits} fractional bits holds "
                "before truncation")
        elif r.magnitude >= limits.value:
            problems.append(f"{where}: its output can reach {_pow2(r.magnitude)}, past the "
                            f"{_pow2(limits.value)} that {precision_bits} fractional bits "
                            "represent")
        exp_limit = {"sigmoid": limits.sigmoid_input, "tanh": limits.tanh_input}.get(r.op)
        if exp_limit is not None and previous > exp_limit:
            problems.append(f"{where}: its input can reach {_pow2(previous)}; CrypTen's {r.op} "
                            f"is exact only for |x| <= {exp_limit:g}")
    if problems:
        low, high = input_range
        raise InputError(
            f"on shares this model could leave the fixed-point range for inputs in "
            f"[{low:g}, {high:g}] ({range_key}), giving wrong answers without any error:"
            "\n  - " + "\n  - ".join(problems)
            + f"\nDeclare the real range of the inputs in {range_key}, scale the inputs "
            "or weights down, or lower precision_bits (each bit less doubles the product range).")
    return [r for r, _ in found]


def comparison_limit(activation_bound: float | None) -> float | None:
    """The magnitude of every value full mode compares when every activation (and input) is
    within ``±activation_bound``: a ReLU's input, a difference of two activations (``max``,
    max pooling, softmax's max), and softmax's clamp ``x - max - EXP_FLOOR``, with one unit of
    slack for fixed-point rounding. None without a bound."""
    if activation_bound is None:
        return None
    from .secure import EXP_FLOOR  # noqa: PLC0415 - secure imports CrypTen's helpers

    return 2 * activation_bound - EXP_FLOOR + 1


def check_activation_bound(ranges: list[LayerRange], input_range: tuple[float, float],
                           bound: float, *, range_key: str = "querier.input_range") -> None:
    """Raise :class:`InputError` naming every layer whose output could exceed the federation's
    public ``activation_bound`` (comparisons on shares are only exact within it)."""
    low, high = input_range
    problems = [f"{r.path} ({r.op}): its output can reach {r.magnitude:.4g}"
                for r in ranges if r.magnitude > bound]
    if max(abs(low), abs(high)) > bound:
        problems.insert(0, f"the inputs: {range_key} [{low:g}, {high:g}] reaches past it")
    if problems:
        raise InputError(
            f"this model's activations are not within activation_bound = {bound:g} for inputs "
            f"in [{low:g}, {high:g}] ({range_key}), and comparisons on shares would be wrong:"
            "\n  - " + "\n  - ".join(problems)
            + "\nRaise activation_bound (each doubling costs one bit per comparison), declare "
            f"the real range of the inputs in {range_key}, or leave activation_bound out "
            "(full-width comparisons).")
