"""Confident release: the label only when the ensemble agrees enough, else an abstention."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any



from . import plain_ops
from .base import VoteWrapper

BASES = ("votes", "probability")


@dataclass(frozen=True)
class ConfidentVoteParams:
    threshold: float = field(metadata={"what": "a vote count in (0, number of owners], or an "
                                               "averaged probability in (0, 1]"})
    basis: str = "votes"  # votes | probability

    def check(self, protocol: Any, *, num_owners: int) -> None:
        if self.basis not in BASES:
            raise protocol.param_error("basis", f"must be one of {', '.join(BASES)}, got "
                                                f"{self.basis!r}")
        high = float(num_owners) if self.basis == "votes" else 1.0
        t = self.threshold
        if t is None:
            raise protocol.param_error("threshold", f"missing (a number in (0, {high:g}])")
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) \
                or not 0 < t <= high:
            what = "a vote count" if self.basis == "votes" else "an averaged probability"
            raise protocol.param_error("threshold", f"with basis {self.basis!r} it is {what} in "
                                                    f"(0, {high:g}], got {t!r}")


class ConfidentVote(VoteWrapper):
    """Reveal the plurality label only if its support reaches ``threshold``; else abstain (-1).

    ``basis: votes`` (default) wraps :class:`~protocols.hard_vote.HardVote`: the top class must
    hold at least ``threshold`` votes (``0 < threshold <= N``). ``basis: probability`` wraps
    :class:`~protocols.soft_vote.SoftVote`: the top class's averaged probability must be at least
    ``threshold`` (``0 < threshold <= 1``). The threshold test is a comparison on shares, exact
    on the integer encodings (the threshold is rounded up to a whole fixed-point unit,
    :func:`protocols.plain_ops.threshold_units`); the opened value is ``label`` or ``-1``
    (:data:`mpc_fi.result.ABSTAIN`), so an abstention reveals nothing about the label, and an
    answer reveals nothing about the margin. Tie rule: the lowest class index among equal tops.
    """

    name = "confident_vote"
    summary = ("reveal the plurality label only if its vote count (or averaged probability) "
               "reaches a threshold, else abstain (-1).")
    releases = {"label": "the top label if its support reaches the threshold, else -1 (abstain); "
                         "nothing about counts or probabilities"}
    cost = ("one argmax over C + C comparisons (one layer) + one multiplication; "
            "full mode: + the wrapped vote's per-owner argmax (votes) or softmax (probability)")

    Params = ConfidentVoteParams
    inner_choices = ("hard_vote", "soft_vote")

    def __init__(self, *, threshold: float | None = None, basis: str = "votes",
                 **common: Any) -> None:
        self.parse_params({"threshold": threshold, "basis": basis},
                          num_owners=common.get("num_owners", 0))
        super().__init__(inner="hard_vote" if basis == "votes" else "soft_vote", **common)
        self.basis = basis
        self.threshold = float(threshold)
        # the aggregate is a count (votes) or a sum of N probabilities (probability)
        per = 1 if basis == "votes" else self.num_owners
        self.threshold_units = plain_ops.threshold_units(threshold, per=per,
                                                         precision_bits=self.precision_bits)

    def release(self, ops: Any, aggregate: Any) -> Any:
        # The winner passes iff its own entry reaches the threshold, i.e. iff the maximum does.
        one_hot = ops.argmax_one_hot(aggregate, self.num_classes)
        passed = ops.above(aggregate, self.threshold_units)
        return ops.gated_label(one_hot, passed, self.num_classes)
