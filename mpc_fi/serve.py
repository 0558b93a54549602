"""Served federations: long-lived parties that answer many query batches.

A served session is started once (``Federation(cfg).start()`` locally, ``mpc-fi serve`` on each
host): every party joins, proves its key, loads its model, and in full mode the owners share
their weights, once. Then the querier's party answers requests from the querier's application
on a **Unix socket** (mode 0600, on the querier's host only: the queries never travel anywhere
else in plaintext), from any number of connected clients, one request at a time; for each, the parties run the same batches as a
one-shot run and the querier's application receives exactly what a one-shot run gives.

Messages on the socket are length-prefixed :mod:`mpc_fi.records` (JSON and numpy arrays, never
pickle), at most :data:`REQUEST_LIMIT` bytes. Requests: ``{"op": "predict", "x": array}``,
``{"op": "health"}``, ``{"op": "stop"}``. Replies: ``{"ok": true, ...}`` or ``{"ok": false,
"type": <error class>, "message": ...}``.

A request whose failure every party agrees on (bad input, a budget refused by the owners, a bad
model output) is answered with that error and the session goes on. A party that stops ends the
session: the request in flight is answered with an error naming it, the other parties rejoin a
new session (:class:`~mpc_fi.errors.SessionLost`) and, until the lost party is back, the querier
refuses every request naming whom it waits for (``health`` says ``waiting``).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import errors, records
from .errors import InputError, MpcFiError, PartyFailedError, WireFormatError
from .result import Prediction

#: Largest request or reply on the querier's socket, in bytes.
REQUEST_LIMIT = 1 << 31
_LENGTH = struct.Struct("!Q")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_message(sock: socket.socket, obj: Any) -> None:
    data = records.dumps(obj)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def recv_message(sock: socket.socket, limit: int = REQUEST_LIMIT) -> Any:
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if length > limit:
        raise WireFormatError(f"a message of {length} bytes exceeds the limit of {limit}")
    return records.loads(_recv_exact(sock, length))


def error_reply(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def raise_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or the error it carries raised as the same mpc-fi class."""
    if reply.get("ok"):
        return reply
    cls = getattr(errors, str(reply.get("type")), None)
    message = str(reply.get("message"))
    if isinstance(cls, type) and issubclass(cls, MpcFiError) and cls is not PartyFailedError:
        raise cls(message)
    raise PartyFailedError(message)


class ServingStopped(Exception):
    """The querier's application (or SIGTERM) stopped a served querier while no session ran."""


class Endpoint:
    """The querier party's side of the socket: any number of connected clients (a pipeline's
    processes, an estimator), one request at a time, answered in arrival order."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.exists():
            self.path.unlink()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound under a temporary name and renamed once listening: whoever sees the path can
        # connect at once.
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        old = os.umask(0o177)  # the socket is this user's only: queries are secret
        try:
            self.server.bind(str(staging))
        finally:
            os.umask(old)
        self.server.listen(16)
        os.replace(staging, self.path)
        self.clients: list[socket.socket] = []
        self.client: socket.socket | None = None  # the one whose request is being answered
        self.stopping = threading.Event()  # SIGTERM: finish the request in flight, then stop

    def next(self) -> dict[str, Any]:
        """The next request from any client (``{"op": "stop"}`` when asked to stop)."""
        while not self.stopping.is_set():
            request = self._poll(0.5)
            if request is not None:
                return request
        return {"op": "stop"}

    def _poll(self, timeout_s: float) -> dict[str, Any] | None:
        """One request that is ready within ``timeout_s`` (new clients are taken meanwhile)."""
        try:
            ready, _, _ = select.select([self.server, *self.clients], [], [], timeout_s)
        except InterruptedError:
            return None
        for sock in ready:
            if sock is self.server:
                client, _ = self.server.accept()
                client.settimeout(None)
                self.clients.append(client)
                continue
            self.client = sock
            try:
                request = recv_message(sock)
            except (ConnectionError, OSError):
                self._drop()
                continue
            except MpcFiError as exc:
                self.reply(error_reply(exc))
                self._drop()
                continue
            if not isinstance(request, dict) or request.get("op") not in (
                    "predict", "health", "stop"):
                self.reply(error_reply(InputError(
                    "a request is {'op': 'predict', 'x': array}, {'op': 'health'} or "
                    "{'op': 'stop'}")))
                continue
            return request
        return None

    def waiting(self, missing: list[str]) -> None:
        """While the parties (re)form a session: answer what is asked now, without a session
        (``health``: waiting, and for whom; ``predict``: refused, naming whom the federation
        waits for; ``stop``, or SIGTERM: :class:`ServingStopped`)."""
        while True:
            if self.stopping.is_set():
                raise ServingStopped()
            request = self._poll(0.0)
            if request is None:
                return
            who = ", ".join(missing)
            if request["op"] == "health":
                self.reply({"ok": True, "status": "waiting", "missing": missing})
            elif request["op"] == "predict":
                self.reply(error_reply(PartyFailedError(
                    f"the federation is waiting for {who} to join: no session is running (a "
                    "party was lost, or has not started), so no query was answered; retry once "
                    "it is back")))
            else:
                self.reply({"ok": True, "stopped": True})
                raise ServingStopped()

    def reply(self, obj: dict[str, Any]) -> None:
        """Answer the client whose request was returned last."""
        if self.client is None:
            return
        try:
            send_message(self.client, obj)
        except OSError:
            self._drop()

    def _drop(self) -> None:
        if self.client is not None:
            if self.client in self.clients:
                self.clients.remove(self.client)
            self.client.close()
            self.client = None

    def close(self) -> None:
        for sock in self.clients:
            sock.close()
        self.clients, self.client = [], None
        self.server.close()
        try:
            self.path.unlink()
        except OSError:
            pass


class ServedFederation:
    """A client of a served federation: ``predict`` / ``predict_proba`` / ``run`` as on
    :class:`~mpc_fi.Federation`, answered by long-lived parties.

    Made by :meth:`mpc_fi.Federation.start` (local parties, stopped by :meth:`close` or at the
    end of a ``with`` block) or :func:`connect` (parties served by ``mpc-fi serve``; ``close``
    only disconnects, ``stop`` ends the session).
    """

    def __init__(self, path: str | os.PathLike[str], *, launcher: Any = None,
                 timeout_s: float = 600.0, reveal: str | None = None) -> None:
        self.path = Path(path)
        self.launcher = launcher
        self.timeout_s = timeout_s
        self.reveal = reveal
        self.sock = self._connect()
        self._closed = False

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise PartyFailedError(f"no served federation at {self.path}: {exc.strerror or exc} "
                                   "(is `mpc-fi serve` running for the querier?)") from None
        return sock

    def _querier_left(self) -> bool:
        """The querier closed this connection (it left a lost session to rejoin a new one)."""
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
            return bool(ready) and self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # ValueError: closed here after a failed reconnection
            return True

    def _reconnect(self, wait_s: float = 60.0) -> None:
        """Reach the querier of the session that replaced a lost one (the same socket path)."""
        self.sock.close()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.sock = self._connect()
                return
            except PartyFailedError as exc:
                if self.launcher is not None:  # a local party that stopped for good: named
                    self.launcher.raise_first_failure()
                if time.monotonic() > deadline:
                    raise PartyFailedError(f"the served querier left its session and was not "
                                           f"back within {wait_s:g} s: {exc}") from None
                time.sleep(0.1)

    # -- requests --------------------------------------------------------------------------
    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise PartyFailedError("this served federation is closed")
        if self._querier_left():  # nothing was asked of it: safe to ask its successor
            self._reconnect()
        try:
            send_message(self.sock, request)
            reply = recv_message(self.sock)
        except socket.timeout:
            raise PartyFailedError(f"the served querier did not answer within {self.timeout_s:g} s"
                                   ) from None
        except (ConnectionError, OSError) as exc:
            raise self._gone(exc) from None  # the next call reconnects (_querier_left)
        return raise_reply(reply)

    def _gone(self, exc: BaseException) -> MpcFiError:
        if self.launcher is not None:
            try:
                self.launcher.raise_first_failure()
            except MpcFiError as failure:
                return failure
        return PartyFailedError(f"the served querier closed the connection ({exc}): its session "
                                "ended (see the parties' logs); the next call reaches the session "
                                "that replaces it, once every party is back")

    def health(self) -> dict[str, Any]:
        """``{"status": "ready", "parties": [...], "requests": n, ...}`` from the querier, or
        ``{"status": "waiting", "missing": [...]}`` while parties are still to join."""
        return self._ask({"op": "health"})

    def wait_ready(self, wait_s: float, *, check: Any = None) -> dict[str, Any]:
        """Ask ``health`` until every party has joined or ``wait_s`` has passed (``check``, if
        given, runs between asks and may raise); return the last answer."""
        deadline = time.monotonic() + wait_s
        while (health := self.health())["status"] != "ready" and time.monotonic() < deadline:
            if check is not None:
                check()
            time.sleep(0.05)
        return health

    def run(self, X: Any) -> Prediction:
        x = np.asarray(X)
        reply = self._ask({"op": "predict", "x": x})
        return Prediction(labels=np.asarray(reply["labels"]), scores=reply.get("scores"))

    def predict(self, X: Any) -> np.ndarray:
        return self.run(X).labels

    def predict_proba(self, X: Any) -> np.ndarray:
        if self.reveal is not None and self.reveal != "scores":
            from .errors import ProtocolError  # noqa: PLC0415

            raise ProtocolError("predict_proba needs the federation to allow reveal: scores "
                                "(by default only the label is released)")
        scores = self.run(X).scores
        if scores is None:
            from .errors import ProtocolError  # noqa: PLC0415

            raise ProtocolError("this federation releases labels only (reveal: label)")
        return np.asarray(scores)

    # -- ending ----------------------------------------------------------------------------
    def stop(self) -> None:
        """End the session: every party leaves (the querier after answering this)."""
        if not self._closed:
            try:
                self._ask({"op": "stop"})
            except MpcFiError:
                pass
        self._disconnect()
        if self.launcher is not None:
            self.launcher.finish(self.timeout_s)

    def close(self) -> None:
        """Local session: stop every party. Connected session: disconnect only."""
        if self.launcher is not None:
            self.stop()
        else:
            self._disconnect()

    def _disconnect(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "ServedFederation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(path: str | os.PathLike[str], *, timeout_s: float = 600.0,
            wait_s: float = 0.0) -> ServedFederation:
    """Reach a federation served by ``mpc-fi serve`` through the querier's socket at ``path``,
    waiting up to ``wait_s`` for it to appear and for every party to join (after that, a request
    to a federation still incomplete is refused with an error naming whom it waits for)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fed = ServedFederation(path, timeout_s=timeout_s)
            break
        except PartyFailedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    fed.wait_ready(deadline - time.monotonic())
    return fed
