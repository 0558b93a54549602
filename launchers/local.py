"""Every party as a process on this machine (fork server, fresh rendezvous and free port per run).

:class:`LocalLauncher` runs an inference. :func:`run_functions` (also
``LocalLauncher.run_functions``) runs any other secure computation the same way: it starts
``len(payloads)`` computing parties (and, with the ``ttp`` dealer, the trusted dealer as one more
process), runs ``fn(rank, payloads[rank])`` in each inside the party runtime
(:class:`mpc_fi.runtime.Session`: every patch, the same roles, error agreement and shutdown as an
inference party; :func:`mpc_fi.runtime.current` gives ``fn`` its session) and returns the results
by rank. Each party receives only its own payload. The contribution study (through the launcher
registry), the multi-party test fixture and the benchmarks' direct-CrypTen path start their
parties here.

Both keep the same rules: parties are forked from a fork server that preloaded torch and CrypTen
(:mod:`launchers._preload`), never from the calling process; a fresh free port per run; one torch
thread per party; results are drained before joining; every wait is bounded; when a party fails,
the others are stopped and the error names it; no party outlives the calling process
(:mod:`launchers.lifeline`). Like :mod:`launchers.entry`, the child process (and only it) writes
the environment variables CrypTen reads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpc_fi import errors
from mpc_fi.channel import BACKEND
from mpc_fi.config import PLAINTEXT_DEFAULT, FederationConfig
from mpc_fi.errors import ConfigError, MpcFiError, PartyFailedError, SessionLost, Terminated
from mpc_fi.logs import setup_party_logging
from mpc_fi.memory import auto_limit_mb

from . import lifeline
from .base import Launcher, name_run_dir, read_record, sigterm_raises, wait_until, write_atomic
from .entry import channel_configs, child_main, clear_previous_run, error_file, heartbeat_file, \
    party_env, progress_file, read_progress, result_file


def _forkserver() -> Any:
    """The multiprocessing context every local party comes from: a fork server (a fresh
    process, not this one) that preloads torch and CrypTen once (:mod:`launchers._preload`).
    Same isolation as "spawn", without re-importing per party."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["launchers._preload"])
    return ctx


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
                 progress: Callable[[int, int], None] | None = None,
                 serve_socket: str | None = None) -> None:
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
        #: a served session (mpc_fi.serve): the querier's socket; None: one run
        self.serve_socket = serve_socket
        self._respawn_lock = threading.Lock()
        #: a served session: how often each rank left a session to rejoin a new one
        self.rejoins: dict[int, int] = {}

    def start(self, *, query: np.ndarray | None = None) -> None:
        fed = self.federation
        self._rendezvous = f"tcp://127.0.0.1:{free_port()}"
        # Every party shares this host's memory: each gets an equal part unless a limit is set.
        self._memory = self.memory_limit_mb or auto_limit_mb(len(fed.party_names))
        for rank, name in enumerate(fed.party_names):  # the run folder may be reused
            clear_previous_run(self.run_dir, rank, name)
        self._lifeline = lifeline.this_process()  # every party leaves when this process is gone
        self._channels = channel_configs(fed, range(len(fed.party_names))) or {}
        self._query = query
        self.procs = [self._spawn(rank) for rank in range(len(fed.party_names))]
        if self.serve_socket is not None:
            threading.Thread(target=self._supervise, name="mpc-fi-supervisor",
                             daemon=True).start()

    def _spawn(self, rank: int) -> mp.Process:
        fed = self.federation
        args = (fed, rank, str(self.run_dir), party_env(fed, rank, self._rendezvous),
                self._query if rank == fed.querier_rank else None, True, 1)  # log file; 1 thread
        proc = _forkserver().Process(target=child_main, args=args,
                                     kwargs={"audit": self.audit, "memory_limit_mb": self._memory,
                                             "launcher": self._lifeline,
                                             "channel_config": self._channels.get(rank),
                                             "serve_socket": self.serve_socket},
                                     daemon=True, name=f"mpc-fi-{fed.party_names[rank]}")
        proc.start()
        return proc

    # -- a served session: parties that lost a peer rejoin ------------------------------------
    def _supervise(self) -> None:
        """Start again every party that left its served session to rejoin (exit code of
        :class:`~mpc_fi.errors.SessionLost`), until the session is stopped."""
        while not self._closing:
            with self._respawn_lock:
                for rank, proc in enumerate(self.procs):
                    if proc.exitcode == SessionLost.exit_code and not self._closing:
                        self._exited_at.pop(rank, None)
                        self.procs[rank] = self._spawn(rank)
                        self.rejoins[rank] = self.rejoins.get(rank, 0) + 1
            time.sleep(0.1)

    def restart(self, party: str | int) -> None:
        """Start a served party again that stopped (killed, or failed on its own): it rejoins
        the others, which wait for it since they lost it."""
        fed = self.federation
        names = list(fed.party_names)
        if party not in names and party not in range(len(names)):
            raise ConfigError(f"no party {party!r} in this federation: {', '.join(names)}",
                              key="party")
        rank = party if isinstance(party, int) else names.index(party)
        with self._respawn_lock:
            if self.procs[rank].exitcode is None:
                raise MpcFiError(f"{fed.party_names[rank]} is running: nothing to restart")
            self._exited_at.pop(rank, None)
            self._terminated.discard(rank)
            self.procs[rank] = self._spawn(rank)

    @staticmethod
    def run_functions(fn: Callable[..., Any], payloads: Sequence[Any], *, dealer: str = "ttp",
                      precision_bits: int = 16, timeout_s: float = 600.0,
                      log_dir: str | None = None, star: bool = False,
                      transport: str = PLAINTEXT_DEFAULT) -> list[Any]:
        """Run a secure computation that is not inference in local parties: ``fn(rank,
        payloads[rank])`` in each, inside the same party runtime (see :func:`run_functions`)."""
        return run_functions(fn, payloads, dealer=dealer, precision_bits=precision_bits,
                             timeout_s=timeout_s, log_dir=log_dir, star=star,
                             transport=transport)

    def _read(self, path) -> Any:
        return read_record(path)

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

    # -- a served session (Federation.start) -------------------------------------------------
    def raise_first_failure(self) -> None:
        """Raise the error of a party that has stopped with one (nothing if all are running).

        A served session: a party that left to rejoin is not a failure, and a party that
        stopped is named without stopping the others (they wait for it: :meth:`restart`)."""
        self._note_exits()
        if self.serve_socket is not None:
            with self._respawn_lock:
                gone = [r for r, p in enumerate(self.procs)
                        if p.exitcode not in (None, 0, SessionLost.exit_code)]
            if gone:
                rank = min(gone, key=lambda r: self._exited_at.get(r, float("inf")))
                code = self.procs[rank].exitcode
                how = (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
                fed = self.federation
                raise name_run_dir(PartyFailedError(
                    f"party {fed.party_names[rank]} (rank {rank}, {fed.role_of(rank)}) {how}; the "
                    "other parties wait for it to rejoin (restart it, or close the session)",
                    party=fed.party_names[rank], rank=rank, log_tail=self.log_tail(rank)),
                    self.run_dir)
            return
        if any(p.exitcode not in (None, 0) for p in self.procs):
            try:
                self._fail()
            except MpcFiError as exc:
                raise name_run_dir(exc, self.run_dir)

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
        # The dealer leaves once party 0 says goodbye; give it a moment, it holds no result. A
        # dealer that died instead (killed, crashed) is reported, even this late.
        for proc in self.procs[fed.compute_world_size:]:
            proc.join(self.stop_grace_s)
        if any(p.exitcode not in (None, 0) for p in self.procs[fed.compute_world_size:]):
            self._fail()
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
                except ValueError:
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
        with self._respawn_lock:  # no party is started again from here on
            self._closing = True
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


# ---------------------------------------------------------------------------------------------
# Computations other than inference (the contribution study, the test harness, the benchmarks'
# direct-CrypTen baseline): the same fork server, lifeline and party runtime
# ---------------------------------------------------------------------------------------------
def _role(rank: int, world: int) -> str:
    return "owner" if rank < world - 1 else ("querier" if rank == world - 1 else "dealer")


def _child(rank: int, world: int, port: int, dealer: str, precision_bits: int,
           fn: Callable[..., Any], payload: Any, star: bool, log_dir: str | None,
           out: str, audit_dir: str | None = None,
           launcher: tuple[int, int | None] | None = None,
           channel_config: Any = None) -> None:
    if launcher is not None:  # never outlive the calling process (see launchers.lifeline)
        lifeline.exit_when_gone(*launcher, code=PartyFailedError.exit_code)
    if channel_config is not None:
        from mpc_fi import channel  # noqa: PLC0415

        channel.configure(channel_config)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world),
                      DISTRIBUTED_BACKEND="gloo" if channel_config is None else BACKEND,
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
                write_atomic(_outcome(out, rank), {"status": "ok", "value": None})
                return
            value = fn(rank, *payload) if star else fn(rank, payload)
            session.close()  # after a success only: party 0 then tells the dealer to stop
        finally:
            if recorder is not None:
                recorder.uninstall()
                recorder.dump(str(Path(audit_dir) / f"audit-{rank}.npz"))
        log.info("done")
        _flush_channel(10.0)  # this process leaves without teardown: the last shares go first
        # A record file, not a queue: nothing a party hands back is unpickled (mpc_fi.records).
        write_atomic(_outcome(out, rank), {"status": "ok", "value": value})
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, keyed by rank
        log.error("failed:\n%s", traceback.format_exc())
        _flush_channel(2.0)
        write_atomic(_outcome(out, rank), {"status": "error", "value": traceback.format_exc()})


def _flush_channel(linger_s: float) -> None:
    """Deliver what this party still has queued for its peers (mpc_fi.channel), bounded."""
    channel = sys.modules.get("mpc_fi.channel")
    if channel is not None:
        channel.close(linger_s)


def _outcome(folder: str, rank: int) -> Path:
    return Path(folder) / f"outcome-{rank}.npz"


def _function_channels(transport: str, world: int, total: int, timeout_s: float) -> list[Any]:
    """Each process's channel settings for :func:`run_functions` (None everywhere for gloo)."""
    if transport == "gloo":
        return [None] * total
    if transport not in ("zmq", "curve"):
        raise ConfigError(f"must be zmq, curve or gloo, got {transport!r}", key="transport")
    from mpc_fi import channel, keys  # noqa: PLC0415

    # The names the party runtime gives these seats (SessionSpec.generic), for error messages.
    names = tuple(f"owner{r}" for r in range(world - 1)) + ("querier",) \
        + (("dealer",) if total > world else ())
    if transport == "zmq":
        return [channel.ChannelConfig(names=names, timeout_s=timeout_s)] * total
    pairs = [keys.ephemeral_pair() for _ in range(total)]
    publics = tuple(p for p, _ in pairs)
    return [channel.ChannelConfig(names=names, public_keys=publics, secret_key=sec,
                                  timeout_s=timeout_s) for _, sec in pairs]


def run_functions(fn: Callable[..., Any], payloads: Sequence[Any], *, dealer: str = "ttp",
                  precision_bits: int = 16, timeout_s: float = 600.0,
                  log_dir: str | os.PathLike[str] | None = None, star: bool = False,
                  audit_dir: str | os.PathLike[str] | None = None,
                  transport: str = PLAINTEXT_DEFAULT) -> list[Any]:
    """Run ``fn(rank, payloads[rank])`` in each computing party; results by rank.

    Parameters
    ----------
    fn:
        A module-level function returning plain Python values, numpy arrays and tensors (handed
        back as :mod:`mpc_fi.records`, never pickle; anything else fails that party).
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
        Record every party's and the dealer's traffic there (``audit-<rank>.npz``,
        :mod:`mpc_fi.audit`; tests only: it writes shares and keys to disk).
    transport:
        ``zmq`` (mpc-fi's channels, the default on loopback), ``curve`` (the same, with one-run
        keys: authenticated and encrypted) or ``gloo`` (see :mod:`mpc_fi.channel`).

    Raises :class:`~mpc_fi.errors.PartyFailedError` naming the first party that failed, with every
    failed party's traceback, or the ranks that gave no result within ``timeout_s``.
    """
    world = len(payloads)
    if world < 2:
        raise ValueError("need at least two computing parties")
    total = world + (1 if dealer == "ttp" else 0)
    ctx = _forkserver()
    out = tempfile.mkdtemp(prefix="mpc-fi-fn-")  # each party's outcome record lands here
    port = free_port()
    channels = _function_channels(transport, world, total, timeout_s)
    procs = [ctx.Process(target=_child, daemon=True, name=f"mpc-fi-fn-{rank}",
                         args=(rank, world, port, dealer, precision_bits, fn,
                               payloads[rank] if rank < world else None, star,
                               None if log_dir is None else str(log_dir), out,
                               None if audit_dir is None else str(audit_dir)),
                         kwargs={"launcher": lifeline.this_process(),
                                 "channel_config": channels[rank]})
             for rank in range(total)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < total and time.monotonic() < deadline:
            for rank in range(total):
                if rank not in results and _outcome(out, rank).exists():
                    rec = read_record(_outcome(out, rank))
                    results[rank] = (rec["status"], rec["value"])
            if any(status == "error" for status, _ in results.values()):
                break
            if any(p.exitcode not in (None, 0) for r, p in enumerate(procs)
                   if r not in results and not _outcome(out, r).exists()):
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            p.join(0.1 if len(results) < total else 10)
            if p.is_alive():
                p.kill()
                p.join(5)
        shutil.rmtree(out, ignore_errors=True)
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
