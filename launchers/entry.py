"""The entry point of one party process, shared by every launcher.

It is the only code that writes the process environment CrypTen reads (RANK, WORLD_SIZE,
RENDEZVOUS, DISTRIBUTED_BACKEND, and GLOO_SOCKET_IFNAME across hosts), bounds every
torch.distributed wait (:mod:`launchers.rendezvous`), then runs :func:`mpc_fi.party.run_party`
and leaves either a result file or an error file in the run folder.

Error files hold ``{"type", "message", "party", "rank", "phase"}``; ``phase`` is the last
progress line the party logged ("handshake ok ...", "batch 2/3 done", ...).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpc_fi import channel, keys
from mpc_fi.config import FederationConfig
from mpc_fi.errors import ConfigError, MpcFiError, PartyFailedError, SessionLost
from mpc_fi.logs import LOGGER_NAME, setup_party_logging
from mpc_fi.party import PartyContext, run_party

from . import lifeline, rendezvous
from .base import insecure_settings, write_atomic

HEARTBEAT_S = 1.0


def result_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"result-{rank}.npz"


def error_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"error-{rank}.npz"


def heartbeat_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f".heartbeat-{rank}"


def log_file(run_dir: Path, rank: int, name: str) -> Path:
    return run_dir / f"party-{rank}-{name}.log"


def progress_file(run_dir: Path, rank: int) -> Path:
    """``"<done> <total>"``: the batches party ``rank`` finished (the querier writes it)."""
    return run_dir / f"progress-{rank}.txt"


def read_progress(path: Path) -> tuple[int, int] | None:
    """``(done, total)`` from a progress file; None when absent or unreadable."""
    try:
        done, total = path.read_text().split()
        return int(done), int(total)
    except (OSError, ValueError):
        return None


_BATCH_DONE = re.compile(r"^batch (\d+)/(\d+) done$")


def clear_previous_run(run_dir: Path, rank: int, name: str) -> None:
    """Make a reused run folder safe for party ``rank``: an earlier run's heartbeat would be
    blamed on this party as a freeze, its error and result files taken for this run's. They
    are removed; its log is kept once, as ``party-<rank>-<name>.log.1``."""
    for path in (heartbeat_file(run_dir, rank), error_file(run_dir, rank),
                 result_file(run_dir, rank), run_dir / f"audit-{rank}.npz",
                 progress_file(run_dir, rank)):
        for stale in (path, path.with_name(path.name + ".tmp")):
            stale.unlink(missing_ok=True)
    log = log_file(run_dir, rank, name)
    if log.exists():
        log.replace(log.with_name(log.name + ".1"))


def party_env(federation: FederationConfig, rank: int, rendezvous: str,
              gloo_ifname: str | None = None) -> dict[str, str]:
    """What CrypTen reads from the environment. ``WORLD_SIZE`` is CrypTen's: the computing
    parties only (it adds the dealer itself), not the process count torchrun means by it.
    ``DISTRIBUTED_BACKEND`` is gloo or mpc-fi's own channels (:mod:`mpc_fi.channel`)."""
    transport = federation.transport()
    env = {"RANK": str(rank), "WORLD_SIZE": str(federation.compute_world_size),
           "RENDEZVOUS": rendezvous,
           "DISTRIBUTED_BACKEND": "gloo" if transport == "gloo" else channel.BACKEND}
    if gloo_ifname and transport == "gloo":
        env["GLOO_SOCKET_IFNAME"] = gloo_ifname
    return env


def channel_configs(federation: FederationConfig, ranks: Sequence[int], *,
                    secret_key: str | None = None, listen: str = "127.0.0.1"
                    ) -> dict[int, channel.ChannelConfig] | None:
    """Each of ``ranks``' channel settings (None with transport gloo).

    Transport ``curve``: every party's public key comes from the federation's ``identities``;
    a party's secret key from ``secret_key`` (the path given to ``mpc-fi party --key``) or, by
    ZeroMQ's convention, from ``NAME.key_secret`` beside the ``NAME.key`` the federation names.
    On loopback without identities, the parties get one-run keys made here (the local launcher:
    every process is this user's, on this machine).
    """
    transport = federation.transport()
    if transport == "gloo":
        return None
    names, timeout = federation.party_names, federation.network.timeout_s
    if transport == "zmq":
        return {r: channel.ChannelConfig(names=names, listen=listen, timeout_s=timeout)
                for r in ranks}
    if not federation.identities:
        pairs = [keys.ephemeral_pair() for _ in names]
        publics = tuple(p for p, _ in pairs)
        return {r: channel.ChannelConfig(names=names, public_keys=publics,
                                         secret_key=pairs[r][1], listen=listen, timeout_s=timeout)
                for r in ranks}
    publics = tuple(federation.identities[n].public_key for n in names)
    out = {}
    for r in ranks:
        name, ident = names[r], federation.identities[names[r]]
        path = secret_key
        if path is None:
            if ident.file is None:
                raise ConfigError(f"where is {name}'s secret key? Pass --key NAME.key_secret (the "
                                  "federation names its public key as text, so no key file lies "
                                  "beside it)", key="key")
            path = ident.file + "_secret"
        public, secret = keys.load_secret(path, where="key")
        if public != ident.public_key:
            raise ConfigError(f"{path} holds the key pair of another party: its public key is "
                              f"not the one the federation names for {name} "
                              f"(identities.{name})", key="key")
        out[r] = channel.ChannelConfig(names=names, public_keys=publics, secret_key=secret,
                                       listen=listen, timeout_s=timeout)
    return out


class _Progress(logging.Handler):
    """Remembers the party's last progress line (the phase it was in when something failed);
    with ``path``, writes each "batch i/n done" there as ``"i n"`` (the querier's, read by the
    local launcher for progress bars)."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__(logging.INFO)
        self.last: str | None = None
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == LOGGER_NAME and record.levelno == logging.INFO:
            msg = record.getMessage()
            if not msg.startswith(("starting", "exit")):
                self.last = msg
            done = _BATCH_DONE.match(msg) if self.path is not None else None
            if done:
                tmp = self.path.with_name(self.path.name + ".tmp")
                try:
                    tmp.write_text(f"{done[1]} {done[2]}")
                    tmp.replace(self.path)
                except OSError:
                    pass  # progress is a convenience; never fail the party for it


class _DealerWatch(logging.Handler):
    """CrypTen's TTPServer swallows a broken connection (it logs and returns as if party 0 had
    said goodbye); this notices it so the dealer does not report success after a failed run."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.broken: str | None = None
        self._next = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "root":
            return
        msg = record.getMessage()
        if self._next:
            self.broken, self._next = rendezvous.clean_gloo_message(msg), False
        elif msg.startswith("Encountered Runtime error. TTPServer shutting down"):
            self.broken, self._next = "connection lost", True


def _ours(record: logging.LogRecord) -> bool:
    return record.name.startswith(LOGGER_NAME) or record.levelno >= logging.WARNING


def party_main(federation: FederationConfig, rank: int, run_dir: str, env: dict[str, str],
               query: np.ndarray | None = None, log_to_file: bool = True,
               threads: int | None = None, *, echo_stderr: bool = False,
               audit: bool = False, memory_limit_mb: float | None = None,
               channel_config: channel.ChannelConfig | None = None,
               serve_socket: str | None = None) -> int:
    """Run party ``rank``; return (and, in a child, exit with) its exit code.

    ``log_to_file`` writes ``party-<rank>-<name>.log`` in ``run_dir`` (stderr otherwise);
    ``threads`` caps torch's intra-op threads in this process (None: torch's default; the local
    launcher runs every party on one machine and passes 1); ``echo_stderr`` copies the log lines
    to stderr as well (one party per host); ``audit`` records this party's outgoing traffic and
    decryptions in ``audit-<rank>.npz`` (:mod:`mpc_fi.audit`; tests only, it weakens security);
    ``memory_limit_mb`` bounds the party's working memory for a batch (None: half of what this
    host has available).
    """
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        import torch  # noqa: PLC0415 - already imported by mpc_fi.party

        torch.set_num_threads(threads)
    os.environ.update(env)
    name = federation.party_names[rank]
    role = federation.role_of(rank)
    log_path = log_file(run_path, rank, name) if log_to_file else None
    log = setup_party_logging(log_path, rank=rank, role=role, name=name)
    root = logging.getLogger()
    if echo_stderr and log_path is not None:
        echo = logging.StreamHandler(sys.stderr)
        echo.setFormatter(root.handlers[0].formatter)
        root.addHandler(echo)
    progress = _Progress(progress_file(run_path, rank) if role == "querier" else None)
    log.addHandler(progress)
    watch = None
    if role == "dealer":
        watch = _DealerWatch()
        for handler in root.handlers:
            handler.addFilter(_ours)
        root.addHandler(watch)
        root.setLevel(logging.INFO)
    for message in insecure_settings(federation):
        log.warning("INSECURE SETTING: %s", message)
    if audit:
        log.warning("INSECURE SETTING: wire audit on: this party's shares and opened values are "
                    "written to %s", run_path / f"audit-{rank}.npz")
    # SIGTERM from the launcher: leave quickly, as after Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code, payload = 0, None
    try:
        log.info("starting (pid %d, rendezvous %s, transport %s%s)", os.getpid(),
                 env.get("RENDEZVOUS"), federation.transport(),
                 ": every party proves its key, every message is encrypted"
                 if federation.transport() == "curve" else "")
        # A served party waits for its peers without a deadline, and rejoins a new session
        # when one is lost (mpc_fi.errors.SessionLost).
        rendezvous.install(federation, rank, federation.network.timeout_s,
                           patient=serve_socket is not None)
        if channel_config is not None:
            channel.configure(channel_config)
        payload = run_party(PartyContext(
            federation=federation, rank=rank, query=query, memory_limit_mb=memory_limit_mb,
            audit_path=str(run_path / f"audit-{rank}.npz") if audit else None,
            serve_socket=serve_socket))
        if watch is not None and watch.broken and serve_socket is not None:
            raise SessionLost(f"the dealer lost its connection to the parties ({watch.broken}): "
                              "the session is over; rejoining a new one", party=name, rank=rank)
        if watch is not None and watch.broken:
            raise PartyFailedError(
                f"the dealer lost its connection to the parties before party "
                f"{federation.party_names[0]} said goodbye ({watch.broken}): the run failed on "
                "the other side", party=name, rank=rank)
    except MpcFiError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        code, payload = exc.exit_code, {"type": type(exc).__name__, "message": str(exc)}
    except KeyboardInterrupt:
        log.error("interrupted")
        code, payload = 130, {"type": "KeyboardInterrupt", "message": "interrupted"}
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        log.error("stopped (exit %d)", code)
        payload = {"type": "SystemExit", "message": f"stopped (exit {code})"}
    except BaseException as exc:  # noqa: BLE001 - any crash must leave an error record
        explained = rendezvous.explain_failure(federation, rank, exc, progress.last)
        if explained:
            log.error("%s", explained)
            code = PartyFailedError.exit_code
            payload = {"type": "PartyFailedError", "message": explained}
        else:
            log.error("crashed:\n%s", traceback.format_exc())
            code, payload = 1, {"type": type(exc).__name__, "message": str(exc)}
    if code == SessionLost.exit_code:  # whoever rejoins early must not join the old session
        rendezvous.leave_session()
    # What is still queued for the peers (the last shares, an error every party must agree on)
    # reaches them before this process goes; bounded, since a failed peer may never take it.
    channel.close(linger_s=10.0 if code == 0 else 2.0)
    if payload is not None and code != 0:
        payload.update(party=name, rank=rank, phase=progress.last)
    target = result_file(run_path, rank) if code == 0 else error_file(run_path, rank)
    try:
        write_atomic(target, payload)
    except OSError:
        log.exception("cannot write %s", target)
        code = code or 1
    log.info("exit %d", code)
    return code


def _die_with_parent() -> None:
    """Linux: let the kernel kill this party if its launcher dies (even by SIGKILL)."""
    parent = os.getppid()
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(137)


def _heartbeat(path: Path) -> None:
    """Touch ``path`` every second: the local launcher's watchdog sees a frozen process."""
    def beat() -> None:
        while True:
            try:
                path.touch()
            except OSError:
                pass
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="mpc-fi-heartbeat", daemon=True).start()


def child_main(*args: Any, launcher: tuple[int, int | None] | None = None,
               **kwargs: Any) -> None:
    """multiprocessing target: run the party (``party_main``'s arguments) and exit with its code.

    ``launcher`` is ``(pid, start time)`` of the launching process
    (:func:`launchers.lifeline.this_process`): the party leaves as soon as that process is gone,
    even while it waits on a peer or computes (its parent is the fork server, so
    ``PR_SET_PDEATHSIG`` alone does not see the launcher die).
    """
    _die_with_parent()
    if launcher is not None:
        pid = launcher[0]
        lifeline.exit_when_gone(*launcher, code=PartyFailedError.exit_code, before_exit=lambda: (
            logging.getLogger(LOGGER_NAME).error("the launcher (pid %d) is gone: leaving", pid)))
    _heartbeat(heartbeat_file(Path(args[2]), args[1]))
    code = party_main(*args, **kwargs)
    logging_shutdown()
    os._exit(code)  # skip interpreter teardown: gloo threads can hang it


def logging_shutdown() -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
