"""Secure arithmetic over shared tensors (CrypTen ``MPCTensor``), apart from any plumbing.

Each function has a plaintext twin in :mod:`mpc_fi.plain` with the same tie rule, so that
protocols can be checked value for value.

Tie rule used everywhere: **among equal values, the lowest class index wins.** CrypTen's own
``argmax`` breaks ties at random, which makes plurality votes among few owners
non-deterministic. The argmax here (:mod:`mpc_fi.compare`) compares every pair with
"the lower index wins unless the higher one is strictly larger", so equal values are ordered by
index without changing the values.

Cost: the comparisons carry only the bits the values can occupy when a public
:class:`~mpc_fi.compare.ValueRange` is known, either passed as ``value_range=`` or attached to
the tensor with :func:`annotate` (the engine does this for the aggregate of output-mode
contributions). Without one they are full 64-bit comparisons: exact, like CrypTen's, and cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._crypten import load_crypten
from .compare import (LAN, NETWORKS, NetworkProfile, ValueRange, approximate_max_shares, argmax_bits,
                      bound_range, ge_zero_shares, relu_shares)

__all__ = ["ValueRange", "Hint", "annotate", "hint_of", "distinct", "argmax_one_hot",
           "one_hot_to_index", "argmax_index", "EXP_FLOOR", "clamp_exponent", "softmax",
           "log_softmax", "shift_for_softmax", "exp_clamped", "reciprocal_in", "max_pool2d",
           "MAX_SLACK"]

_HINT_ATTR = "_mpc_fi_hint"


@dataclass(frozen=True)
class Hint:
    """Public facts about one shared tensor: its value range and the network to optimise for."""

    value_range: ValueRange | None = None
    network: NetworkProfile = LAN
    group_size: int | None = None  # force an argmax schedule (benchmarks); None: cost model


def _share_state(x: Any) -> tuple[int, int]:
    share = x.share
    return id(share), share._version


def annotate(x: Any, *, value_range: ValueRange | None = None,
             network: NetworkProfile | str = LAN, group_size: int | None = None) -> Any:
    """Attach public facts to the shared tensor ``x`` (this object, these values) and return it.

    An operation that makes a new tensor drops them, and so does an in-place update of ``x``
    (the facts remember the state of its share), so a bound can never outlive the values it
    describes. Every party must annotate alike (the facts choose the circuit).
    """
    net = NETWORKS[network] if isinstance(network, str) else network
    setattr(x, _HINT_ATTR, (Hint(value_range, net, group_size), _share_state(x)))
    return x


def hint_of(x: Any) -> Hint:
    """The facts attached by :func:`annotate` if ``x`` is unchanged since, else the defaults."""
    try:
        hint, state = object.__getattribute__(x, _HINT_ATTR)
    except AttributeError:
        return Hint()
    return hint if state == _share_state(x) else Hint()


def distinct(x: Any, num_classes: int) -> Any:
    """Return ``x * C + (C-1-j) ulp`` along the last dimension: an order-preserving, tie-free map.

    Kept for callers that feed CrypTen's own ``argmax``; :func:`argmax_one_hot` does not need it.
    """
    scale = x.encoder.scale
    offsets = torch.arange(num_classes - 1, -1, -1, dtype=torch.float64) / scale
    return x * num_classes + offsets


def _shares_2d(x: Any, num_classes: int) -> tuple[torch.Tensor, tuple[int, ...], int]:
    crypten = load_crypten()

    if x.ptype != crypten.mpc.arithmetic:
        x = x.to(crypten.mpc.arithmetic)
    share = x.share
    if share.shape[-1] != num_classes:
        raise ValueError(f"last dimension is {share.shape[-1]}, expected {num_classes} classes")
    precision = x.encoder.scale.bit_length() - 1
    return share.reshape(-1, num_classes), tuple(share.shape[:-1]), precision


def _wrap(shares: torch.Tensor, precision: int) -> Any:
    crypten = load_crypten()

    # Integer shares of 0/1 or of an index, scaled to the fixed-point encoding: exact.
    return crypten.mpc.MPCTensor.from_shares(shares * (1 << precision), precision=precision)


def _resolve(x: Any, value_range: ValueRange | None, network: NetworkProfile | str | None,
             group_size: int | None) -> dict[str, Any]:
    hint = hint_of(x)
    net = network if network is not None else hint.network
    if value_range is None and hint.value_range is None:
        # Inside compare.bounded: the values are within the limit (their differences twice).
        limit = bound_range(int(x.encoder.scale))
        if limit is not None:
            value_range = ValueRange(-limit.hi, limit.hi)
    return {"value_range": value_range if value_range is not None else hint.value_range,
            "net": NETWORKS[net] if isinstance(net, str) else net,
            "group_size": group_size if group_size is not None else hint.group_size}


def argmax_one_hot(x: Any, num_classes: int, *, value_range: ValueRange | None = None,
                   network: NetworkProfile | str | None = None,
                   group_size: int | None = None) -> Any:
    """One-hot (shared) of the argmax along the last dimension, lowest index on ties."""
    shares, lead, precision = _shares_2d(x, num_classes)
    bits = argmax_bits(shares, outputs="one_hot", **_resolve(x, value_range, network, group_size))
    return _wrap(bits.view(*lead, num_classes), precision)


def one_hot_to_index(one_hot: Any, num_classes: int) -> Any:
    """Shared class index from a shared one-hot vector (local: a dot product with 0..C-1)."""
    # An integer tensor multiplies the shares without a fixed-point truncation: exact.
    return (one_hot * torch.arange(num_classes, dtype=torch.long)).sum(dim=-1)


def argmax_index(x: Any, num_classes: int, *, value_range: ValueRange | None = None,
                 network: NetworkProfile | str | None = None,
                 group_size: int | None = None) -> Any:
    """Shared index of the maximum along the last dimension, lowest index on ties.

    Cheaper than ``one_hot_to_index(argmax_one_hot(...))``: only ``ceil(log2 C)`` bits per row
    are converted from binary to arithmetic shares.
    """
    shares, lead, precision = _shares_2d(x, num_classes)
    index = argmax_bits(shares, outputs="index", **_resolve(x, value_range, network, group_size))
    return _wrap(index.view(*lead), precision)


#: Softmax on shares clamps ``x - max(x)`` at this floor before ``exp``. CrypTen's ``exp(x)`` is
#: ``(1 + x / 2**n)**(2**n)`` with ``n = 8`` iterations: below ``x = -2**(n+1)`` the base falls
#: under -1 and the result explodes (logits far apart: a silently wrong distribution).
#: ``exp(-16)`` is below one unit at 16 fractional bits, so the clamp loses nothing
#: representable. More iterations do not help at 16 bits: ``x / 2**n`` loses its digits
#: (measured: 12 iterations, probability errors ~1e-2).
EXP_FLOOR = -16.0
#: The softmax's shift may lie this far (real units) below the row's maximum; its comparisons
#: drop the low bits this allows (:func:`mpc_fi.compare.approximate_max_shares`).
MAX_SLACK = 1 / 16
#: Newton iterations of the normalised reciprocal (:func:`reciprocal_in`): the linear start on
#: ``[1/2, 1]`` is within 0.0858 (relative), then 7.4e-3, then 5.4e-5 (under 4 units of 2**-16
#: on values in ``[1, 2]``; measured with rounding on shares: within 8 units).
RECIPROCAL_ITERATIONS = 2


def clamp_exponent(shifted: Any) -> Any:
    """``max(shifted, EXP_FLOOR)`` on shares (one comparison): a safe input for ``exp``.

    Inside a :func:`mpc_fi.compare.bounded` limit the comparison drops low bits: an input
    within a quarter above the floor may be clamped to it (``exp`` changes by less than
    ``exp(-16) / 3``, below one unit)."""
    crypten = load_crypten()

    z = shifted - EXP_FLOOR
    limit = bound_range(int(z.encoder.scale))
    if limit is None:
        return z.relu() + EXP_FLOOR
    if z.ptype != crypten.mpc.arithmetic:
        z = z.to(crypten.mpc.arithmetic)
    precision = z.encoder.scale.bit_length() - 1
    world = crypten.communicator.get().get_world_size()
    slack = max(0, precision - 2 - world.bit_length())  # P * 2**slack <= 1/4
    above = relu_shares(z.share, limit, slack_bits=slack)
    return crypten.mpc.MPCTensor.from_shares(above, precision=precision) + EXP_FLOOR


def _ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


def shift_for_softmax(x: Any) -> Any:
    """A value of each row of ``x`` (last dimension) at most :data:`MAX_SLACK` below the row's
    maximum, shape ``(..., 1)``: softmax is the same for any shift, so the comparisons of this
    tournament may drop low bits. Inside :func:`mpc_fi.compare.bounded` they carry only the bits
    the bound leaves."""
    crypten = load_crypten()

    classes = x.size(-1)
    shares, lead, precision = _shares_2d(x, classes)
    world = crypten.communicator.get().get_world_size()
    limit = bound_range(int(x.encoder.scale))
    value_range = None if limit is None else ValueRange(-limit.hi, limit.hi)
    # levels * P * 2**slack <= MAX_SLACK * 2**precision
    budget = int(MAX_SLACK * (1 << precision)) // (_ceil_log2(classes) * world or 1)
    slack = max(0, budget.bit_length() - 1)
    top = approximate_max_shares(shares, value_range, slack_bits=slack)
    return crypten.mpc.MPCTensor.from_shares(top.view(*lead, 1), precision=precision)


def reciprocal_in(s: Any, high: float, scale: int = 1) -> Any:
    """``1 / s`` on shares for ``1 <= s <= high`` (public ``high``), within a few units of
    ``2**-16`` for any ``high`` up to ``2**(precision - 2)``.

    ``s`` is first brought into ``[1/2, 1]`` by a power of two ``f = 2**-(n+1)``, found by
    comparing ``s`` with ``2, 4, ..., 2**J`` at once (the bits are monotone, so ``f`` is a public
    linear function of them); then Newton's iteration from the linear start ``2.9142 - 2 s f``
    (:data:`RECIPROCAL_ITERATIONS` steps), and ``1/s = f * (1 / (s f))``. CrypTen's own
    reciprocal starts from ``3 exp(1/2 - s) + 0.003`` and diverges for ``s`` above about 660
    (a softmax over flat scores of 1,000 classes). ``scale`` (a power of two): returns
    ``scale / s``, rounded at the result's own 16 fractional bits (more significant bits when
    ``1/s`` is small). Twin: ``scale / s``.
    """
    if scale < 1 or scale & (scale - 1):
        raise ValueError(f"reciprocal_in: scale must be a power of two, got {scale}")
    crypten = load_crypten()

    precision = s.encoder.scale.bit_length() - 1
    levels = _ceil_log2(math.ceil(high))
    if levels == 0:
        scaled, f = s * 0.5, None
        if (scale << (precision - 1)) >= 1 << 61:
            raise ValueError(f"reciprocal_in: scale {scale} is too large")
    else:
        if levels > precision - 2:
            raise ValueError(f"reciprocal_in: high={high:g} needs more than {precision} "
                             "fractional bits")
        flat = s.share.reshape(-1, 1)
        steps = torch.tensor([1 << (j + precision) for j in range(1, levels + 1)],
                             dtype=torch.int64)
        rank = crypten.communicator.get().get_rank()
        diff = flat - (steps if rank == 0 else torch.zeros_like(steps))
        spread = math.ceil(2 * high * (1 << precision))
        bits = ge_zero_shares(diff, ValueRange(0, spread))  # integer shares of [s >= 2**j]
        coeff = torch.tensor([1 << (precision - j - 1) for j in range(1, levels + 1)],
                             dtype=torch.int64)
        half = torch.tensor(1 << (precision - 1), dtype=torch.int64)
        f_share = (half if rank == 0 else torch.zeros_like(half)) - (bits * coeff).sum(dim=1)
        f = crypten.mpc.MPCTensor.from_shares(f_share.view(s.share.shape), precision=precision)
        scaled = s * f
        # scale * f: the same public combination of the bits, times scale (exact, local)
        f = crypten.mpc.MPCTensor.from_shares(f.share * scale, precision=precision)
    y = 2.9142 - 2 * scaled
    for _ in range(RECIPROCAL_ITERATIONS):
        y = y * (2 - scaled * y)
    return y * (0.5 * scale) if f is None else y * f


def max_pool2d(x: Any, kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int]) -> Any:
    """2-D max pooling on shares, exactly ``torch.nn.functional.max_pool2d`` (padding never
    wins): each window's maximum from a pair tournament (:func:`mpc_fi.compare.max_circuit`),
    its comparisons on the bits a :func:`mpc_fi.compare.bounded` limit leaves. CrypTen's own
    pooling reduces each window with 64-bit comparisons and one-hot selections, and pads with
    zeros."""
    crypten = load_crypten()

    if x.ptype != crypten.mpc.arithmetic:
        x = x.to(crypten.mpc.arithmetic)
    precision = x.encoder.scale.bit_length() - 1
    limit = bound_range(int(x.encoder.scale))
    value_range = None if limit is None else ValueRange(-limit.hi, limit.hi)
    share = x.share
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if ph or pw:  # padding below every value (public: party 0 holds it)
        low = -(limit.hi if limit is not None else 1 << 61)
        rank = crypten.communicator.get().get_rank()
        share = torch.nn.functional.pad(share, (pw, pw, ph, ph), value=low if rank == 0 else 0)
    windows = share.unfold(-2, kh, sh).unfold(-2, kw, sw)  # (..., Ho, Wo, kh, kw)
    lead = windows.shape[:-2]
    top = approximate_max_shares(windows.reshape(-1, kh * kw), value_range)
    return crypten.mpc.MPCTensor.from_shares(top.view(lead), precision=precision)


#: :func:`exp_clamped` squares ``2**EXP_SQUARINGS`` times: inputs are divided by 16.
EXP_SQUARINGS = 4


def exp_clamped(x: Any) -> Any:
    """``exp(x)`` on shares for ``EXP_FLOOR <= x <= 1``, to a relative error of about 1e-3
    for ``x >= -4`` (measured; the rounding of 16 fractional bits, doubled by each squaring,
    is most of it).

    ``exp(x) = p(y)**16`` with ``y = x / 16`` in ``[-1, 1/16]`` and ``p`` the degree-4 Taylor
    polynomial of ``exp`` (positive and increasing there; its error is below ``y**5/120`` per
    factor: 1.3e-4 in all for ``x >= -4``, where the classes that decide a label are). Two
    truncations fewer than a plain evaluation: ``y/6 + y**2/24`` is one. CrypTen's
    ``(1 + x/256)**256`` is off by up to ``x**2/512`` (3% at ``x = -4``) and amplifies the
    rounding of ``x/256`` 256 times; here 16 times. Twin: ``torch.exp``.
    """
    y = x * (1.0 / (1 << EXP_SQUARINGS))
    y2 = y.square()
    p = 1 + y + y2 * (0.5 + _linear_combination([(y, 1.0 / 6), (y2, 1.0 / 24)]))
    for _ in range(EXP_SQUARINGS):
        p = p.square()
    return p


def _linear_combination(terms: list[tuple[Any, float]]) -> Any:
    """``sum(c * t)`` for shared ``t`` and public ``c``, with one truncation for all terms
    (CrypTen truncates after each product with a public float)."""
    crypten = load_crypten()

    scale = int(terms[0][0].encoder.scale)
    share = sum(t.share * round(c * scale) for t, c in terms)
    out = crypten.mpc.MPCTensor.from_shares(share, precision=scale.bit_length() - 1)
    out._tensor.encoder = terms[0][0].encoder
    out._tensor.div_(scale)  # one truncation: encoded at scale**2 -> scale
    return out


def softmax(x: Any, dim: int = -1, scale: int = 1) -> Any:
    """Softmax on shares, exact (within fixed-point rounding) for any spread of ``x``.

    The shift is a value of the row within :data:`MAX_SLACK` of its maximum
    (:func:`shift_for_softmax`); the exponent is clamped at :data:`EXP_FLOOR`
    (:func:`clamp_exponent`) and exponentiated by :func:`exp_clamped`; the sum of the
    exponentials lies in ``[1, C e**MAX_SLACK]``, inverted by :func:`reciprocal_in`.
    (CrypTen's own ``softmax`` is wrong once two entries differ by more than about 500, and its
    reciprocal once the sum passes about 660.) ``scale`` (a power of two) returns ``scale``
    times the distribution, with that many more significant bits in each probability: many
    classes make every probability small. Twin: ``scale * torch.softmax``.
    """
    dim = dim % x.dim()
    if dim != x.dim() - 1:
        return softmax(x.transpose(dim, -1), -1, scale).transpose(dim, -1)
    e = exp_clamped(clamp_exponent(x - shift_for_softmax(x)))
    high = x.size(-1) * math.exp(MAX_SLACK) * 1.01 + 1
    return e * reciprocal_in(e.sum(-1, keepdim=True), high, scale)


def log_softmax(x: Any, dim: int = -1) -> Any:
    """Log-softmax on shares with the clamped exponent of :func:`softmax`. Twin:
    ``torch.log_softmax`` (entries below ``EXP_FLOOR`` from the top stay exact: ``x - max``)."""
    shifted = x - x.max(dim, keepdim=True)[0]
    return shifted - clamp_exponent(shifted).exp().sum(dim, keepdim=True).log()
