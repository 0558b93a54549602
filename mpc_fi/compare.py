"""Comparisons and argmax on additive shares that carry only the bits a value can occupy.

CrypTen compares two shared values by converting every party's whole 64-bit share to binary and
adding the ``P`` binary numbers with ``log2 P`` rounds of full 64-bit parallel-prefix adders: about
100 communication rounds for one argmax among 4 parties, whatever the values are. This module
computes the same comparison results (exactly, not approximately) from less:

* **Bit width from public bounds.** If a shared difference ``d`` is known to satisfy
  ``|d| < 2**k`` (a public :class:`ValueRange` of the compared values), then ``[d >= 0]`` is bit
  ``k`` of ``d + 2**k``, which only depends on the low ``k + 1`` bits of every share (sums of shares
  are exact modulo ``2**(k+1)``). Vote counts need 3 to 6 bits instead of 64, summed
  probabilities about 19.
* **Known zero low bits are dropped for almost nothing.** If every compared value is a multiple
  of ``2**t`` (vote counts in fixed point: ``t = 16``), the parties open the sum of the top
  ``ceil(log2 P)`` of the ``t`` low bits of their shares, which tells each party the carry those
  bits produce; the low bits are then ignored. What is opened depends on the low bits of the
  shares only, which are independent of the secret when the secret's low bits are zero.
* **Carry-save instead of repeated adders.** The ``P`` shares are added by a Wallace tree of
  full adders (one AND round per layer, ``m - 1`` ANDs per value), then one parallel-prefix
  carry computation yields the top bit only (``ceil(log2(m - 1))`` rounds).
* **Bit slicing.** Bit ``j`` of 64 different comparisons shares one machine word, so every AND
  round opens ``2 * bits / 64`` words instead of 2 words per comparison and bit position.
* **Argmax as a group tournament.** Candidates are split into groups of ``g``; inside a group all
  pairs are compared at once and a candidate wins if it beats every other member (an AND tree);
  group winners are selected on arithmetic shares and meet in the next level. ``g = C`` is the
  round-optimal all-pairs argmax, ``g = 2`` the byte-optimal binary tournament; a cost model
  (:func:`choose_group_size`) picks ``g`` for a network profile (LAN or WAN). Ties go to the
  lowest index: inside a pair the lower index wins when the values are equal, and groups are
  consecutive runs of indices.
* **One dealer request per kind.** Every correlated value an argmax needs (binary triples,
  daBits, multiplication triples) is counted first by a dry run of the same circuit on zeros and
  fetched in one request per kind, so a TTP dealer costs party 0 three extra rounds per kind, not
  three per AND level.

Security model: the one CrypTen uses (semi-honest, additive shares over ``Z_2**64``, any number of
corrupted parties below ``P``, correlated randomness from the configured provider: TTP or TFP).
Every opened value is masked by a Beaver triple or daBit, except the low-bit carry sums described
above. The bounds must hold: a difference outside ``(-2**k, 2**k)`` gives a wrong comparison
(never an exception, so the parties stay synchronised). Callers that cannot guarantee a bound
pass none and get full 64-bit comparisons (still exact, and cheaper than CrypTen's).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from . import audit, wire
from ._crypten import load_crypten

__all__ = [
    "ValueRange", "NetworkProfile", "LAN", "WAN", "NETWORKS", "ArgmaxPlan",
    "choose_group_size", "plan_argmax", "argmax_circuit", "argmax_bits", "argmax_one_hot_shares",
    "argmax_index_shares", "ge_zero_circuit", "ge_zero_shares", "install_fast_comparisons",
    "uninstall_fast_comparisons", "pack_bits", "unpack_bits", "bounded", "bound_range", "relu_bound_range",
    "max_circuit", "approximate_max_shares", "relu_circuit",
    "relu_shares", "use_crypten_relu",
]

_WORD = 64


# ---------------------------------------------------------------------------------------
# Public knowledge about the compared values, and the network the cost model assumes
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueRange:
    """Public bounds on the *encoded* (fixed-point integer) values of a shared tensor.

    ``lo <= value <= hi`` for every entry, and every entry is a multiple of ``2**zero_low_bits``.
    Example: the sum of ``N`` one-hot votes at 16 fractional bits is
    ``ValueRange(0, N << 16, zero_low_bits=16)``.
    """

    lo: int
    hi: int
    zero_low_bits: int = 0

    def __post_init__(self) -> None:
        if self.hi < self.lo:
            raise ValueError(f"empty range: hi={self.hi} < lo={self.lo}")
        if not 0 <= self.zero_low_bits < 63:
            raise ValueError(f"zero_low_bits must be in 0..62, got {self.zero_low_bits}")

    def comparison_bits(self) -> tuple[int, int]:
        """``(m, t)``: a difference of two values needs ``m`` bits above ``t`` known-zero bits.

        ``m = 64, t = 0`` when the range is too wide to gain anything.
        """
        t = self.zero_low_bits
        spread = -(-(self.hi - self.lo) // (1 << t))  # ceil: |difference| >> t is at most this
        k = max(1, spread.bit_length())  # 2**k > spread
        if k + 1 + t > 62:
            return 64, 0
        return k + 1, t

    def to_wire(self) -> dict[str, int]:
        return {"lo": self.lo, "hi": self.hi, "zero_low_bits": self.zero_low_bits}

    @staticmethod
    def from_wire(value: Any) -> "ValueRange":
        """A range a peer sent, checked (:data:`VALUE_RANGE_WIRE`); WireFormatError otherwise."""
        return VALUE_RANGE_WIRE.check(value)

    def scaled(self, factor: int) -> "ValueRange":
        """The range of ``factor * value`` for a public non-negative integer ``factor``."""
        lo, hi = sorted((self.lo * factor, self.hi * factor))
        extra = (factor & -factor).bit_length() - 1 if factor else 0
        return ValueRange(lo, hi, min(62, self.zero_low_bits + extra))


_INT64 = wire.Int(-(1 << 63), (1 << 63) - 1)
#: A :class:`ValueRange` on the wire: 64-bit signed bounds, ``lo <= hi``, 0..62 zero bits.
VALUE_RANGE_WIRE = wire.Convert(
    wire.Record({"lo": _INT64, "hi": _INT64, "zero_low_bits": wire.Int(0, 62)}),
    lambda d: ValueRange(d["lo"], d["hi"], d["zero_low_bits"]))


@dataclass(frozen=True)
class NetworkProfile:
    """What one communication round and one byte cost, for choosing between argmax schedules."""

    name: str
    latency_s: float  # per sequential round
    bandwidth_bytes_s: float  # per party


LAN = NetworkProfile("lan", latency_s=0.5e-3, bandwidth_bytes_s=125e6)  # 1 Gbit/s, 0.5 ms
WAN = NetworkProfile("wan", latency_s=40e-3, bandwidth_bytes_s=12.5e6)  # 100 Mbit/s, 40 ms
NETWORKS: dict[str, NetworkProfile] = {LAN.name: LAN, WAN.name: WAN}


# ---------------------------------------------------------------------------------------
# Bit slicing: bit j of 64 values in one int64 word
# ---------------------------------------------------------------------------------------
def _words(n: int) -> int:
    return -(-n // _WORD)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``(R, n)`` tensor of 0/1 -> ``(R, ceil(n/64))`` int64 words.

    Entry ``i`` of a row is bit ``i % 64`` of word ``i // 64``.
    """
    rows, n = bits.shape
    arr = bits.to(torch.uint8).numpy()
    pad = _words(n) * _WORD - n
    if pad:
        arr = np.concatenate([arr, np.zeros((rows, pad), dtype=np.uint8)], axis=1)
    packed = np.packbits(arr, axis=1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(packed).view("<i8").astype(np.int64, copy=False))


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(R, W)`` words -> ``(R, n)`` int64 tensor of 0/1."""
    u8 = np.ascontiguousarray(words.numpy().astype("<i8", copy=False)).view(np.uint8)
    bits = np.unpackbits(u8, axis=1, bitorder="little")[:, :n]
    return torch.from_numpy(bits.astype(np.int64))


def _bit_planes(values: torch.Tensor, m: int) -> torch.Tensor:
    """``(n,)`` int64 -> ``(m, W)`` words holding bit planes 0..m-1."""
    planes = torch.empty((m, values.numel()), dtype=torch.uint8)
    for j in range(m):
        planes[j] = ((values >> j) & 1).to(torch.uint8)
    return pack_bits(planes)


def _pack_fields(values: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """Non-negative ``(n,)`` values below ``2**width`` -> int64 words of ``64 // width`` fields."""
    per = _WORD // width
    n = values.numel()
    total = -(-n // per) * per
    padded = torch.zeros(total, dtype=torch.int64)
    padded[:n] = values
    shifts = torch.arange(per, dtype=torch.int64) * width
    return (padded.view(-1, per) << shifts).sum(dim=1), per


def _unpack_fields(words: torch.Tensor, width: int, per: int, n: int) -> torch.Tensor:
    shifts = torch.arange(per, dtype=torch.int64) * width
    return ((words.unsqueeze(1) >> shifts) & ((1 << width) - 1)).flatten()[:n]


# ---------------------------------------------------------------------------------------
# Backends: the real one talks through CrypTen; the counting one sizes the dealer requests
# ---------------------------------------------------------------------------------------
@dataclass
class _Needs:
    and_words: int = 0
    dabits: int = 0
    mul: int = 0
    bitmul: int = 0  # products of a binary-shared bit with an arithmetic value


class _Counting:
    """Runs a circuit on zeros to count what it will need from the dealer (no communication)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.needs = _Needs()

    def and_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.needs.and_words += x.numel()
        return torch.zeros_like(x)

    def open_bits(self, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.needs.dabits += bits.numel()
        z = torch.zeros(bits.numel(), dtype=torch.int64)
        return z, z

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.needs.mul += x.numel()
        return torch.zeros_like(x)

    def open_carry(self, words: torch.Tensor, shares: torch.Tensor, t: int) -> torch.Tensor:
        return torch.zeros_like(words)

    def bit_mul(self, bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.needs.bitmul += x.numel()
        return torch.zeros_like(x)


class _Mpc:
    """Raw-share operations over CrypTen's communicator, with pooled correlated randomness.

    Every opening is one of three kinds, each declared to the wire audit (:mod:`mpc_fi.audit`)
    with the dealer material that masks it: :meth:`and_` (Beaver AND, masks ``a``, ``b``),
    :meth:`open_bits` (bits XOR daBits), :meth:`mul` (Beaver multiplication), and the low-bit
    carry sums of :meth:`open_carry` (no mask: see :func:`_drop_zero_low_bits`).
    """

    def __init__(self, needs: _Needs) -> None:
        crypten = load_crypten()

        self.comm = crypten.communicator.get()
        self.rank, self.world = self.comm.get_rank(), self.comm.get_world_size()
        provider = crypten.mpc.get_default_provider()
        self._and = self._mul = self._dab = self._bm = None
        self._and_at = self._mul_at = self._dab_at = self._bm_at = 0
        # Where each pool starts in this party's dealer stream (audits only; None otherwise).
        self._and_off = self._mul_off = self._dab_off = self._bm_off = None
        if needs.and_words:
            self._and_off = audit.dealer_offset()
            a, b, c = provider.generate_binary_triple((needs.and_words,), (needs.and_words,))
            self._and = (a.share, b.share, c.share)
        if needs.dabits:
            self._dab_off = audit.dealer_offset()
            r_a, r_b = provider.B2A_rng((needs.dabits,))
            self._dab = (r_a.share, r_b.share & 1)
        if needs.mul:
            self._mul_off = audit.dealer_offset()
            a, b, c = provider.generate_additive_triple((needs.mul,), (needs.mul,), "mul")
            self._mul = (a.share, b.share, c.share)
        if needs.bitmul:
            self._bm_off = audit.dealer_offset()
            r_a, r_b, a, ar = provider.B2A_mul_rng((needs.bitmul,))
            self._bm = (r_a.share, r_b.share & 1, a.share, ar.share)
        self.needs = needs

    def exhausted(self) -> bool:
        return (self._and_at == self.needs.and_words and self._dab_at == self.needs.dabits
                and self._mul_at == self.needs.mul and self._bm_at == self.needs.bitmul)

    @staticmethod
    def _at(base: int | None, index: int, pool: int = 0) -> int | None:
        """Byte offset in the dealer stream of element ``index`` of the ``pool``-th tensor."""
        return None if base is None else base + 8 * (pool + index)

    def _xor_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(x, op=torch.distributed.ReduceOp.BXOR)

    def and_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One round: Beaver AND of binary-shared words ``x`` and ``y`` (same shape)."""
        n = x.numel()
        start = self._and_at
        a, b, c = (t[start:start + n].view(x.shape) for t in self._and)
        self._and_at += n
        total = self.needs.and_words
        with audit.opening("masked", "compare.and", lambda: [
                audit.part(x, self._at(self._and_off, start), combine="xor"),
                audit.part(y, self._at(self._and_off, start, total), combine="xor")]):
            opened = self._xor_reduce(torch.cat([(x ^ a).flatten(), (y ^ b).flatten()]))
        eps, dlt = opened[:n].view(x.shape), opened[n:].view(x.shape)
        z = c ^ (eps & b) ^ (a & dlt)
        if self.rank == 0:
            z = z ^ (eps & dlt)
        return z

    def open_bits(self, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Open binary-shared bits ``(n,)`` masked by ``n`` daBits: ``(bits ^ r, shares of r)``."""
        n = bits.numel()
        start = self._dab_at
        r_a, r_b = (t[start:start + n] for t in self._dab)
        self._dab_at += n
        with audit.opening("masked", "compare.bits", lambda: [
                audit.part(bits, self._at(self._dab_off, start), kind="bit", combine="xor",
                           pack=True)]):
            opened = unpack_bits(self._xor_reduce(pack_bits((bits ^ r_b).unsqueeze(0))), n)[0]
        return opened, r_a

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One round: Beaver multiplication of integer-shared ``x`` and ``y`` (``(n,)``)."""
        n = x.numel()
        start = self._mul_at
        a, b, c = (t[start:start + n] for t in self._mul)
        self._mul_at += n
        total = self.needs.mul
        with audit.opening("masked", "compare.mul", lambda: [
                audit.part(x, self._at(self._mul_off, start), combine="sub"),
                audit.part(y, self._at(self._mul_off, start, total), combine="sub")]):
            masked = self.comm.all_reduce(torch.cat([x - a, y - b]))
        eps, dlt = masked[:n], masked[n:]
        return c + eps * b + a * dlt + _public(self, eps * dlt)

    def bit_mul(self, bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Integer shares of ``bit * x`` for binary-shared bits and integer-shared ``x``
        (``(n,)`` each), from one masked bit and one masked value per element.

        The dealer's ``B2A_mul`` gives a random bit ``r`` (binary and arithmetic shares), a mask
        ``a`` and ``a * r``. The parties open ``o = bit ^ r`` and ``e = x - a``; then
        ``x * r = e * r + a * r`` and ``bit * x = o * x + (1 - 2 o) * x * r`` are local. A
        Beaver product of the converted bit with ``x`` opens two values, not one."""
        n = x.numel()
        start = self._bm_at
        r_a, r_b, a, ar = (t[start:start + n] for t in self._bm)
        self._bm_at += n
        total = self.needs.bitmul
        # the pool's stream layout, per element: the bit, then the mask (then the rest)
        with audit.opening("masked", "compare.bitmul", lambda: [
                audit.part(bits, self._at(self._bm_off, start), kind="bit", combine="xor",
                           pack=True),
                audit.part(x, self._at(self._bm_off, start, total), combine="sub")]):
            o = unpack_bits(self._xor_reduce(pack_bits((bits ^ r_b).unsqueeze(0))), n)[0]
            e = self.comm.all_reduce(x - a)
        x_r = e * r_a + ar
        return o * x + (1 - 2 * o) * x_r

    def open_carry(self, words: torch.Tensor, shares: torch.Tensor, t: int) -> torch.Tensor:
        """The sum of packed low-bit fields of the shares of values whose low ``t`` bits are 0."""
        with audit.opening("carry", "compare.carry", None,
                           shares=shares.detach().clone().numpy(), t=t):
            return self.comm.all_reduce(words)


# ---------------------------------------------------------------------------------------
# Circuits on raw shares (int64 tensors); ``be`` is a backend
# ---------------------------------------------------------------------------------------
def _public(be: Any, value: torch.Tensor) -> torch.Tensor:
    """A public value as a share: party 0 holds it, the others hold zero."""
    return value if be.rank == 0 else torch.zeros_like(value)


def _drop_zero_low_bits(be: Any, y: torch.Tensor, t: int) -> torch.Tensor:
    """Shares of ``Y >> t`` (modulo ``2**(64-t)``) from shares of ``Y``, a multiple of ``2**t``.

    The low ``t`` bits of the shares sum to ``kappa * 2**t`` with ``0 <= kappa < P``. The parties
    open the sum ``H`` of the top ``q = min(t, bits(P-1))`` of those bits; the lower ones add
    ``j * 2**(t-q)`` with ``0 <= j < 2**q``, so ``kappa = ceil(H / 2**q)``.
    """
    world = be.world
    q = min(t, max(1, (world - 1).bit_length()))
    h = (y >> (t - q)) & ((1 << q) - 1)
    width = (world * ((1 << q) - 1)).bit_length()
    words, per = _pack_fields(h, width)
    total = _unpack_fields(be.open_carry(words, y, t), width, per, y.numel())
    kappa = (total + (1 << q) - 1) >> q
    return (y >> t) + _public(be, kappa)


def _full_adder_layer(be: Any, operands: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    """3 -> 2 reduction of bit-sliced operands (each ``(m, W)``), all triples in one round."""
    groups = len(operands) // 3
    a = torch.stack(operands[0:3 * groups:3])
    b = torch.stack(operands[1:3 * groups:3])
    c = torch.stack(operands[2:3 * groups:3])
    total = a ^ b ^ c
    majority = be.and_((a ^ c)[:, :m - 1], (b ^ c)[:, :m - 1]) ^ c[:, :m - 1]
    carry = torch.zeros_like(a)
    carry[:, 1:] = majority
    return [total[i] for i in range(groups)] + [carry[i] for i in range(groups)] \
        + operands[3 * groups:]


def _top_bit_of_sum(be: Any, a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """Bit ``m-1`` of ``a + b`` for bit-sliced binary-shared ``a``, ``b`` (``(m, W)``)."""
    span = m - 1
    gen = be.and_(a[:span], b[:span])
    prop = a[:span] ^ b[:span]
    while gen.shape[0] > 1:
        pairs = gen.shape[0] // 2
        g_lo, g_hi = gen[0:2 * pairs:2], gen[1:2 * pairs:2]
        p_lo, p_hi = prop[0:2 * pairs:2], prop[1:2 * pairs:2]
        # The lowest block never needs its propagate bit (no carry enters bit 0).
        both = be.and_(torch.cat([p_hi, p_hi[1:]]), torch.cat([g_lo, p_lo[1:]]))
        new_gen = g_hi ^ both[:pairs]
        new_prop = torch.cat([torch.zeros_like(p_hi[:1]), both[pairs:]])
        if gen.shape[0] % 2:
            new_gen = torch.cat([new_gen, gen[-1:]])
            new_prop = torch.cat([new_prop, prop[-1:]])
        gen, prop = new_gen, new_prop
    return a[m - 1] ^ b[m - 1] ^ gen[0]


def _sign_bits(be: Any, y: torch.Tensor, m: int, t: int) -> torch.Tensor:
    """Binary shares (0/1 per party) of bit ``t + m - 1`` of the value shared as ``y`` (``(n,)``).

    Precondition: the value is a multiple of ``2**t`` when ``t > 0``.
    """
    n = y.numel()
    if t:
        y = _drop_zero_low_bits(be, y, t)
    if m < 64:
        y = y & ((1 << m) - 1)
    planes = _bit_planes(y, m)
    zeros = torch.zeros_like(planes)
    operands = [planes if be.rank == p else zeros for p in range(be.world)]
    while len(operands) > 2:
        operands = _full_adder_layer(be, operands, m)
    top = _top_bit_of_sum(be, operands[0], operands[1], m)
    return unpack_bits(top.unsqueeze(0), n)[0]


def _and_reduce(be: Any, words: torch.Tensor) -> torch.Tensor:
    """AND over the first dimension of ``(S, W)`` binary-shared words: ``ceil(log2 S)`` rounds."""
    while words.shape[0] > 1:
        half = words.shape[0] // 2
        words = torch.cat([be.and_(words[:half], words[half:2 * half]), words[2 * half:]])
    return words[0]


def _and_bits(be: Any, bits: torch.Tensor) -> torch.Tensor:
    """AND over the first dimension of ``(S, n)`` 0/1 binary shares -> ``(n,)``."""
    if bits.shape[0] == 1:
        return bits[0]
    n = bits.shape[1]
    return unpack_bits(_and_reduce(be, pack_bits(bits)).unsqueeze(0), n)[0]


def _b2a(be: Any, bits: torch.Tensor) -> torch.Tensor:
    """Arithmetic (integer) shares of binary-shared bits ``(n,)``, one round, ``n`` daBits."""
    opened, r_a = be.open_bits(bits)
    return r_a - 2 * opened * r_a + _public(be, opened)


@lru_cache(maxsize=256)
def _group_layout(k: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs inside consecutive groups of ``g`` among ``k`` candidates, and for every candidate
    the ``g - 1`` pair results (negated or not) that it must all win; missing slots read a
    constant 1 (index ``len(pairs)``, negated zero)."""
    left, right = [], []
    slots = [[] for _ in range(k)]
    for start in range(0, k, g):
        members = list(range(start, min(start + g, k)))
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                slots[a].append((len(left), 0))  # a beats b iff x_a >= x_b
                slots[b].append((len(left), 1))  # b beats a iff not (x_a >= x_b)
                left.append(a)
                right.append(b)
    npairs = len(left)
    index = torch.full((g - 1, k), npairs, dtype=torch.int64)
    negate = torch.ones((g - 1, k), dtype=torch.int64)
    for c, entries in enumerate(slots):
        for s, (p, neg) in enumerate(entries):
            index[s, c], negate[s, c] = p, neg
    return (torch.tensor(left, dtype=torch.int64), torch.tensor(right, dtype=torch.int64),
            index, negate)


def _group_winners(be: Any, values: torch.Tensor, g: int, m: int, t: int) -> torch.Tensor:
    """``(rows, K)`` shares -> 0/1 binary shares: does the candidate win its group of ``g``."""
    rows, k = values.shape
    left, right, index, negate = _group_layout(k, g)
    diff = (values[:, left] - values[:, right]).flatten()
    offset = torch.tensor(-(1 << 63) if m == 64 else 1 << (m - 1 + t), dtype=torch.int64)
    won = _sign_bits(be, diff + _public(be, offset), m, t).view(rows, -1)
    won = torch.cat([won, torch.zeros((rows, 1), dtype=torch.int64)], dim=1)
    slots = won[:, index] ^ _public(be, negate)  # (rows, g-1, K)
    return _and_bits(be, slots.permute(1, 0, 2).reshape(g - 1, rows * k)).view(rows, k)


def _pair_winners(be: Any, values: torch.Tensor, m: int, drop: int) -> torch.Tensor:
    """``(rows, 2K)`` shares -> 0/1 binary shares ``(rows, K)`` of ``x[2i] >= x[2i+1]``, judged
    on the values' top bits: each party drops the low ``drop`` bits of its share of the
    difference, so a difference in ``[0, P * 2**drop)`` may be judged negative (the loser is
    then within that of the winner); differences outside it are judged exactly."""
    rows = values.shape[0]
    diff = (values[:, 0::2] - values[:, 1::2]).flatten()
    width = m
    if drop:
        diff = diff >> drop  # per share: the sum is (d >> drop) - c, 0 <= c < P
        width = m - drop + 1
    offset = torch.tensor(-(1 << 63) if width == 64 else 1 << (width - 1), dtype=torch.int64)
    return _sign_bits(be, diff + _public(be, offset), width, 0).view(rows, -1)


def _max_circuit(be: Any, values: torch.Tensor, m: int, drop: int) -> torch.Tensor:
    """Shares ``(rows, 1)`` of one of the row's values within ``levels * P * 2**drop`` of its
    maximum (the maximum itself when ``drop = 0``): a knock-out tournament of pairs."""
    current = values
    while current.shape[1] > 1:
        rows, k = current.shape
        odd = k % 2
        pairs = current[:, :k - odd]
        won = _pair_winners(be, pairs, m, drop).flatten()  # x[2i] >= x[2i+1]
        # winner = second + won * (first - second): one bit product per pair
        first, second = pairs[:, 0::2].flatten(), pairs[:, 1::2].flatten()
        chosen = second + be.bit_mul(won, first - second)
        current = torch.cat([chosen.view(rows, -1), current[:, k - odd:]], dim=1)
    return current


def _select(be: Any, won: torch.Tensor, values: torch.Tensor, g: int) -> torch.Tensor:
    """Sum over each group of ``won * value`` (the group winner's value), on arithmetic shares.

    One bit product per entry (:meth:`_Mpc.bit_mul`: a masked bit and a masked value)."""
    rows, k = values.shape
    chosen = be.bit_mul(won.flatten(), values.flatten())
    groups = -(-k // g)
    padded = torch.zeros(rows, groups * g, dtype=torch.int64)
    padded[:, :k] = chosen.view(rows, k)
    return padded.view(rows, groups, g).sum(dim=2)


def _argmax_circuit(be: Any, values: torch.Tensor, m: int, t: int, g: int) -> torch.Tensor:
    """0/1 binary shares ``(rows, C)`` of the one-hot argmax (lowest index among equals)."""
    rows, classes = values.shape
    level_wins = []
    k, current = classes, values
    while True:
        won = _group_winners(be, current, g, m, t)
        level_wins.append(won)
        if k <= g:
            break
        current = _select(be, won, current, g)
        k = current.shape[1]
    if len(level_wins) == 1:
        return level_wins[0]
    ancestors = [torch.arange(classes) // (g ** level) for level in range(len(level_wins))]
    stacked = torch.stack([w[:, anc].flatten() for w, anc in zip(level_wins, ancestors)])
    return _and_bits(be, stacked).view(rows, classes)


def _index_bits(one_hot: torch.Tensor) -> torch.Tensor:
    """Binary shares of the index bits of a one-hot row (local: XOR of the set positions)."""
    classes = one_hot.shape[-1]
    nbits = max(1, (classes - 1).bit_length())
    codes = torch.arange(classes, dtype=torch.int64)
    out = []
    for j in range(nbits):
        mask = ((codes >> j) & 1).bool()
        out.append(_xor_columns(one_hot[:, mask]))
    return torch.stack(out, dim=1)


def _xor_columns(bits: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(bits.shape[0], dtype=torch.int64)
    for j in range(bits.shape[1]):
        acc ^= bits[:, j]
    return acc


# ---------------------------------------------------------------------------------------
# Cost model and plans
# ---------------------------------------------------------------------------------------
def _adder_layers(parties: int) -> int:
    layers, ops = 0, parties
    while ops > 2:
        ops = 2 * (ops // 3) + ops % 3
        layers += 1
    return layers


def _full_adders(parties: int) -> int:
    count, ops = 0, parties
    while ops > 2:
        count += ops // 3
        ops = 2 * (ops // 3) + ops % 3
    return count


def _ceil_log2(x: int) -> int:
    return max(0, (x - 1).bit_length())


@dataclass(frozen=True)
class ArgmaxPlan:
    """A schedule and its estimated per-party cost (CrypTen's counting: collectives, bytes)."""

    group_size: int
    levels: int
    rounds: int
    bytes_sent: float
    dealer_requests: int
    est_time_s: float


def _estimate(rows: int, classes: int, m: int, t: int, parties: int, g: int,
              net: NetworkProfile, outputs: int) -> ArgmaxPlan:
    rounds, and_bits, opened_words = 0, 0.0, 0.0
    span = m - 1
    cmp_rounds = (1 if t else 0) + _adder_layers(parties) + 1 + _ceil_log2(span)
    cmp_ands = _full_adders(parties) * span + span + 2 * max(0, span - 1)
    k, levels, selects = classes, 0, 0
    while True:
        levels += 1
        sizes = [min(g, k - s) for s in range(0, k, g)]
        pairs = sum(s * (s - 1) // 2 for s in sizes)
        n = rows * pairs
        rounds += cmp_rounds + _ceil_log2(g - 1)
        and_bits += n * cmp_ands + rows * k * max(0, g - 2)
        if t:
            opened_words += n / (64 // (parties.bit_length() + 2))
        if k <= g:
            break
        rounds += 2
        opened_words += rows * k + rows * k / 64
        selects += rows * k
        k = len(sizes)
    if levels > 1:
        rounds += _ceil_log2(levels)
        and_bits += rows * classes * (levels - 1)
    rounds += 1  # B2A of the outputs
    opened_words += rows * outputs / 64 + 2 * and_bits / 64
    bytes_sent = 16.0 * opened_words
    requests = 2 + (1 if selects else 0)
    time = rounds * net.latency_s + bytes_sent / net.bandwidth_bytes_s
    return ArgmaxPlan(g, levels, rounds, bytes_sent, requests, time)


#: The largest number of pairwise comparisons one level may hold (memory: ~80 bytes each).
MAX_PAIRS_PER_LEVEL = 1 << 22


def choose_group_size(rows: int, classes: int, m: int, t: int, parties: int,
                      net: NetworkProfile = LAN, *, outputs: int | None = None) -> ArgmaxPlan:
    """The group size with the lowest estimated time on ``net`` (ties: fewer rounds)."""
    outputs = classes if outputs is None else outputs
    best = None
    for g in range(2, classes + 1):
        pairs_first = rows * sum(min(g, classes - s) * (min(g, classes - s) - 1) // 2
                                 for s in range(0, classes, g))
        if pairs_first > MAX_PAIRS_PER_LEVEL and g > 2:
            continue
        plan = _estimate(rows, classes, m, t, parties, g, net, outputs)
        if best is None or (plan.est_time_s, plan.rounds) < (best.est_time_s, best.rounds):
            best = plan
    if best is None:  # classes < 2: nothing to compare
        raise ValueError(f"an argmax needs at least 2 classes, got {classes}")
    return best


def plan_argmax(rows: int, classes: int, value_range: ValueRange | None, parties: int,
                net: NetworkProfile = LAN, *, group_size: int | None = None,
                outputs: int | None = None) -> tuple[int, int, ArgmaxPlan]:
    """``(m, t, plan)`` for an argmax over ``classes`` values of ``value_range``."""
    m, t = value_range.comparison_bits() if value_range is not None else (64, 0)
    if group_size is not None:
        g = max(2, min(group_size, classes))
        return m, t, _estimate(rows, classes, m, t, parties, g, net,
                               classes if outputs is None else outputs)
    return m, t, choose_group_size(rows, classes, m, t, parties, net, outputs=outputs)


# ---------------------------------------------------------------------------------------
# Entry points on raw shares (the MPCTensor wrappers live in mpc_fi.secure)
# ---------------------------------------------------------------------------------------
#: What each circuit shape needs from the dealer, counted once per shape (oldest dropped first).
_NEEDS_CACHE: dict[tuple, _Needs] = {}
_NEEDS_CACHE_SIZE = 512


def _run(circuit: Any, key: tuple, *args: Any) -> Any:
    """Count the circuit's dealer needs (cached per shape), fetch them once, run it for real."""
    crypten = load_crypten()

    comm = crypten.communicator.get()
    rank, world = comm.get_rank(), comm.get_world_size()
    full_key = (key, world, rank == 0)
    needs = _NEEDS_CACHE.get(full_key)
    if needs is None:
        counter = _Counting(rank, world)
        circuit(counter, *(torch.zeros_like(a) if torch.is_tensor(a) else a for a in args))
        needs = counter.needs
        if len(_NEEDS_CACHE) >= _NEEDS_CACHE_SIZE:
            _NEEDS_CACHE.pop(next(iter(_NEEDS_CACHE)))
        _NEEDS_CACHE[full_key] = needs
    be = _Mpc(needs)
    out = circuit(be, *args)
    if not be.exhausted():  # a bug in the circuit: dry run and real run must match exactly
        raise RuntimeError("compare: dealer material not consumed as planned")
    return out


def argmax_circuit(classes: int, m: int, t: int, g: int, outputs: str = "one_hot") -> Any:
    """The argmax circuit as a function ``(backend, shares (rows, C)) -> integer shares``.

    ``outputs="one_hot"``: ``(rows, C)`` shares of 0/1; ``"index"``: ``(rows,)`` shares of the
    index. Exposed so that tests can run it on a simulated backend.
    """
    if outputs not in ("one_hot", "index"):
        raise ValueError(f"outputs must be 'one_hot' or 'index', got {outputs!r}")

    def circuit(be: Any, values: torch.Tensor) -> torch.Tensor:
        rows = values.shape[0]
        one_hot = _argmax_circuit(be, values, m, t, g)
        if outputs == "one_hot":
            return _b2a(be, one_hot.flatten()).view(rows, classes)
        bits = _index_bits(one_hot)  # (rows, nbits)
        arith = _b2a(be, bits.flatten()).view(rows, -1)
        weights = 1 << torch.arange(bits.shape[1], dtype=torch.int64)
        return (arith * weights).sum(dim=1)

    return circuit


def argmax_bits(shares: torch.Tensor, value_range: ValueRange | None, *,
                net: NetworkProfile = LAN, group_size: int | None = None,
                outputs: str = "one_hot") -> torch.Tensor:
    """Integer arithmetic shares of the argmax of ``shares`` (``(rows, C)`` raw int64 shares).

    ``outputs="one_hot"``: ``(rows, C)`` shares of 0/1; ``"index"``: ``(rows,)`` shares of the
    index. Ties go to the lowest index. Collective: every computing party calls it alike.
    """
    crypten = load_crypten()

    rows, classes = shares.shape
    world = crypten.communicator.get().get_world_size()
    nout = classes if outputs == "one_hot" else max(1, (classes - 1).bit_length())
    m, t, plan = plan_argmax(rows, classes, value_range, world, net, group_size=group_size,
                             outputs=nout)
    circuit = argmax_circuit(classes, m, t, plan.group_size, outputs)
    return _run(circuit, ("argmax", rows, classes, m, t, plan.group_size, outputs), shares)


def argmax_one_hot_shares(shares: torch.Tensor, value_range: ValueRange | None, **kw: Any
                          ) -> torch.Tensor:
    return argmax_bits(shares, value_range, outputs="one_hot", **kw)


def argmax_index_shares(shares: torch.Tensor, value_range: ValueRange | None, **kw: Any
                        ) -> torch.Tensor:
    return argmax_bits(shares, value_range, outputs="index", **kw)


def max_circuit(m: int, drop: int) -> Any:
    """The tournament maximum as a function ``(backend, shares (rows, C)) -> shares (rows, 1)``."""

    def circuit(be: Any, values: torch.Tensor) -> torch.Tensor:
        return _max_circuit(be, values, m, drop)

    return circuit


def _width_and_drop(value_range: ValueRange | None, slack_bits: int) -> tuple[int, int]:
    """``(m, drop)`` for comparisons of values in ``value_range`` that may drop up to
    ``slack_bits`` low bits: as many as leave room for the parties' carries (none at 64 bits)."""
    if value_range is None:
        return 64, 0
    m = ValueRange(value_range.lo, value_range.hi).comparison_bits()[0]
    if m == 64 or not slack_bits:
        return m, 0
    world = load_crypten().communicator.get().get_world_size()
    return m, max(0, min(slack_bits, m - 2 - world.bit_length()))


def approximate_max_shares(shares: torch.Tensor, value_range: ValueRange | None, *,
                           slack_bits: int = 0) -> torch.Tensor:
    """Shares ``(rows, 1)`` of a value of each row of ``shares`` (``(rows, C)``) at most
    ``ceil(log2 C) * P * 2**slack_bits`` below the row's maximum (encoded units): a pair
    tournament whose comparisons drop ``slack_bits`` low bits (``slack_bits=0``: the maximum,
    exactly). The result is always one of the row's values. Collective."""
    m, drop = _width_and_drop(value_range, slack_bits)
    rows, classes = shares.shape
    return _run(max_circuit(m, drop), ("max", rows, classes, m, drop), shares)


def relu_circuit(m: int, drop: int = 0) -> Any:
    """``max(x, 0)`` as a function ``(backend, shares of x) -> shares`` (any shape): the sign
    bit on ``m`` bits (see :func:`_pair_winners` for ``drop``), times ``x`` by one bit product."""

    def circuit(be: Any, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten()
        pairs = torch.stack([flat, torch.zeros_like(flat)], dim=1)
        bits = _pair_winners(be, pairs, m, drop).flatten()
        return be.bit_mul(bits, flat).view(x.shape)

    return circuit


def relu_shares(shares: torch.Tensor, value_range: ValueRange | None = None, *,
                slack_bits: int = 0) -> torch.Tensor:
    """Integer shares of ``max(x, 0)`` for raw shares ``x`` (any shape, any scale).

    With ``value_range``, ``x`` lies in ``[-(hi - lo), hi - lo]``. ``slack_bits``: the parties
    may drop that many low bits of their shares, and an ``x`` in ``[0, P * 2**slack_bits)`` may
    come out as 0; every other ``x`` exactly."""
    m, drop = _width_and_drop(value_range, slack_bits)
    return _run(relu_circuit(m, drop), ("relu", tuple(shares.shape), m, drop), shares)


def ge_zero_circuit(m: int, t: int) -> Any:
    """``[x >= 0]`` as a function ``(backend, shares of x) -> integer shares`` (any shape)."""

    def circuit(be: Any, x: torch.Tensor) -> torch.Tensor:
        offset = torch.tensor(-(1 << 63) if m == 64 else 1 << (m - 1 + t), dtype=torch.int64)
        bits = _sign_bits(be, x.flatten() + _public(be, offset), m, t)
        return _b2a(be, bits).view(x.shape)

    return circuit


def ge_zero_shares(shares: torch.Tensor, value_range: ValueRange | None = None) -> torch.Tensor:
    """Integer arithmetic shares of ``[x >= 0]`` for raw shares ``x`` (any shape).

    With ``value_range``, ``x`` must lie in ``[-(hi - lo), hi - lo]`` (a difference of two values
    of the range) and be a multiple of ``2**zero_low_bits``.
    """
    m, t = value_range.comparison_bits() if value_range is not None else (64, 0)
    return _run(ge_zero_circuit(m, t), ("ge0", tuple(shares.shape), m, t), shares)


# ---------------------------------------------------------------------------------------
# CrypTen's comparison primitive, replaced by an output-identical cheaper one
# ---------------------------------------------------------------------------------------
_CRYPTEN_LTZ: Any = None
_CRYPTEN_RELU: Any = None
#: The public bounds of :func:`bounded` in force (magnitudes in real units), or None.
_BOUND: float | None = None
_RELU_BOUND: float | None = None


@contextlib.contextmanager
def bounded(limit: float | None, relu_limit: float | None = None) -> Iterator[None]:
    """Inside the block, every value CrypTen compares with zero (a ReLU's input, a difference
    inside ``max`` or max pooling, a clamp's argument) has magnitude at most ``limit`` (public,
    real units), and a ReLU's input at most ``relu_limit`` (default: ``limit``): the
    comparisons carry only the bits those bounds need. Every party must use the same limits;
    a value outside them gives a wrong comparison, never an error. ``None``: full 64-bit
    comparisons."""
    global _BOUND, _RELU_BOUND
    saved = _BOUND, _RELU_BOUND
    _BOUND, _RELU_BOUND = limit, (relu_limit if limit is not None else None)
    try:
        yield
    finally:
        _BOUND, _RELU_BOUND = saved


def _as_range(limit: float | None, scale: int) -> ValueRange | None:
    if limit is None:
        return None
    top = math.ceil(limit * scale)
    return ValueRange(0, top) if top < 1 << 61 else None


def bound_range(scale: int) -> ValueRange | None:
    """The :func:`bounded` limit in force as a range of values encoded at ``scale`` (None
    outside a block): differences of two such values lie within ``±limit``."""
    return _as_range(_BOUND, scale)


def relu_bound_range(scale: int) -> ValueRange | None:
    """The range of a ReLU's input inside :func:`bounded` (see :func:`bound_range`)."""
    return _as_range(_RELU_BOUND if _RELU_BOUND is not None else _BOUND, scale)


def _ltz(self: Any) -> Any:
    """``[x < 0]`` for an ``MPCTensor``, as CrypTen's ``MPCTensor._ltz`` returns it.

    Same function (the top bit of the sum of the 64-bit shares), same output encoding
    (arithmetic shares of 0/1 at scale 1), computed with the carry-save circuit of this module,
    on the bits a :func:`bounded` limit leaves (all 64 outside one).
    """
    crypten = load_crypten()

    x = self if self.ptype == crypten.mpc.arithmetic else self.to(crypten.mpc.arithmetic)
    non_negative = ge_zero_shares(x.share, bound_range(int(x.encoder.scale)))
    rank = crypten.communicator.get().get_rank()
    below = (1 if rank == 0 else 0) - non_negative
    return crypten.mpc.MPCTensor.from_shares(below, precision=0)


def _relu(self: Any) -> Any:
    """``MPCTensor.relu``: CrypTen's ``x * (x >= 0)`` with the comparison of :func:`_ltz` and
    the product as one bit product (:meth:`_Mpc.bit_mul`): one masked value per element
    instead of a Beaver multiplication's two."""
    crypten = load_crypten()

    x = self if self.ptype == crypten.mpc.arithmetic else self.to(crypten.mpc.arithmetic)
    out = relu_shares(x.share, relu_bound_range(int(x.encoder.scale)))
    return crypten.mpc.MPCTensor.from_shares(out, precision=x.encoder.scale.bit_length() - 1)


def _b2a_mul_rng(self: Any, size: Any, device: Any = None) -> tuple[Any, Any, Any, Any]:
    """``TrustedThirdParty.B2A_mul_rng``: shares of a random bit ``r`` (arithmetic, binary), a
    mask ``a`` and ``a * r``. Every party draws its ``r`` and ``a`` shares from its dealer
    stream; party 0 gets its shares of ``r`` and ``a * r`` from the dealer, the others draw
    them (the layout of CrypTen's ``B2A_rng``, with the mask and product after the bit)."""
    crypten = load_crypten()
    ttp = crypten.mpc.provider.ttp_provider
    rng = crypten.common.rng
    arith = crypten.mpc.primitives.ArithmeticSharedTensor
    gen = ttp.TTPClient.get().get_generator(device=device)
    r_b = rng.generate_kbit_random_tensor(size, bitlength=1, generator=gen, device=device)
    a = rng.generate_random_ring_element(size, generator=gen, device=device)
    if crypten.communicator.get().get_rank() == 0:
        both = ttp.TTPClient.get().ttp_request("B2A_mul", device, size)
        r_a, ar = both[0], both[1]
    else:
        r_a = rng.generate_random_ring_element(size, generator=gen, device=device)
        ar = rng.generate_random_ring_element(size, generator=gen, device=device)
    return (arith.from_shares(r_a, precision=0),
            crypten.mpc.primitives.BinarySharedTensor.from_shares(r_b),
            arith.from_shares(a, precision=0), arith.from_shares(ar, precision=0))


def _b2a_mul_server(self: Any, size: Any) -> torch.Tensor:
    """``TTPServer.B2A_mul``: party 0's shares of ``r`` and ``a * r``, stacked (what a
    prefetched package holds for an entry party 0 holds)."""
    from .prefetch import holder_share  # noqa: PLC0415 - prefetch needs the dealer wire

    return holder_share(self, "B2A_mul", (tuple(size),), {}, 0)


def _b2a_mul_tfp(self: Any, size: Any, device: Any = None) -> tuple[Any, Any, Any, Any]:
    """``TrustedFirstParty.B2A_mul_rng``: party 0 makes the bit, mask and product and shares
    them (the insecure development dealer, like CrypTen's other TFP functions)."""
    crypten = load_crypten()
    rng = crypten.common.rng
    prim = crypten.mpc.primitives
    r = rng.generate_kbit_random_tensor(size, bitlength=1, device=device)
    a = rng.generate_random_ring_element(size, device=device)
    return (prim.ArithmeticSharedTensor(r, precision=0, src=0), prim.BinarySharedTensor(r, src=0),
            prim.ArithmeticSharedTensor(a, precision=0, src=0),
            prim.ArithmeticSharedTensor(a * r, precision=0, src=0))


def install_fast_comparisons(crypten: Any) -> None:
    """Make every CrypTen comparison of this process (``lt``, ``ge``, ``relu``, ``max``,
    ``argmax``, ``softmax``'s max, pooling, ...) use the carry-save circuit.

    CrypTen routes all of them through ``MPCTensor._ltz``; this replaces that method with
    :func:`_ltz`, which returns the same values (exactly) for ~8x fewer bytes and far fewer
    rounds, and never changes its communication pattern on a local error (CrypTen's A2B retries
    a different circuit after a local out-of-memory error, desynchronising the parties). It
    also replaces ``MPCTensor.relu`` with :func:`_relu` (the same values, one opened value per
    element fewer) and gives CrypTen's TTP and TFP providers and the TTP server the ``B2A_mul``
    material it needs. Every party of a federation, and the dealer, must call it alike: the
    engine does, in :func:`mpc_fi._crypten.configure`. Idempotent;
    :func:`uninstall_fast_comparisons` restores CrypTen's methods.
    """
    global _CRYPTEN_LTZ, _CRYPTEN_RELU
    cls = crypten.mpc.MPCTensor
    if cls.__dict__.get("_ltz") is not _ltz:
        _CRYPTEN_LTZ = cls.__dict__.get("_ltz")
        cls._ltz = _ltz
    if cls.__dict__.get("relu") is not _relu:
        _CRYPTEN_RELU = cls.__dict__.get("relu")
        cls.relu = _relu
    provider = crypten.mpc.provider
    if "B2A_mul_rng" not in provider.ttp_provider.TrustedThirdParty.__dict__:
        provider.ttp_provider.TrustedThirdParty.B2A_mul_rng = _b2a_mul_rng
    provider.ttp_provider.TTPServer.B2A_mul = _b2a_mul_server
    provider.tfp_provider.TrustedFirstParty.B2A_mul_rng = _b2a_mul_tfp


def use_crypten_relu(crypten: Any) -> None:
    """Give ``MPCTensor.relu`` CrypTen's own ``x * (x >= 0)`` back (a baseline that measures
    CrypTen's algorithms on mpc-fi's comparison primitive)."""
    if _CRYPTEN_RELU is not None and crypten.mpc.MPCTensor.__dict__.get("relu") is _relu:
        crypten.mpc.MPCTensor.relu = _CRYPTEN_RELU


def uninstall_fast_comparisons(crypten: Any) -> None:
    if _CRYPTEN_LTZ is not None and crypten.mpc.MPCTensor.__dict__.get("_ltz") is _ltz:
        crypten.mpc.MPCTensor._ltz = _CRYPTEN_LTZ
    if _CRYPTEN_RELU is not None and crypten.mpc.MPCTensor.__dict__.get("relu") is _relu:
        crypten.mpc.MPCTensor.relu = _CRYPTEN_RELU
