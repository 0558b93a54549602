"""The operations a protocol's release is written against, on shares and in plaintext.

A protocol writes its release once, as :meth:`protocols.base.Protocol.release` over an
:class:`Ops` (the MPyC way: one function for plain and secure values). :class:`SecureOps` runs it
on CrypTen shares (:mod:`protocols.secure_ops`, :mod:`mpc_fi.secure`); :class:`PlainOps` runs the
same code on plaintext ``float64`` tensors that hold exactly what the querier would open: the
fixed-point aggregate decoded (``units / 2**bits``, exact in float64), 0/1 bits, class indices.
The plaintext twin of every protocol is that code on :class:`PlainOps`, so the two cannot drift.

Tie rule everywhere: among equal values the lowest class index wins.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from mpc_fi import plain, secure

from . import plain_ops, secure_ops
from .noise import NoiseSource, SystemNoise


class Ops(ABC):
    """What a release may do with the aggregate (shared or plaintext)."""

    def __init__(self, *, precision_bits: int) -> None:
        self.precision_bits = precision_bits

    @abstractmethod
    def argmax_index(self, x: Any, num_classes: int) -> Any:
        """Index of the maximum along the last dimension."""

    @abstractmethod
    def argmax_one_hot(self, x: Any, num_classes: int) -> Any:
        """One-hot (0/1) of the maximum along the last dimension."""

    @abstractmethod
    def above(self, x: Any, units: int) -> Any:
        """0/1 bits ``[x >= units / 2**bits]`` (exact on the fixed-point encodings)."""

    @abstractmethod
    def top_k_indices(self, x: Any, num_classes: int, k: int, *, bound: float,
                      method: str = "auto") -> Any:
        """``(batch, k)`` indices of the ``k`` largest entries, largest first (``method``: how
        shares rank them; the result is the same)."""

    @abstractmethod
    def joint_noise(self, shape: Sequence[int], sigma: float) -> Any:
        """``N(0, sigma**2)`` noise no single party knows, fixed-point encoded."""

    def gated_label(self, one_hot: Any, passed: Any, num_classes: int) -> Any:
        """The argmax where its own entry passed, else -1 (``one_hot`` and ``passed`` 0/1)."""
        hit = one_hot * passed
        return (hit * torch.arange(1, num_classes + 1, dtype=torch.long)).sum(-1) - 1

    def gate(self, passed: Any, label: Any) -> Any:
        """``label`` where the bit ``passed`` is 1, else -1."""
        return passed * (label + 1) - 1


class SecureOps(Ops):
    """The release on CrypTen shares; joint noise from this party's own ``noise_source``."""

    def __init__(self, *, precision_bits: int, noise_source: NoiseSource | None = None) -> None:
        super().__init__(precision_bits=precision_bits)
        self.noise_source = noise_source

    def argmax_index(self, x: Any, num_classes: int) -> Any:
        return secure.argmax_index(x, num_classes)

    def argmax_one_hot(self, x: Any, num_classes: int) -> Any:
        return secure.argmax_one_hot(x, num_classes)

    def above(self, x: Any, units: int) -> Any:
        return secure_ops.above(x, units, self.precision_bits)

    def top_k_indices(self, x: Any, num_classes: int, k: int, *, bound: float,
                      method: str = "auto") -> Any:
        return secure_ops.top_k_indices(x, num_classes, k, bound=bound, method=method)

    def joint_noise(self, shape: Sequence[int], sigma: float) -> Any:
        if self.noise_source is None:
            raise ValueError("this release needs a noise source")
        return secure_ops.joint_gaussian(tuple(shape), sigma, self.noise_source)

    def gated_label(self, one_hot: Any, passed: Any, num_classes: int) -> Any:
        # a product with scale-1 bits: exact (secure_ops.gated_label)
        return secure_ops.gated_label(one_hot, passed, num_classes)

    def gate(self, passed: Any, label: Any) -> Any:
        return secure_ops.gate(passed, label)


class PlainOps(Ops):
    """The release in plaintext, on decoded ``float64`` values (exact for fixed-point units).

    ``noise_sources`` are every computing party's sources, in rank order (a test replays what
    each party drew); None: fresh ones, ``parties`` of them.
    """

    def __init__(self, *, precision_bits: int, noise_sources: Sequence[NoiseSource] | None = None,
                 parties: int = 2) -> None:
        super().__init__(precision_bits=precision_bits)
        self.sources = list(noise_sources) if noise_sources else \
            [SystemNoise() for _ in range(parties)]

    def argmax_index(self, x: torch.Tensor, num_classes: int) -> torch.Tensor:
        return plain.argmax_lowest(x).to(torch.float64)

    def argmax_one_hot(self, x: torch.Tensor, num_classes: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(plain.argmax_lowest(x), num_classes).to(torch.float64)

    def above(self, x: torch.Tensor, units: int) -> torch.Tensor:
        return (x >= units / (1 << self.precision_bits)).to(torch.float64)

    def top_k_indices(self, x: torch.Tensor, num_classes: int, k: int, *, bound: float,
                      method: str = "auto") -> torch.Tensor:
        return plain_ops.top_k_lowest(x, k).to(torch.float64)

    def joint_noise(self, shape: Sequence[int], sigma: float) -> torch.Tensor:
        parties = len(self.sources)
        units = sum(plain.encode(src.gaussian(tuple(shape), sigma / math.sqrt(parties)),
                                 self.precision_bits) for src in self.sources)
        return units.to(torch.float64) / (1 << self.precision_bits)
