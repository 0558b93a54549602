"""Public value ranges of output-mode contributions, so that comparisons carry few bits.

A protocol's output-mode contribution is a public function of an owner's logits
(``local_contribution``), and the aggregate a public combination of the contributions
(``combine``). Both are learnt here from **public probes** at set-up, identically on every
party, without any private data:

* the contribution range: ``local_contribution`` on fixed logits (zeros, spikes, extremes at the
  engine's logit limit, seeded random scales); the extremes, rounded outwards to powers of two,
  and whether every probe gave integers (votes) -- then their fixed-point encodings end in
  ``precision_bits`` zero bits;
* the aggregate: ``combine`` on plaintext tensors must be linear with integer weights (the
  default sum is); anything else gets no range, hence full 64-bit comparisons.

Probes cannot prove a bound for every input, so every owner checks each batch's contribution
against the agreed :class:`ContributionRange` before sharing it (:meth:`ContributionRange.problem`),
and a violation stops every party through the engine's per-batch status exchange: an unexpected
value can stop a run, never produce a wrong comparison. A protocol may also state its range
itself with an ``aggregate_range(num_owners, precision_bits)`` method returning a
:class:`~mpc_fi.compare.ValueRange` (or None); then no probing happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import wire
from .compare import VALUE_RANGE_WIRE, ValueRange


@dataclass(frozen=True)
class ContributionRange:
    """What every owner's contribution must satisfy (real units) for the agreed aggregate range."""

    lo: float
    hi: float
    integer: bool

    def problem(self, contribution: torch.Tensor) -> str | None:
        """Why ``contribution`` breaks the range (a message for the status exchange), or None."""
        c = contribution.to(torch.float64)
        if not torch.isfinite(c).all():
            return "contribution holds NaN or inf"
        if c.numel() and (c.min() < self.lo or c.max() > self.hi):
            return (f"contribution values in [{c.min().item():.6g}, {c.max().item():.6g}] leave "
                    f"the range [{self.lo:g}, {self.hi:g}] agreed at set-up for exact few-bit "
                    "comparisons; give the protocol an aggregate_range() method")
        if self.integer and not torch.equal(c, c.round()):
            return ("contribution is not integer-valued although set-up agreed it is (votes); "
                    "give the protocol an aggregate_range() method")
        return None

    def to_wire(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "integer": self.integer}

    @staticmethod
    def from_wire(value: Any) -> "ContributionRange":
        """A range a peer sent, checked (:data:`CONTRIBUTION_RANGE_WIRE`)."""
        return CONTRIBUTION_RANGE_WIRE.check(value)


def _ordered(d: dict[str, Any]) -> ContributionRange:
    if d["hi"] < d["lo"]:
        raise ValueError(f"empty range: hi={d['hi']} < lo={d['lo']}")
    return ContributionRange(d["lo"], d["hi"], d["integer"])


#: A :class:`ContributionRange` on the wire: finite bounds, ``lo <= hi``.
CONTRIBUTION_RANGE_WIRE = wire.Convert(
    wire.Record({"lo": wire.Float(), "hi": wire.Float(), "integer": wire.Bool()}), _ordered)
#: What every party publishes of :func:`aggregate_range` so that all use the same circuit.
AGGREGATE_RANGE_WIRE = wire.Tuple(wire.Optional(VALUE_RANGE_WIRE),
                                  wire.Optional(CONTRIBUTION_RANGE_WIRE))


def _probe_logits(num_classes: int, limit: float) -> list[torch.Tensor]:
    # Public probes, masking nothing: a fixed seed, so that every party derives the same range
    # and picks the same comparison circuit. Secrets never come from torch's generators.
    gen = torch.Generator().manual_seed(20240611)
    probes = [torch.zeros(2, num_classes, dtype=torch.float64),
              torch.full((2, num_classes), limit, dtype=torch.float64),
              torch.full((2, num_classes), -limit, dtype=torch.float64)]
    spike = torch.full((num_classes, num_classes), -limit, dtype=torch.float64)
    spike.fill_diagonal_(limit)
    probes += [spike, -spike, torch.eye(num_classes, dtype=torch.float64)]
    for scale in (1e-3, 1.0, 10.0, 100.0, 1e3, limit):
        probes.append((torch.randn(16, num_classes, generator=gen, dtype=torch.float64) * scale)
                      .clamp(-limit, limit))
    return probes


def _outward_power_of_two(value: float) -> float:
    """0 stays 0; otherwise the power of two at least as far from 0 (same sign)."""
    if value == 0:
        return 0.0
    return math.copysign(2.0 ** math.ceil(math.log2(abs(value))), value)


def contribution_range(protocol: Any, num_classes: int, *, logit_limit: float
                       ) -> ContributionRange | None:
    """Range of ``protocol.local_contribution`` over public probe logits, or None if unusable."""
    lo, hi, integer = math.inf, -math.inf, True
    try:
        for logits in _probe_logits(num_classes, logit_limit):
            c = torch.as_tensor(protocol.local_contribution(logits)).to(torch.float64)
            if not torch.isfinite(c).all():
                return None
            lo, hi = min(lo, c.min().item()), max(hi, c.max().item())
            integer = integer and torch.equal(c, c.round())
    except Exception:  # noqa: BLE001 - a protocol that cannot be probed just gets no range
        return None
    lo, hi = _outward_power_of_two(min(lo, 0.0)), _outward_power_of_two(max(hi, 0.0))
    return ContributionRange(lo, hi, integer)


def _integer_weights(protocol: Any, num_owners: int, num_classes: int) -> list[int] | None:
    """The weights of ``combine`` if it is linear with integer weights on plaintext tensors."""
    def combined(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.as_tensor(protocol.combine(parts)).to(torch.float64)

    try:
        zeros = torch.zeros(3, num_classes, dtype=torch.float64)
        weights = []
        for k in range(num_owners):
            out = combined([torch.ones_like(zeros) if i == k else zeros for i in range(num_owners)])
            w = out.flatten()[0].item()
            if out.shape != zeros.shape or not torch.all(out == w) or w != round(w):
                return None
            weights.append(int(round(w)))
        gen = torch.Generator().manual_seed(7)  # public test values (see _probe_logits)
        parts = [torch.randint(-50, 50, zeros.shape, generator=gen).to(torch.float64)
                 for _ in range(num_owners)]
        if not torch.equal(combined(parts), sum(w * p for w, p in zip(weights, parts))):
            return None
        return weights
    except Exception:  # noqa: BLE001 - a combine that only works on shares: no range
        return None


def aggregate_range(protocol: Any, *, num_owners: int, num_classes: int, precision_bits: int,
                    logit_limit: float) -> tuple[ValueRange | None, ContributionRange | None]:
    """``(range of the encoded aggregate, what each owner checks)``; ``(None, None)`` if unknown."""
    declared = getattr(protocol, "aggregate_range", None)
    if callable(declared):
        try:
            return declared(num_owners, precision_bits), None
        except Exception:  # noqa: BLE001 - a failing declaration just gives no range
            return None, None
    contrib = contribution_range(protocol, num_classes, logit_limit=logit_limit)
    weights = _integer_weights(protocol, num_owners, num_classes) if contrib else None
    if contrib is None or weights is None:
        return None, None
    scale = 1 << precision_bits
    lo_enc, hi_enc = int(contrib.lo * scale), int(contrib.hi * scale)
    zero_bits = precision_bits if contrib.integer else 0
    return _weighted_sum_range(weights, lo_enc, hi_enc, zero_bits), contrib


def _weighted_sum_range(weights: list[int], lo_enc: int, hi_enc: int, zero_bits: int
                        ) -> ValueRange:
    """The range of ``sum(w * c)`` for contributions ``c`` encoded in ``[lo_enc, hi_enc]``."""
    lo = sum(min(w * lo_enc, w * hi_enc) for w in weights)
    hi = sum(max(w * lo_enc, w * hi_enc) for w in weights)
    return ValueRange(lo, hi, zero_bits)


def _defined_in(cls: type, name: str) -> type | None:
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


def states_secure_range(protocol: Any) -> bool:
    """Whether ``protocol`` vouches for what its ``secure_contribution`` computes: it defines
    ``full_mode_contribution_range`` in the same class (then its comparisons on an owner's
    logits may use the federation's activation bound too)."""
    cls = type(protocol)
    return getattr(protocol, "full_mode_contribution_range", None) is not None \
        and _defined_in(cls, "full_mode_contribution_range") is _defined_in(
            cls, "secure_contribution")


def full_mode_aggregate_range(protocol: Any, *, num_owners: int, num_classes: int,
                              precision_bits: int, activation_bound: float | None
                              ) -> ValueRange | None:
    """The range of a full-mode aggregate, or None (64-bit comparisons).

    Contributions computed on shares cannot be checked by anyone, so probes are not enough: the
    protocol states the range of its ``secure_contribution`` by construction, with
    ``full_mode_contribution_range(activation_bound) -> ContributionRange | None``, defined in
    the class that defines its ``secure_contribution`` (a subclass that computes something else
    inherits no range). The stated range is then widened by a quarter of its width on each side
    (the fixed-point error of a softmax on shares, about 1e-3, is far below that; logits stay
    within the bound each owner checked, up to rounding), and no low bits are assumed
    zero unless the contribution is an exact integer.
    """
    if not states_secure_range(protocol):
        return None
    try:
        contrib = protocol.full_mode_contribution_range(activation_bound)
    except Exception:  # noqa: BLE001 - a failing statement just gives no range
        return None
    weights = _integer_weights(protocol, num_owners, num_classes) if contrib else None
    if contrib is None or weights is None:
        return None
    scale = 1 << precision_bits
    margin = 0 if contrib.integer else (contrib.hi - contrib.lo) / 4
    lo_enc = math.floor((contrib.lo - margin) * scale)
    hi_enc = math.ceil((contrib.hi + margin) * scale)
    found = _weighted_sum_range(weights, lo_enc, hi_enc, precision_bits if contrib.integer else 0)
    return None if max(abs(found.lo), abs(found.hi)) >= 1 << 60 else found
