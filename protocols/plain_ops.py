"""Plaintext twins of :mod:`protocols.secure_ops`, and the public fixed-point bookkeeping.

Everything here works on integer fixed-point units (``int64``: a value ``v`` is held as
``trunc(v * 2**precision_bits)``, CrypTen's encoding, see :func:`mpc_fi.plain.encode`) so that the
twins reproduce the secure results value for value. Tie rule everywhere: **among equal values,
the lowest class index wins** (as in :mod:`mpc_fi.secure`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from mpc_fi.result import ABSTAIN

#: Largest integer weight used on shares. Contributions are at most ``2**16`` units (one vote or a
#: probability of 1 at 16 fractional bits); times this weight, times the number of owners and
#: times the class count (the tie-free map) stays far below CrypTen's 2**62 comparison range.
MAX_INTEGER_WEIGHT = 1 << 16
#: Largest denominator tried when looking for an exact integer form of rational weights.
MAX_WEIGHT_DENOMINATOR = 1 << 10


def integer_weights(weights: Sequence[float]) -> tuple[tuple[int, ...], bool]:
    """Positive integer weights proportional to ``weights``, and whether they are exact.

    Weights that are small rationals (``1, 2, 3`` or ``0.5, 0.25``) are represented exactly
    (``p_i / q_i`` with ``q_i <= 1024``, scaled by the lcm of the denominators and reduced by the
    gcd). Others are quantised: ``round(w_i / max(w) * 65536)`` (at least 1), a relative error of
    at most ``2**-17`` of the largest weight. Multiplying a share by a Python ``int`` is exact and
    local, so the weighted sum on shares equals its twin bit for bit either way.
    """
    if not weights:
        raise ValueError("no weights")
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w <= 0 for w in ws):
        raise ValueError(f"weights must be finite and > 0, got {ws}")
    fracs = [Fraction(w).limit_denominator(MAX_WEIGHT_DENOMINATOR) for w in ws]
    if all(abs(float(f) - w) <= 1e-12 * w for f, w in zip(fracs, ws)):
        den = math.lcm(*(f.denominator for f in fracs))
        ints = [int(f * den) for f in fracs]
        g = math.gcd(*ints)
        ints = [i // g for i in ints]
        if max(ints) <= MAX_INTEGER_WEIGHT:
            return tuple(ints), True
    top = max(ws)
    return tuple(max(1, round(w / top * MAX_INTEGER_WEIGHT)) for w in ws), False


def top_k_lowest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dimension, largest first.

    Among equal values the lower index comes first (a stable descending sort keeps the original
    order of equal elements).
    """
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def threshold_units(threshold: float, *, per: int, precision_bits: int) -> int:
    """Smallest integer unit count ``u`` with ``u >= threshold * per * 2**bits`` (exact).

    An integer aggregate ``a`` (units) satisfies ``a >= threshold * per * 2**bits`` exactly when
    ``a >= threshold_units(...)``: the comparison on shares and its twin use this integer.
    """
    return math.ceil(Fraction(threshold) * per * (1 << precision_bits))


def gate(labels: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """``labels`` where ``passed``, else :data:`~mpc_fi.result.ABSTAIN` (twin of ``secure_ops.gate``)."""
    return torch.where(passed, labels, torch.full_like(labels, ABSTAIN))


def effective_sigma(sigma: float, parties: int) -> float:
    """Noise std that a single computing party cannot subtract from a joint Gaussian.

    Each of ``parties`` computing parties adds an independent ``N(0, sigma**2 / parties)`` share;
    the querier knows its own share, so from its point of view the release carries noise of
    variance ``sigma**2 * (parties - 1) / parties``. The budget is charged at that std.
    """
    if parties < 2:
        raise ValueError(f"need at least 2 computing parties, got {parties}")
    return sigma * math.sqrt((parties - 1) / parties)


def softmax_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and their entropy in nats (float64, stable for far-apart logits)."""
    z = logits.to(torch.float64)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return p, -(p * logp).sum(dim=-1)
