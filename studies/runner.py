"""Local parties for the studies' secure computations that are not inference (contributions).

``run_parties(fn, payloads)`` runs ``fn(rank, payloads[rank])`` in ``len(payloads)`` computing
parties (owners ``0..N-1``, the querier ``N``) plus CrypTen's trusted dealer, each a fresh local
process that receives **only its own payload** (an owner its own model source, the querier its
queries and labels), and returns the results by rank.

The parties are started by the registered ``local`` launcher (``LocalLauncher.run_functions``,
found through :mod:`mpc_fi.plugins` like every launcher: the engine never imports
``launchers``), which writes the environment CrypTen reads in each child, seeds the dealer from
``os.urandom``, bounds every wait, and raises :class:`~mpc_fi.errors.PartyFailedError` naming the
party that failed, with its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from mpc_fi.plugins import LAUNCHERS, lookup


def run_parties(fn: Callable[[int, Any], Any], payloads: Sequence[Any], *,
                timeout_s: float = 600.0, precision_bits: int = 16,
                log_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """Run ``fn(rank, payloads[rank])`` in each computing party; results by rank.

    ``fn`` must be a module-level function returning plain Python / numpy values.
    """
    local = lookup(LAUNCHERS, "local", key="launcher")
    return local.run_functions(fn, payloads, timeout_s=timeout_s, precision_bits=precision_bits,
                               log_dir=log_dir)
