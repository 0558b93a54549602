"""Local parties for a secure computation that is not an inference run.

:func:`run_functions` starts ``len(payloads)`` CrypTen computing parties (and, with the ``ttp``
dealer, CrypTen's trusted dealer as one more process) on this machine, runs
``fn(rank, payloads[rank])`` in each after ``crypten.init()``, and returns the results by rank.
Each party receives only its own payload. The Shapley study (through the launcher registry:
``LocalLauncher.run_functions``), the multi-party test fixture and the direct-CrypTen benchmark
path all start their parties here.

It keeps the local launcher's rules: parties are forked from a fork server that preloaded torch
and CrypTen (:mod:`launchers._preload`), never from the calling process; a fresh free port per
run; one torch thread per party; every party and the dealer set CrypTen up through
:func:`mpc_fi._crypten.configure` (CSPRNG randomness, the same comparison circuit); results are drained
before joining; every wait is bounded; when a party fails, the others are killed and the error
names it with its traceback; no party outlives the calling process (:mod:`launchers.lifeline`).
Like :mod:`launchers.entry`, the child process (and only it) writes the environment variables
CrypTen reads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpc_fi.errors import PartyFailedError
from mpc_fi.logs import setup_party_logging

from . import lifeline
from .local import free_port


def _role(rank: int, world: int) -> str:
    return "owner" if rank < world - 1 else ("querier" if rank == world - 1 else "dealer")


def _child(rank: int, world: int, port: int, dealer: str, precision_bits: int,
           fn: Callable[..., Any], payload: Any, star: bool, log_dir: str | None,
           out: Any, audit_dir: str | None = None,
           launcher: tuple[int, int | None] | None = None) -> None:
    if launcher is not None:  # never outlive the calling process (see launchers.lifeline)
        lifeline.exit_when_gone(*launcher, code=PartyFailedError.exit_code)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), DISTRIBUTED_BACKEND="gloo",
                      RENDEZVOUS=f"tcp://127.0.0.1:{port}")
    role = _role(rank, world)
    log = setup_party_logging(Path(log_dir) / f"party-{rank}.log" if log_dir else None,
                              rank=rank, role=role, name=f"{role}{rank if role == 'owner' else ''}",
                              level=logging.INFO if log_dir else logging.WARNING)
    try:
        import torch  # noqa: PLC0415 - preloaded by the fork server

        from mpc_fi.runtime import Session, SessionSpec  # noqa: PLC0415

        torch.set_num_threads(1)  # many parties share few cores
        # The same runtime as an inference party: every patch (CSPRNG randomness, exact
        # decoding, the comparison circuit, JSON object messages), the same roles and shutdown.
        spec = SessionSpec.generic(world, dealer="ttp" if dealer == "ttp" else
                                   "insecure-party-dealer", precision_bits=precision_bits)
        session = Session(spec, rank)
        recorder = None
        if audit_dir is not None:
            from mpc_fi.audit import WireAudit  # noqa: PLC0415

            log.warning("INSECURE SETTING: wire audit on (shares and keys written to %s)",
                        audit_dir)
            recorder = WireAudit(rank).install()
        try:
            session.start()
            if session.role == "dealer":
                session.serve_dealer()
                out.put((rank, "ok", None))
                return
            value = fn(rank, *payload) if star else fn(rank, payload)
            session.close()  # after a success only: party 0 then tells the dealer to stop
        finally:
            if recorder is not None:
                recorder.uninstall()
                recorder.dump(str(Path(audit_dir) / f"audit-{rank}.pkl"))
        log.info("done")
        # Plain pickle, not the queue's: torch's reducer would pass tensors as shared-memory
        # handles that die with this process.
        out.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, keyed by rank
        log.error("failed:\n%s", traceback.format_exc())
        out.put((rank, "error", traceback.format_exc()))


def run_functions(fn: Callable[..., Any], payloads: Sequence[Any], *, dealer: str = "ttp",
                  precision_bits: int = 16, timeout_s: float = 600.0,
                  log_dir: str | os.PathLike[str] | None = None, star: bool = False,
                  audit_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """Run ``fn(rank, payloads[rank])`` in each computing party; results by rank.

    Parameters
    ----------
    fn:
        A module-level function returning plain Python / numpy values (they are pickled).
    payloads:
        One per computing party: owners ``0..N-1``, then the querier.
    dealer:
        ``"ttp"`` (a trusted dealer process, the default) or anything else for CrypTen's "TFP"
        (party 0 generates the correlated randomness: tests of that mode only).
    star:
        Call ``fn(rank, *payloads[rank])`` instead.
    log_dir:
        One log per party there (``party-<rank>.log``); None: warnings to stderr only.
    audit_dir:
        Record every party's and the dealer's traffic there (``audit-<rank>.pkl``,
        :mod:`mpc_fi.audit`; tests only: it writes shares and keys to disk).

    Raises :class:`~mpc_fi.errors.PartyFailedError` naming the first party that failed, with every
    failed party's traceback, or the ranks that gave no result within ``timeout_s``.
    """
    world = len(payloads)
    if world < 2:
        raise ValueError("need at least two computing parties")
    total = world + (1 if dealer == "ttp" else 0)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["launchers._preload"])
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, daemon=True, name=f"mpc-fi-fn-{rank}",
                         args=(rank, world, port, dealer, precision_bits, fn,
                               payloads[rank] if rank < world else None, star,
                               None if log_dir is None else str(log_dir), out,
                               None if audit_dir is None else str(audit_dir)),
                         kwargs={"launcher": lifeline.this_process()})
             for rank in range(total)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < total and time.monotonic() < deadline:
            try:
                rank, status, value = out.get(timeout=0.5)
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0)
                       for r, p in enumerate(procs) if r not in results):
                    break
                continue
            results[rank] = (status, pickle.loads(value) if status == "ok" and value else value)
            if status == "error":
                break
    finally:
        for p in procs:
            p.join(0.1 if len(results) < total else 10)
            if p.is_alive():
                p.kill()
                p.join(5)
    failed = {r: v for r, (s, v) in results.items() if s == "error"}
    dead = {r: f"exited with code {p.exitcode}" for r, p in enumerate(procs)
            if r not in results and p.exitcode not in (None, 0, -9)}
    missing = [r for r in range(total) if r not in results and r not in dead]
    if failed or dead:
        first = min(failed) if failed else min(dead)
        text = "\n".join(f"--- party rank {r} ({_role(r, world)}) ---\n{tb}"
                         for r, tb in sorted({**dead, **failed}.items()))
        if missing:
            text += f"\nstopped without a result: ranks {missing}"
        raise PartyFailedError(f"party rank {first} ({_role(first, world)}) failed:\n{text}",
                               party=_role(first, world), rank=first)
    if missing:
        raise PartyFailedError(f"no result from ranks {missing} within {timeout_s:g} s; every "
                               "party was stopped", party=_role(missing[0], world),
                               rank=missing[0])
    return [results[r][1] for r in range(world)]
