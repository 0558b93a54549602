"""The entry point of one party process, shared by every launcher.

It is the only code that writes the process environment CrypTen reads (RANK, WORLD_SIZE,
RENDEZVOUS, DISTRIBUTED_BACKEND), then runs :func:`mpc_fi.party.run_party` and leaves either a
result file or an error file in the run folder.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from mpc_fi.config import FederationConfig
from mpc_fi.errors import MpcFiError
from mpc_fi.logs import setup_party_logging
from mpc_fi.party import PartyContext, run_party

from .base import insecure_settings, write_atomic


def result_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"result-{rank}.pkl"


def error_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"error-{rank}.pkl"


def party_env(federation: FederationConfig, rank: int, rendezvous: str) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(federation.compute_world_size),
            "RENDEZVOUS": rendezvous, "DISTRIBUTED_BACKEND": "gloo"}


def party_main(federation: FederationConfig, rank: int, run_dir: str, env: dict[str, str],
               query: np.ndarray | None = None, log_to_file: bool = True) -> int:
    """Run party ``rank``; return (and, in a child, exit with) its exit code."""
    run_path = Path(run_dir)
    os.environ.update(env)
    name = federation.party_names[rank]
    role = federation.role_of(rank)
    log_path = run_path / f"party-{rank}-{name}.log" if log_to_file else None
    log = setup_party_logging(log_path, rank=rank, role=role, name=name)
    for message in insecure_settings(federation):
        log.warning("INSECURE SETTING: %s", message)
    # SIGTERM from the launcher: leave quickly, as after Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code, payload = 0, None
    try:
        log.info("starting (pid %d)", os.getpid())
        payload = run_party(PartyContext(federation=federation, rank=rank, query=query))
    except MpcFiError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        code, payload = exc.exit_code, {"type": type(exc).__name__, "message": str(exc)}
    except KeyboardInterrupt:
        log.error("interrupted")
        code, payload = 130, {"type": "KeyboardInterrupt", "message": "interrupted"}
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        payload = {"type": "SystemExit", "message": f"stopped (exit {code})"}
    except BaseException as exc:  # noqa: BLE001 - any crash must leave an error record
        log.error("crashed:\n%s", traceback.format_exc())
        code, payload = 1, {"type": type(exc).__name__, "message": str(exc)}
    target = result_file(run_path, rank) if code == 0 else error_file(run_path, rank)
    try:
        write_atomic(target, payload)
    except OSError:
        log.exception("cannot write %s", target)
        code = code or 1
    log.info("exit %d", code)
    return code


def child_main(*args: Any) -> None:
    """multiprocessing target: run the party and exit with its code."""
    code = party_main(*args)
    logging_shutdown()
    os._exit(code)  # skip interpreter teardown: gloo threads can hang it


def logging_shutdown() -> None:
    import logging  # noqa: PLC0415

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
