"""The wire format of every party-to-party message that is not a share tensor.

No party ever unpickles what a peer sends. ``torch.distributed.all_gather_object`` and CrypTen's
``send_obj``/``recv_obj``/``broadcast_obj`` run pickle on the received bytes (CrypTen's
``restricted_loads`` still unpickles), so whoever takes one seat could run code in every other
party. Here every such message is:

* UTF-8 JSON (only ``null``, booleans, numbers, strings, arrays and string-keyed objects; no
  NaN/Infinity, no duplicate keys), at most :data:`MAX_DEPTH` levels deep;
* carried as a uint8 tensor after an int64 length, which every receiver checks against the
  message kind's limit **before** allocating anything (:data:`AGREEMENT_LIMIT` for the
  handshake and error agreement, :data:`OBJECT_LIMIT` for CrypTen's object messages);
* decoded against the :class:`Schema` its kind expects: wrong type, missing or extra key, a
  number out of range, an unknown name => :class:`~mpc_fi.errors.WireFormatError`, naming the
  peer. Schemas also build the typed values (tuples, ``torch.Size``, ``ValueRange``,
  ``Architecture``) so that nothing downstream sees raw peer JSON.

Collectives keep one communication pattern on every party whatever happens: a party that cannot
encode its own message still takes part and announces length ``-1``; every party sees the same
lengths, so all of them refuse together, before the payload exchange.

:func:`gather_json` / :func:`broadcast_json` replace ``all_gather_object`` /
``broadcast_object_list``; :func:`install_object_channel` replaces CrypTen's object channel and
holds the trusted dealer to the five request kinds CrypTen's TTP client sends and mpc-fi's
sixth (a bit with a multiplication mask, :mod:`mpc_fi.compare`) (:data:`TTP_REQUEST`).

A peer that sends *different* well-formed messages to different parties is not detected here
(no broadcast agreement); such a peer can only make the honest parties disagree and stop.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import PEER_ERRORS, MpcFiError, PartyFailedError, WireFormatError

#: Largest handshake / agreement message (bytes of JSON): hello, failures, shapes, architectures.
AGREEMENT_LIMIT = 1 << 20
#: Largest CrypTen object message: TTP requests and sizes (well under 1 KiB), and the recipe of
#: a prefetched package (its distinct requests, then up to MAX_PREFETCH_REQUESTS indices and as
#: many holders).
OBJECT_LIMIT = 256 << 10
#: Most requests in one prefetched package (:mod:`mpc_fi.prefetch`).
MAX_PREFETCH_REQUESTS = 1 << 14
#: Deepest nesting of arrays and objects in any message.
MAX_DEPTH = 16
#: Longest error message kept from a peer (characters); longer ones are cut.
MAX_ERROR_CHARS = 4000
#: Most elements in one tensor a peer may make another party allocate (shapes, TTP requests).
MAX_ELEMENTS = 1 << 28
#: Largest dimension count of a shape on the wire.
MAX_DIMS = 8


# ---------------------------------------------------------------------------------------
# Schemas: what a message kind may hold, and the typed value it becomes
# ---------------------------------------------------------------------------------------
def _refuse(path: str, why: str) -> WireFormatError:
    return WireFormatError(f"{path}: {why}")


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


class Schema:
    """Checks one decoded JSON value and returns the typed value; raises WireFormatError."""

    def check(self, value: Any, path: str = "$") -> Any:
        raise NotImplementedError


class Null(Schema):
    def check(self, value: Any, path: str = "$") -> None:
        if value is not None:
            raise _refuse(path, f"expected null, got {_kind(value)}")
        return None


class Bool(Schema):
    def check(self, value: Any, path: str = "$") -> bool:
        if not isinstance(value, bool):
            raise _refuse(path, f"expected a boolean, got {_kind(value)}")
        return value


class Int(Schema):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: Any, path: str = "$") -> int:
        if type(value) is not int:  # bool is an int subclass: refused
            raise _refuse(path, f"expected an integer, got {_kind(value)}")
        if not self.lo <= value <= self.hi:
            raise _refuse(path, f"{value} is outside [{self.lo}, {self.hi}]")
        return value


class Float(Schema):
    def __init__(self, lo: float = -math.inf, hi: float = math.inf) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: Any, path: str = "$") -> float:
        if type(value) not in (int, float):
            raise _refuse(path, f"expected a number, got {_kind(value)}")
        out = float(value)
        if not math.isfinite(out) or not self.lo <= out <= self.hi:
            raise _refuse(path, f"{out!r} is outside [{self.lo}, {self.hi}]")
        return out


_CONTROL = {"Cc", "Cf", "Cs", "Co", "Cn"}


def clean_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` without control or format characters (newlines and tabs kept), cut to ``limit``."""
    kept = "".join(ch for ch in text[:limit * 2]
                   if ch in "\n\t" or unicodedata.category(ch) not in _CONTROL)
    return kept if len(kept) <= limit else kept[:limit] + " [cut]"


class Str(Schema):
    """A string of at most ``max_len`` characters. ``text=True``: free text from a peer (an error
    message), cleaned and cut instead of refused; otherwise control characters are refused."""

    def __init__(self, max_len: int, *, text: bool = False, pattern: str | None = None) -> None:
        self.max_len, self.text = max_len, text
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, value: Any, path: str = "$") -> str:
        if not isinstance(value, str):
            raise _refuse(path, f"expected a string, got {_kind(value)}")
        if self.text:
            return clean_text(value, self.max_len)
        if len(value) > self.max_len:
            raise _refuse(path, f"string of {len(value)} characters (at most {self.max_len})")
        if any(unicodedata.category(ch) in _CONTROL for ch in value):
            raise _refuse(path, "string holds control characters")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _refuse(path, f"{value!r} does not match {self.pattern.pattern}")
        return value


class Enum(Schema):
    """One of a fixed set of strings."""

    def __init__(self, *values: str) -> None:
        self.values = values

    def check(self, value: Any, path: str = "$") -> str:
        if not isinstance(value, str) or value not in self.values:
            shown = repr(value[:40]) if isinstance(value, str) else _kind(value)
            raise _refuse(path, f"{shown} is not one of {', '.join(self.values)}")
        return value


class Array(Schema):
    """An array of at most ``max_len`` items of one schema; becomes a tuple."""

    def __init__(self, item: Schema, max_len: int, *, min_len: int = 0) -> None:
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def check(self, value: Any, path: str = "$") -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _refuse(path, f"expected an array, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise _refuse(path, f"{len(value)} items (expected {self.min_len}..{self.max_len})")
        return tuple(self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value))


class Tuple(Schema):
    """A fixed-length array, one schema per position; becomes a tuple."""

    def __init__(self, *items: Schema) -> None:
        self.items = items

    def check(self, value: Any, path: str = "$") -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _refuse(path, f"expected an array, got {_kind(value)}")
        if len(value) != len(self.items):
            raise _refuse(path, f"{len(value)} items (expected {len(self.items)})")
        return tuple(s.check(v, f"{path}[{i}]") for i, (s, v) in enumerate(zip(self.items, value)))


class Shape(Schema):
    """A tensor shape: at most ``max_dims`` non-negative ints, at most ``max_elements`` in all.
    ``size=True`` returns a ``torch.Size``, else a tuple."""

    def __init__(self, *, max_dims: int = MAX_DIMS, max_elements: int = MAX_ELEMENTS,
                 min_dims: int = 0, size: bool = False) -> None:
        self.dims = Array(Int(0, max_elements), max_dims, min_len=min_dims)
        self.max_elements, self.size = max_elements, size

    def check(self, value: Any, path: str = "$") -> tuple[int, ...] | torch.Size:
        dims = self.dims.check(value, path)
        if math.prod(dims) > self.max_elements:
            raise _refuse(path, f"shape {list(dims)} has more than {self.max_elements} elements")
        return torch.Size(dims) if self.size else dims


class Record(Schema):
    """An object with exactly the ``required`` keys plus any of the ``optional`` ones; a dict."""

    def __init__(self, required: Mapping[str, Schema],
                 optional: Mapping[str, Schema] | None = None) -> None:
        self.required, self.optional = dict(required), dict(optional or {})

    def check(self, value: Any, path: str = "$") -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _refuse(path, f"expected an object, got {_kind(value)}")
        missing = [k for k in self.required if k not in value]
        extra = [k for k in value if k not in self.required and k not in self.optional]
        if missing or extra:
            raise _refuse(path, f"missing keys {missing or 'none'}, unexpected keys "
                                f"{[k[:40] for k in extra[:8]] or 'none'}")
        return {k: {**self.optional, **self.required}[k].check(v, f"{path}.{k}")
                for k, v in value.items()}


class Map(Schema):
    """An object with free (checked) keys, at most ``max_items``; a dict."""

    def __init__(self, key: Str, value: Schema, max_items: int) -> None:
        self.key, self.value, self.max_items = key, value, max_items

    def check(self, value: Any, path: str = "$") -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _refuse(path, f"expected an object, got {_kind(value)}")
        if len(value) > self.max_items:
            raise _refuse(path, f"{len(value)} entries (at most {self.max_items})")
        return {self.key.check(k, f"{path} key"): self.value.check(v, f"{path}.{k}")
                for k, v in value.items()}


class Optional(Schema):
    def __init__(self, inner: Schema) -> None:
        self.inner = inner

    def check(self, value: Any, path: str = "$") -> Any:
        return None if value is None else self.inner.check(value, path)


class AnyOf(Schema):
    """The first alternative that accepts the value."""

    def __init__(self, *options: Schema) -> None:
        self.options = options

    def check(self, value: Any, path: str = "$") -> Any:
        reasons = []
        for option in self.options:
            try:
                return option.check(value, path)
            except WireFormatError as exc:
                reasons.append(str(exc))
        raise _refuse(path, "matches no allowed form (" + "; ".join(reasons) + ")")


class Convert(Schema):
    """``inner``, then ``build`` on its result (a typed value); ``build``'s ValueError/TypeError
    becomes a WireFormatError."""

    def __init__(self, inner: Schema, build: Callable[[Any], Any]) -> None:
        self.inner, self.build = inner, build

    def check(self, value: Any, path: str = "$") -> Any:
        checked = self.inner.check(value, path)
        try:
            return self.build(checked)
        except (ValueError, TypeError) as exc:
            raise _refuse(path, str(exc)) from None


NULL = Null()


# ---------------------------------------------------------------------------------------
# Encoding and decoding one message
# ---------------------------------------------------------------------------------------
def _to_json(obj: Any) -> Any:
    # Only objects that say how they travel (``to_wire``) and torch.Size-like tuples do.
    to_wire = getattr(type(obj), "to_wire", None)
    if to_wire is None:
        raise TypeError(f"{type(obj).__name__} has no wire encoding")
    return obj.to_wire()


def encode(obj: Any, *, limit: int = AGREEMENT_LIMIT) -> bytes:
    """``obj`` as compact UTF-8 JSON; WireFormatError if it has no JSON form or exceeds ``limit``.

    Tuples (and ``torch.Size``) become arrays; objects with a ``to_wire()`` method are encoded
    through it; anything else (tensors, numpy scalars, NaN, non-string keys) is refused.
    """
    try:
        text = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"),
                          default=_to_json)
    except (TypeError, ValueError, RecursionError) as exc:
        raise WireFormatError(f"cannot encode a {type(obj).__name__} for the wire: {exc}") from None
    data = text.encode("utf-8")
    if len(data) > limit:
        raise WireFormatError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    return data


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def _depth(data: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (a bound computed before json parses)."""
    bare = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    steps = (np.isin(bare, (0x5B, 0x7B)).astype(np.int64)
             - np.isin(bare, (0x5D, 0x7D)).astype(np.int64))
    return int(np.cumsum(steps).max()) if steps.size else 0


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in an object")
    return out


def decode(data: bytes, schema: Schema, *, limit: int = AGREEMENT_LIMIT) -> Any:
    """Check and decode one message; WireFormatError on anything outside ``schema``."""
    if len(data) > limit:
        raise WireFormatError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"not UTF-8 ({exc.reason} at byte {exc.start}): not a JSON "
                              "message (a pickle?)") from None
    if _depth(data) > MAX_DEPTH:
        raise WireFormatError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise WireFormatError(f"not JSON: {clean_text(str(exc), 200)}") from None
    return schema.check(value)


# ---------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------
def _who(rank: int, names: Sequence[str] | None) -> tuple[str, str]:
    name = names[rank] if names is not None and rank < len(names) else f"rank{rank}"
    return name, f"party {name} (rank {rank})"


def _schema_of(schema: Schema | Sequence[Schema], rank: int) -> Schema:
    return schema if isinstance(schema, Schema) else schema[rank]


def _try_encode(obj: Any, limit: int) -> tuple[bytes | None, WireFormatError | None]:
    try:
        return encode(obj, limit=limit), None
    except WireFormatError as exc:
        return None, exc


def _refuse_length(length: int, limit: int, rank: int, me: int, own: WireFormatError | None,
                   names: Sequence[str] | None, what: str) -> None:
    """Raise, identically on every party, if a peer announced a length outside ``1..limit``."""
    if 0 < length <= limit:
        return
    name, who = _who(rank, names)
    if rank == me and own is not None:
        raise WireFormatError(f"this party could not send its {what}: {own}", party=name, rank=rank)
    why = ("could not encode its message" if length == -1
           else f"announced {length} bytes (limit {limit})")
    raise WireFormatError(f"{who} sent a malformed {what}: {why}", party=name, rank=rank)


def _decode_from(data: bytes, schema: Schema, limit: int, rank: int,
                 names: Sequence[str] | None, what: str) -> Any:
    try:
        return decode(data, schema, limit=limit)
    except WireFormatError as exc:
        name, who = _who(rank, names)
        raise WireFormatError(f"{who} sent a malformed {what}: {exc}", party=name,
                              rank=rank) from None


def gather_json(obj: Any, schema: Schema | Sequence[Schema], *, group: Any = None,
                names: Sequence[str] | None = None, what: str = "message",
                limit: int = AGREEMENT_LIMIT) -> list[Any]:
    """Every party's ``obj``, by rank, each checked against ``schema`` (one, or one per rank).

    Two all_gathers on every party, whatever the messages: the int64 lengths, then the payloads
    padded to the longest. A length outside ``1..limit`` is refused by every party before any
    payload buffer exists. Raises :class:`WireFormatError` naming the first party (lowest rank)
    whose message is malformed; every party that received the same bytes raises the same error.
    ``names`` (by rank) and ``what`` only word the errors.
    """
    me, n = dist.get_rank(group), dist.get_world_size(group)
    payload, own = _try_encode(obj, limit)
    mine = torch.tensor([-1 if payload is None else len(payload)], dtype=torch.int64)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
    dist.all_gather(lengths, mine, group=group)
    sizes = [int(t.item()) for t in lengths]
    for rank, length in enumerate(sizes):
        _refuse_length(length, limit, rank, me, own, names, what)
    width = max(sizes)
    buf = torch.zeros(width, dtype=torch.uint8)
    buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    out = [torch.empty(width, dtype=torch.uint8) for _ in range(n)]
    dist.all_gather(out, buf, group=group)
    return [_decode_from(out[r][:sizes[r]].numpy().tobytes(), _schema_of(schema, r), limit, r,
                         names, what) for r in range(n)]


def broadcast_json(obj: Any, schema: Schema, *, src: int, group: Any = None,
                   names: Sequence[str] | None = None, what: str = "message",
                   limit: int = AGREEMENT_LIMIT) -> Any:
    """``obj`` of party ``src``, checked against ``schema`` on every party (``src`` included).

    Two broadcasts on every party: the int64 length, then the payload; a length outside
    ``1..limit`` is refused everywhere before the payload. ``obj`` is ignored off ``src``.
    """
    me = dist.get_rank(group)
    payload, own = _try_encode(obj, limit) if me == src else (None, None)
    length = torch.tensor([-1 if payload is None else len(payload)], dtype=torch.int64)
    dist.broadcast(length, src, group=group)
    size = int(length.item())
    _refuse_length(size, limit, src, me, own, names, what)
    data = torch.empty(size, dtype=torch.uint8) if payload is None else \
        torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    dist.broadcast(data, src, group=group)
    return _decode_from(data.numpy().tobytes(), schema, limit, src, names, what)


# ---------------------------------------------------------------------------------------
# Error agreement: what a party reports when a local step fails
# ---------------------------------------------------------------------------------------
FAILURE = Record({"type": Enum(*PEER_ERRORS), "message": Str(MAX_ERROR_CHARS, text=True)})


def describe_failure(exc: BaseException) -> dict[str, str]:
    """The wire form of a local failure: the nearest allow-listed class and a clean message.

    An mpc-fi error keeps its class (or the nearest listed base, e.g. a protocol's own subclass
    of ProtocolError); anything else travels as MpcFiError with its type in the message.
    """
    if isinstance(exc, MpcFiError):
        cls = next(c for c in type(exc).__mro__ if PEER_ERRORS.get(c.__name__) is c)
        return {"type": cls.__name__, "message": clean_text(str(exc))}
    return {"type": "MpcFiError", "message": clean_text(f"{type(exc).__name__}: {exc}")}


def peer_error(failure: Mapping[str, str], *, party: str, rank: int) -> MpcFiError:
    """The exception every party raises for ``party``'s reported failure (already checked
    against :data:`FAILURE`: the class comes from the allow-list, never from arbitrary text)."""
    cls = PEER_ERRORS[failure["type"]]
    message = failure["message"]
    if cls is PartyFailedError or cls is WireFormatError:
        return cls(message, party=party, rank=rank)
    return cls(f"[{party}] {message}")


class Outcome(Schema):
    """One party's ``{"failure", "value"}`` in an error agreement: a failure (and null value),
    or no failure and a value of ``value``'s schema."""

    def __init__(self, value: Schema) -> None:
        self.record = Record({"failure": Optional(FAILURE), "value": Any_})
        self.value = value

    def check(self, value: Any, path: str = "$") -> dict[str, Any]:
        out = self.record.check(value, path)
        if out["failure"] is not None:
            NULL.check(out["value"], f"{path}.value")
        else:
            out["value"] = self.value.check(out["value"], f"{path}.value")
        return out


class _Deferred(Schema):
    """Accepts anything: only inside :class:`Outcome`, which checks the value itself."""

    def check(self, value: Any, path: str = "$") -> Any:
        return value


Any_ = _Deferred()


def agree(step: Callable[[], Any], schema: Schema | Sequence[Schema], *, group: Any = None,
          names: Sequence[str], what: str = "result",
          on_error: Callable[[BaseException], None] | None = None) -> list[Any]:
    """Run ``step`` here, exchange every party's outcome, raise the same error everywhere.

    ``schema`` checks the values (one schema, or one per rank). The first reported failure
    (lowest rank) is raised on every party as its allow-listed class; otherwise the values are
    returned by rank. ``on_error`` sees a local exception first (to log it).
    """
    value, failure = None, None
    try:
        value = step()
    except Exception as exc:  # noqa: BLE001 - every failure is agreed, never raised alone
        if on_error is not None:
            on_error(exc)
        failure = describe_failure(exc)
    per_rank = [Outcome(_schema_of(schema, r)) for r in range(dist.get_world_size(group))]
    outcomes = gather_json({"failure": failure, "value": None if failure else value}, per_rank,
                           group=group, names=names, what=what)
    for rank, outcome in enumerate(outcomes):
        if outcome["failure"] is not None:
            raise peer_error(outcome["failure"], party=names[rank], rank=rank)
    return [o["value"] for o in outcomes]


# ---------------------------------------------------------------------------------------
# Typed encodings of what the parties exchange
# ---------------------------------------------------------------------------------------
_NAME = Str(128)
#: The handshake: who a party is, which federation it runs, which versions.
HELLO = Record({"name": _NAME, "fingerprint": Str(128),
                "versions": Map(Str(64), Str(128), max_items=16)})
#: The querier's public query metadata: row count and per-row shape.
QUERY_META = Tuple(Int(1, 1 << 40), Shape(min_dims=1))
#: A batch plan: rows per batch that fit this party, and its memory limit in MiB (or None).
BATCH_PLAN = Tuple(Int(0, 1 << 40), Optional(Float(0.0, 1e12)))
#: A served session: the querier's next step for everyone (answer ``n`` queries, or stop).
#: A digest of a batch's dealer recipe (:func:`mpc_fi.prefetch.recipe_digest`).
RECIPE_DIGEST = Str(32, pattern=r"none|[0-9a-f]{32}")

SERVED_STEP = Record({"op": Enum("batch", "stop"), "n": Int(0, 1 << 40),
                      "shape": Shape(max_dims=8)})


# ---------------------------------------------------------------------------------------
# CrypTen's object channel, and the trusted dealer's requests
# ---------------------------------------------------------------------------------------
TTP_FUNCTIONS = ("additive", "square", "binary", "wraps", "B2A", "B2A_mul")
#: What party 0 may ask the dealer: CrypTen's five functions and ``B2A_mul``, or a package of
#: them for a later call (:mod:`mpc_fi.prefetch`).
DEALER_FUNCTIONS = (*TTP_FUNCTIONS, "prefetch")
BEAVER_OPS = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")
_SIZE = Shape(size=True)
_SMALL = Int(0, 1 << 16)
_SPATIAL = AnyOf(_SMALL, Array(_SMALL, 2, min_len=1))
_CONV_KWARGS = {"stride": _SPATIAL, "padding": _SPATIAL, "dilation": _SPATIAL,
                "groups": Int(1, 1 << 16)}
_OP_KWARGS: dict[str, Record] = {
    "mul": Record({}), "matmul": Record({}),
    "conv1d": Record({}, _CONV_KWARGS), "conv2d": Record({}, _CONV_KWARGS),
    "conv_transpose1d": Record({}, {**_CONV_KWARGS, "output_padding": _SPATIAL}),
    "conv_transpose2d": Record({}, {**_CONV_KWARGS, "output_padding": _SPATIAL}),
}
_TTP_ARGS: dict[str, Schema] = {
    "additive": Tuple(_SIZE, _SIZE, Enum(*BEAVER_OPS)),
    "square": Tuple(_SIZE), "binary": Tuple(_SIZE, _SIZE), "wraps": Tuple(_SIZE),
    "B2A": Tuple(_SIZE),
    # a random bit (arithmetic and binary shares) with a mask ``a`` and the product ``a * bit``
    # (mpc_fi.compare): the dealer answers party 0's shares of the bit and of the product
    "B2A_mul": Tuple(_SIZE),
}


def _broadcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """NumPy/torch broadcasting of two shapes, in plain Python."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {list(a)} and {list(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def _matmul_shape(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """``torch.matmul``'s result shape, in plain Python."""
    if not a or not b:
        raise ValueError("matmul needs tensors of at least one dimension")
    a2 = (1, *a) if len(a) == 1 else tuple(a)
    b2 = (*b, 1) if len(b) == 1 else tuple(b)
    if a2[-1] != b2[-2]:
        raise ValueError(f"matmul of {list(a)} and {list(b)}: inner sizes differ")
    out = (*_broadcast(a2[:-2], b2[:-2]), a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _per_dim(value: Any, dims: int, default: int) -> list[int]:
    if value is None:
        return [default] * dims
    if isinstance(value, int):
        return [value] * dims
    if len(value) == 1:
        return list(value) * dims
    if len(value) != dims:
        raise ValueError(f"{value} does not give one value per spatial dimension")
    return list(value)


def _conv_shape(x: Sequence[int], w: Sequence[int], dims: int, transpose: bool,
                kw: dict[str, Any]) -> tuple[int, ...]:
    """Result shape of ``torch.conv{dims}d`` / ``conv_transpose{dims}d``, in plain Python."""
    if len(x) != dims + 2 or len(w) != dims + 2:
        raise ValueError(f"a {dims}-D convolution needs rank-{dims + 2} input and weight")
    groups = kw.get("groups", 1)
    stride = _per_dim(kw.get("stride"), dims, 1)
    padding = _per_dim(kw.get("padding"), dims, 0)
    dilation = _per_dim(kw.get("dilation"), dims, 1)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError("stride and dilation must be positive")
    if transpose:
        extra = _per_dim(kw.get("output_padding"), dims, 0)
        if x[1] != w[0] or x[1] % groups:
            raise ValueError("input channels do not match the weight")
        channels = w[1] * groups
        spatial = [(n - 1) * s - 2 * p + d * (k - 1) + e + 1
                   for n, s, p, d, k, e in zip(x[2:], stride, padding, dilation, w[2:], extra)]
    else:
        if x[1] != w[1] * groups or w[0] % groups:
            raise ValueError("input channels do not match the weight and groups")
        channels = w[0]
        spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1
                   for n, s, p, d, k in zip(x[2:], stride, padding, dilation, w[2:])]
    if min(spatial) < 1:
        raise ValueError("the output would be empty")
    return (x[0], channels, *spatial)


def result_size(function: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    """The size of the dealer's answer, by shape arithmetic (nothing allocated, and no torch
    meta tensors: their first use costs a second in a fresh process)."""
    if function == "additive":
        a, b, op = tuple(args[0]), tuple(args[1]), args[2]
        if op == "mul":
            return _broadcast(a, b)
        if op == "matmul":
            return _matmul_shape(a, b)
        dims = 1 if op.endswith("1d") else 2
        return _conv_shape(a, b, dims, op.startswith("conv_transpose"), kwargs)
    if function == "binary":
        return _broadcast(tuple(args[0]), tuple(args[1]))
    if function == "B2A_mul":
        return (2, *tuple(args[0]))
    return tuple(args[0])


def _one_request(message: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A checked request of one of the dealer's functions, and its answer's element count."""
    function = message["function"]
    args = _TTP_ARGS[function].check(message["args"], "$.args")
    if function == "additive":
        kwargs = _OP_KWARGS[args[2]].check(message["kwargs"], "$.kwargs")
    else:
        kwargs = Record({}).check(message["kwargs"], "$.kwargs")
    try:
        size = result_size(function, args, kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"the request does not describe a valid {function} "
                         f"({clean_text(str(exc), 200)})") from None
    if math.prod(size) > MAX_ELEMENTS:
        raise ValueError(f"the answer would have {math.prod(size)} elements "
                         f"(at most {MAX_ELEMENTS})")
    return {"function": function, "args": args, "kwargs": kwargs}, math.prod(size)


_PREFETCH_KIND = Convert(Record({"function": Enum(*TTP_FUNCTIONS), "args": Any_,
                                 "kwargs": Any_}), lambda m: _one_request(m)[0])
_PREFETCH_ARGS = Tuple(Int(1, 1 << 40), Array(_PREFETCH_KIND, MAX_PREFETCH_REQUESTS, min_len=1),
                       Array(Int(0, MAX_PREFETCH_REQUESTS - 1), MAX_PREFETCH_REQUESTS, min_len=1),
                       Array(Int(0, 1023), MAX_PREFETCH_REQUESTS, min_len=1))


def _ttp_request(message: dict[str, Any]) -> dict[str, Any]:
    if message["function"] != "prefetch":
        checked, _ = _one_request(message)
        return {**checked, "device": message["device"]}
    number, kinds, order, holders = _PREFETCH_ARGS.check(message["args"], "$.args")
    Record({}).check(message["kwargs"], "$.kwargs")
    if max(order) >= len(kinds):
        raise ValueError(f"the recipe names request {max(order)} of {len(kinds)}")
    if len(holders) != len(order):
        raise ValueError(f"{len(holders)} holders for a recipe of {len(order)} requests")
    sizes = [math.prod(result_size(k["function"], k["args"], k["kwargs"])) for k in kinds]
    total = sum(sizes[i] for i in order)
    if total > MAX_ELEMENTS:
        raise ValueError(f"the package would have {total} elements (at most {MAX_ELEMENTS})")
    return {"function": "prefetch", "device": message["device"],
            "args": (number, kinds, order, holders),
            "kwargs": {}}


class _TTPMessage(Schema):
    """The string "terminate", or a request checked by :func:`_ttp_request`."""

    request = Convert(Record({"function": Enum(*DEALER_FUNCTIONS),
                              "device": Optional(Str(16, pattern=r"cpu|cuda(:\d{1,2})?")),
                              "args": Any_, "kwargs": Any_}), _ttp_request)

    def check(self, value: Any, path: str = "$") -> Any:
        if isinstance(value, str):
            return Enum("terminate").check(value, path)
        return self.request.check(value, path)


#: What party 0 may send the dealer: one of its six requests, a prefetch, or "terminate".
TTP_REQUEST = _TTPMessage()
#: What the dealer answers party 0: the size of the tensor it broadcasts next.
TTP_REPLY = _SIZE
#: What ``broadcast_obj`` carries in CrypTen: a tensor size, CrypTen's -1 sentinel, or None.
BROADCAST_OBJECT = AnyOf(NULL, Int(-1, 1 << 62), _SIZE)


def _channel_schema(comm: Any, src: int) -> Schema:
    ttp = comm.get_ttp_rank()
    if comm.get_rank() == ttp:
        return TTP_REQUEST
    if src == ttp:
        return TTP_REPLY
    return BROADCAST_OBJECT


def _bytes_tensor(payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def _make_channel(logging_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
                  ) -> dict[str, Callable[..., Any]]:
    """send_obj / recv_obj / broadcast_obj for CrypTen's DistributedCommunicator.

    Same names (CrypTen's ``_logging`` counts rounds and bytes by name), same shape as
    CrypTen's: a length, then the bytes. A refused length stops the receiver before the bytes.
    """
    def send_obj(self: Any, obj: Any, dst: int, group: Any = None) -> None:
        group = self.main_group if group is None else group
        payload, own = _try_encode(obj, OBJECT_LIMIT)
        size = torch.tensor([-1 if payload is None else len(payload)], dtype=torch.int64)
        first = dist.isend(size, dst=dst, group=group)
        if payload is None:
            first.wait()
            raise WireFormatError(f"rank {self.get_rank()} could not send an object: {own}",
                                  rank=self.get_rank())
        # Both sends in flight before waiting, as CrypTen does: waiting for the length to land
        # before sending the bytes costs a round trip per message (every dealer request).
        second = dist.isend(_bytes_tensor(payload), dst=dst, group=group)
        first.wait()
        second.wait()

    def recv_obj(self: Any, src: int, group: Any = None) -> Any:
        group = self.main_group if group is None else group
        size = torch.zeros(1, dtype=torch.int64)
        dist.irecv(size, src=src, group=group).wait()
        length = int(size.item())
        role = "the dealer" if src == self.get_ttp_rank() else f"rank {src}"
        if not 0 < length <= OBJECT_LIMIT:
            raise WireFormatError(f"{role} sent a malformed object message: announced {length} "
                                  f"bytes (limit {OBJECT_LIMIT})", rank=src)
        data = torch.empty(length, dtype=torch.uint8)
        dist.irecv(data, src=src, group=group).wait()
        try:
            return decode(data.numpy().tobytes(), _channel_schema(self, src), limit=OBJECT_LIMIT)
        except WireFormatError as exc:
            here = " (the dealer refused the request)" if self.get_rank() == self.get_ttp_rank() \
                else ""
            raise WireFormatError(f"{role} sent a malformed object message{here}: {exc}",
                                  rank=src) from None

    def broadcast_obj(self: Any, obj: Any, src: int, group: Any = None) -> Any:
        group = self.main_group if group is None else group
        return broadcast_json(obj, BROADCAST_OBJECT, src=src, group=group,
                              what="object message", limit=OBJECT_LIMIT)

    for fn in (send_obj, recv_obj, broadcast_obj):
        fn.__qualname__ = f"DistributedCommunicator.{fn.__name__}"
    channel = {fn.__name__: logging_wrapper(fn) for fn in (send_obj, recv_obj, broadcast_obj)}
    for fn in channel.values():
        fn.mpc_fi_wire = True  # type: ignore[attr-defined]
    return channel


#: CrypTen's own methods, kept so that :func:`uninstall_object_channel` can restore them.
_CRYPTEN_CHANNEL: dict[str, Any] = {}


def object_channel_installed(crypten: Any) -> bool:
    """Whether this process's CrypTen sends objects as checked JSON (all three methods)."""
    cls = crypten.communicator.distributed_communicator.DistributedCommunicator
    return all(getattr(cls.__dict__.get(n), "mpc_fi_wire", False)
               for n in ("send_obj", "recv_obj", "broadcast_obj"))


def install_object_channel(crypten: Any) -> bool:
    """Replace CrypTen's pickled object channel with checked JSON in this process.

    Every party **and the dealer** must do it (the framing differs from CrypTen's, so a party
    without it fails at its first object message). Afterwards the dealer accepts only
    :data:`TTP_REQUEST` from party 0: one of the five functions CrypTen's TTP client calls or
    ``B2A_mul``, known
    Beaver ops and their integer keyword arguments, at most :data:`MAX_ELEMENTS` elements per
    tensor; anything else stops it with :class:`~mpc_fi.errors.WireFormatError` (which CrypTen's
    server loop does not swallow: only its RuntimeError is). Idempotent; returns True once
    installed (check with :func:`object_channel_installed`).
    """
    cls = crypten.communicator.distributed_communicator.DistributedCommunicator
    if not object_channel_installed(crypten):
        # CrypTen's counter of rounds and bytes, which dispatches on the method's name.
        counting = crypten.communicator.communicator._logging
        for name, fn in _make_channel(counting).items():
            _CRYPTEN_CHANNEL.setdefault(name, cls.__dict__[name])
            setattr(cls, name, fn)
    return object_channel_installed(crypten)


def uninstall_object_channel(crypten: Any) -> None:
    """Restore CrypTen's pickled channel (tests only)."""
    cls = crypten.communicator.distributed_communicator.DistributedCommunicator
    for name, original in _CRYPTEN_CHANNEL.items():
        setattr(cls, name, original)
