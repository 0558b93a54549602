"""One party per host: this process runs the party named on the command line.

Every host runs the same command with its own party name::

    mpc-fi party --federation federation.yaml --party owner0

and the parties meet at ``network.address:network.port`` of the federation file, which must be
an address of the host of rank 0 (the first owner), where the rendezvous store listens. Started
by ``torchrun`` or a scheduler instead, the party and the rendezvous come from ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``WORLD_SIZE`` counts every process,
the dealer included). See ``docs/multihost.md``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpc_fi import errors
from mpc_fi.config import FederationConfig
from mpc_fi.errors import ConfigError, PartyFailedError

from .base import Launcher, read_record, write_atomic
from .entry import channel_configs, clear_previous_run, error_file, logging_shutdown, party_env, \
    party_main, result_file
from .rendezvous import gloo_interface, is_loopback, local_address_towards, parse_tcp

TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def resolve_party(federation: FederationConfig, party: str | None,
                  environ: Mapping[str, str]) -> tuple[int, str, str]:
    """``(rank, rendezvous URL, where it came from)`` for this host's party.

    Raises :class:`ConfigError` naming what is missing or inconsistent.
    """
    names = federation.party_names
    procs = len(names)
    listing = ", ".join(f"{r}={n}" for r, n in enumerate(names))
    present = [v for v in TORCHRUN_VARS if environ.get(v)]
    if present and len(present) < len(TORCHRUN_VARS) and any(
            v in present for v in ("MASTER_ADDR", "MASTER_PORT")):
        missing = [v for v in TORCHRUN_VARS if v not in present]
        raise ConfigError(f"{', '.join(present)} set but {', '.join(missing)} missing: set all of "
                          f"{', '.join(TORCHRUN_VARS)} (torchrun does) or none of MASTER_ADDR/"
                          "MASTER_PORT (then network.address/port of the federation are used)",
                          key="environment")
    rank_from_env = None
    if environ.get("RANK"):
        try:
            rank_from_env = int(environ["RANK"])
        except ValueError:
            raise ConfigError(f"RANK must be an integer, got {environ['RANK']!r}",
                              key="environment") from None
        if not 0 <= rank_from_env < procs:
            raise ConfigError(f"RANK={rank_from_env} but this federation has ranks 0..{procs - 1} "
                              f"({listing})", key="environment")
    if party is not None:
        rank = federation.rank_of(party)
        if rank_from_env is not None and rank_from_env != rank:
            raise ConfigError(f"--party {party} is rank {rank} in this federation but RANK="
                              f"{rank_from_env} ({names[rank_from_env]}); drop one of them",
                              key="party")
    elif rank_from_env is not None:
        rank = rank_from_env
    else:
        raise ConfigError(f"which party runs here? Pass --party NAME (one of {', '.join(names)}) "
                          "or set RANK", key="party")

    if environ.get("WORLD_SIZE"):
        try:
            world = int(environ["WORLD_SIZE"])
        except ValueError:
            raise ConfigError(f"WORLD_SIZE must be an integer, got {environ['WORLD_SIZE']!r}",
                              key="environment") from None
        if world != procs:
            dealer = " (the dealer counts: it is a process too)" if federation.dealer == "ttp" else ""
            raise ConfigError(
                f"WORLD_SIZE={world} but this federation runs {procs} processes{dealer}: "
                f"{listing}. Start exactly one process per party (torchrun: --nnodes/"
                f"--nproc-per-node multiplying to {procs})", key="environment")
    if len(present) == len(TORCHRUN_VARS):
        try:
            port = int(environ["MASTER_PORT"])
        except ValueError:
            raise ConfigError(f"MASTER_PORT must be an integer, got {environ['MASTER_PORT']!r}",
                              key="environment") from None
        addr = environ["MASTER_ADDR"]
        if not is_loopback(addr) and federation.transport() != "curve" \
                and not federation.network.acknowledge_plaintext_network:
            raise ConfigError(
                f"MASTER_ADDR {addr} is not loopback and transport {federation.transport()} is "
                "not encrypted: name every party's public key under identities (mpc-fi keygen "
                "NAME; transport curve), or, inside a VPN (WireGuard; see docs/multihost.md), set "
                "network.acknowledge_plaintext_network: true",
                key="network.acknowledge_plaintext_network")
        return rank, f"tcp://{addr}:{port}", "MASTER_ADDR/MASTER_PORT"
    if federation.network.port is None:
        raise ConfigError(
            "required to run one party per host: every party must know where to meet. Set it "
            "to a free TCP port on the host of rank 0 "
            f"({names[0]}), open between the hosts, e.g. network: {{address: <that host>, "
            "port: 29500}}", key="network.port")
    net = federation.network
    return rank, f"tcp://{net.address}:{net.port}", "network.address/network.port"


class HostLauncher(Launcher):
    """Run one party of ``federation`` in this process (one party per host).

    Parameters
    ----------
    federation:
        The federation every host was given (same file everywhere).
    party:
        This host's party; None: take it from ``RANK``.
    run_dir:
        Folder for this party's log and result (a temporary folder by default, removed after a
        successful run unless ``keep_run_dir``; a failed run keeps it and names it).
    timeout_s:
        Bound on the whole run. Every single wait on a peer is bounded by
        ``network.timeout_s`` (gloo timeout); past ``timeout_s`` the process leaves with exit
        code 7 even if it is stuck in native code (this launcher owns its process).
    environ:
        Where ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` are read (``os.environ``).
    echo_stderr:
        Copy the party's log lines to stderr as well as to its log file (default).
    """

    name = "host"

    def __init__(self, federation: FederationConfig, *, party: str | None = None, run_dir=None,
                 timeout_s: float = 900.0, stop_grace_s: float = 10.0,
                 environ: Mapping[str, str] | None = None, echo_stderr: bool = True,
                 memory_limit_mb: float | None = None, keep_run_dir: bool = False,
                 key: str | os.PathLike[str] | None = None,
                 serve_socket: str | os.PathLike[str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.rank, self.rendezvous, self.source = resolve_party(federation, party, environ)
        super().__init__(federation, run_dir=run_dir, stop_grace_s=stop_grace_s,
                         memory_limit_mb=memory_limit_mb, keep_run_dir=keep_run_dir)
        self.timeout_s = timeout_s
        self.echo_stderr = echo_stderr
        self.party = federation.party_names[self.rank]
        if federation.transport() == "curve" and not federation.identities:
            raise ConfigError("one party per host with transport curve needs identities: every "
                              "party's public key in the federation file (mpc-fi keygen NAME)",
                              key="identities")
        self.key = None if key is None else str(key)
        #: a served session (``mpc-fi serve``): the querier's socket; None: one run
        self.serve_socket = None if serve_socket is None else str(serve_socket)
        self._channel = channel_configs(federation, [self.rank], secret_key=self.key,
                                        listen="127.0.0.1")  # checks the key before any wait
        self._query: np.ndarray | None = None
        self._code: int | None = None
        self._done = threading.Event()

    def start(self, *, query: np.ndarray | None = None) -> None:
        if query is not None and self.rank != self.federation.querier_rank:
            raise ConfigError(f"only the querier passes queries; this host runs {self.party}",
                              key="query")
        self._query = query

    def wait(self, timeout_s: float | None = None) -> dict[int, dict[str, Any]]:
        """Run the party here; return ``{rank: result}`` or raise the error it ended with."""
        fed, rank = self.federation, self.rank
        limit = timeout_s or self.timeout_s
        host, port = parse_tcp(self.rendezvous)
        env = party_env(fed, rank, self.rendezvous,
                        gloo_ifname=os.environ.get("GLOO_SOCKET_IFNAME") or gloo_interface(host, port))
        config = None
        if self._channel is not None:  # listen on the address that faces the rendezvous host
            listen = "127.0.0.1" if is_loopback(host) else local_address_towards(host, port)
            config = dataclasses.replace(self._channel[rank], listen=listen)
        print(f"mpc-fi: running {self.party} (rank {rank}, {fed.role_of(rank)}) of "
              f"{len(fed.party_names)} processes; rendezvous {self.rendezvous} (from "
              f"{self.source}); log {self.log_path(rank)}", file=sys.stderr, flush=True)
        clear_previous_run(self.run_dir, rank, self.party)  # the run folder may be reused
        if self.serve_socket is None:  # a served party lives until the querier says stop
            self._watchdog(limit)
        try:
            self._code = party_main(fed, rank, str(self.run_dir), env, self._query,
                                    log_to_file=True, echo_stderr=self.echo_stderr,
                                    memory_limit_mb=self.memory_limit_mb, channel_config=config,
                                    serve_socket=self.serve_socket)
        finally:
            self._done.set()
        if self._code == 0:
            return {rank: read_record(result_file(self.run_dir, rank))}
        self._raise()
        raise AssertionError("unreachable")

    def _raise(self) -> None:
        fed, rank = self.federation, self.rank
        try:
            rec = read_record(error_file(self.run_dir, rank))
        except ValueError:
            rec = {"type": "PartyFailedError", "message": f"exit code {self._code}"}
        if rec["type"] == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if rec["type"] == "SystemExit" and self._code == errors.Terminated.exit_code:
            raise errors.Terminated()  # SIGTERM: leave with its exit code, as the party did
        cls = getattr(errors, rec["type"], None)
        if isinstance(cls, type) and issubclass(cls, errors.MpcFiError) \
                and cls not in (errors.PartyFailedError, errors.MpcFiError):
            raise cls(rec["message"])
        me = f"{self.party} (rank {rank}, {fed.role_of(rank)})"
        message = rec["message"]
        if not message.startswith(me):
            phase = (f" (last step: {rec['phase']})"
                     if rec.get("phase") and "(last step:" not in message else "")
            message = f"party {me} failed{phase}: {message}"
        # With echo_stderr the log lines are on the terminal already.
        raise PartyFailedError(message, party=self.party, rank=rank,
                               log_tail="" if self.echo_stderr else self.log_tail(rank))

    def _watchdog(self, limit: float) -> None:
        """Past ``limit`` seconds, record the failure and leave, even from inside native code."""
        def guard() -> None:
            if self._done.wait(limit):
                return
            msg = (f"party {self.party} did not finish within {limit:g} s (--timeout); "
                   "stopping this process")
            try:
                write_atomic(error_file(self.run_dir, self.rank),
                             {"type": "PartyFailedError", "message": msg, "party": self.party,
                              "rank": self.rank, "phase": None})
            except OSError:
                pass
            print(f"mpc-fi: error: PartyFailedError: {msg}", file=sys.stderr, flush=True)
            logging_shutdown()
            os._exit(PartyFailedError.exit_code)

        threading.Thread(target=guard, name="mpc-fi-run-timeout", daemon=True).start()

    def terminate(self) -> None:
        """Nothing to stop from here: the party runs in this process and has returned."""
        self._done.set()
