"""A rogue party for the wire tests: runs in a forked party process, never in the test process.

:func:`child_main` stands in for :func:`launchers.entry.child_main`. In the rank named by
``rogue.json`` in the run folder it first replaces :func:`mpc_fi.wire.encode` so that every
message this party sends is the attack's bytes (its first message is the handshake hello); every
other rank runs unchanged. :func:`send_ttp_request` is party 0 sending the dealer a request that
CrypTen's own client would never send.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

ROGUE_FILE = "rogue.json"


class _RunsShell:
    """Unpickling this runs ``touch <marker>``: what all_gather_object would have done."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ClaimsHuge(bytes):
    """A payload that announces 2**40 bytes: a receiver that believed it would allocate a TiB."""

    def __len__(self) -> int:
        return 1 << 40


def attack_bytes(attack: str, marker: str) -> bytes:
    if attack == "pickle":  # the binary pickle all_gather_object sends (not UTF-8)
        return pickle.dumps(_RunsShell(marker))
    if attack == "pickle0":  # protocol 0: plain ASCII, so valid UTF-8, but not JSON
        return pickle.dumps(_RunsShell(marker), protocol=0)
    if attack == "oversize":
        return _ClaimsHuge(b"{}")
    if attack == "schema":  # well-formed JSON, wrong structure: a number for a name, extra key
        return json.dumps({"name": 7, "fingerprint": "x", "versions": {}, "extra": 1}).encode()
    raise ValueError(attack)


def install_attack(attack: str, marker: str) -> None:
    from mpc_fi import wire  # noqa: PLC0415

    payload = attack_bytes(attack, marker)
    wire.encode = lambda obj, **kwargs: payload


def child_main(*args: Any, **kwargs: Any) -> None:
    """``launchers.entry.child_main``, with the attack installed first in the rogue rank."""
    rank, run_dir = args[1], Path(args[2])
    spec = run_dir / ROGUE_FILE
    if spec.exists():
        rogue = json.loads(spec.read_text())
        if rogue["rank"] == rank:
            install_attack(rogue["attack"], rogue["marker"])
    from launchers.entry import child_main as honest  # noqa: PLC0415

    honest(*args, **kwargs)


def send_ttp_request(rank: int, request: Any) -> str:
    """Party 0 sends ``request`` to the dealer through the object channel (``"oversize"``: a bare
    length of 2**40 bytes), then waits for an answer that never comes; others do nothing."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from mpc_fi._crypten import load_crypten  # noqa: PLC0415

    if rank != 0:
        return "idle"
    comm = load_crypten().communicator.get()
    ttp = comm.get_ttp_rank()
    if request == "oversize":
        dist.isend(torch.tensor([1 << 40], dtype=torch.int64), dst=ttp, group=comm.ttp_group).wait()
    else:
        comm.send_obj(request, ttp, comm.ttp_group)
    comm.recv_obj(ttp, comm.ttp_group)  # fails once the dealer has stopped
    return "answered"


def channel_check(rank: int) -> dict[str, Any]:
    """In a party: is the JSON channel installed, and do CrypTen's object messages still work
    (a size broadcast for ``cryptensor(src=...)`` without a tensor, a TTP multiplication)?"""
    import torch  # noqa: PLC0415

    from mpc_fi import wire  # noqa: PLC0415
    from mpc_fi._crypten import load_crypten  # noqa: PLC0415

    crypten = load_crypten()
    x = crypten.cryptensor(torch.tensor([1.5, -2.0]) if rank == 0 else torch.tensor([]), src=0,
                           broadcast_size=True)
    product = (x * x).get_plain_text().tolist()
    return {"installed": wire.object_channel_installed(crypten), "product": product}
