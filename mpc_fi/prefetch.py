"""The dealer's correlated randomness, prepared before a served call needs it.

With CrypTen's trusted dealer (TTP), every Beaver triple, square pair, binary triple, wrap pair
or daBit a computing party uses costs party 0 a round trip to the dealer at the moment the
circuit needs it: the other parties draw their shares from the streams they share with the
dealer, and party 0 waits for the dealer to compute its share (``c0 = a*b - sum(c_i, i>0)``).
In a served session those requests sit on the critical path of every call, one after another.

A served session asks for the same sequence of requests call after call (the same protocol
and models on the same query shape). So, at the end of a call, every computing party records
that call's sequence (the *recipe*), and party 0 asks the dealer, without waiting for the
answer, to compute its shares for the whole recipe at once (a *package*). The next call
takes its material from the package while the requests match the recipe, and asks online
from the first request that does not (another batch size, a protocol whose shape depends on
an opened value), for the rest of that call. Every party sees the same requests, so all of
them decide alike with no message.

No randomness is used twice. Package ``p`` is drawn from the region starting at byte
``p << 48`` of every party's dealer stream (AES-CTR, seekable), which the online requests,
drawing from the stream's start, never reach (they would need 256 TiB); a package's entries
that a call does not use are dropped with their region, never regenerated. Party 0 receives
only its own shares of the package's material, as it would online. The dealer learns the
request sizes, as it does online. An audited run (:mod:`mpc_fi.audit`) records, for the one
request that leaves a package, where its material really came from
(:func:`mpc_fi.audit.relocated`), so the audit still regenerates every mask.

A one-shot run has no previous call to learn its recipe from, so every computing party
*rehearses* the batch first (:func:`rehearse`): it runs the same computation on zeros with a
communicator that sends nothing and samplers and a dealer that return zeros, recording the
requests. The computation on shares does not branch on secret values, so the rehearsal asks for
what the real batch will ask for; the parties compare digests of their recipes (one small
message) and only if all agree does party 0 ask for that recipe's package. A batch that
deviates (a protocol that branches on an opened value) leaves the package as above. A
rehearsal draws no randomness, touches no stream, and sends nothing.

Only computing parties with a TTP dealer prefetch (:func:`start`), when ``network.prefetch``
is on (the default).
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import audit, wire
from .errors import ProtocolError

__all__ = ["REGION_BITS", "MAX_PACKAGE_ELEMENTS", "Prefetcher", "install", "start", "stop",
           "installed", "rehearse", "recipe_digest"]

#: Package ``p`` starts at byte ``p << REGION_BITS`` of each dealer stream.
REGION_BITS = 48
#: The largest package (elements of party 0's shares, int64): 128 MiB at party 0. A call that
#: needs more asks online.
MAX_PACKAGE_ELEMENTS = 1 << 24

#: CrypTen's provider methods and the dealer function each one asks for.
_METHODS = {"generate_additive_triple": "additive", "square": "square",
            "generate_binary_triple": "binary", "wrap_rng": "wraps", "B2A_rng": "B2A"}
_POSITIONAL = {"additive": 3, "binary": 2, "square": 1, "wraps": 1, "B2A": 1}

Key = tuple  # (function, args, kwargs) with every size a tuple of ints

_CURRENT: "Prefetcher | None" = None
#: The requests of the rehearsal under way in this process (None: none is).
_REHEARSAL: "list[Key | None] | None" = None


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple, torch.Size)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(type(value).__name__)
    return value


def request_key(function: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key | None:
    """The request a provider call makes of the dealer, or None when it cannot be prefetched
    (not on the CPU, or arguments the dealer's wire format does not carry)."""
    kw = dict(kwargs)
    device = kw.pop("device", None)
    n = _POSITIONAL[function]
    head, extra = args[:n], args[n:]
    if extra and device is None:
        device, extra = extra[0], extra[1:]
    if extra or (device is not None and torch.device(device).type != "cpu"):
        return None
    try:
        return (function, _freeze(head), tuple(sorted((k, _freeze(v)) for k, v in kw.items())))
    except TypeError:
        return None


def _message(key: Key) -> dict[str, Any]:
    function, args, kwargs = key
    return {"function": function,
            "args": [a if isinstance(a, str) else list(a) for a in args],
            "kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs}}


def _result_elements(key: Key) -> int:
    function, args, kwargs = key
    return math.prod(wire.result_size(function, args, dict(kwargs)))


@dataclass
class _Package:
    number: int
    recipe: list[Key]
    at: int = 0  # entries of the recipe used so far in this call
    main_offset: int = 0  # where this party's dealer stream stood when the call began


@dataclass
class Prefetcher:
    """One computing party's view of the session's packages (the same decisions at every party).
    Party 0 logs, per call, how many requests the package answered and how many went online."""

    rank: int
    client: Any  # CrypTen's TTP client of this process (its ``generator`` is the dealer stream)
    comm: Any
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("mpc_fi"))
    issued: int = 0  # packages asked for so far (the next one is number issued + 1)
    recording: list[Key] | None = field(default_factory=list)  # None: not prefetchable
    ready: _Package | None = None  # the package the next call draws from
    active: _Package | None = None  # the package this call draws from
    hit: tuple[int, int] | None = None  # party 0: (package, entry) the next dealer request takes
    pending: collections.deque = field(default_factory=collections.deque)  # party 0: asked for
    received: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # party 0
    from_package: int = 0
    online: int = 0

    # -- per call ---------------------------------------------------------------------------
    def begin_call(self) -> None:
        self.recording, self.from_package, self.online, self.hit = [], 0, 0, None
        package, self.ready = self.ready, None
        if package is None:
            return
        stream = self.client.generator
        if stream.offset >= 1 << REGION_BITS:
            raise ProtocolError("the dealer stream reached the prefetch regions (2**48 bytes)")
        package.main_offset = stream.offset
        stream.seek(package.number << REGION_BITS)
        self.active = package

    def before(self, key: Key | None) -> None:
        """A provider request is about to draw: from the package if it is the recipe's next."""
        if self.recording is not None:
            if key is None:
                self.recording = None
            else:
                self.recording.append(key)
        package = self.active
        if package is not None:
            if key is not None and package.at < len(package.recipe) \
                    and package.recipe[package.at] == key:
                self.hit = (package.number, package.at)
                package.at += 1
                self.from_package += 1
                return
            self._leave(relocate=True)
        self.hit = None
        self.online += 1

    def _leave(self, *, relocate: bool) -> None:
        package, self.active = self.active, None
        stream = self.client.generator
        if relocate:  # the audit read this request's position before the decision
            audit.relocated(stream.offset, package.main_offset)
        stream.seek(package.main_offset)
        self.received.pop(package.number, None)

    def end_call(self, ok: bool, *, ask: bool = True) -> None:
        """After a call (``ok``: it succeeded at every party): ask for the next package with
        this call's recipe (``ask``: a next call like this one is expected)."""
        if self.active is not None:
            self._leave(relocate=False)
        recipe, self.recording = self.recording, []
        if self.rank == 0 and (self.from_package or self.online):
            self.log.info("dealer material: %d request(s) from the prefetched package, %d online",
                          self.from_package, self.online)
        if ok and ask:
            self.prepare(recipe)

    def prepare(self, recipe: list[Key] | None) -> bool:
        """Make ``recipe`` (the same at every party) the next call's package: party 0 asks the
        dealer for it now. False (and nothing asked) if it cannot be prefetched."""
        if not recipe or len(recipe) > wire.MAX_PREFETCH_REQUESTS \
                or sum(_result_elements(k) for k in recipe) > MAX_PACKAGE_ELEMENTS:
            return False
        self.issued += 1
        self.ready = _Package(self.issued, recipe)
        if self.rank == 0:
            self._ask(self.ready)
        return True

    # -- party 0 and the dealer ---------------------------------------------------------------
    def _ask(self, package: _Package) -> None:
        kinds = list(dict.fromkeys(package.recipe))
        index = {k: i for i, k in enumerate(kinds)}
        message = {"function": "prefetch", "device": "cpu",
                   "args": [package.number, [_message(k) for k in kinds],
                            [index[k] for k in package.recipe]],
                   "kwargs": {}}
        ttp = self.comm.get_ttp_rank()
        with audit.opening("dealer", "prefetch"):
            self.comm.send_obj(message, ttp, self.client.ttp_group)
        self.pending.append(package)

    def drain(self) -> None:
        """Receive every package asked for (the dealer answers in order, before any later
        request): party 0 calls it before it takes material or asks online."""
        ttp = self.comm.get_ttp_rank()
        while self.pending:
            package = self.pending.popleft()
            size = self.comm.recv_obj(ttp, self.client.ttp_group)
            flat = torch.empty(size, dtype=torch.long)
            self.comm.broadcast(flat, ttp, self.client.comm_group)
            sizes = [wire.result_size(k[0], k[1], dict(k[2])) for k in package.recipe]
            if flat.numel() != sum(math.prod(s) for s in sizes):
                raise ProtocolError(f"the dealer's package {package.number} holds {flat.numel()} "
                                    "elements, not what its recipe needs")
            wanted = self.active is not None and self.active.number == package.number \
                or self.ready is not None and self.ready.number == package.number
            if wanted:
                parts = torch.split(flat, [math.prod(s) for s in sizes])
                self.received[package.number] = [p.view(s) for p, s in zip(parts, sizes)]

    def take(self) -> torch.Tensor:
        number, entry = self.hit
        self.hit = None
        return self.received[number][entry]


def start(session: Any) -> Prefetcher | None:
    """Prefetch in this computing party's served session (a TTP dealer only); returns the state."""
    global _CURRENT
    crypten = session.crypten
    if crypten is None or session.role == "dealer" or crypten.cfg.mpc.provider != "TTP":
        return None
    client = crypten.mpc.provider.ttp_provider.TTPClient.get()
    _CURRENT = Prefetcher(session.rank, client, crypten.communicator.get(), log=session.log)
    return _CURRENT


def stop() -> None:
    """End prefetching (party 0 first receives what it asked for: the dealer answers it before
    it reads the goodbye)."""
    global _CURRENT
    state, _CURRENT = _CURRENT, None
    if state is not None and state.rank == 0:
        state.drain()


# -- rehearsals -------------------------------------------------------------------------------
class _SilentCommunicator:
    """CrypTen's communicator as a rehearsal sees it: the same rank and world, no messages.

    Every collective answers as if the other parties held zeros; a rehearsal's values are
    meaningless and never leave the process."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def get_rank(self) -> int:
        return self._real.get_rank()

    def get_world_size(self) -> int:
        return self._real.get_world_size()

    def get_ttp_rank(self) -> int:
        return self._real.get_ttp_rank()

    @staticmethod
    def _same(value: Any, batched: bool = False) -> Any:
        return [t.clone() for t in value] if batched else value.clone()

    def all_reduce(self, value: Any, op: Any = None, batched: bool = False) -> Any:
        return self._same(value, batched)

    def reduce(self, value: Any, dst: int, op: Any = None, batched: bool = False) -> Any:
        return self._same(value, batched)

    def broadcast(self, value: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        return self._same(value, batched)

    def all_gather(self, value: Any) -> list[Any]:
        return [value.clone() for _ in range(self.get_world_size())]

    def gather(self, value: Any, dst: int) -> list[Any]:
        return [value.clone() for _ in range(self.get_world_size())]

    def __getattr__(self, name: str) -> Any:  # point-to-point and object messages: refused
        raise _RehearsalStopped(f"a rehearsal does not {name}")


class _RehearsalStopped(RuntimeError):
    pass


def rehearse(step: Any, crypten: Any) -> list[Key] | None:
    """The dealer requests ``step()`` makes, found by running it here on zeros with no messages,
    no randomness drawn and no dealer asked; None if it made a request that cannot be prefetched
    or failed. An active wire audit is rolled back to where it stood (nothing was sent)."""
    global _REHEARSAL
    from .crypten_rng import set_rehearsing  # noqa: PLC0415

    comm_module = crypten.communicator
    real_get = comm_module.get
    silent = _SilentCommunicator(real_get())
    mark = audit.mark()
    _REHEARSAL = []
    set_rehearsing(True)
    comm_module.get = lambda: silent
    try:
        step()
        recipe = _REHEARSAL
    except Exception as exc:  # noqa: BLE001 - any failure: no package, the real run decides
        logging.getLogger("mpc_fi").info("no dealer package for this batch: its rehearsal "
                                         "stopped (%s: %s)", type(exc).__name__, exc)
        recipe = None
    finally:
        comm_module.get = real_get
        set_rehearsing(False)
        _REHEARSAL = None
        audit.rollback(mark)
    if recipe is None or any(k is None for k in recipe):
        return None
    return recipe


def recipe_digest(recipe: list[Key] | None) -> str:
    """A short public digest of a recipe (the parties compare it before party 0 asks)."""
    import hashlib  # noqa: PLC0415

    if recipe is None:
        return "none"
    return hashlib.sha256(repr(recipe).encode()).hexdigest()[:32]


# -- the patches ------------------------------------------------------------------------------
def _provider_wrapper(function: str, original: Any) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _REHEARSAL is not None:
            _REHEARSAL.append(request_key(function, args, kwargs))
            return original(self, *args, **kwargs)
        state = _CURRENT
        if state is not None:
            state.before(request_key(function, args, kwargs))
        return original(self, *args, **kwargs)

    wrapper.__name__ = original.__name__
    wrapper.__qualname__ = original.__qualname__
    wrapper.mpc_fi_prefetch = original  # type: ignore[attr-defined]
    return wrapper


def _request_wrapper(original: Any) -> Any:
    def ttp_request(self: Any, func_name: str, device: Any, *args: Any, **kwargs: Any) -> Any:
        if _REHEARSAL is not None:  # the size of the dealer's answer, as zeros
            return torch.zeros(wire.result_size(func_name, args, kwargs), dtype=torch.long)
        state = _CURRENT
        if state is None:
            return original(self, func_name, device, *args, **kwargs)
        state.drain()  # the dealer's answers come in order: packages first
        if state.hit is not None:
            return state.take()
        return original(self, func_name, device, *args, **kwargs)

    ttp_request.mpc_fi_prefetch = original  # type: ignore[attr-defined]
    return ttp_request


def _server_prefetch(self: Any, number: int, kinds: tuple[dict[str, Any], ...],
                     order: tuple[int, ...]) -> torch.Tensor:
    """TTPServer: party 0's shares of a whole recipe, drawn from package ``number``'s region."""
    last = getattr(self, "_mpc_fi_prefetched", 0)
    if number <= last:
        raise ProtocolError(f"party 0 asked for package {number} after package {last}: a region "
                            "of the dealer streams is used once")
    self._mpc_fi_prefetched = number
    streams = list(self.generators)
    main = [s.offset for s in streams]
    if max(main) >= 1 << REGION_BITS:
        raise ProtocolError("the dealer streams reached the prefetch regions (2**48 bytes)")
    for s in streams:
        s.seek(number << REGION_BITS)
    self.device = "cpu"
    try:
        parts = [getattr(self, kinds[i]["function"])(*kinds[i]["args"], **kinds[i]["kwargs"])
                 .reshape(-1) for i in order]
    finally:
        for s, offset in zip(streams, main):
            s.seek(offset)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def install(crypten: Any) -> dict[str, Any]:
    """Patch CrypTen's TTP provider, client and server in this process; return the originals."""
    ttp = crypten.mpc.provider.ttp_provider
    saved: dict[str, Any] = {}
    for method, function in _METHODS.items():
        original = ttp.TrustedThirdParty.__dict__[method]
        if not hasattr(original, "mpc_fi_prefetch"):
            saved[f"TrustedThirdParty.{method}"] = original
            setattr(ttp.TrustedThirdParty, method, _provider_wrapper(function, original))
    client = ttp.TTPClient._TTPClient__TTPClient  # CrypTen's private singleton class
    if not hasattr(client.ttp_request, "mpc_fi_prefetch"):
        saved["TTPClient.ttp_request"] = client.ttp_request
        client.ttp_request = _request_wrapper(client.ttp_request)
    ttp.TTPServer.prefetch = _server_prefetch
    return saved


def installed(crypten: Any) -> bool:
    ttp = crypten.mpc.provider.ttp_provider
    client = ttp.TTPClient._TTPClient__TTPClient
    return (all(hasattr(ttp.TrustedThirdParty.__dict__[m], "mpc_fi_prefetch") for m in _METHODS)
            and hasattr(client.ttp_request, "mpc_fi_prefetch")
            and getattr(ttp.TTPServer, "prefetch", None) is _server_prefetch)
