"""Cryptographic randomness for everything a secret depends on.

Every random value that masks a secret (pairwise zero-sharing masks, dealer material: Beaver and
binary triples, daBits, B2A and truncation randomness, party-local randomness, the differential-
privacy noise shares) comes from a :class:`CSPRNG`: AES-256 in counter mode, run by OpenSSL
through the maintained ``cryptography`` package, under a 256-bit key.

Keys:

* are 256 bits drawn from the operating system (``os.urandom``), or received from the party that
  drew them (pairwise keys, the dealer's per-party keys, the global key);
* are never used directly: each stream's AES key is ``HKDF-SHA256(key, info=purpose)``, so one
  key can feed several purposes without two streams ever coinciding;
* address their output by counter: byte ``i`` of a stream is byte ``i % 16`` of
  ``AES_k(i // 16)``, so two parties that hold the same key and purpose produce the same values
  as long as they draw the same sizes in the same order (which CrypTen's protocols guarantee), and
  a test build can regenerate any slice from the key and the offset (:meth:`CSPRNG.at`).

torch's CPU generator (MT19937) keeps only 32 bits of a seed, so CrypTen's own generators, seeded
with 64 bits from ``os.urandom``, have at most 2**32 states each; an exhaustive search recovers
them in under a minute on 16 cores. :mod:`mpc_fi._crypten` replaces every one of them with this
class (see ``install_randomness`` there).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import InsecureSettingWarning

__all__ = ["CSPRNG", "KEY_BYTES", "key_to_tensor", "tensor_to_key", "new_key"]

#: Every key is 256 bits; keys shorter than 128 bits are refused.
KEY_BYTES = 32
_MIN_KEY_BYTES = 16
_BLOCK = 16
_VERSION = b"mpc-fi/csprng/v1/"


def new_key() -> bytes:
    """A fresh 256-bit key from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)


def key_to_tensor(key: bytes) -> torch.Tensor:
    """A 256-bit key as 4 int64 words, to send through a torch.distributed collective."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a key has {KEY_BYTES} bytes, got {len(key)}")
    return torch.from_numpy(np.frombuffer(key, dtype="<i8").astype(np.int64))


def tensor_to_key(words: torch.Tensor) -> bytes:
    """Inverse of :func:`key_to_tensor`."""
    arr = np.ascontiguousarray(words.detach().cpu().numpy().astype("<i8", copy=False))
    if arr.size != KEY_BYTES // 8:
        raise ValueError(f"a key has {KEY_BYTES // 8} words, got {arr.size}")
    return arr.tobytes()


_CHUNK = 1 << 24  # bytes of keystream per AES call when drawing large tensors
_ZEROS = memoryview(bytes(1 << 20))


def _zeros(n: int) -> memoryview:
    """A read-only run of ``n`` zero bytes (the plaintext AES-CTR encrypts into keystream)."""
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = memoryview(bytes(min(_CHUNK, max(n, 2 * len(_ZEROS)))))
    return _ZEROS[:n]


def _size(size: Any) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size,)
    if len(size) == 1 and hasattr(size[0], "__len__"):  # f(*size) and f(size) both occur
        return tuple(int(s) for s in size[0])
    return tuple(int(s) for s in size)


class CSPRNG:
    """A keyed, counter-addressed pseudo-random stream (AES-256-CTR under an HKDF-derived key).

    It stands where CrypTen expects a ``torch.Generator`` (``crypten.generators``, the TTP
    client's and server's generators) and is used only through :meth:`ring`, :meth:`kbits`,
    :meth:`uniform` and :meth:`normal`. Passing it to a torch sampling function fails loudly
    (``TypeError``), which is the point: no secret may come from torch's generators.
    """

    __slots__ = ("purpose", "device", "_aes_key", "_enc", "_offset")

    def __init__(self, key: bytes, *, purpose: str, device: str | torch.device = "cpu") -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"a CSPRNG key needs at least {_MIN_KEY_BYTES * 8} bits")
        self.purpose = purpose
        self.device = torch.device(device)
        self._aes_key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                             info=_VERSION + purpose.encode()).derive(bytes(key))
        self._seek(0)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_os(cls, purpose: str, device: str | torch.device = "cpu") -> "CSPRNG":
        """A stream under a fresh 256-bit key from ``os.urandom`` (known to this process only)."""
        return cls(new_key(), purpose=purpose, device=device)

    @classmethod
    def from_seed(cls, seed: int, purpose: str, device: str | torch.device = "cpu") -> "CSPRNG":
        """A stream from a fixed integer seed, for **tests only** (warns).

        Every bit of the seed matters (it is hashed, not truncated): seeds that differ only above
        bit 31 give unrelated streams. A fixed seed is still guessable by whoever knows it.
        """
        warnings.warn(f"CSPRNG.from_seed({purpose!r}): a fixed seed makes the stream predictable "
                      "to anyone who knows it; use it in tests only", InsecureSettingWarning,
                      stacklevel=2)
        raw = int(seed).to_bytes(max(16, (int(seed).bit_length() + 8) // 8), "big", signed=True)
        return cls(hashlib.sha256(b"mpc-fi/seed/" + raw).digest(), purpose=purpose, device=device)

    @classmethod
    def _from_stream_key(cls, aes_key: bytes, purpose: str) -> "CSPRNG":
        """The stream whose derived AES key is ``aes_key`` (audits regenerate dealer material)."""
        stream = object.__new__(CSPRNG)
        stream.purpose, stream.device, stream._aes_key = purpose, torch.device("cpu"), aes_key
        stream._seek(0)
        return stream

    def derive(self, purpose: str) -> "CSPRNG":
        """An independent stream for a sub-purpose (same key, longer label)."""
        child = object.__new__(CSPRNG)
        child.purpose = f"{self.purpose}/{purpose}"
        child.device = self.device
        child._aes_key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                              info=_VERSION + child.purpose.encode()).derive(self._aes_key)
        child._seek(0)
        return child

    # -- position -------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes drawn so far (the counter position)."""
        return self._offset

    def _seek(self, offset: int) -> None:
        block, skip = divmod(offset, _BLOCK)
        nonce = block.to_bytes(_BLOCK, "big")
        self._enc = Cipher(algorithms.AES(self._aes_key), modes.CTR(nonce)).encryptor()
        self._offset = block * _BLOCK
        if skip:
            self._enc.update(bytes(skip))
            self._offset += skip

    def seek(self, offset: int) -> None:
        """Move this stream to byte ``offset`` (prefetched dealer material lives in regions far
        from the start: :mod:`mpc_fi.prefetch`)."""
        if offset < 0:
            raise ValueError("negative offset")
        self._seek(offset)

    def at(self, offset: int) -> "CSPRNG":
        """A copy of this stream positioned at byte ``offset`` (regenerates any past slice)."""
        copy = object.__new__(CSPRNG)
        copy.purpose, copy.device, copy._aes_key = self.purpose, self.device, self._aes_key
        copy._seek(offset)
        return copy

    # -- output ---------------------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        self._offset += n
        return self._enc.update(bytes(n))

    def _words(self, shape: tuple[int, ...]) -> np.ndarray:
        """``shape`` int64 words of keystream, encrypted straight into a fresh array."""
        n = 8 * math.prod(shape)
        # update_into wants room for a block beyond the data; the words are a view of it.
        out = np.empty(n + _BLOCK, dtype=np.uint8)
        for start in range(0, n, _CHUNK):  # bounded zero buffer, however large the draw
            size = min(_CHUNK, n - start)
            self._enc.update_into(_zeros(size), out[start:start + size + _BLOCK])
        self._offset += n
        return out[:n].view("<i8").reshape(shape)

    def _out(self, arr: np.ndarray, device: Any) -> torch.Tensor:
        t = torch.from_numpy(arr if arr.dtype == np.int64 else arr.astype(np.int64))
        device = self.device if device is None else torch.device(device)
        if device.type != "cpu":
            cuda_long = sys.modules["crypten"].cuda.CUDALongTensor  # CUDA parties only
            return cuda_long(t.to(device))
        return t

    def ring(self, size: Any, device: Any = None) -> torch.Tensor:
        """Uniform elements of ``Z_2**64`` as int64 (every one of the 2**64 values)."""
        return self._out(self._words(_size(size)), device)

    def kbits(self, size: Any, bits: int, device: Any = None) -> torch.Tensor:
        """Uniform integers in ``[0, 2**bits)``; ``bits == 64`` is :meth:`ring`."""
        if not 1 <= bits <= 64:
            raise ValueError(f"bits must be in 1..64, got {bits}")
        words = self._words(_size(size))
        if bits < 64:
            words = words & np.int64((1 << bits) - 1)
        return self._out(words, device)

    def uniform(self, size: Sequence[int]) -> torch.Tensor:
        """float64 in ``(0, 1)``: 53 random bits, never exactly 0 or 1."""
        words = self._words(_size(size)).view(np.uint64) >> np.uint64(11)
        return torch.from_numpy((words.astype(np.float64) + 0.5) * 2.0 ** -53)

    def normal(self, size: Sequence[int], std: float = 1.0) -> torch.Tensor:
        """float64 samples of ``N(0, std**2)`` (Box-Muller on :meth:`uniform`)."""
        shape = _size(size)
        n = math.prod(shape)
        u = self.uniform((2, (n + 1) // 2))
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = 2.0 * math.pi * u[1]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return (z * std).reshape(shape)

    def __repr__(self) -> str:
        return f"CSPRNG(purpose={self.purpose!r}, offset={self._offset})"
