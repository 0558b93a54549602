"""Wire-level audit (a test and debugging mode): what a party sends, and why.

When enabled for a process, every outgoing torch.distributed call is recorded with the data it
puts on the wire, and with the **site** that sent it. A site is a named step of the protocol that
declares what its message is:

* ``masked``: an opening of secret shares, each part masked by dealer material the site names by
  its position in this party's dealer stream (Beaver multiplications and ANDs, squares, the
  truncation's wrap count, B2A conversions, the comparison circuits of :mod:`mpc_fi.compare`);
* ``carry``: the comparison circuits' low-bit carry sums (they open sums of share bits of values
  whose low bits are zero: share randomness only, see :mod:`mpc_fi.compare`);
* ``release``: a decryption (``get_plain_text``) with its destination;
* ``query`` (output mode: the querier's query to the owners), ``status`` (one flag per party per
  batch), ``agree`` (handshake and error agreement), ``keys`` (key exchange), ``dealer``
  (party 0's requests to the trusted dealer).

Each party records, for a masked site, its own share of the secret and the mask's offset; the
dealer (in an audited run) records the keys of its per-party streams. :func:`verify` then checks,
for every party, that every message belongs to a site, that the bytes a masked site actually sent
equal the party's share of the secret masked by the dealer material *regenerated from the
dealer's keys* at the declared offset, that no piece of dealer material masks two openings, that
the carry sums only concern values with zero low bits, and that every release goes to the
querier. An opening that a bug or an attacker slips into a circuit without a mask is either
outside any site or does not match its declared mask: both fail.

The audit writes raw shares, keys and opened values to disk: it destroys the security of the run
by design, is for tests only, and warns.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import records, wire
from .csprng import CSPRNG

#: torch.distributed calls whose first tensor argument is (part of) what this rank sends.
_SENDING_CALLS = ("send", "isend", "reduce", "all_reduce", "gather", "all_gather", "scatter")
#: Calls that open (combine) what parties send; all others move data point to point.
_OPENING_CALLS = ("reduce", "all_reduce", "gather", "all_gather")
KINDS = ("masked", "carry", "release", "query", "status", "agree", "keys", "dealer")


@dataclass
class MaskedPart:
    """One part of a masked opening: this party sends ``secret (combine) mask``."""

    secret: np.ndarray  # this party's share of the secret, int64 (0/1 for bit parts)
    offset: int | None  # byte offset of the mask in this party's dealer stream (None: no dealer)
    numel: int
    kind: str  # "ring": 64-bit words; "bit": one bit per stream word (daBits)
    combine: str  # "sub" | "add" | "xor"
    pack: bool = False  # sent as pack_bits of the masked bits (mpc_fi.compare)


@dataclass
class Site:
    kind: str
    name: str
    seq: int
    parts: list[MaskedPart] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class WireRecord:
    op: str
    peer: int | None  # destination / root, None for all-to-all collectives
    data: np.ndarray | bytes
    site: int | None = None  # seq of the innermost site that sent it


@dataclass
class AuditLog:
    rank: int
    sent: list[WireRecord] = field(default_factory=list)
    #: (destination rank or None for everyone, shape, value opened here or None)
    decryptions: list[tuple[int | None, tuple[int, ...], np.ndarray | None]] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    #: the dealer only: the stream key it gave each party (test builds regenerate masks from it)
    dealer_keys: list[bytes] | None = None
    #: (told, real): the request whose position was read at ``told`` (in a prefetched package's
    #: region) drew from ``real`` onwards instead (it left the package: :mod:`mpc_fi.prefetch`)
    relocations: list[tuple[int, int]] = field(default_factory=list)


#: The audit of this process while one is installed (None otherwise: sites cost nothing).
ACTIVE: "WireAudit | None" = None
_STACK: list[Site] = []
_NOOP = contextlib.nullcontext()


def opening(kind: str, name: str, parts: Callable[[], list[MaskedPart]] | None = None,
            **info: Any) -> contextlib.AbstractContextManager:
    """Declare what the messages sent inside the ``with`` block are (no-op without an audit).

    ``parts`` is called only when an audit is active (it copies shares).
    """
    if ACTIVE is None:
        return _NOOP
    return ACTIVE.site(kind, name, parts() if parts is not None else [], info)


def dealer_offset() -> int | None:
    """Where this party's dealer stream stands (None without a TTP dealer or without an audit:
    the comparison circuits ask on every run, so this costs nothing outside audits)."""
    if ACTIVE is None:
        return None
    crypten = sys.modules.get("crypten")
    if crypten is None or crypten.cfg.mpc.provider != "TTP":
        return None
    try:
        return crypten.mpc.provider.ttp_provider.TTPClient.get().generator.offset
    except RuntimeError:
        return None


def mark() -> tuple[int, int, int, int] | None:
    """Where the active audit's records stand (None without an audit); see :func:`rollback`."""
    if ACTIVE is None:
        return None
    log = ACTIVE.log
    return len(log.sent), len(log.decryptions), len(log.sites), len(log.relocations)


def rollback(at: tuple[int, int, int, int] | None) -> None:
    """Forget what was recorded since :func:`mark` (a rehearsal: computed here, never sent)."""
    if ACTIVE is None or at is None:
        return
    log = ACTIVE.log
    del log.sent[at[0]:], log.decryptions[at[1]:], log.sites[at[2]:], log.relocations[at[3]:]


def relocated(told: int, real: int) -> None:
    """Record that material announced at stream position ``told`` comes from ``real`` (no-op
    without an audit)."""
    if ACTIVE is not None:
        ACTIVE.log.relocations.append((int(told), int(real)))


def _real_offset(offset: int, relocations: list[tuple[int, int]]) -> int:
    """Where the material announced at ``offset`` was drawn: a position in a prefetch region at
    or after a relocation's ``told`` (nothing else is drawn there afterwards) moves with it."""
    from .prefetch import REGION_BITS  # noqa: PLC0415 - prefetch imports this module

    for told, real in relocations:
        if offset >= told and offset >> REGION_BITS == told >> REGION_BITS:
            return real + (offset - told)
    return offset


def part(secret: torch.Tensor, offset: int | None, *, kind: str = "ring", combine: str,
         pack: bool = False) -> MaskedPart:
    flat = secret.detach().reshape(-1).to(torch.int64).clone().numpy()
    return MaskedPart(flat, offset, flat.size, kind, combine, pack)


def _as_array(t: Any) -> np.ndarray:
    return t.detach().cpu().clone().numpy()


def _int_view(data: np.ndarray | bytes) -> np.ndarray:
    if isinstance(data, bytes):
        return np.frombuffer(data, dtype=np.uint8)
    return np.ascontiguousarray(data).reshape(-1).view(np.int64) if data.dtype.itemsize == 8 \
        else np.ascontiguousarray(data).reshape(-1)


class WireAudit:
    """Installs recording wrappers in this process; :meth:`uninstall` restores everything."""

    def __init__(self, rank: int) -> None:
        self.log = AuditLog(rank=rank)
        self._saved: list[tuple[Any, str, Any]] = []

    # -- sites ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def site(self, kind: str, name: str, parts: list[MaskedPart], info: dict[str, Any]
             ) -> Iterator[Site]:
        if kind not in KINDS:
            raise ValueError(f"unknown audit site kind {kind!r}")
        s = Site(kind, name, len(self.log.sites), parts, info)
        self.log.sites.append(s)
        _STACK.append(s)
        try:
            yield s
        finally:
            _STACK.pop()

    def _patch(self, owner: Any, name: str, wrapper_factory: Callable[[Any], Any]) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper_factory(original))

    # -- install --------------------------------------------------------------------------
    def install(self) -> "WireAudit":
        global ACTIVE
        sent = self.log.sent

        def here() -> int | None:
            return _STACK[-1].seq if _STACK else None

        def tensor_call(name: str) -> Callable[[Any], Any]:
            def factory(original: Any) -> Any:
                @functools.wraps(original)
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    tensor = args[0] if args else kwargs.get("tensor")
                    if name == "all_gather":  # (output list, input)
                        tensor = args[1] if len(args) > 1 else kwargs.get("tensor")
                    peer = kwargs.get("dst", args[1] if len(args) > 1 and name in
                                      ("send", "isend", "reduce", "gather") else None)
                    if isinstance(tensor, torch.Tensor):
                        sent.append(WireRecord(name, peer, _as_array(tensor), here()))
                    return original(*args, **kwargs)
                return wrapper
            return factory

        for name in _SENDING_CALLS:
            self._patch(dist, name, tensor_call(name))

        def broadcast_factory(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(tensor: Any, src: int, *args: Any, **kwargs: Any) -> Any:
                if dist.get_rank() == src:
                    sent.append(WireRecord("broadcast", None, _as_array(tensor), here()))
                return original(tensor, src, *args, **kwargs)
            return wrapper

        self._patch(dist, "broadcast", broadcast_factory)

        def json_factory(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
                payload = original(obj, *args, **kwargs)
                sent.append(WireRecord("json", None, payload, here()))
                return payload
            return wrapper

        # Every JSON message (handshake, agreements, CrypTen's object channel) as encoded here,
        # before framing; mpc_fi.wire looks ``encode`` up at each call.
        self._patch(wire, "encode", json_factory)

        def agreement_factory(name: str) -> Callable[[Any], Any]:
            def factory(original: Any) -> Any:
                @functools.wraps(original)
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    with self.site("agree", name, [], {}):
                        return original(*args, **kwargs)
                return wrapper
            return factory

        # Handshake, error agreement and set-up metadata: checked JSON (mpc_fi.wire).
        self._patch(wire, "gather_json", agreement_factory("gather_json"))
        self._patch(wire, "broadcast_json", agreement_factory("broadcast_json"))

        from ._crypten import load_crypten  # noqa: PLC0415

        crypten = load_crypten()
        self._install_crypten_sites(crypten)
        ACTIVE = self
        return self

    def _install_crypten_sites(self, crypten: Any) -> None:
        """Name CrypTen's own openings and decryptions (same computation, same messages)."""
        primitives = crypten.mpc.primitives
        beaver = primitives.beaver
        decryptions = self.log.decryptions
        rank = self.log.rank

        def decrypt_factory(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(tensor_self: Any, dst: int | None = None) -> Any:
                with self.site("release", type(tensor_self).__name__, [], {"dst": dst}):
                    value = original(tensor_self, dst=dst)
                mine = dst is None or dst == rank
                decryptions.append((dst, tuple(tensor_self.share.shape),
                                    _as_array(value) if mine else None))
                return value
            return wrapper

        for cls in (primitives.ArithmeticSharedTensor, primitives.BinarySharedTensor):
            self._patch(cls, "get_plain_text", decrypt_factory)

        def beaver_factory(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(op: str, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
                at = dealer_offset()
                b_at = None if at is None else at + 8 * x.share.numel()
                with self.site("masked", f"beaver.{op}", [part(x.share, at, combine="sub"),
                                                          part(y.share, b_at, combine="sub")], {}):
                    return original(op, x, y, *args, **kwargs)
            return wrapper

        def one_mask_factory(name: str, kind: str, combine: str) -> Callable[[Any], Any]:
            def factory(original: Any) -> Any:
                @functools.wraps(original)
                def wrapper(x: Any) -> Any:
                    parts = [part(x.share, dealer_offset(), kind=kind, combine=combine)]
                    with self.site("masked", f"beaver.{name}", parts, {}):
                        return original(x)
                return wrapper
            return factory

        def and_factory(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(x: Any, y: Any) -> Any:
                at = dealer_offset()
                b_at = None if at is None else at + 8 * x.share.numel()
                with self.site("masked", "beaver.AND", [part(x.share, at, combine="xor"),
                                                       part(y.share, b_at, combine="xor")], {}):
                    return original(x, y)
            return wrapper

        self._patch(beaver, "__beaver_protocol", beaver_factory)
        self._patch(beaver, "square", one_mask_factory("square", "ring", "sub"))
        self._patch(beaver, "wraps", one_mask_factory("wraps", "ring", "add"))
        self._patch(beaver, "B2A_single_bit", one_mask_factory("B2A", "bit", "xor"))
        self._patch(beaver, "AND", and_factory)

        client = crypten.mpc.provider.ttp_provider.TTPClient._TTPClient__TTPClient

        def request_factory(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(client_self: Any, func_name: str, *args: Any, **kwargs: Any) -> Any:
                with self.site("dealer", func_name, [], {}):
                    return original(client_self, func_name, *args, **kwargs)
            return wrapper

        self._patch(client, "ttp_request", request_factory)
        server = crypten.mpc.provider.ttp_provider.TTPServer

        def server_keys_factory(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(server_self: Any) -> Any:
                with self.site("keys", "dealer", [], {}):
                    original(server_self)
                self.log.dealer_keys = [g._aes_key for g in server_self.generators]
            return wrapper

        self._patch(server, "_setup_generators", server_keys_factory)

    def uninstall(self) -> None:
        global ACTIVE
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)
        if ACTIVE is self:
            ACTIVE = None

    def dump(self, path: str) -> None:
        records.save(path, self.log)


def load(path: str) -> AuditLog:
    """Read an audit file :meth:`WireAudit.dump` wrote (:mod:`mpc_fi.records`, never pickle)."""
    raw = records.load(path)
    return AuditLog(
        rank=raw["rank"], sent=[WireRecord(**r) for r in raw["sent"]],
        decryptions=[tuple(d) for d in raw["decryptions"]],
        sites=[Site(s["kind"], s["name"], s["seq"], [MaskedPart(**p) for p in s["parts"]],
                    s["info"]) for s in raw["sites"]],
        dealer_keys=raw["dealer_keys"],
        relocations=[tuple(r) for r in raw.get("relocations", [])])


# ---------------------------------------------------------------------------------------------
# Verification (test builds): every message has a reason, every opening a fresh dealer mask
# ---------------------------------------------------------------------------------------------
def _regenerate(key: bytes, p: MaskedPart) -> torch.Tensor:
    stream = CSPRNG._from_stream_key(key, purpose="dealer").at(p.offset)
    return stream.kbits((p.numel,), 1) if p.kind == "bit" else stream.ring((p.numel,))


def expected_message(p: MaskedPart, mask: torch.Tensor) -> np.ndarray:
    """What a party must send for part ``p`` given its share ``mask`` of the dealer material."""
    from .compare import pack_bits  # noqa: PLC0415 - compare imports this module

    secret = torch.from_numpy(p.secret)
    if p.combine == "sub":
        out = secret - mask
    elif p.combine == "add":
        out = secret + mask
    elif p.combine == "xor":
        out = secret ^ mask
    else:
        raise ValueError(f"unknown combine {p.combine!r}")
    if p.pack:
        out = pack_bits(out.unsqueeze(0))
    return out.reshape(-1).numpy()


def verify(logs: dict[int, AuditLog], *, querier: int, mode: str | None = None,
           dealer: int | None = None) -> list[str]:
    """Every problem found in an audited run's logs (an empty list: the run passed).

    ``logs`` holds every computing party's log and, with a TTP dealer, the dealer's (its keys
    are what masks are regenerated from). ``mode`` (``output``/``full``) enables the check that
    the query crosses the wire only in output mode.
    """
    problems: list[str] = []
    keys = logs[dealer].dealer_keys if dealer is not None and dealer in logs else None
    compute = sorted(r for r in logs if r != dealer)
    if keys is None:
        problems.append("no dealer keys in the audit: masks cannot be regenerated (audit the "
                        "dealer's process too, and use the ttp dealer)")
    for rank in compute:
        log = logs[rank]
        sites = {s.seq: s for s in log.sites}
        used: list[tuple[int, int, str]] = []
        for rec in log.sent:
            if rec.site is None:
                problems.append(f"rank {rank}: a {rec.op} of {_int_view(rec.data).nbytes} bytes "
                                "outside any audited site (an opening nobody declared)")
                continue
            s = sites[rec.site]
            if s.kind == "query" and (rank != querier or mode == "full"):
                problems.append(f"rank {rank}: sent query data ({s.name}) in {mode} mode")
            if s.kind == "release" and rec.op in _OPENING_CALLS:
                dst = s.info.get("dst")
                if dst != querier:
                    problems.append(f"rank {rank}: decryption of {s.name} towards "
                                    f"{'everyone' if dst is None else f'rank {dst}'}, not the "
                                    "querier")
            if s.kind == "status" and _int_view(rec.data).size != 1:
                problems.append(f"rank {rank}: a status message of {_int_view(rec.data).size} words")
        for s in log.sites:
            if s.kind != "masked":
                continue
            sent = [_int_view(r.data) for r in log.sent if r.site == s.seq]
            actual = np.concatenate(sent) if sent else np.empty(0, np.int64)
            if any(p.offset is None for p in s.parts):
                problems.append(f"rank {rank}: {s.name} #{s.seq} masks with material outside "
                                "the dealer's streams")
                continue
            parts = [replace(p, offset=_real_offset(p.offset, log.relocations)) for p in s.parts]
            for p in parts:
                used.append((p.offset, p.offset + 8 * p.numel, f"{s.name} #{s.seq}"))
                if p.kind == "bit" and not np.isin(p.secret, (0, 1)).all():
                    problems.append(f"rank {rank}: {s.name} #{s.seq} masks one bit per value but "
                                    "its values hold more (the other bits go out unmasked)")
            if keys is None or rank >= len(keys):
                continue
            want = np.concatenate([expected_message(p, _regenerate(keys[rank], p))
                                   for p in parts]) if parts else np.empty(0, np.int64)
            if actual.shape != want.shape or not np.array_equal(actual, want.view(actual.dtype)
                                                                 if actual.size else want):
                problems.append(f"rank {rank}: {s.name} #{s.seq} sent something other than its "
                                "share of the secret masked by the declared dealer material")
        used.sort()
        for (a0, a1, who_a), (b0, b1, who_b) in zip(used, used[1:]):
            if b0 < a1:
                problems.append(f"rank {rank}: dealer material at bytes {b0}..{min(a1, b1)} masks "
                                f"two openings ({who_a} and {who_b})")
    # Carry sums: the values whose low bits they concern must have zero low bits. The k-th carry
    # site of every party is the same protocol step (party 0 has extra dealer sites, so seq
    # numbers differ between parties).
    carries = [[x for x in logs[r].sites if x.kind == "carry"] for r in compute]
    if len({len(c) for c in carries}) > 1:
        problems.append("parties ran different numbers of carry steps (out of step)")
    for step in zip(*carries):
        total = sum(torch.from_numpy(x.info["shares"]) for x in step)
        t = int(step[0].info["t"])
        if bool(((total & ((1 << t) - 1)) != 0).any()):
            problems.append(f"{step[0].name} #{step[0].seq}: a carry sum over values whose low "
                            f"{t} bits are not zero (it would reveal them)")
    return problems
