"""Multi-party test harness in the spirit of CrypTen's MultiProcessTestCase.

``run_parties(fn, world_size, *args)`` starts ``world_size`` CrypTen parties (plus a TTP dealer
when ``dealer="ttp"``), runs ``fn(rank, *args)`` in each after ``crypten.init()``, and returns the
results by rank. The parties come from :func:`launchers.local.run_functions`: a failure in
any party raises :class:`~mpc_fi.errors.PartyFailedError` with every failed party's traceback,
keyed by rank; every wait has a timeout, and survivors are killed. ``fn`` must be a module-level
function and must return plain Python / numpy values (no live tensors).
"""

from __future__ import annotations

from typing import Any, Callable

from launchers.local import run_functions


def run_parties(fn: Callable[..., Any], world_size: int, *args: Any, dealer: str = "ttp",
                precision_bits: int = 16, timeout_s: float = 180.0,
                audit_dir: Any = None) -> list[Any]:
    return run_functions(fn, [args] * world_size, dealer=dealer, precision_bits=precision_bits,
                         timeout_s=timeout_s, star=True, audit_dir=audit_dir)
