"""Wire-level audit (a test and debugging mode): what a party sends, and every decryption.

When enabled for a party, every outgoing torch.distributed call of that process is recorded with
the data it puts on the wire (its own contribution to a collective, a point-to-point payload, a
broadcast from itself, a JSON message of :mod:`mpc_fi.wire`), and every decryption of a shared tensor
(``get_plain_text``) is recorded with its destination and, at the party that receives it, the
opened value. Records go to one file per party so that tests can check that only the agreed
release is opened, only at the querier, and that no secret crosses the wire in plaintext.

The audit writes opened values and raw shares to disk: it weakens security by design and warns.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import wire

#: torch.distributed calls whose first tensor argument is (part of) what this rank sends.
_SENDING_CALLS = ("send", "isend", "reduce", "all_reduce", "gather", "all_gather", "scatter")


@dataclass
class WireRecord:
    op: str
    peer: int | None  # destination / root, None for all-to-all collectives
    data: np.ndarray | bytes


@dataclass
class AuditLog:
    rank: int
    sent: list[WireRecord] = field(default_factory=list)
    #: (destination rank or None for everyone, shape, value opened here or None)
    decryptions: list[tuple[int | None, tuple[int, ...], np.ndarray | None]] = field(default_factory=list)


def _as_array(t: Any) -> np.ndarray:
    return t.detach().cpu().clone().numpy()


class WireAudit:
    """Installs recording wrappers in this process; :meth:`uninstall` restores everything."""

    def __init__(self, rank: int) -> None:
        self.log = AuditLog(rank=rank)
        self._saved: list[tuple[Any, str, Any]] = []

    def _patch(self, owner: Any, name: str, wrapper_factory) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper_factory(original))

    def install(self) -> "WireAudit":
        rank = self.log.rank
        sent = self.log.sent

        def tensor_call(name):
            def factory(original):
                @functools.wraps(original)
                def wrapper(*args, **kwargs):
                    tensor = args[0] if args else kwargs.get("tensor")
                    if name in ("all_gather", "gather"):  # (output list, input) / (input, ...)
                        tensor = args[1] if name == "all_gather" else tensor
                    peer = kwargs.get("dst", args[1] if len(args) > 1 and name in
                                      ("send", "isend", "reduce") else None)
                    if isinstance(tensor, torch.Tensor):
                        sent.append(WireRecord(name, peer, _as_array(tensor)))
                    return original(*args, **kwargs)
                return wrapper
            return factory

        for name in _SENDING_CALLS:
            self._patch(dist, name, tensor_call(name))

        def broadcast_factory(original):
            @functools.wraps(original)
            def wrapper(tensor, src, *args, **kwargs):
                if dist.get_rank() == src:
                    sent.append(WireRecord("broadcast", None, _as_array(tensor)))
                return original(tensor, src, *args, **kwargs)
            return wrapper

        self._patch(dist, "broadcast", broadcast_factory)

        def json_factory(original):
            @functools.wraps(original)
            def wrapper(obj, *args, **kwargs):
                payload = original(obj, *args, **kwargs)
                sent.append(WireRecord("json", None, payload))
                return payload
            return wrapper

        # Every JSON message (handshake, agreements, CrypTen's object channel) as encoded here,
        # before framing; mpc_fi.wire looks ``encode`` up at each call.
        self._patch(wire, "encode", json_factory)

        from ._crypten import load_crypten  # noqa: PLC0415

        primitives = load_crypten().mpc.primitives
        decryptions = self.log.decryptions

        def decrypt_factory(original):
            @functools.wraps(original)
            def wrapper(tensor_self, dst=None):
                value = original(tensor_self, dst=dst)
                mine = dst is None or dst == rank
                decryptions.append((dst, tuple(tensor_self.share.shape),
                                    _as_array(value) if mine else None))
                return value
            return wrapper

        for cls in (primitives.ArithmeticSharedTensor, primitives.BinarySharedTensor):
            self._patch(cls, "get_plain_text", decrypt_factory)
        return self

    def uninstall(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)

    def dump(self, path: str) -> None:
        with open(path, "wb") as fh:
            pickle.dump(self.log, fh)


def load(path: str) -> AuditLog:
    with open(path, "rb") as fh:
        return pickle.load(fh)
