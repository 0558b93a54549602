"""Secure arithmetic the protocols share, as functions over CrypTen ``MPCTensor`` shares.

Twins live in :mod:`protocols.plain_ops`; argmaxes come from :mod:`mpc_fi.secure`. Facts these
functions rely on (CrypTen 0.4.1, checked by the protocol tests):

* Comparison results (``gt``, ``ge``, ``lt``) are 0/1 tensors at encoder scale 1, and a product
  in which one factor has scale 1 is not truncated: selecting, masking and gating with bits is
  exact.
* A share times a Python ``int`` is exact and local. A share at scale ``2**16`` times an
  integer *tensor* is exact too but goes through a truncation (one extra round with more than
  two parties), so weighted sums multiply by Python ints, one owner at a time.
* Additions, and comparisons between fixed-point values, are exact on the integer encodings;
  a product of two fixed-point shares is truncated (a few units of ``2**-16``).

Tie rule everywhere: the lowest class index wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mpc_fi import secure
from mpc_fi._crypten import load_crypten

from .noise import NoiseSource

#: Below this many classes :func:`top_k_indices` ranks all pairs at once (constant rounds,
#: ``C(C-1)/2`` comparisons per query); from it on, it takes ``k`` successive argmaxes.
PAIRWISE_TOP_K_MAX_CLASSES = 32


def weighted_sum(contributions: Sequence[Any], weights: Sequence[int]) -> Any:
    """``sum_i weights[i] * contributions[i]`` with public integer weights: exact and local."""
    if len(contributions) != len(weights):
        raise ValueError(f"{len(contributions)} contributions for {len(weights)} weights")
    total = None
    for c, w in zip(contributions, weights):
        term = c * int(w)
        total = term if total is None else total + term
    return total


def above(x: Any, units: int, precision_bits: int) -> Any:
    """Shared bits ``[x >= units / 2**bits]`` (scale 1), exact on the integer encodings."""
    # units / 2**bits is exactly representable, so CrypTen encodes it back to ``units``.
    return x.ge(units / (1 << precision_bits))


def gated_label(one_hot: Any, passed_bits: Any, num_classes: int) -> Any:
    """``argmax`` where its entry passed, else -1 (abstain), from the argmax one-hot.

    ``one_hot * passed_bits`` keeps the winner only where its own entry passed (a product with
    scale-1 bits: exact); the dot product with ``1..C`` then gives ``label + 1`` or 0.
    """
    hit = one_hot * passed_bits
    return (hit * torch.arange(1, num_classes + 1, dtype=torch.long)).sum(-1) - 1


def gate(passed: Any, label: Any) -> Any:
    """``label`` where the shared bit ``passed`` is 1, else -1 (abstain): one product.

    Both factors may be at the fixed-point scale, so the product can be off by a few units
    (2**-16) from an integer; the querier rounds the opened value (``Protocol.decode``).
    """
    return passed * (label + 1) - 1


def top_k_indices(x: Any, num_classes: int, k: int, *, bound: float,
                  method: str = "auto") -> Any:
    """Shared ``(batch, k)`` indices of the ``k`` largest entries of ``x``, largest first.

    Ties go to the lowest index. ``bound`` is a public bound on ``|x|``. ``method``:
    ``"pairwise"`` compares every pair of classes once (2 comparison layers, ``C(C-1)/2 + kC``
    comparisons per query), ``"iterative"`` takes ``k`` argmaxes, masking each winner (``k``
    argmax depths, about ``kC`` comparisons), ``"auto"`` picks pairwise below
    :data:`PAIRWISE_TOP_K_MAX_CLASSES` classes.
    """
    if method == "auto":
        method = "pairwise" if num_classes < PAIRWISE_TOP_K_MAX_CLASSES else "iterative"
    if method == "pairwise":
        return _top_k_pairwise(x, num_classes, k)
    if method == "iterative":
        return _top_k_iterative(x, num_classes, k, bound)
    raise ValueError(f"unknown top-k method {method!r}")


def _top_k_pairwise(x: Any, num_classes: int, k: int) -> Any:
    c = num_classes
    d = secure.distinct(x, c)  # all entries distinct: every pair compares strictly
    left, right = torch.triu_indices(c, c, offset=1)
    greater = d.index_select(-1, left).gt(d.index_select(-1, right))  # [d_l > d_r], l < r
    # rank_j = #{l : d_l > d_j} = sum_{l<j} g_(l,j) + sum_{l>j} (1 - g_(j,l)).
    to_right = torch.zeros(len(left), c, dtype=torch.long)
    to_right[torch.arange(len(left)), right] = 1
    to_left = torch.zeros(len(left), c, dtype=torch.long)
    to_left[torch.arange(len(left)), left] = 1
    # Scale-1 bits times integer matrices: local and exact.
    rank = greater.matmul(to_right - to_left) + to_left.sum(0)
    # below[..., j, r] = [rank_j < r + 1]; position r holds j iff below[r] - below[r - 1] = 1.
    below = rank.unsqueeze(-1).lt(torch.arange(1, k + 1, dtype=torch.long))
    step = torch.eye(k, dtype=torch.long) - torch.diag(torch.ones(k - 1, dtype=torch.long), 1)
    at_position = below.matmul(step)  # (batch, C, k) one-hot along C
    return (at_position * torch.arange(c, dtype=torch.long).unsqueeze(-1)).sum(-2)


def _top_k_iterative(x: Any, num_classes: int, k: int, bound: float) -> Any:
    crypten = load_crypten()
    # A winner drops by more than the range of x, below every other entry (bits times an int:
    # exact). The next argmax's tie-free map keeps the lowest-index rule among the rest.
    mask = 2 * math.ceil(bound) + 1
    labels, current = [], x
    for r in range(k):
        one_hot = secure.argmax_one_hot(current, num_classes)
        labels.append(secure.one_hot_to_index(one_hot, num_classes))
        if r + 1 < k:
            current = current - one_hot * mask
    return crypten.stack(labels, dim=-1)


def joint_gaussian(shape: Sequence[int], sigma: float, source: NoiseSource) -> Any:
    """Shared ``N(0, sigma**2)`` noise that no single party knows.

    Every computing party draws ``N(0, sigma**2 / m)`` locally from its own ``source`` (``m`` =
    number of computing parties) and secret-shares it; the sum of the ``m`` shares has std
    ``sigma``. Sharing uses pseudo-random zero shares: no messages. A coalition learns only the
    parts its members drew (see docs/protocols.md).
    """
    crypten = load_crypten()
    comm = crypten.communicator.get()
    parties, rank = comm.get_world_size(), comm.get_rank()
    shape = tuple(shape)
    mine = source.gaussian(shape, sigma / math.sqrt(parties))
    total = None
    for r in range(parties):
        part = crypten.cryptensor(mine if r == rank else torch.zeros(shape, dtype=torch.float64),
                                  src=r)
        total = part if total is None else total + part
    return total


def softmax_confidence(logits: Any, num_classes: int, *,
                       power: int = 1) -> tuple[Any, Any]:
    """Softmax probabilities ``(batch, C)`` and ``exp(-power * H)`` ``(batch, 1)`` on shares.

    ``H`` is the entropy (nats) of the softmax. With ``d = z - m`` for a shift ``m`` near the
    maximum (clamped below at :data:`mpc_fi.secure.EXP_FLOOR`), ``e = exp(d)``, ``s = sum e``
    and ``p = e / s``: ``H = log s - sum p d``, so ``exp(-H) = exp(sum p d) / s`` needs **no
    logarithm on shares**: the reciprocal ``1 / s`` is the softmax's own, and ``sum p d`` lies
    in ``[-log C, 0]`` where ``exp`` is accurate. Any shift ``m`` gives the same ``p`` and
    ``H``, so the maximum is taken as the argmax one-hot dotted with ``z`` (a truncated product
    is fine). ``power`` is a positive integer: ``exp(-power * H)`` is a power of ``exp(-H)`` by
    repeated multiplication.
    """
    one_hot = secure.argmax_one_hot(logits, num_classes)
    top = (one_hot * logits).sum(-1, keepdim=True)
    shifted = secure.clamp_exponent(logits - top)
    e = secure.exp_clamped(shifted)
    # the row's maximum gives e = 1, so the sum lies in [1, C] (up to exp's error)
    inverse = secure.reciprocal_in(e.sum(-1, keepdim=True), num_classes * 1.01 + 1)
    p = e * inverse
    base = secure.exp_clamped((p * shifted).sum(-1, keepdim=True)) * inverse  # exp(-H)
    confidence = base
    for _ in range(power - 1):
        confidence = confidence * base
    return p, confidence


def entropy_weighted_average(probs: Sequence[Any], confidences: Sequence[Any]) -> Any:
    """``sum_i w_i p_i`` with ``w_i = u_i / sum_j u_j``, normalised on shares.

    ``probs[i]`` is ``(batch, C)``, ``confidences[i]`` is ``(batch, 1)`` and positive. One
    reciprocal of the per-query total and two batched multiplications; no owner's weight is
    ever opened.
    """
    crypten = load_crypten()
    u = crypten.stack(list(confidences))  # (N, batch, 1)
    total = u.sum(0)
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        inverse = total.reciprocal()
    weights = u * inverse  # (N, batch, 1), sums to 1 over owners
    return (weights * crypten.stack(list(probs))).sum(0)
