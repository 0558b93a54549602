"""Every party as a process on this machine (fork server, fresh rendezvous and free port per run)."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mpc_fi import errors
from mpc_fi.config import FederationConfig
from mpc_fi.errors import PartyFailedError, Terminated
from mpc_fi.memory import auto_limit_mb

from . import lifeline
from .base import Launcher, sigterm_raises, wait_until
from .entry import child_main, clear_previous_run, error_file, heartbeat_file, party_env, \
    progress_file, read_progress, result_file


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stopped(pid: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class LocalLauncher(Launcher):
    """Start all parties as local processes.

    Failure handling, all bounded:

    * a party that exits with an error or is killed: the others are stopped at once (SIGTERM,
      SIGKILL after ``stop_grace_s``); the error names the party that failed first (a party
      killed by a signal is preferred over the peers that failed because it vanished) and shows
      the end of its log;
    * a party that freezes (stopped, deadlocked holding the GIL): its heartbeat stops and after
      ``hang_timeout_s`` every party is stopped, naming it;
    * a party that waits forever on a peer: gloo's timeout (``network.timeout_s``) makes it fail,
      then as above;
    * the whole run past ``timeout_s``: every party is stopped;
    * Ctrl-C: every party is stopped before ``KeyboardInterrupt`` propagates.

    No party outlives the launching process: when it ends, even by SIGKILL, the fork server and
    every party leave at once (:mod:`launchers.lifeline`); SIGTERM to it during :meth:`run` or
    :meth:`wait` stops the parties first, then raises :class:`~mpc_fi.errors.Terminated`.
    """

    name = "local"

    def __init__(self, federation: FederationConfig, *, run_dir=None, stop_grace_s: float = 5.0,
                 timeout_s: float = 600.0, hang_timeout_s: float = 20.0,
                 audit: bool = False, memory_limit_mb: float | None = None,
                 keep_run_dir: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__(federation, run_dir=run_dir, stop_grace_s=stop_grace_s,
                         memory_limit_mb=memory_limit_mb, keep_run_dir=keep_run_dir,
                         progress=progress)
        self._progress_seen: tuple[int, int] | None = None
        self._progress_checked = 0.0
        self.audit = audit  # record every party's traffic and decryptions (mpc_fi.audit)
        self.timeout_s = timeout_s
        self.hang_timeout_s = hang_timeout_s
        self.procs: list[mp.Process] = []
        self._exited_at: dict[int, float] = {}
        self._terminated: set[int] = set()  # ranks this launcher stopped itself

    def start(self, *, query: np.ndarray | None = None) -> None:
        fed = self.federation
        rendezvous = f"tcp://127.0.0.1:{free_port()}"
        # A fork server (a fresh process, not this one) preloads torch and CrypTen once; every
        # party is forked from it. Same isolation as "spawn", without re-importing per party.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["launchers._preload"])
        # Every party shares this host's memory: each gets an equal part unless a limit is set.
        memory = self.memory_limit_mb or auto_limit_mb(len(fed.party_names))
        for rank, name in enumerate(fed.party_names):  # the run folder may be reused
            clear_previous_run(self.run_dir, rank, name)
        launcher = lifeline.this_process()  # every party leaves when this process is gone
        for rank in range(len(fed.party_names)):
            args = (fed, rank, str(self.run_dir), party_env(fed, rank, rendezvous),
                    query if rank == fed.querier_rank else None, True, 1)  # log file; 1 thread
            proc = ctx.Process(target=child_main, args=args,
                               kwargs={"audit": self.audit, "memory_limit_mb": memory,
                                       "launcher": launcher},
                               daemon=True,
                               name=f"mpc-fi-{fed.party_names[rank]}")
            proc.start()
            self.procs.append(proc)

    @staticmethod
    def run_functions(fn: Callable[..., Any], payloads: Sequence[Any], *, dealer: str = "ttp",
                      precision_bits: int = 16, timeout_s: float = 600.0,
                      log_dir: str | None = None, star: bool = False) -> list[Any]:
        """Run a secure computation that is not inference in local parties: ``fn(rank,
        payloads[rank])`` in each (see :func:`launchers.functions.run_functions`)."""
        from .functions import run_functions  # noqa: PLC0415 - functions imports this module

        return run_functions(fn, payloads, dealer=dealer, precision_bits=precision_bits,
                             timeout_s=timeout_s, log_dir=log_dir, star=star)

    def _read(self, path) -> Any:
        with open(path, "rb") as fh:
            return pickle.load(fh)

    def _note_exits(self) -> None:
        now = time.monotonic()
        for r, p in enumerate(self.procs):
            if r not in self._exited_at and p.exitcode is not None:
                self._exited_at[r] = now

    def _report_progress(self, *, force: bool = False) -> None:
        """Pass the querier's latest "batch i/n done" to ``progress`` (at most 5 times a second)."""
        now = time.monotonic()
        if self.progress is None or (not force and now - self._progress_checked < 0.2):
            return
        self._progress_checked = now
        seen = read_progress(progress_file(self.run_dir, self.federation.querier_rank))
        if seen is not None and seen != self._progress_seen:
            self._progress_seen = seen
            self.progress(*seen)

    def _frozen(self) -> int | None:
        """A live party whose heartbeat is older than ``hang_timeout_s`` (None if all beat)."""
        now = time.time()
        for r, p in enumerate(self.procs):
            if p.exitcode is not None:
                continue
            try:
                age = now - heartbeat_file(self.run_dir, r).stat().st_mtime
            except OSError:
                continue  # still importing: no heartbeat yet
            if age > self.hang_timeout_s:
                return r
        return None

    def wait(self, timeout_s: float | None = None) -> dict[int, dict[str, Any]]:
        with sigterm_raises(self):
            return self._wait(timeout_s)

    def _wait(self, timeout_s: float | None) -> dict[int, dict[str, Any]]:
        fed = self.federation
        limit = timeout_s or self.timeout_s
        deadline = time.monotonic() + limit
        compute = range(fed.compute_world_size)
        try:
            while True:
                self._note_exits()
                if any(p.exitcode not in (None, 0) for p in self.procs):
                    self._fail()
                if all(self.procs[r].exitcode == 0 for r in compute):
                    self._report_progress(force=True)
                    break
                self._report_progress()
                frozen = self._frozen()
                if frozen is not None:
                    self.terminate()
                    raise PartyFailedError(
                        f"party {fed.party_names[frozen]} (rank {frozen}, {fed.role_of(frozen)}) "
                        f"stopped responding (no heartbeat for {self.hang_timeout_s:g} s: frozen "
                        "or stopped); every party was stopped.",
                        party=fed.party_names[frozen], rank=frozen, log_tail=self.log_tail(frozen))
                if time.monotonic() > deadline:
                    running = [r for r, p in enumerate(self.procs) if p.is_alive()]
                    self.terminate()
                    rank = running[0] if running else 0
                    names = ", ".join(fed.party_names[r] for r in running)
                    raise PartyFailedError(
                        f"timed out after {limit:g} s; still running: {names}. Every party was "
                        "stopped.", party=fed.party_names[rank], rank=rank,
                        log_tail=self.log_tail(rank))
                time.sleep(0.02)
        except (KeyboardInterrupt, Terminated):
            self.terminate()
            raise
        # The dealer leaves once party 0 says goodbye; give it a moment, it holds no result.
        for proc in self.procs[fed.compute_world_size:]:
            proc.join(self.stop_grace_s)
        return {r: self._read(result_file(self.run_dir, r)) for r in compute}

    def _root_cause(self) -> int:
        """The party whose failure started it: killed by a signal first, else the first out."""
        failed = [r for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)]
        killed = [r for r in failed if self.procs[r].exitcode < 0 and r not in self._terminated]
        pool = killed or failed
        # Among parties seen exiting together, one that lost its peers (exit code 7) is more
        # likely the consequence than the cause.
        return min(pool, key=lambda r: (self._exited_at.get(r, float("inf")),
                                        self.procs[r].exitcode == PartyFailedError.exit_code, r))

    def _fail(self) -> None:
        """A party failed: wait briefly for the agreed error, stop everyone, raise."""
        fed = self.federation
        rank = self._root_cause()
        # When parties agree on an error, all of them exit with it at about the same time.
        wait_until(lambda: all(p.exitcode is not None for p in self.procs[:fed.compute_world_size]),
                   timeout_s=min(2.0, self.stop_grace_s))
        self.terminate()
        records = {}
        for r in range(len(self.procs)):
            path = error_file(self.run_dir, r)
            if path.exists():
                try:
                    records[r] = self._read(path)
                except (OSError, pickle.UnpicklingError, EOFError):
                    pass
        # Prefer an error the parties agreed on (a user-facing MpcFiError subclass).
        for r, rec in sorted(records.items()):
            cls = getattr(errors, rec["type"], None)
            if isinstance(cls, type) and issubclass(cls, errors.MpcFiError) \
                    and cls is not errors.PartyFailedError and cls is not errors.MpcFiError:
                raise cls(rec["message"])
        code = self.procs[rank].exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}")
        rec = records.get(rank, {})
        detail = rec.get("message")
        step = rec.get("phase") or self.last_step(rank)
        phase = f" (last step: {step})" if step and "(last step:" not in (detail or "") else ""
        raise PartyFailedError(
            f"party {fed.party_names[rank]} (rank {rank}, {fed.role_of(rank)}) {how}{phase}"
            + (f": {detail}" if detail else "") + "; every other party was stopped.",
            party=fed.party_names[rank], rank=rank, log_tail=self.log_tail(rank))

    def terminate(self) -> None:
        with self.terminating():
            alive = [p for p in self.procs if p.is_alive()]
            self._terminated |= {self.procs.index(p) for p in alive}
            for p in alive:
                # A stopped process cannot run its SIGTERM handler: no point waiting for it.
                p.kill() if _stopped(p.pid) else p.terminate()
            deadline = time.monotonic() + self.stop_grace_s
            for p in alive:
                p.join(max(0.0, deadline - time.monotonic()))
            for p in alive:
                if p.is_alive():
                    p.kill()
                    p.join(5)
