"""One runtime per party: what every secure computation of mpc-fi runs inside.

A :class:`Session` is a party's seat in one computation: it sets CrypTen up with every patch
(:func:`mpc_fi._crypten.configure`: CSPRNG randomness, exact decoding, the comparison circuit,
JSON object messages), joins the parties (``crypten.init``), knows its role, exchanges checked
messages and agrees on errors (:mod:`mpc_fi.wire`: a failure anywhere is raised on every party
at the same point, so none is left waiting), runs the trusted dealer's loop when that is its
role, and shuts down. Inference (:mod:`mpc_fi.party`), the contribution study, the benchmarks'
direct-CrypTen baseline and the multi-party test harness all run inside one; the launchers start
the processes and hand each its session's description.

Roles by rank, for ``P`` computing parties: ``0..P-2`` owners, ``P-1`` the querier, ``P`` the
dealer (with ``dealer="ttp"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import audit, wire
from ._crypten import configure, patches
from .crypten_rng import generators_in_use
from .errors import MpcFiError
from .logs import party_logger

DEALERS = ("ttp", "insecure-party-dealer")

#: The session this process runs (a party process takes part in one computation at a time).
_CURRENT: "Session | None" = None

#: Called by the launchers' rendezvous, over and over, while this party waits for peers to join
#: (their names): a served querier answers its clients meanwhile (:func:`while_waiting`).
_WAITING: "Callable[[list[str]], None] | None" = None


def while_waiting(callback: "Callable[[list[str]], None] | None") -> None:
    """Set (or clear, with None) what runs while this party waits for peers to join a session.
    ``callback(missing)`` gets the missing parties' descriptions; it may raise to give up."""
    global _WAITING
    _WAITING = callback


def waiting(missing: Sequence[str]) -> None:
    """The rendezvous is waiting for ``missing`` (launchers call it in their waiting loops)."""
    if _WAITING is not None:
        _WAITING(list(missing))


def current() -> "Session":
    """The session of this party process (for functions run inside one by a launcher)."""
    if _CURRENT is None:
        raise MpcFiError("no session is running in this process: start one with Session.start()")
    return _CURRENT


@dataclass(frozen=True)
class SessionSpec:
    """What a party needs to take its seat: names by rank (computing parties, then the dealer's
    when there is one), the dealer kind and CrypTen's fixed-point precision."""

    names: tuple[str, ...]
    dealer: str = "ttp"
    precision_bits: int = 16
    #: each party's public key (Z85 text, by rank) when the parties authenticate; () otherwise
    public_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dealer not in DEALERS:
            raise ValueError(f"dealer must be one of {', '.join(DEALERS)}, got {self.dealer!r}")
        if self.compute_world_size < 2:
            raise ValueError("a session needs at least two computing parties")

    @property
    def compute_world_size(self) -> int:
        return len(self.names) - (1 if self.dealer == "ttp" else 0)

    def role_of(self, rank: int) -> str:
        last = self.compute_world_size - 1
        return "owner" if rank < last else ("querier" if rank == last else "dealer")

    @classmethod
    def generic(cls, computing_parties: int, *, dealer: str = "ttp",
                precision_bits: int = 16) -> "SessionSpec":
        """Owners ``owner0..``, ``querier``, ``dealer``: for computations without a federation."""
        names = tuple(f"owner{r}" for r in range(computing_parties - 1)) + ("querier",)
        return cls(names + (("dealer",) if dealer == "ttp" else ()), dealer, precision_bits)

    @classmethod
    def of_federation(cls, federation: Any) -> "SessionSpec":
        names = tuple(federation.party_names)
        identities = federation.identities
        keys = tuple(identities[n].public_key for n in names) if identities else ()
        return cls(names, federation.dealer, federation.precision_bits, keys)


class Session:
    """One party's runtime in one computation (see the module docstring).

    Use :meth:`start` (every role), then, at a computing party, :meth:`agree` / :meth:`gather`
    and CrypTen through :attr:`crypten`, and :meth:`close` after success (it has party 0 tell
    the dealer to stop). A dealer's session runs :meth:`serve_dealer` instead. A failed party
    does not call :meth:`close`: its process ends and the peers see its connections close.
    """

    def __init__(self, spec: SessionSpec, rank: int) -> None:
        if not 0 <= rank < len(spec.names):
            raise ValueError(f"rank {rank} is not a seat of {len(spec.names)} parties")
        self.spec, self.rank = spec, rank
        self.role = spec.role_of(rank)
        self.name = spec.names[rank]
        self.log: logging.Logger = party_logger()
        self.crypten: Any = None
        self.comm: Any = None

    # -- start and stop -------------------------------------------------------------------
    def start(self) -> "Session":
        """Configure CrypTen with every patch; join the computing parties (not as the dealer)."""
        global _CURRENT
        _CURRENT = self
        self.crypten = configure(dealer=self.spec.dealer, precision_bits=self.spec.precision_bits)
        live = ", ".join(k for k, v in patches().installed().items() if v)
        if self.role == "dealer":
            self.log.info("patches live: %s", live)
            return self
        self.crypten.init()
        kinds = generators_in_use()
        self.log.info("randomness: %s (%d streams); patches live: %s",
                      ", ".join(sorted(set(kinds.values()))), len(kinds), live)
        self.comm = self.crypten.communicator.get()
        return self

    def serve_dealer(self) -> float:
        """The trusted dealer's loop until party 0 says goodbye; returns its wall time."""
        if self.role != "dealer":
            raise MpcFiError(f"{self.name} is a {self.role}, not the dealer")
        start = time.perf_counter()
        self.crypten.mpc.provider.TTPServer()
        return time.perf_counter() - start

    def close(self) -> None:
        """Leave after a success (party 0 tells the dealer to stop)."""
        if self.crypten is not None and self.role != "dealer":
            with audit.opening("dealer", "terminate"):
                self.crypten.uninit()

    # -- messages and agreement -------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.spec.compute_world_size

    @property
    def querier(self) -> int:
        return self.world - 1

    def gather(self, obj: Any, schema: wire.Schema | Sequence[wire.Schema], what: str) -> list[Any]:
        """Every computing party's ``obj`` as checked JSON, by rank."""
        return wire.gather_json(obj, schema, group=self.comm.main_group,
                                names=self.spec.names, what=what)

    def broadcast(self, obj: Any, schema: wire.Schema, *, src: int, what: str) -> Any:
        """``obj`` of party ``src`` at every computing party, as checked JSON."""
        return wire.broadcast_json(obj, schema, src=src, group=self.comm.main_group,
                                   names=self.spec.names, what=what)

    def agree(self, step: Callable[[], Any], schema: wire.Schema | Sequence[wire.Schema],
              what: str) -> tuple[Any, list[Any]]:
        """Run ``step`` here, exchange outcomes; raise the same error on every party.

        Returns this party's value and every party's, by rank. ``schema`` (one, or one per
        rank) is what each value must look like on the wire.
        """
        def on_error(exc: BaseException) -> None:
            if not isinstance(exc, MpcFiError):  # a bug or a user's model: log its traceback
                self.log.error("local failure", exc_info=exc)

        values = wire.agree(step, schema, group=self.comm.main_group, names=self.spec.names,
                            what=what, on_error=on_error)
        return values[self.rank], values

    def identity_of(self, rank: int) -> str:
        """The identity party ``rank`` proved in this session, as a stable string.

        ``"key:<fingerprint>"`` when the parties authenticated with keys (the SHA-256 of the
        party's public key, as the federation file names it); ``"name:<party name>"`` when they
        did not (loopback only: the processes of one user on one machine).
        """
        if not 0 <= rank < len(self.spec.names):
            raise ValueError(f"rank {rank} is not a seat of {len(self.spec.names)} parties")
        keys = self.spec.public_keys
        if keys:
            from .keys import fingerprint  # noqa: PLC0415

            return "key:" + fingerprint(keys[rank])
        return "name:" + self.spec.names[rank]

    def communication(self) -> tuple[int, int]:
        """CrypTen's counters for this party: (collective calls, bytes)."""
        stats = self.comm.get_communication_stats()
        return int(stats["rounds"]), int(stats["bytes"])
