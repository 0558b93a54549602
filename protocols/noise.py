"""Where a party's share of the joint differential-privacy noise comes from.

Each computing party (every owner and the querier) draws its own Gaussian share locally and
secret-shares it (:func:`protocols.secure_ops.joint_gaussian`); no party ever sees the total.
:class:`SystemNoise` is the only source for real runs: a ``torch.Generator`` seeded with 63 bits
from ``os.urandom`` (the operating system's CSPRNG), private to one protocol instance in one
process, never the global torch RNG (which other code seeds with constants).
:class:`SeededNoise` exists for tests that must replay every party's noise in plaintext; it is
loud about being insecure.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from mpc_fi.errors import InsecureSettingWarning


class NoiseSource(ABC):
    """One party's private supply of Gaussian noise."""

    @abstractmethod
    def gaussian(self, shape: Sequence[int], std: float) -> torch.Tensor:
        """``float64`` samples of ``N(0, std**2)`` with the given shape."""


class SystemNoise(NoiseSource):
    """Gaussian samples from a generator seeded from the operating system's CSPRNG."""

    def __init__(self) -> None:
        self._generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)

    def gaussian(self, shape: Sequence[int], std: float) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self._generator, dtype=torch.float64) * std


class SeededNoise(NoiseSource):
    """Reproducible samples from a fixed seed: **tests only** (anyone who knows the seed can
    subtract the noise, so the release loses its differential privacy)."""

    def __init__(self, seed: int) -> None:
        warnings.warn(f"SeededNoise(seed={seed}): differential-privacy noise from a fixed seed is "
                      "predictable; use it only in tests", InsecureSettingWarning, stacklevel=2)
        self._generator = torch.Generator().manual_seed(seed)

    def gaussian(self, shape: Sequence[int], std: float) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self._generator, dtype=torch.float64) * std
