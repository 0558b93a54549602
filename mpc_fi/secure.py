"""Secure arithmetic over shared tensors (CrypTen ``MPCTensor``), apart from any plumbing.

Each function has a plaintext twin in :mod:`mpc_fi.plain` with the same tie rule, so that
protocols can be checked value for value.

Tie rule used everywhere: **among equal values, the lowest class index wins.** CrypTen's own
``argmax`` breaks ties at random, which makes plurality votes among few owners
non-deterministic. :func:`distinct` makes every entry unique before the argmax by scaling the
fixed-point encoding by ``C`` (an exact, local multiplication by a public integer) and adding
``C - 1 - j`` units in the last place to class ``j``. Values that differ keep their order; values
that are equal in fixed point are ordered by index.
"""

from __future__ import annotations

from typing import Any

import torch


def distinct(x: Any, num_classes: int) -> Any:
    """Return ``x * C + (C-1-j) ulp`` along the last dimension: an order-preserving, tie-free map."""
    scale = x.encoder.scale
    offsets = torch.arange(num_classes - 1, -1, -1, dtype=torch.float64) / scale
    return x * num_classes + offsets


def argmax_one_hot(x: Any, num_classes: int) -> Any:
    """One-hot (shared) of the argmax along the last dimension, lowest index on ties."""
    return distinct(x, num_classes).argmax(dim=-1, one_hot=True)


def one_hot_to_index(one_hot: Any, num_classes: int) -> Any:
    """Shared class index from a shared one-hot vector (local: a dot product with 0..C-1)."""
    # An integer tensor multiplies the shares without a fixed-point truncation: exact.
    return (one_hot * torch.arange(num_classes, dtype=torch.long)).sum(dim=-1)


def argmax_index(x: Any, num_classes: int) -> Any:
    """Shared index of the maximum along the last dimension, lowest index on ties."""
    return one_hot_to_index(argmax_one_hot(x, num_classes), num_classes)
