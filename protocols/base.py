"""The aggregation-protocol interface.

A protocol says what each owner contributes (from its own logits, locally in ``output`` mode or
on shares in ``full`` mode), how contributions combine on shares, what is revealed and to whom
(always the querier alone), and its plaintext twin. The engine owns the loop and calls the hooks
in order for every batch: ``local_contribution`` (or ``secure_contribution``) at each owner,
``combine`` on the shares, ``to_reveal``, an opening to the querier only, then ``decode`` at the
querier. A protocol only fills the hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from mpc_fi import plain, secure
from mpc_fi.errors import ProtocolError
from mpc_fi.result import Prediction


class Protocol(ABC):
    """Base class of every aggregation protocol.

    Parameters
    ----------
    num_classes, num_owners:
        Agreed at start-up from the owners' public architectures.
    reveal:
        ``"label"`` (default): the querier learns one label per query. ``"scores"``: it learns the
        protocol's aggregate (see :attr:`releases`) and derives the label itself.
    owner_weights:
        Public per-owner weights from the federation (used by weighted protocols).
    precision_bits:
        Fractional bits of CrypTen's fixed-point encoding.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    #: reveal kind -> what exactly the querier learns
    releases: ClassVar[dict[str, str]]
    #: cost profile on shares, in words
    cost: ClassVar[str]

    def __init__(self, *, num_classes: int, num_owners: int, reveal: str = "label",
                 owner_weights: Sequence[float] | None = None, precision_bits: int = 16) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ProtocolError(f"{self.name}: need at least 2 classes, got {num_classes!r}")
        if not isinstance(num_owners, int) or num_owners < 2:
            raise ProtocolError(f"{self.name}: need at least 2 owners, got {num_owners!r}")
        if reveal not in self.releases:
            raise ProtocolError(f"{self.name} cannot reveal {reveal!r}; it can reveal: "
                                + ", ".join(f"{k} ({v})" for k, v in self.releases.items()))
        self.num_classes = num_classes
        self.num_owners = num_owners
        self.reveal = reveal
        self.owner_weights = tuple(float(w) for w in (owner_weights or [1.0] * num_owners))
        if len(self.owner_weights) != num_owners:
            raise ProtocolError(f"{self.name}: {len(self.owner_weights)} weights for "
                                f"{num_owners} owners")
        self.precision_bits = precision_bits

    # -- hooks --------------------------------------------------------------------------
    @abstractmethod
    def local_contribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Owner side, ``output`` mode: the (batch, classes) tensor this owner secret-shares."""

    @abstractmethod
    def secure_contribution(self, logits: Any) -> Any:
        """``full`` mode: the same contribution computed on shared logits."""

    def combine(self, contributions: Sequence[Any]) -> Any:
        """Aggregate the owners' shared contributions (default: their sum; local, no traffic)."""
        total = contributions[0]
        for c in contributions[1:]:
            total = total + c
        return total

    def to_reveal(self, aggregate: Any) -> Any:
        """The one shared tensor opened to the querier."""
        if self.reveal == "label":
            return secure.argmax_index(aggregate, self.num_classes)
        return aggregate

    def decode(self, opened: torch.Tensor) -> Prediction:
        """Turn what the querier opened into a :class:`Prediction`."""
        if self.reveal == "label":
            return Prediction(labels=opened.round().long().numpy())
        scores = self.scores_from_aggregate(opened)
        return Prediction(labels=plain.argmax_lowest(opened).numpy(), scores=scores)

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        """Public post-processing of an opened aggregate into the released scores."""
        return aggregate.numpy()

    @abstractmethod
    def plaintext(self, logits: Sequence[torch.Tensor]) -> Prediction:
        """Plaintext twin from each owner's logits, with the same encoding and tie rule."""

    # -- helpers ------------------------------------------------------------------------
    def validate_contribution(self, contribution: torch.Tensor, batch: int) -> None:
        want = (batch, self.num_classes)
        if tuple(contribution.shape) != want:
            raise ProtocolError(f"{self.name}: contribution of shape {tuple(contribution.shape)}, "
                                f"expected {want}")

    def describe(self) -> str:
        return f"{self.name}: {self.summary} Reveals {self.releases[self.reveal]}, to the querier only."
