"""The aggregation-protocol interface.

A protocol says what each owner contributes (from its own logits, locally in ``output`` mode or
on shares in ``full`` mode), how contributions combine on shares, what is revealed and to whom
(always the querier alone), and its plaintext twin. The engine owns the loop and calls the hooks
in order for every batch: ``local_contribution`` (or ``secure_contribution``) at each owner,
``combine`` on the shares, ``to_reveal``, an opening to the querier only, then ``decode`` at the
querier. A protocol only fills the hooks.

Two optional parts of the interface:

* :attr:`Protocol.contribution_width` — how many columns each owner shares per query (one per
  class by default; a protocol that also shares a per-owner scalar, such as an entropy weight,
  widens it). The engine sizes the other parties' placeholders with it.
* :attr:`Protocol.row_elements` — per query, the size of the largest tensor a step on shares
  works on; the engine sizes batches to the parties' memory with it.
* :meth:`Protocol.privacy_cost` — a differentially private protocol prices a batch of queries
  with :mod:`mpc_fi.privacy`; the :class:`~mpc_fi.Federation` checks the querier's budget with it
  before any party starts and charges it after the run. Other protocols return ``None``.

:class:`VoteWrapper` is the base of protocols that reuse another protocol's contributions and
aggregate and change only what is revealed (a threshold, noise): privacy as a wrapper.
:class:`JointNoiseVote` adds the joint Gaussian noise of the GNMax family.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mpc_fi import plain
from mpc_fi.errors import ConfigError, ProtocolError
from mpc_fi.result import Prediction

from . import plain_ops, secure_ops
from .noise import NoiseSource, SystemNoise
from .ops import Ops, PlainOps, SecureOps

if TYPE_CHECKING:  # dp-accounting and scipy load only with a differentially private protocol
    from mpc_fi.privacy import QueryCost


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A protocol's own parameters: none. Protocols that take some declare a frozen dataclass
    like this one as ``Params``, whose :meth:`check` refuses a bad value (naming
    ``protocol.<name>``) without knowing the class count: the federation checks them when it
    loads, before any party starts (:func:`mpc_fi.plugins.check_protocol_params`)."""

    def check(self, protocol: type["Protocol"], *, num_owners: int) -> None:
        """Raise ``protocol.param_error(...)`` for a value out of its range."""


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
    #: True when the release is differentially private (the protocol prices it, see
    #: :meth:`privacy_cost`)
    differentially_private: ClassVar[bool] = False
    #: the protocol's own parameters (a frozen dataclass; see :class:`NoParams`)
    Params: ClassVar[type] = NoParams

    @classmethod
    def parse_params(cls, params: Mapping[str, Any], *, num_owners: int) -> Any:
        """The federation's ``protocol`` parameters as this protocol's :attr:`Params`.

        An unknown name is a :class:`~mpc_fi.errors.ConfigError` naming ``protocol.<name>``; a
        missing or out-of-range value a :class:`~mpc_fi.errors.ProtocolError` naming it. Checks
        that need the class count happen when the protocol is built, at start-up.
        """
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        for key in params:
            if key not in fields:
                raise ConfigError(f"unknown parameter; {cls.name} takes "
                                  f"{', '.join(fields) or 'none'}", key=f"protocol.{key}")
        for name, f in fields.items():
            if name not in params and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                what = f.metadata.get("what")
                raise cls.param_error(name, "missing" + (f" ({what})" if what else ""))
        parsed = cls.Params(**params)
        parsed.check(cls, num_owners=num_owners)
        return parsed

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

    # -- shape of a contribution ---------------------------------------------------------
    @property
    def contribution_width(self) -> int:
        """Columns of the ``(batch, width)`` tensor each owner shares (default: one per class)."""
        return self.num_classes

    @property
    def row_elements(self) -> int:
        """Per query, elements of the largest shared tensor one step of this protocol works on.

        The engine sizes batches to memory with it (:mod:`mpc_fi.memory`). Default: the owners'
        stacked contributions, which an argmax over the aggregate never exceeds.
        """
        return self.num_owners * self.contribution_width

    # -- differential privacy -----------------------------------------------------------
    @classmethod
    def privacy_cost(cls, *, params: Mapping[str, Any], num_owners: int, queries: int,
                     answered: int | None = None) -> QueryCost | None:
        """Privacy cost of answering ``queries`` queries, or ``None`` if the release is not DP.

        Called before any party starts (``answered=None``: the worst case) and after a run with
        the number of queries that were answered (not abstained). ``params`` are the federation's
        protocol parameters; the class count is not known yet at that point, so a DP protocol's
        cost must not depend on it.
        """
        return None

    # -- hooks --------------------------------------------------------------------------
    @abstractmethod
    def local_contribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Owner side, ``output`` mode: the ``(batch, contribution_width)`` tensor it shares."""

    @abstractmethod
    def secure_contribution(self, logits: Any) -> Any:
        """``full`` mode: the same contribution computed on shared logits."""

    def combine(self, contributions: Sequence[Any]) -> Any:
        """Aggregate the owners' shared contributions (default: their sum; local, no traffic)."""
        total = contributions[0]
        for c in contributions[1:]:
            total = total + c
        return total

    def release(self, ops: Ops, aggregate: Any) -> Any:
        """What is opened to the querier, written once against ``ops``.

        On :class:`~protocols.ops.SecureOps` it runs on the shared aggregate (:meth:`to_reveal`);
        on :class:`~protocols.ops.PlainOps` on the plaintext aggregate (:meth:`plaintext`).
        Default: the label (argmax, lowest index on ties) or the aggregate itself.
        """
        if self.reveal == "label":
            return ops.argmax_index(aggregate, self.num_classes)
        return aggregate

    def to_reveal(self, aggregate: Any) -> Any:
        """The one shared tensor opened to the querier: :meth:`release` on shares."""
        return self.release(SecureOps(precision_bits=self.precision_bits,
                                      noise_source=getattr(self, "noise_source", None)),
                            aggregate)

    def decode(self, opened: torch.Tensor) -> Prediction:
        """Turn what the querier opened into a :class:`Prediction`."""
        if self.reveal == "label":
            return Prediction(labels=opened.round().long().numpy())
        scores = self.scores_from_aggregate(opened)
        return Prediction(labels=plain.argmax_lowest(opened).numpy(), scores=scores)

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        """Public post-processing of an opened aggregate into the released scores."""
        return aggregate.numpy()

    def plaintext(self, logits: Sequence[torch.Tensor], *,
                  noise_sources: Sequence[NoiseSource] | None = None) -> Prediction:
        """Plaintext twin from each owner's logits: the same :meth:`release` on plaintext ops.

        The aggregate is :meth:`plaintext_aggregate` decoded (exact for fixed-point units); the
        result is decoded as the querier decodes what it opens. ``noise_sources`` replays each
        computing party's noise for the differentially private releases (fresh draws if None).
        """
        aggregate = self.plaintext_aggregate(logits).to(torch.float64) / self.scale
        ops = PlainOps(precision_bits=self.precision_bits, noise_sources=noise_sources,
                       parties=self.num_owners + 1)
        return self.decode(self.release(ops, aggregate))

    def plaintext_aggregate(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The combined aggregate as the shares hold it: integer fixed-point units (int64).

        Default: the sum of the owners' encoded contributions (exact on shares). Protocols whose
        :meth:`combine` does more override it.
        """
        return sum(plain.encode(self.local_contribution(lg), self.precision_bits) for lg in logits)

    # -- helpers ------------------------------------------------------------------------
    @property
    def scale(self) -> int:
        """Fixed-point scale ``2**precision_bits``."""
        return 1 << self.precision_bits

    @classmethod
    def param_error(cls, param: str, message: str) -> ProtocolError:
        """A ProtocolError that names the federation key at fault (``protocol.<param>``)."""
        return ProtocolError(f"protocol.{param}: {message} ({cls.name})")

    @classmethod
    def integer_param(cls, param: str, value: Any, *, low: int = 1) -> int:
        """``value`` as an integer >= ``low`` (booleans refused), else a ProtocolError."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise cls.param_error(param, f"must be an integer >= {low}, got {value!r}")
        return int(value)

    @classmethod
    def inner_param(cls, value: Any) -> None:
        """A wrapper's ``inner`` parameter names one of its :attr:`inner_choices`."""
        choices = getattr(cls, "inner_choices", ())
        if value not in choices:
            raise cls.param_error("inner", f"must be one of {', '.join(choices)}, got {value!r}")

    @classmethod
    def positive_real_param(cls, param: str, value: Any) -> float:
        """``value`` as a finite float > 0, else a ProtocolError naming ``protocol.<param>``.

        ``None`` stands for a required parameter that was not given.
        """
        if value is None:
            raise cls.param_error(param, "missing (a number > 0)")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(float(value)) or float(value) <= 0:
            raise cls.param_error(param, f"must be a finite number > 0, got {value!r}")
        return float(value)

    def validate_contribution(self, contribution: torch.Tensor, batch: int) -> None:
        want = (batch, self.contribution_width)
        if tuple(contribution.shape) != want:
            raise ProtocolError(f"{self.name}: contribution of shape {tuple(contribution.shape)}, "
                                f"expected {want}")

    def describe(self) -> str:
        return f"{self.name}: {self.summary} Reveals {self.releases[self.reveal]}, to the querier only."


class VoteWrapper(Protocol):
    """A protocol that reuses ``inner``'s contributions and aggregate and changes only the release.

    ``inner`` is a protocol instance (``GNMax(inner=HardVote(num_classes=4, num_owners=3),
    sigma=2.0)``; the common arguments come from it) or, from a federation file, the name of one
    of :attr:`inner_choices` (built with the same common arguments); None: :attr:`default_inner`.
    Subclasses implement :meth:`release` and :meth:`decode`; everything up to the aggregate is
    delegated, so the wrapped protocol's twin (:meth:`plaintext_aggregate`) stays valid.
    """

    #: names of the protocols this wrapper may wrap (its release assumes their aggregate)
    inner_choices: ClassVar[tuple[str, ...]] = ("hard_vote",)
    default_inner: ClassVar[str] = "hard_vote"

    def __init__(self, *, inner: "Protocol | str | None" = None, **common: Any) -> None:
        if isinstance(inner, Protocol):
            if inner.name not in self.inner_choices:
                raise self.param_error("inner", f"{self.name} wraps {', '.join(self.inner_choices)}"
                                                f", not {inner.name}")
            for key, value in (("num_classes", inner.num_classes), ("num_owners", inner.num_owners),
                               ("owner_weights", inner.owner_weights),
                               ("precision_bits", inner.precision_bits)):
                common.setdefault(key, value)
            super().__init__(**common)
            if (inner.num_classes, inner.num_owners) != (self.num_classes, self.num_owners):
                raise self.param_error("inner", "the wrapped protocol was built for another "
                                                "federation (classes or owners differ)")
            self.inner = inner
            self._unscaled()
            return
        super().__init__(**common)
        name = self.default_inner if inner is None else inner
        if name not in self.inner_choices:
            raise self.param_error("inner", f"must be one of {', '.join(self.inner_choices)}, got "
                                            f"{inner!r}")
        from . import REGISTRY  # noqa: PLC0415 - the package imports this module

        # The wrapper decides what is revealed; the inner protocol only aggregates.
        self.inner = REGISTRY[name](**{**common, "reveal": "label"})
        self._unscaled()

    def _unscaled(self) -> None:
        """The wrapper reads the aggregate's values (thresholds, noise): the inner protocol must
        not rescale them for a label release (:attr:`protocols.soft_vote.SoftVote.label_scale`)."""
        if hasattr(self.inner, "scale_for_labels"):
            self.inner.scale_for_labels = False

    @property
    def contribution_width(self) -> int:
        return self.inner.contribution_width

    def local_contribution(self, logits: torch.Tensor) -> torch.Tensor:
        return self.inner.local_contribution(logits)

    def secure_contribution(self, logits: Any) -> Any:
        return self.inner.secure_contribution(logits)

    def combine(self, contributions: Sequence[Any]) -> Any:
        return self.inner.combine(contributions)

    def plaintext_aggregate(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.inner.plaintext_aggregate(logits)


class JointNoiseVote(VoteWrapper):
    """A vote wrapper whose release goes through joint Gaussian noise (PATE's GNMax family).

    Every computing party (the ``N`` owners and the querier) contributes one share of each noise
    from its own :attr:`noise_source` (:func:`protocols.secure_ops.joint_gaussian`); the twin
    replays every party's draws through :class:`~protocols.ops.PlainOps`. Both wrap vote counts
    or summed distributions: one owner changes the aggregate by at most sqrt(2) in L2 norm, the
    sensitivity the privacy accounting assumes.
    """

    differentially_private = True
    inner_choices = ("hard_vote", "soft_vote")

    def __init__(self, *, inner: "Protocol | str | None" = None, **common: Any) -> None:
        super().__init__(inner=inner, **common)
        #: this party's private noise supply (tests may swap in a SeededNoise)
        self.noise_source: NoiseSource = SystemNoise()

    @property
    def computing_parties(self) -> int:
        return self.num_owners + 1


class IntegerWeighted:
    """Mixin: owner ``i``'s contribution counts with a public positive integer weight ``W_i``.

    ``W_i`` are proportional to the federation's ``owners[i].weight``
    (:func:`protocols.plain_ops.integer_weights`: exact for small rationals, else quantised to
    ``2**-16`` of the largest; :attr:`integer_weights` and :attr:`weights_exact` say which).
    A share times a Python ``int`` is exact and local, so the weighted sum on shares equals its
    twin bit for bit. Put it before the protocol whose contributions are weighted.
    """

    integer_weights: tuple[int, ...]
    weights_exact: bool

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self.integer_weights, self.weights_exact = plain_ops.integer_weights(self.owner_weights)

    def combine(self, contributions: Sequence[Any]) -> Any:
        return secure_ops.weighted_sum(contributions, self.integer_weights)

    def scores_from_aggregate(self, aggregate: torch.Tensor) -> np.ndarray:
        return (aggregate / sum(self.integer_weights)).numpy()

    def plaintext_aggregate(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(w * plain.encode(self.local_contribution(lg), self.precision_bits)
                   for w, lg in zip(self.integer_weights, logits, strict=True))
