"""A small spawner for secure computations that are not inference (contribution scores).

``run_parties(fn, payloads)`` starts ``len(payloads)`` computing parties (owners ``0..N-1``, the
querier ``N``) and CrypTen's trusted dealer (rank ``N + 1``) as fresh local processes, runs
``fn(rank, payloads[rank])`` in each computing party after ``crypten.init()``, and returns the
results by rank. Each party receives **only its own payload** (an owner its own model source, the
querier its queries and labels), so no process holds another party's private input.

It follows the launchers' rules: parties are forked from a fork server that preloaded CrypTen
(:mod:`mpc_fi.study._preload`), never from the calling process; a fresh free port per run; the
dealer seeds torch's global generator from ``os.urandom`` before starting (CrypTen's
``TTPServer`` derives every triple from it); results are drained before joining; every wait is
bounded; when one party fails, the others are killed and the error names the party, with its
traceback. CrypTen is imported only through
:func:`mpc_fi._crypten.load_crypten`. Like the launchers' entry point, the child process (and only
it) writes the environment variables CrypTen reads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import PartyFailedError
from ..logs import setup_party_logging


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _role(rank: int, world: int) -> str:
    return "owner" if rank < world - 1 else ("querier" if rank == world - 1 else "dealer")


def _child(rank: int, world: int, port: int, precision_bits: int, fn: Callable[..., Any],
           payload: Any, log_dir: str | None, out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), DISTRIBUTED_BACKEND="gloo",
                      RENDEZVOUS=f"tcp://127.0.0.1:{port}")
    role = _role(rank, world)
    log = setup_party_logging(Path(log_dir) / f"party-{rank}.log" if log_dir else None,
                              rank=rank, role=role, name=f"{role}{rank if role == 'owner' else ''}",
                              level=logging.INFO if log_dir else logging.WARNING)
    try:
        import torch  # noqa: PLC0415

        from .._crypten import load_crypten  # noqa: PLC0415

        torch.set_num_threads(1)  # many parties share few cores
        crypten = load_crypten()
        crypten.cfg.mpc.provider = "TTP"
        crypten.cfg.encoder.precision_bits = precision_bits
        if role == "dealer":
            # TTPServer seeds its per-party generators from torch's global RNG (constant default
            # seed): seed it from OS entropy or every run would derive the same triples.
            torch.manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
            crypten.mpc.provider.TTPServer()
            out.put((rank, "ok", None))
            return
        crypten.init()
        try:
            value = fn(rank, payload)
        finally:
            crypten.uninit()
        log.info("done")
        # Plain pickle, not the queue's: torch's reducer would pass tensors as shared-memory
        # handles that die with this process.
        out.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, keyed by rank
        log.error("failed:\n%s", traceback.format_exc())
        out.put((rank, "error", traceback.format_exc()))


def run_parties(fn: Callable[[int, Any], Any], payloads: Sequence[Any], *,
                timeout_s: float = 600.0, precision_bits: int = 16,
                log_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """Run ``fn(rank, payloads[rank])`` in each computing party; results by rank.

    ``fn`` must be a module-level function returning plain Python / numpy values. Raises
    :class:`~mpc_fi.errors.PartyFailedError` naming the first party that failed (with its
    traceback), or the ranks that gave no result within ``timeout_s``.
    """
    world = len(payloads)
    if world < 2:
        raise ValueError("need at least two computing parties")
    # A fork server (a fresh process, not this one) imports torch and CrypTen once; every party
    # is forked from it: the isolation of "spawn" without importing CrypTen per party.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mpc_fi.study._preload"])
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, daemon=True, name=f"mpc-fi-study-{rank}",
                         args=(rank, world, port, precision_bits, fn,
                               payloads[rank] if rank < world else None,
                               None if log_dir is None else str(log_dir), out))
             for rank in range(world + 1)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    failed: tuple[int, str] | None = None
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                rank, status, value = out.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in results]
                if dead:
                    failed = (dead[0], f"exited with code {procs[dead[0]].exitcode}")
                    break
                continue
            if status == "ok" and value is not None:
                value = pickle.loads(value)
            results[rank] = (status, value)
            if status == "error":
                failed = (rank, value)
                break
    finally:
        for p in procs:
            p.join(0.1 if failed or len(results) < len(procs) else 10)
            if p.is_alive():
                p.kill()
                p.join(5)
    if failed is not None:
        rank, text = failed
        raise PartyFailedError(f"study party rank {rank} ({_role(rank, world)}) failed:\n{text}",
                               party=_role(rank, world), rank=rank)
    missing = [r for r in range(len(procs)) if r not in results]
    if missing:
        raise PartyFailedError(f"no result from ranks {missing} within {timeout_s:g} s; every "
                               "party was stopped")
    return [results[r][1] for r in range(world)]
