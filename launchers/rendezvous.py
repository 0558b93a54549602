"""Bounded, named rendezvous for the parties' torch.distributed (gloo) process group.

CrypTen 0.4.1 calls ``dist.init_process_group(backend, init_method, world_size, rank)`` and
three ``dist.new_group(ranks)`` without a timeout, so every wait defaults to torch's 30 minutes
(``new_group`` ignores the default group's timeout and falls back to that constant as well), and
a missing peer shows up as a bare "timed out" from deep inside c10d.

:func:`install` replaces those two functions *in the party process only* (the launchers' entry
point calls it before CrypTen starts) with thin wrappers that

1. hold a **roll call** first: rank 0 hosts a ``TCPStore`` at the rendezvous address (or, under
   ``torchrun``, everyone joins the agent's store), each party registers its name, address and
   pid, and waits at most ``timeout_s`` for the others. If someone is missing, the error names
   exactly who (``owner1 (rank 1, owner)``) and where they were expected; if the rendezvous host
   cannot be reached at all, the error names the host, the port and the party that should host it;
2. then create the real default group **on that same store** (one port for everything) with
   ``timeout=timeout_s``, and give every later ``new_group`` the same timeout.

A gloo timeout bounds every later collective too: a peer that hangs or whose link drops makes the
waiting parties fail after at most ``timeout_s`` instead of 30 minutes. A peer that dies is seen at
once (its sockets close).

Why wrapping rather than pre-creating the group: CrypTen skips its whole set-up (ranks, the
dealer's groups) when a default group already exists, so a group made beforehand breaks it.
Why not patching torch's module constant ``default_pg_timeout``: it would be global and fragile
(some torch signatures bind it as a default value at import). Wrapping the two functions CrypTen
calls through ``torch.distributed`` is explicit, limited to the party process, and tested
(``tests/launchers/test_rendezvous.py``).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import re
import socket
import struct
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

from mpc_fi.config import FederationConfig
from mpc_fi import wire
from mpc_fi.errors import ConfigError, MpcFiError, PartyFailedError

ROLL_CALL = "mpc-fi/roll-call"
#: What a party announces at the roll call (mpc_fi.wire schema), and its size limit in bytes.
ROLL_CALL_WIRE = wire.Record({"name": wire.Str(64), "address": wire.Str(64),
                              "pid": wire.Int(0, 1 << 31), "host": wire.Str(255)})
ROLL_CALL_LIMIT = 1024

#: Filled by the roll call: rank -> what the party announced (name, address, pid, host).
PEERS: dict[int, dict[str, Any]] = {}


def _describe(federation: FederationConfig, rank: int) -> str:
    return f"{federation.party_names[rank]} (rank {rank}, {federation.role_of(rank)})"


def parse_tcp(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        raise ConfigError(f"rendezvous must look like tcp://HOST:PORT, got {url!r}", key="network")
    return parsed.hostname, parsed.port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- which local interface gloo must use ---------------------------------------------------
def local_address_towards(host: str, port: int) -> str:
    """The local IPv4 address this host uses to reach ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP connect only picks a route
        return s.getsockname()[0]


def interface_with_address(address: str) -> str | None:
    """Name of the interface holding ``address`` (Linux ``SIOCGIFADDR``); None if not found."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def gloo_interface(host: str, port: int) -> str | None:
    """Interface gloo should bind so that peers on other hosts can reach this party.

    Gloo otherwise binds the address the machine's hostname resolves to; on many distributions
    that is ``127.0.1.1`` (or the loopback fallback), which peers on other hosts cannot reach and
    the run then hangs at its first message. Raises :class:`PartyFailedError` when there is no
    route to the rendezvous host at all.
    """
    if is_loopback(host):
        return None
    try:
        local = local_address_towards(host, port)
    except OSError as exc:
        raise PartyFailedError(f"no route from this host to the rendezvous host {host}:{port} "
                               f"({exc.strerror or exc}); check network.address and this host's "
                               "network (VPN/tunnel up?)") from None
    return interface_with_address(local)


# -- the roll call --------------------------------------------------------------------------
def _wait_until_listening(host: str, port: int, deadline: float) -> None:
    """Connect-probe the rendezvous port quietly (c10d's own retries print C++ backtraces)."""
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(last)
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, remaining))):
                return
        except socket.timeout:
            last = "connection attempts timed out (host down, or packets dropped by a firewall)"
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                last = "connection refused (nothing listening on that port yet)"
            elif exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                last = f"{exc.strerror} (no route to that host)"
            else:
                last = exc.strerror or str(exc)
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def listen_socket(host: str, port: int) -> int:
    """A socket listening on ``host:port`` only; returns its descriptor, which the caller owns.

    ``TCPStore(master_listen_fd=...)`` takes the descriptor over and closes it with the store.
    IPv4 is preferred for a host name (gloo's interface choice is IPv4 too).
    """
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does itself
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def roll_call(federation: FederationConfig, *, host: str, port: int, rank: int, world_size: int,
              timeout_s: float, agent_store: bool = False, prefix: str = "",
              patient: bool = False) -> Any:
    """Meet every party at ``host:port``; return the store, or raise naming who never came.

    Rank 0 hosts the store unless ``agent_store`` (``torchrun`` hosts it then). Every party
    registers ``{name, address, pid, host}`` and waits at most ``timeout_s`` for all
    ``world_size`` of them.

    ``patient`` (served sessions): no deadline; the waiting is reported to
    :func:`mpc_fi.runtime.waiting` (a served querier answers its clients meanwhile), and a store
    that goes away (its host left to rejoin) or belongs to a session that is over
    (:func:`leave_session`) is left for the next one.
    """
    if not patient:
        return _roll_call(federation, host=host, port=port, rank=rank, world_size=world_size,
                          timeout_s=timeout_s, agent_store=agent_store, prefix=prefix)
    from mpc_fi import runtime  # noqa: PLC0415
    from mpc_fi.logs import party_logger  # noqa: PLC0415

    log, reported = party_logger(), 0.0
    while True:
        try:
            return _roll_call(federation, host=host, port=port, rank=rank,
                              world_size=world_size, timeout_s=timeout_s,
                              agent_store=agent_store, prefix=prefix, patient=True)
        except _StaleStore:
            runtime.waiting([_describe(federation, 0) + " (to host a new session)"])
            time.sleep(0.2)
        except PartyFailedError as exc:  # the store's host left, or it is not up yet
            if time.monotonic() - reported > 30:
                log.info("waiting for the session to form: %s", exc)
                reported = time.monotonic()
            runtime.waiting([_describe(federation, 0)])
            time.sleep(0.2)


def _wait_patiently(store: Any, stop_key: str, missing: list[str], *, hosts: bool) -> None:
    """One step of a served party's wait: report it (a served querier answers its clients and
    may be told to stop: then every party at this rendezvous stops too). The store's host
    (``hosts``) keeps it up a moment after a stop, so that everyone waiting there reads it."""
    from mpc_fi import runtime  # noqa: PLC0415
    from mpc_fi.serve import ServingStopped  # noqa: PLC0415

    try:
        stop = store.check([stop_key])
    except RuntimeError:
        return  # the store went away: the roll call's next check says so
    try:
        if stop:
            raise ServingStopped()
        runtime.waiting(missing)
    except ServingStopped:
        try:
            store.set(stop_key, "1")
        except (RuntimeError, OSError):
            pass
        if hosts:
            time.sleep(1.0)
        raise


class _StaleStore(Exception):
    """The rendezvous store belongs to a session that is over."""


#: The store of this party's current session and its epoch (for :func:`leave_session`).
_SESSION: dict[str, Any] = {}


def leave_session() -> None:
    """Mark this party's session over in its store, so that parties rejoining before the store's
    host has left wait for a new one instead of joining the old one (best effort)."""
    store, key = _SESSION.get("store"), _SESSION.get("key")
    if store is None:
        return
    try:
        store.set(key, "1")
    except (RuntimeError, OSError):
        pass


def _roll_call(federation: FederationConfig, *, host: str, port: int, rank: int,
               world_size: int, timeout_s: float, agent_store: bool, prefix: str,
               patient: bool = False) -> Any:
    import torch.distributed as dist  # noqa: PLC0415 - only in party processes

    if world_size != len(federation.party_names):
        raise ConfigError(f"CrypTen asked for {world_size} processes but the federation has "
                          f"{len(federation.party_names)}: {', '.join(federation.party_names)}",
                          key="dealer")
    td = timedelta(seconds=timeout_s)
    deadline = time.monotonic() + timeout_s
    me = _describe(federation, rank)
    host_party = "torchrun's agent on MASTER_ADDR" if agent_store else _describe(federation, 0)
    is_master = rank == 0 and not agent_store
    if not is_master:
        try:  # patient: short tries, so that the waiting is reported (runtime.waiting) often
            _wait_until_listening(host, port, time.monotonic() + 1.0 if patient else deadline)
        except TimeoutError as exc:
            raise PartyFailedError(
                f"{me} waited {timeout_s:g} s for the rendezvous at {host}:{port} (hosted by "
                f"{host_party}) and could not reach it: {exc}. Is that party started, is "
                f"network.address the address of its host, and is port {port} open between the "
                "hosts?", party=federation.party_names[rank], rank=rank) from None
    try:
        # The master listens on the configured address only: left to itself, TCPStore binds
        # every interface (``[::]``), and whoever reaches that port can read and write the keys.
        store = dist.TCPStore(host, port, world_size, is_master, timeout=td,
                              wait_for_workers=False,
                              master_listen_fd=listen_socket(host, port) if is_master else None)
    except (RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if is_master:
            raise PartyFailedError(
                f"{me} hosts the rendezvous but cannot listen on {host}:{port}: {first}. Is the "
                "port in use (another run?) and is network.address an address of this host?",
                party=federation.party_names[rank], rank=rank) from None
        raise PartyFailedError(f"{me} could not join the rendezvous at {host}:{port} (hosted by "
                               f"{host_party}): {first}", party=federation.party_names[rank],
                               rank=rank) from None
    base = f"{prefix}{ROLL_CALL}"
    if patient:  # a served session: one epoch per store, marked over when the session ends
        try:
            if is_master:
                store.set(f"{prefix}mpc-fi/epoch", os.urandom(8).hex())
            epoch = bytes(store.get(f"{prefix}mpc-fi/epoch")).decode("ascii", "replace")
            if store.check([f"{prefix}mpc-fi/session/{epoch}/over"]):
                raise _StaleStore()
        except RuntimeError as exc:
            raise PartyFailedError(f"{me} lost the rendezvous at {host}:{port}: "
                                   f"{str(exc).splitlines()[0]}",
                                   party=federation.party_names[rank], rank=rank) from None
        _SESSION.update(store=store, key=f"{prefix}mpc-fi/session/{epoch}/over")
        base = f"{prefix}mpc-fi/session/{epoch}/roll-call"
    try:
        local = local_address_towards(host, port) if not is_loopback(host) else "127.0.0.1"
    except OSError:
        local = "?"
    store.set(f"{base}/{rank}", json.dumps({"name": federation.party_names[rank], "address": local,
                                            "pid": os.getpid(), "host": socket.gethostname()}))
    keys = [f"{base}/{r}" for r in range(world_size)]
    missing = list(range(world_size))
    while True:
        try:
            missing = [r for r, key in zip(range(world_size), keys) if r in missing
                       and not store.check([key])]
        except (RuntimeError, OSError) as exc:
            who = ", ".join(_describe(federation, r) for r in missing if r != rank)
            raise PartyFailedError(
                f"{me} lost the rendezvous at {host}:{port} (hosted by {host_party}) while "
                f"waiting for {who}, who never arrived: the host gave up or stopped "
                f"({str(exc).splitlines()[0]})", party=federation.party_names[rank],
                rank=rank) from None
        if not missing:
            break
        if patient:
            _wait_patiently(store, f"{base.rsplit('/', 1)[0]}/stop",
                            [_describe(federation, r) for r in missing], hosts=is_master)
        elif time.monotonic() > deadline:
            who = ", ".join(_describe(federation, r) for r in missing)
            raise PartyFailedError(
                f"{me} waited {timeout_s:g} s at the rendezvous {host}:{port} for {who}, who never "
                "arrived. Start every party (same federation file, same network.address and "
                "network.port), or raise network.timeout_s if they start slowly.",
                party=federation.party_names[rank], rank=rank)
        time.sleep(0.05)
    PEERS.clear()
    for r, key in enumerate(keys):
        # A peer's roll-call entry only labels addresses in error messages; it is read as
        # size-limited JSON against a fixed schema, and ignored (name only) if it is not that.
        try:
            PEERS[r] = wire.decode(bytes(store.get(key)), ROLL_CALL_WIRE, limit=ROLL_CALL_LIMIT)
        except (RuntimeError, MpcFiError):
            PEERS[r] = {"name": federation.party_names[r]}
    if patient:  # what follows (the channels' mesh) lives under this session's epoch
        store = dist.PrefixStore(base.rsplit("/", 1)[0] + "/", store)
    return store


#: What the installed wrappers use; :func:`install` updates it for each run in this process.
_CURRENT: dict[str, Any] = {}


def install(federation: FederationConfig, rank: int, timeout_s: float, *,
            patient: bool = False) -> None:
    """Bound and name every wait of this party's process group (see the module docstring).

    ``patient`` (a served session): the roll call waits for the peers without a deadline
    (:func:`roll_call`). Idempotent; a later call (another run in the same process) replaces the
    federation and the timeout the wrappers use.
    """
    import torch.distributed as dist  # noqa: PLC0415

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    _CURRENT.update(
        federation=federation, timeout=timedelta(seconds=timeout_s), timeout_s=timeout_s,
        agent_store=agent_store, patient=patient,
        prefix=f"mpc-fi/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/" if agent_store
        else "")
    if getattr(dist.init_process_group, "_mpc_fi_bounded", False):
        return
    real_init, real_new_group = dist.init_process_group, dist.new_group

    def init_process_group(backend: Any = None, init_method: str | None = None,
                           timeout: timedelta | None = None, world_size: int = -1, rank: int = -1,
                           store: Any = None, **kwargs: Any) -> Any:
        cur = _CURRENT
        if store is None and init_method and init_method.startswith("tcp://"):
            host, port = parse_tcp(init_method)
            store = dist.PrefixStore(f"{cur['prefix']}mpc-fi/pg", roll_call(
                cur["federation"], host=host, port=port, rank=rank, world_size=world_size,
                timeout_s=cur["timeout_s"], agent_store=cur["agent_store"], prefix=cur["prefix"],
                patient=cur["patient"]))
            init_method = None
        return real_init(backend=backend, init_method=init_method,
                         timeout=timeout or cur["timeout"], world_size=world_size, rank=rank,
                         store=store, **kwargs)

    def new_group(ranks: Any = None, timeout: timedelta | None = None, *args: Any,
                  **kwargs: Any) -> Any:
        return real_new_group(ranks, timeout or _CURRENT["timeout"], *args, **kwargs)

    init_process_group._mpc_fi_bounded = True  # type: ignore[attr-defined]
    dist.init_process_group = init_process_group
    dist.new_group = new_group


_GLOO_SOURCE = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")
_ADDR_RE = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:(\d+)")


def explain_failure(federation: FederationConfig, rank: int, exc: BaseException,
                    phase: str | None) -> str | None:
    """A readable sentence for a torch.distributed failure (None if ``exc`` is not one)."""
    text = str(exc)
    low = text.lower()
    if not isinstance(exc, RuntimeError) or not any(
            k in low for k in ("gloo", "connection", "timed out", "timeout", "peer", "socket")):
        return None
    first = clean_gloo_message(text)
    where = f" (last step: {phase})" if phase else ""
    peers = []
    for addr, _ in _ADDR_RE.findall(text):
        names = [p["name"] for p in PEERS.values() if p.get("address") == addr]
        if len(names) == 1 and names[0] != federation.party_names[rank]:
            peers.append(f"{names[0]} ({addr})")
    if "timed out" in low or "timeout" in low:
        who = ", ".join(peers) if peers else "the other parties"
        return (f"no message from {who} within network.timeout_s{where}: a peer hung or a link "
                f"dropped [{first}]")
    who = ", ".join(peers) if peers else "a peer"
    return f"lost the connection to {who}{where}: that party stopped or its link failed [{first}]"


def clean_gloo_message(text: str) -> str:
    """First line of a gloo error without its source path and boilerplate."""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = _GLOO_SOURCE.sub("", first).split(" This is typically caused")[0].strip()
    return first.rstrip(".")
