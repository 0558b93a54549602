"""The parties' channels: a torch.distributed backend over ZeroMQ, authenticated and encrypted.

Why a backend of its own. The gloo in the torch wheels has no TLS, so between hosts every share
would cross the wire in the clear; and a gloo collective costs several one-way network delays in
sequence (its ring and tree algorithms), where opening a value needs one. This module registers
the ``mpcfi`` backend with ``torch.distributed``: CrypTen, :mod:`mpc_fi.wire` and the audit keep
calling ``dist.all_reduce``, ``dist.send``... unchanged, and every call lands here.

**Channels.** Every process binds one ZeroMQ ``ROUTER`` socket and connects one ``DEALER`` to
each peer's (a full mesh; endpoints are exchanged through the rendezvous store). With
``curve=True`` (transport ``curve``) the sockets run CurveZMQ (RFC 26, libsodium/TweetNaCl in
the pyzmq wheels): the handshake proves that each end holds the secret key of the public key the
federation file names for it (:mod:`mpc_fi.keys`), and every message is encrypted and
authenticated (Curve25519 key agreement with short-term keys, XSalsa20-Poly1305). The listening
side checks each client's long-term key against the federation's keys (a ZAP handler); a
process without one of them is refused before it can send or read a protocol byte. A message's
sender is the rank of the key that authenticated its connection, never what the message claims.
With ``curve=False`` (transport ``zmq``) the same mesh runs without authentication or
encryption: loopback, or a network the federation acknowledges as protected.

**Collectives in one delay.** ``all_reduce``, ``all_gather`` and ``barrier`` send every party's
part to every other party at once; ``broadcast``, ``reduce``, ``gather`` and ``scatter`` are one
send from or to the root. Sums are combined in rank order, so every party gets the same bits.

**Messages.** A fixed 40-byte header (``HEADER``: magic, kind, group, sequence number or tag,
claimed source, dtype, length) and the tensor's raw bytes. Nothing is unpickled. A message whose
claimed source differs from its authenticated sender, whose group is unknown, whose dtype or
size does not match the receive it answers, or that would push the buffered bytes past
``buffer_limit`` raises :class:`~mpc_fi.errors.WireFormatError` naming the sender.

**Failures.** Every wait is bounded by the group's timeout (``network.timeout_s``); a peer whose
connection closes while a party waits on it, or whose handshake fails, is named at once in a
:class:`~mpc_fi.errors.PartyFailedError`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.futures import Future

from .errors import ConfigError, PartyFailedError, WireFormatError

BACKEND = "mpcfi"
TRANSPORTS = ("gloo", "zmq", "curve")

#: magic, kind, group (4 bytes of SHA-256 of torch's group name), seq/tag, src, dtype, nbytes
HEADER = struct.Struct("!4sB4sQiBQ")
_MAGIC = b"MPF1"
_HELLO, _COLLECTIVE, _P2P = 0, 1, 2

_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                    torch.bool, torch.float32, torch.float64, torch.float16,
                                    torch.bfloat16)
_CODE = {d: i for i, d in enumerate(_DTYPES)}

log = logging.getLogger("mpc_fi.channel")


@dataclass(frozen=True)
class ChannelConfig:
    """What this process's mesh needs: every process's name and public key (by global rank,
    the dealer included), this party's secret key, the address it listens on, and limits."""

    names: tuple[str, ...]
    public_keys: tuple[str, ...] = ()  # () : transport ``zmq`` (no CURVE)
    secret_key: str | None = None
    listen: str = "127.0.0.1"
    timeout_s: float = 120.0
    buffer_limit: int = 8 << 30  # bytes buffered from peers ahead of their receive

    @property
    def curve(self) -> bool:
        return bool(self.public_keys)

    def __post_init__(self) -> None:
        if self.public_keys and len(self.public_keys) != len(self.names):
            raise ConfigError(f"{len(self.names)} parties but {len(self.public_keys)} keys",
                              key="identities")
        if self.public_keys and not self.secret_key:
            raise ConfigError("an authenticated channel needs this party's secret key",
                              key="key")


_CONFIG: ChannelConfig | None = None
_MESH: "Mesh | None" = None
_UNBOUNDED: set[int] = set()  # peers waited for without a deadline (see unbounded)
_LOCK = threading.Lock()


def configure(config: ChannelConfig) -> None:
    """Set what the next process group of this process uses; registers the backend."""
    global _CONFIG
    _CONFIG = config
    register()


def register() -> None:
    if BACKEND.upper() not in dist.Backend._plugins:  # noqa: SLF001 - torch's plugin table
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])


def mesh() -> "Mesh | None":
    """This process's mesh, once its default group exists."""
    return _MESH


def close(linger_s: float = 10.0) -> None:
    """Flush what is still queued to peers (up to ``linger_s``) and close every socket."""
    global _MESH
    with _LOCK:
        m, _MESH = _MESH, None
    if m is not None:
        m.close(linger_s)


atexit.register(close)


@contextlib.contextmanager
def unbounded(src: int) -> Iterator[None]:
    """Wait for ``src`` without a deadline inside this block (a served party idle between
    requests). A peer that stops is still noticed: its connection closes, or its heartbeats
    stop (10 s)."""
    # Module-wide, so that it also holds for a mesh made inside the block (the dealer's is made
    # when CrypTen's TTPServer starts).
    _UNBOUNDED.add(src)
    try:
        yield
    finally:
        _UNBOUNDED.discard(src)


def _group_tag(group_id: str) -> bytes:
    return hashlib.sha256(group_id.encode()).digest()[:4]


class Mesh:
    """The sockets of one party process and the messages that arrived ahead of their receive."""

    def __init__(self, config: ChannelConfig, rank: int, store: Any, timeout_s: float) -> None:
        import zmq  # noqa: PLC0415

        self.zmq, self.config, self.rank = zmq, config, rank
        self.world = len(config.names)
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.auth = None
        self.key_rank: dict[bytes, int] = {}
        self.inbox: dict[tuple[bytes, int, int, int], deque[Any]] = {}
        self.buffered = 0
        self.state: dict[int, str] = {}  # peer -> "connected" | "closed" | failure text
        self.closed_at: dict[int, float] = {}
        self.heard: set[int] = set()
        self.sent_bytes = 0
        self.router = self.ctx.socket(zmq.ROUTER)
        self._tune(self.router)
        if config.curve:
            from zmq.auth.thread import ThreadAuthenticator  # noqa: PLC0415

            self.key_rank = {k.encode("ascii"): r for r, k in enumerate(config.public_keys)
                             if r != rank}
            allowed = set(self.key_rank)
            self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("mpc_fi.channel.zap"))
            self.auth.start()

            class Keys:
                @staticmethod
                def callback(domain: str, key: bytes) -> bool:
                    return key in allowed

            self.auth.configure_curve_callback("mpc-fi", credentials_provider=Keys())
            self.router.curve_server = True
            self.router.curve_secretkey = config.secret_key.encode("ascii")
            self.router.curve_publickey = config.public_keys[rank].encode("ascii")
            self.router.zap_domain = b"mpc-fi"
        self.router_monitor = self.router.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        host = config.listen
        bind_host = f"[{host}]" if ":" in host else host
        if ":" in host:
            self.router.ipv6 = True
        self.router.bind(f"tcp://{bind_host}:0")
        endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        store.set(f"mpc-fi/mesh/{rank}", endpoint)
        self.endpoints: dict[int, str] = {}
        self.out: dict[int, Any] = {}
        self.monitors: dict[Any, int] = {}
        deadline = time.monotonic() + timeout_s
        for peer in range(self.world):
            if peer == rank:
                continue
            self.endpoints[peer] = self._endpoint(store, peer, deadline)
            sock = self.ctx.socket(zmq.DEALER)
            self._tune(sock)
            sock.setsockopt(zmq.ROUTING_ID, str(rank).encode())
            if config.curve:
                sock.curve_secretkey = config.secret_key.encode("ascii")
                sock.curve_publickey = config.public_keys[rank].encode("ascii")
                sock.curve_serverkey = config.public_keys[peer].encode("ascii")
            mon = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_DISCONNECTED)
            self.monitors[mon] = peer
            sock.connect(self.endpoints[peer])
            self.out[peer] = sock
        # Nobody opens a channel before every party has read every address: a party that fails
        # its first handshake (and, as rank 0, takes the rendezvous store down with it) must not
        # leave the others without the addresses they need to find out for themselves.
        store.set(f"mpc-fi/mesh-read/{rank}", "1")
        for peer in self.out:
            self._wait_key(store, f"mpc-fi/mesh-read/{peer}", peer, deadline, "read the addresses")
        store.set(f"mpc-fi/mesh-done/{rank}", "1")  # this party needs the store no more
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.router_monitor, zmq.POLLIN)
        for mon in self.monitors:
            self.poller.register(mon, zmq.POLLIN)
        try:
            self._hello(deadline)
        except PartyFailedError:
            if rank == 0:  # rank 0 hosts the store: leave it up until the others are done with it
                self._linger_for(store, time.monotonic() + min(10.0, timeout_s))
            raise

    def _linger_for(self, store: Any, until: float) -> None:
        for peer in self.out:
            try:
                while not store.check([f"mpc-fi/mesh-done/{peer}"]):
                    if time.monotonic() > until:
                        return
                    time.sleep(0.01)
            except RuntimeError:
                return

    def _tune(self, sock: Any) -> None:
        zmq = self.zmq
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)

    def name(self, rank: int) -> str:
        return f"{self.config.names[rank]} (rank {rank})"

    def _wait_key(self, store: Any, key: str, peer: int, deadline: float, what: str) -> bytes:
        while True:
            try:
                if store.check([key]):
                    return bytes(store.get(key))
            except RuntimeError as exc:
                raise PartyFailedError(f"lost the rendezvous while waiting for {self.name(peer)} "
                                       f"to {what}: {str(exc).splitlines()[0]}",
                                       party=self.config.names[peer], rank=peer) from None
            if time.monotonic() > deadline:
                raise PartyFailedError(f"{self.name(peer)} did not {what} within "
                                       f"{self.timeout_s:g} s", party=self.config.names[peer],
                                       rank=peer)
            time.sleep(0.01)

    def _endpoint(self, store: Any, peer: int, deadline: float) -> str:
        raw = self._wait_key(store, f"mpc-fi/mesh/{peer}", peer, deadline,
                             "publish its address")
        text = raw.decode("ascii", "replace")
        if len(raw) > 128 or not text.startswith("tcp://"):
            raise WireFormatError(f"the rendezvous holds no valid address for {self.name(peer)}: "
                                  f"{text[:80]!r}", party=self.config.names[peer], rank=peer)
        return text

    # -- the handshake before any protocol byte -------------------------------------------
    def _hello(self, deadline: float) -> None:
        """Every peer proves its key (CURVE) and says hello; bounded by the timeout."""
        for peer, sock in self.out.items():
            sock.send_multipart([HEADER.pack(_MAGIC, _HELLO, b"\0" * 4, 0, self.rank, 0, 0), b""])
        while len(self.heard) < self.world - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [p for p in self.out if p not in self.heard]
                detail = "; ".join(f"{self.name(p)} at {self.endpoints[p]}: "
                                   f"{self.state.get(p, 'no answer')}" for p in missing)
                first = missing[0]
                raise PartyFailedError(
                    f"could not open an authenticated channel to {detail} within "
                    f"{self.timeout_s:g} s", party=self.config.names[first], rank=first)
            self._pump(min(left, 0.5))

    # -- receiving -------------------------------------------------------------------------
    def _pump(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for anything: file incoming messages, note peer events."""
        zmq = self.zmq
        events = dict(self.poller.poll(max(0, int(wait_s * 1000))))
        for mon, peer in self.monitors.items():
            if mon in events:
                self._peer_event(mon, peer)
        if self.router_monitor in events:
            self._listener_event()
        if self.router not in events:
            return
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._file(frames)

    def _peer_event(self, mon: Any, peer: int) -> None:
        from zmq.utils.monitor import recv_monitor_message  # noqa: PLC0415

        zmq = self.zmq
        while True:
            try:
                msg = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = msg["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.state[peer] = "connected"
                self.closed_at.pop(peer, None)
            elif event == zmq.EVENT_DISCONNECTED:
                if self.state.get(peer) == "connected":
                    self.state[peer] = "closed its connection"
                    self.closed_at[peer] = time.monotonic()
            else:
                self.state[peer] = (
                    "the handshake failed: that process does not hold the secret key of the "
                    "public key the federation names for it (an impostor, or a wrong key file)"
                    if self.config.curve else "the handshake failed")
                raise PartyFailedError(
                    f"could not authenticate {self.name(peer)} at {self.endpoints[peer]}: "
                    f"{self.state[peer]}", party=self.config.names[peer], rank=peer)

    def _listener_event(self) -> None:
        from zmq.utils.monitor import recv_monitor_message  # noqa: PLC0415

        while True:
            try:
                msg = recv_monitor_message(self.router_monitor, self.zmq.NOBLOCK)
            except self.zmq.Again:
                return
            log.warning("refused a connection on %s: the peer proved none of this federation's "
                        "keys", msg["endpoint"].decode(errors="replace"))

    def _sender(self, frames: list[Any]) -> int:
        if self.config.curve:
            user = frames[1].get("User-Id")
            rank = self.key_rank.get(user.encode("ascii") if user else b"")
            if rank is None:  # cannot happen: the ZAP handler admitted only known keys
                raise WireFormatError("a message came from an unknown key")
            return rank
        try:
            rank = int(bytes(frames[0].bytes).decode())
        except ValueError:
            raise WireFormatError("a message came from an unnamed peer") from None
        if not 0 <= rank < self.world or rank == self.rank:
            raise WireFormatError(f"a message claims to come from rank {rank}")
        return rank

    def _file(self, frames: list[Any]) -> None:
        if len(frames) != 3:  # [routing id, header, payload]
            raise WireFormatError(f"a peer sent a message of {len(frames)} frames, not the "
                                  "channel's three")
        sender = self._sender(frames)
        who = self.config.names[sender]
        if len(frames[1].bytes) != HEADER.size:
            raise WireFormatError(f"{self.name(sender)} sent a message that is not of the "
                                  "channel's format", party=who, rank=sender)
        magic, kind, group, key, src, _dtype, nbytes = HEADER.unpack(frames[1].bytes)
        if magic != _MAGIC or kind not in (_HELLO, _COLLECTIVE, _P2P) or src != sender \
                or nbytes != len(frames[2]):
            raise WireFormatError(f"{self.name(sender)} sent a malformed message header (claimed "
                                  f"source {src}, kind {kind})", party=who, rank=sender)
        if kind == _HELLO:
            self.heard.add(sender)
            return
        self.buffered += nbytes
        if self.buffered > self.config.buffer_limit:
            raise WireFormatError(f"{self.name(sender)} sent more than {self.config.buffer_limit} "
                                  "bytes ahead of what the protocol asked for", party=who,
                                  rank=sender)
        self.inbox.setdefault((group, kind, key, sender), deque()).append(frames[1:])

    def take(self, group: bytes, kind: int, key: int, src: int, timeout_s: float) -> tuple[Any, Any]:
        """The next message of ``(group, kind, key)`` from ``src``: (header frame, payload)."""
        slot = (group, kind, key, src)
        deadline = time.monotonic() + timeout_s
        while True:
            queue = self.inbox.get(slot)
            if queue:
                header, payload = queue.popleft()
                if not queue:
                    del self.inbox[slot]
                self.buffered -= len(payload)
                return header, payload
            now = time.monotonic()
            closed = self.closed_at.get(src)
            if closed is not None and now - closed > 1.0:
                raise PartyFailedError(f"{self.name(src)} closed its connection while this party "
                                       "waited for its message: that party stopped",
                                       party=self.config.names[src], rank=src)
            if src in _UNBOUNDED:
                deadline = now + timeout_s
            if now > deadline:
                raise PartyFailedError(f"no message from {self.name(src)} within "
                                       f"{timeout_s:g} s (network.timeout_s): that party hung or "
                                       "its link dropped", party=self.config.names[src], rank=src)
            self._pump(min(deadline - now, 0.2))

    # -- sending ---------------------------------------------------------------------------
    def send(self, dst: int, group: bytes, kind: int, key: int, tensor: torch.Tensor) -> None:
        data = tensor.detach()
        if not data.is_contiguous():
            data = data.contiguous()
        payload = data.view(torch.uint8).numpy().tobytes() if data.dim() else \
            data.reshape(1).view(torch.uint8).numpy().tobytes()
        header = HEADER.pack(_MAGIC, kind, group, key, self.rank, _CODE[data.dtype], len(payload))
        self.out[dst].send_multipart([header, payload])
        self.sent_bytes += len(payload)

    def close(self, linger_s: float) -> None:
        for sock in self.out.values():
            sock.setsockopt(self.zmq.LINGER, int(linger_s * 1000))
        try:
            for sock in list(self.out.values()) + [self.router]:
                sock.disable_monitor()
            for sock in list(self.monitors) + [self.router_monitor]:
                sock.close(0)
            for sock in self.out.values():
                sock.close()
            self.router.close(0)
            if self.auth is not None:
                self.auth.stop()
        finally:
            self.ctx.term()


def _into(tensor: torch.Tensor, header: Any, payload: Any, who: str, rank: int) -> None:
    """Copy a received payload into ``tensor`` after checking its dtype and size."""
    _m, _k, _g, _key, _src, code, nbytes = HEADER.unpack(header.bytes)
    expect = tensor.numel() * tensor.element_size()
    if code >= len(_DTYPES) or _DTYPES[code] != tensor.dtype or nbytes != expect:
        raise WireFormatError(f"{who} sent {nbytes} bytes of "
                              f"{_DTYPES[code] if code < len(_DTYPES) else '?'} where "
                              f"{expect} bytes of {tensor.dtype} were expected", party=who.split(
                                  " (")[0], rank=rank)
    src = torch.frombuffer(bytearray(payload.buffer), dtype=torch.uint8) if nbytes else \
        torch.empty(0, dtype=torch.uint8)
    flat = src.view(tensor.dtype).reshape(tensor.shape)
    tensor.copy_(flat)


class _Done(dist.Work):
    def __init__(self, result: Any = None) -> None:
        super().__init__()
        self._future: Future = Future()
        self._future.set_result(result)

    def wait(self, timeout: timedelta | None = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> Future:
        return self._future


class _Pending(dist.Work):
    """An ``irecv``: the message is taken when the caller waits (incoming messages are filed
    as they arrive, so nothing is lost meanwhile)."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self._run, self._done = run, False

    def wait(self, timeout: timedelta | None = None) -> bool:
        if not self._done:
            self._run()
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done

    def get_future(self) -> Future:
        self.wait()
        fut: Future = Future()
        fut.set_result(None)
        return fut


def _combine(op: Any, parts: list[torch.Tensor]) -> torch.Tensor:
    out = parts[0].clone()
    for p in parts[1:]:
        if op == dist.ReduceOp.SUM:
            out.add_(p)
        elif op == dist.ReduceOp.BXOR:
            out.bitwise_xor_(p)
        elif op == dist.ReduceOp.BAND:
            out.bitwise_and_(p)
        elif op == dist.ReduceOp.BOR:
            out.bitwise_or_(p)
        elif op == dist.ReduceOp.MAX:
            torch.maximum(out, p, out=out)
        elif op == dist.ReduceOp.MIN:
            torch.minimum(out, p, out=out)
        elif op == dist.ReduceOp.PRODUCT:
            out.mul_(p)
        else:
            raise NotImplementedError(f"reduce op {op} is not supported by the mpcfi backend")
    return out


class MeshGroup(dist.ProcessGroup):
    """One torch.distributed group over this process's :class:`Mesh` (see the module doc)."""

    def __init__(self, mesh_: Mesh, group_id: str, ranks: list[int], rank: int, size: int,
                 timeout_s: float) -> None:
        super().__init__(rank, size)
        self._name = group_id
        self.mesh, self.ranks, self.timeout_s = mesh_, list(ranks), timeout_s
        self.tag = _group_tag(group_id)
        self.seq = 0
        self.me = ranks[rank]

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND

    @property
    def group_name(self) -> str:
        """torch hands this object back as the group itself; its C++ side has no backend to
        hold the name, so it is kept here (``destroy_process_group`` reads it)."""
        return self._name

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _recv_into(self, tensor: torch.Tensor, kind: int, key: int, src: int) -> None:
        header, payload = self.mesh.take(self.tag, kind, key, src, self.timeout_s)
        _into(tensor, header, payload, self.mesh.name(src), src)

    def _received(self, like: torch.Tensor, key: int, src: int) -> torch.Tensor:
        out = torch.empty_like(like)
        self._recv_into(out, _COLLECTIVE, key, src)
        return out

    def _others(self) -> list[int]:
        return [g for g in self.ranks if g != self.me]

    def _to_others(self, key: int, t: torch.Tensor) -> None:
        for peer in self._others():
            self.mesh.send(peer, self.tag, _COLLECTIVE, key, t)

    def _combine_all(self, t: torch.Tensor, key: int, op: Any) -> None:
        """``t`` := every party's part combined, in rank order (the same bits everywhere)."""
        parts = [t if g == self.me else self._received(t, key, g) for g in self.ranks]
        t.copy_(_combine(op, parts))

    # -- collectives -----------------------------------------------------------------------
    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        key = self._next()
        op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
        for t in tensors:
            self._to_others(key, t)
        for t in tensors:
            self._combine_all(t, key, op)
        return _Done(tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                  opts: Any) -> dist.Work:
        key = self._next()
        for t in inputs:
            self._to_others(key, t)
        for outs, t in zip(outputs, inputs):
            for i, g in enumerate(self.ranks):
                if g == self.me:
                    outs[i].copy_(t)
                else:
                    self._recv_into(outs[i], _COLLECTIVE, key, g)
        return _Done(outputs)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        key = self._next()
        root = self.ranks[opts.rootRank]
        for t in tensors:
            if root == self.me:
                self._to_others(key, t)
            else:
                self._recv_into(t, _COLLECTIVE, key, root)
        return _Done(tensors)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        key = self._next()
        root = self.ranks[opts.rootRank]
        op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
        for t in tensors:
            if root != self.me:
                self.mesh.send(root, self.tag, _COLLECTIVE, key, t)
            else:
                self._combine_all(t, key, op)
        return _Done(tensors)

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor],
               opts: Any) -> dist.Work:
        key = self._next()
        root = self.ranks[opts.rootRank]
        if root != self.me:
            self.mesh.send(root, self.tag, _COLLECTIVE, key, inputs[0])
        else:
            for i, g in enumerate(self.ranks):
                if g == self.me:
                    outputs[0][i].copy_(inputs[0])
                else:
                    self._recv_into(outputs[0][i], _COLLECTIVE, key, g)
        return _Done(outputs)

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]],
                opts: Any) -> dist.Work:
        key = self._next()
        root = self.ranks[opts.rootRank]
        if root == self.me:
            for i, g in enumerate(self.ranks):
                if g == self.me:
                    outputs[0].copy_(inputs[0][i])
                else:
                    self.mesh.send(g, self.tag, _COLLECTIVE, key, inputs[0][i])
        else:
            self._recv_into(outputs[0], _COLLECTIVE, key, root)
        return _Done(outputs)

    def barrier(self, opts: Any = None) -> dist.Work:
        key = self._next()
        token = torch.zeros(1, dtype=torch.uint8)
        self._to_others(key, token)
        for g in self._others():
            self._received(token, key, g)
        return _Done()

    # -- point to point --------------------------------------------------------------------
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        for t in tensors:
            self.mesh.send(self.ranks[dst], self.tag, _P2P, tag, t)
        return _Done()

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        peer = self.ranks[src]

        def run() -> None:
            for t in tensors:
                self._recv_into(t, _P2P, tag, peer)

        return _Pending(run)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> dist.Work:
        raise NotImplementedError("the mpcfi backend receives from a named source only")


def _create(opts: Any, _backend_options: Any = None) -> MeshGroup:
    """torch.distributed's creator for the ``mpcfi`` backend (one call per group)."""
    global _MESH
    config = _CONFIG
    if config is None:
        raise ConfigError("the mpcfi backend needs mpc_fi.channel.configure() before "
                          "torch.distributed.init_process_group", key="network.transport")
    ranks = list(opts.global_ranks_in_group) or list(range(opts.group_size))
    timeout_s = opts.timeout.total_seconds() if opts.timeout else config.timeout_s
    with _LOCK:
        if _MESH is None:
            if len(ranks) != len(config.names):
                raise ConfigError(f"the default group has {len(ranks)} processes but the channel "
                                  f"knows {len(config.names)} parties", key="network.transport")
            _MESH = Mesh(config, ranks[opts.group_rank], opts.store, timeout_s)
        m = _MESH
    return MeshGroup(m, str(opts.group_id), ranks, opts.group_rank, opts.group_size, timeout_s)
