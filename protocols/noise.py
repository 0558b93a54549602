"""Where a party's share of the joint differential-privacy noise comes from.

Each computing party (every owner and the querier) draws its own Gaussian share locally and
secret-shares it (:func:`protocols.secure_ops.joint_gaussian`); no party ever sees the total.
:class:`SystemNoise` is the only source for real runs: a :class:`~mpc_fi.csprng.CSPRNG`
(AES-256-CTR) under a fresh 256-bit key from ``os.urandom``, private to one protocol instance in
one process; never a ``torch.Generator`` (MT19937 keeps 32 bits of a seed, so noise drawn from
one could be searched for and subtracted). :class:`SeededNoise` exists for tests that must replay
every party's noise in plaintext; it is loud about being insecure.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from mpc_fi.csprng import CSPRNG
from mpc_fi.errors import InsecureSettingWarning


class NoiseSource(ABC):
    """One party's private supply of Gaussian noise."""

    @abstractmethod
    def gaussian(self, shape: Sequence[int], std: float) -> torch.Tensor:
        """``float64`` samples of ``N(0, std**2)`` with the given shape."""


class SystemNoise(NoiseSource):
    """Gaussian samples from a CSPRNG under a 256-bit key from the operating system."""

    def __init__(self) -> None:
        self._stream = CSPRNG.from_os("dp-noise")

    def gaussian(self, shape: Sequence[int], std: float) -> torch.Tensor:
        return self._stream.normal(tuple(shape), std)


class SeededNoise(NoiseSource):
    """Reproducible samples from a fixed seed: **tests only** (anyone who knows the seed can
    subtract the noise, so the release loses its differential privacy)."""

    def __init__(self, seed: int) -> None:
        warnings.warn(f"SeededNoise(seed={seed}): differential-privacy noise from a fixed seed is "
                      "predictable; use it only in tests", InsecureSettingWarning, stacklevel=2)
        with warnings.catch_warnings():  # warned above, once
            warnings.simplefilter("ignore", InsecureSettingWarning)
            self._stream = CSPRNG.from_seed(seed, "dp-noise")

    def gaussian(self, shape: Sequence[int], std: float) -> torch.Tensor:
        return self._stream.normal(tuple(shape), std)
