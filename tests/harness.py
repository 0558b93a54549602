"""Multi-party test harness in the spirit of CrypTen's MultiProcessTestCase.

``run_parties(fn, world_size, *args)`` spawns ``world_size`` CrypTen parties (plus a TTP dealer
when ``dealer="ttp"``), runs ``fn(rank, *args)`` in each after ``crypten.init()``, and returns the
results by rank. A failure in any party raises with every party's traceback, keyed by rank; every
join has a timeout, and survivors are killed. ``fn`` must be a module-level function and must
return plain Python / numpy values (no live tensors).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _party(rank: int, world_size: int, port: int, dealer: str, precision_bits: int,
           fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), DISTRIBUTED_BACKEND="gloo",
                      RENDEZVOUS=f"tcp://127.0.0.1:{port}")
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    crypten.cfg.mpc.provider = "TTP" if dealer == "ttp" else "TFP"
    crypten.cfg.encoder.precision_bits = precision_bits
    crypten.cfg.communicator.verbose = True
    try:
        if rank == world_size:  # the dealer
            crypten.mpc.provider.TTPServer()
            queue.put((rank, "ok", None))
            return
        crypten.init()
        try:
            out = fn(rank, *args)
        finally:
            crypten.uninit()
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))


class PartiesFailed(AssertionError):
    pass


def run_parties(fn: Callable[..., Any], world_size: int, *args: Any, dealer: str = "ttp",
                precision_bits: int = 16, timeout_s: float = 180.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    total = world_size + (1 if dealer == "ttp" else 0)
    procs = [ctx.Process(target=_party, args=(r, world_size, port, dealer, precision_bits, fn,
                                              args, queue), daemon=True) for r in range(total)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        # Drain the queue before joining: a large result would otherwise block its sender.
        while len(results) < total and time.monotonic() < deadline:
            try:
                rank, status, value = queue.get(timeout=0.5)
                results[rank] = (status, value)
                if status == "error":
                    break
            except Exception:  # queue.Empty
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for p in procs:
            p.join(0.1 if len(results) < total else 10)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    missing = [r for r in range(total) if r not in results]
    if errors or missing:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        if missing:
            text += f"\nno result from ranks {missing} (crashed or timed out after {timeout_s} s)"
        raise PartiesFailed(text)
    return [results[r][1] for r in range(world_size)]
