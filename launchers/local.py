"""Every party as a process on this machine (spawned, fresh rendezvous and free port per run)."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import time
from typing import Any

import numpy as np

from mpc_fi import errors
from mpc_fi.config import FederationConfig
from mpc_fi.errors import PartyFailedError

from .base import Launcher, wait_until
from .entry import child_main, error_file, party_env, result_file


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalLauncher(Launcher):
    """Start all parties as local processes.

    If a party exits with an error, crashes, or the run exceeds ``timeout_s``, every other party is
    stopped (SIGTERM, then SIGKILL after ``stop_grace_s``) and the error names the party and shows
    the end of its log. Ctrl-C stops every party. Processes are daemonic, so none outlives the
    launcher.
    """

    name = "local"

    def __init__(self, federation: FederationConfig, *, run_dir=None, stop_grace_s: float = 10.0,
                 timeout_s: float = 600.0) -> None:
        super().__init__(federation, run_dir=run_dir, stop_grace_s=stop_grace_s)
        self.timeout_s = timeout_s
        self.procs: list[mp.Process] = []

    def start(self, *, query: np.ndarray | None = None) -> None:
        fed = self.federation
        rendezvous = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        for rank in range(len(fed.party_names)):
            args = (fed, rank, str(self.run_dir), party_env(fed, rank, rendezvous),
                    query if rank == fed.querier_rank else None)
            proc = ctx.Process(target=child_main, args=args, daemon=True,
                               name=f"mpc-fi-{fed.party_names[rank]}")
            proc.start()
            self.procs.append(proc)

    def _read(self, path) -> Any:
        with open(path, "rb") as fh:
            return pickle.load(fh)

    def wait(self, timeout_s: float | None = None) -> dict[int, dict[str, Any]]:
        fed = self.federation
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        compute = range(fed.compute_world_size)
        try:
            while True:
                failed = [r for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)]
                if failed:
                    self._fail(failed[0])
                if all(self.procs[r].exitcode == 0 for r in compute):
                    break
                if time.monotonic() > deadline:
                    running = [fed.party_names[r] for r, p in enumerate(self.procs) if p.is_alive()]
                    self.terminate()
                    rank = fed.party_names.index(running[0]) if running else 0
                    raise PartyFailedError(
                        f"timed out after {timeout_s or self.timeout_s:.0f} s; still running: "
                        f"{', '.join(running)}. Every party was stopped.",
                        party=fed.party_names[rank], rank=rank, log_tail=self.log_tail(rank))
                time.sleep(0.02)
        except KeyboardInterrupt:
            self.terminate()
            raise
        # The dealer leaves once party 0 says goodbye; give it a moment, it holds no result.
        for proc in self.procs[fed.compute_world_size:]:
            proc.join(self.stop_grace_s)
        return {r: self._read(result_file(self.run_dir, r)) for r in compute}

    def _fail(self, rank: int) -> None:
        """A party failed: wait briefly for the agreed error, stop everyone, raise."""
        fed = self.federation
        # When parties agree on an error, all of them exit with it at about the same time.
        wait_until(lambda: all(p.exitcode is not None for p in self.procs[:fed.compute_world_size]),
                   timeout_s=min(2.0, self.stop_grace_s))
        self.terminate()
        records = {}
        for r in range(len(self.procs)):
            path = error_file(self.run_dir, r)
            if path.exists():
                records[r] = self._read(path)
        # Prefer an error the parties agreed on (a user-facing MpcFiError subclass).
        for r, rec in sorted(records.items()):
            cls = getattr(errors, rec["type"], None)
            if isinstance(cls, type) and issubclass(cls, errors.MpcFiError) \
                    and cls is not errors.PartyFailedError and cls is not errors.MpcFiError:
                raise cls(rec["message"])
        proc = self.procs[rank]
        code = proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        detail = records.get(rank, {}).get("message")
        raise PartyFailedError(
            f"party {fed.party_names[rank]} (rank {rank}, {fed.role_of(rank)}) {how}"
            + (f": {detail}" if detail else "") + "; every other party was stopped.",
            party=fed.party_names[rank], rank=rank, log_tail=self.log_tail(rank))

    def terminate(self) -> None:
        alive = [p for p in self.procs if p.is_alive()]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + self.stop_grace_s
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in alive:
            if p.is_alive():
                p.kill()
                p.join(5)
