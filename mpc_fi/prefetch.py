"""The dealer's correlated randomness for a whole batch at once, spread over the parties.

With CrypTen's trusted dealer (TTP), every Beaver triple, square pair, binary triple, wrap pair
or daBit a computing party uses costs party 0 a round trip to the dealer at the moment the
circuit needs it: the other parties draw their shares from the streams they share with the
dealer, and party 0 waits for the dealer to compute its share (``c0 = a*b - sum(c_i, i>0)``).
Those requests sit on the critical path one after another, and party 0 alone receives all the
dealer's material.

A batch asks for the same sequence of requests whenever its shape is the same (the same protocol
and models). Every computing party records that sequence (the *recipe*), and party 0 asks the
dealer, without waiting for the answer, for the whole recipe at once (a *package*). The batch
takes its material from the package while its requests match the recipe, and asks online from
the first request that does not (a protocol whose shape depends on an opened value), for the
rest of that batch. Every party sees the same requests, so all of them decide alike with no
message.

In a package, the party that receives the dealer's correction changes from entry to entry
(:func:`holders`: the party with the least material so far), and every other party draws its
share of that entry from its stream; the dealer sends each party its part in one message. So
every party receives about ``1/P`` of the material instead of party 0 all of it.

No randomness is used twice. Package ``p`` is drawn from the region starting at byte
``p << 48`` of every party's dealer stream (AES-CTR, seekable), which the online requests,
drawing from the stream's start, never reach (they would need 256 TiB); a package's entries
that a batch does not use are dropped with their region, never regenerated. A party receives
only the corrections it holds. The dealer learns the request sizes, as it does online. An
audited run (:mod:`mpc_fi.audit`) records, for the one request that leaves a package, where its
material really came from (:func:`mpc_fi.audit.relocated`), so the audit still regenerates
every mask.

A served session asks, at the end of each call, for the next call's package (the dealer works
between calls). A one-shot run has no previous call to learn its recipe from, so every computing party
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
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from . import audit, truncation, wire
from .errors import ProtocolError

__all__ = ["REGION_BITS", "MAX_PACKAGE_ELEMENTS", "CHUNK_ELEMENTS", "Prefetcher", "install",
           "start", "stop", "installed", "rehearse", "recipe_digest", "holders", "holder_share"]

#: Package ``p`` starts at byte ``p << REGION_BITS`` of each dealer stream.
REGION_BITS = 48
#: The largest package (elements of all parties' corrections, int64): 512 MiB in all, about
#: ``512/P`` MiB held by each party between asking and use. A batch that needs more takes its
#: first requests from packages and asks online for the rest.
MAX_PACKAGE_ELEMENTS = 1 << 26
#: One package's elements at most: a batch's material comes in packages of this size, so the
#: first one arrives while the dealer computes the next.
CHUNK_ELEMENTS = 1 << 22

#: CrypTen's provider methods and the dealer function each one asks for.
_METHODS = {"generate_additive_triple": "additive", "square": "square",
            "generate_binary_triple": "binary", "wrap_rng": "wraps", "B2A_rng": "B2A",
            "B2A_mul_rng": "B2A_mul"}
_POSITIONAL = {"additive": 3, "binary": 2, "square": 1, "wraps": 1, "B2A": 1, "B2A_mul": 1}

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


def holders(recipe: list[Key], parties: int, initial: list[int] | None = None) -> list[int]:
    """Which computing party receives the dealer's correction for each entry of a package
    (the others draw their shares from their streams): each entry goes to the party with the
    least material so far (highest rank on ties: party 0 also reads the dealer's answers),
    counting from ``initial`` (what each party receives beyond the others in the batch's
    truncations, :mod:`mpc_fi.truncation`), so every party receives about as much. Every party
    computes it alike; party 0 sends it to the dealer with the recipe."""
    loads = list(initial) if initial is not None else [0] * parties
    out = []
    for key in recipe:
        h = min(range(parties), key=lambda r: (loads[r], -r))
        loads[h] += _result_elements(key)
        out.append(h)
    return out


@dataclass
class _Package:
    number: int
    recipe: list[Key]
    holders: list[int] = field(default_factory=list)
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
    queued: list[_Package] = field(default_factory=list)  # the next call's packages, in order
    active: _Package | None = None  # the package this call draws from now
    upcoming: list[_Package] = field(default_factory=list)  # this call's later packages
    hit: tuple[int, int, int] | None = None  # (package, entry, holder) of the next request
    pending: collections.deque = field(default_factory=collections.deque)  # asked, not received
    received: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # entry -> part
    from_package: int = 0
    online: int = 0

    # -- per call ---------------------------------------------------------------------------
    def begin_call(self) -> None:
        self.recording, self.from_package, self.online, self.hit = [], 0, 0, None
        self.gathers_before = truncation.tally(self.comm.get_world_size())
        chunks, self.queued = self.queued, []
        if not chunks:
            return
        stream = self.client.generator
        if stream.offset >= 1 << REGION_BITS:
            raise ProtocolError("the dealer stream reached the prefetch regions (2**48 bytes)")
        for package in chunks:
            package.main_offset = stream.offset
        self.upcoming = chunks[1:]
        self._activate(chunks[0])

    def _activate(self, package: _Package) -> None:
        """Draw from ``package`` (its own region of the dealer stream) from now on."""
        self.client.generator.seek(package.number << REGION_BITS)
        self.active = package
        if self.rank != 0:  # this party's part of the package (party 0's: at its first take)
            self.drain(upto=package.number)
            self.received.setdefault(package.number, {})

    def before(self, key: Key | None) -> None:
        """A provider request is about to draw: from the package if it is the recipe's next."""
        if self.recording is not None:
            if key is None:
                self.recording = None
            else:
                self.recording.append(key)
        package = self.active
        if package is not None and package.at == len(package.recipe) and self.upcoming:
            # the recipe goes on in the next package; the audit read this request's position
            # in the last one's region before the switch
            told = self.client.generator.offset
            self.received.pop(package.number, None)
            self._activate(self.upcoming.pop(0))
            audit.relocated(told, self.client.generator.offset)
            package = self.active
        if package is not None:
            if key is not None and package.at < len(package.recipe) \
                    and package.recipe[package.at] == key:
                self.hit = (package.number, package.at, package.holders[package.at])
                package.at += 1
                self.from_package += 1
                return
            self._leave(relocate=True)
        self.hit = None
        self.online += 1

    def _leave(self, *, relocate: bool) -> None:
        package, self.active = self.active, None
        for later in self.upcoming:  # never drawn from: dropped with their regions
            self.received.pop(later.number, None)
        self.upcoming = []
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
            world = self.comm.get_world_size()
            after = truncation.tally(world)
            before = getattr(self, "gathers_before", None) or [0] * world
            self.prepare(recipe, [a - b for a, b in zip(after, before)])

    def prepare(self, recipe: list[Key] | None, gathers: list[int] | None = None) -> bool:
        """Make ``recipe`` (the same at every party) the next call's material: party 0 asks the
        dealer for it now, in packages of at most :data:`CHUNK_ELEMENTS` (the dealer answers
        the first while it computes the next, so the call waits for the first only).
        ``gathers``: what each party gathers in the call's truncations, so that the dealer's
        material evens the parties out. Up to :data:`MAX_PACKAGE_ELEMENTS` in all (and
        ``wire.MAX_PREFETCH_REQUESTS`` requests per package); the requests after that go
        online. False (and nothing asked) if nothing can be prefetched."""
        recipe = list(recipe or [])
        total, end = 0, len(recipe)
        for n, key in enumerate(recipe):
            total += _result_elements(key)
            if total > MAX_PACKAGE_ELEMENTS:
                end = n
                break
        recipe = recipe[:end]
        if not recipe:
            return False
        owners = holders(recipe, self.comm.get_world_size(), gathers)
        chunks, start, size = [], 0, 0
        for n, key in enumerate(recipe):
            size += _result_elements(key)
            last = n + 1 == len(recipe)
            if last or n + 1 - start >= wire.MAX_PREFETCH_REQUESTS \
                    or size + _result_elements(recipe[n + 1]) > CHUNK_ELEMENTS:
                chunks.append((start, n + 1))
                start, size = n + 1, 0
        self.queued = []
        for lo, hi in chunks:
            self.issued += 1
            package = _Package(self.issued, recipe[lo:hi], owners[lo:hi])
            self.queued.append(package)
            if self.rank == 0:
                self._ask(package)
            elif self._portion_elements(package):  # the dealer will send this party its part
                self.pending.append(package)
        return True

    # -- party 0 and the dealer ---------------------------------------------------------------
    def _ask(self, package: _Package) -> None:
        kinds = list(dict.fromkeys(package.recipe))
        index = {k: i for i, k in enumerate(kinds)}
        message = {"function": "prefetch", "device": "cpu",
                   "args": [package.number, [_message(k) for k in kinds],
                            [index[k] for k in package.recipe], list(package.holders)],
                   "kwargs": {}}
        ttp = self.comm.get_ttp_rank()
        with audit.opening("dealer", "prefetch"):
            self.comm.send_obj(message, ttp, self.client.ttp_group)
        self.pending.append(package)

    def drain(self, upto: int | None = None) -> None:
        """Receive this party's part of the packages asked for, in order (the dealer answers
        in order, before any later request), up to package ``upto`` (None: all): party 0 before
        it takes material from a package or asks online, the others when they start drawing
        from a package."""
        ttp = self.comm.get_ttp_rank()
        while self.pending and (upto is None or self.pending[0].number <= upto):
            package = self.pending.popleft()
            if self.rank == 0:
                size = self.comm.recv_obj(ttp, self.client.ttp_group)
                flat = torch.empty(size, dtype=torch.long)
                self.comm.broadcast(flat, ttp, self.client.comm_group)
            else:
                flat = torch.empty(self._portion_elements(package), dtype=torch.long)
                torch.distributed.recv(flat, src=ttp, group=self.client.ttp_group)
                crypten = sys.modules.get("crypten")
                if crypten is not None and crypten.cfg.communicator.verbose:
                    self.comm._log_communication(flat.numel())  # like any tensor it receives
            if flat.numel() != self._portion_elements(package):
                raise ProtocolError(f"the dealer's package {package.number} holds {flat.numel()} "
                                    "elements, not what its recipe needs")
            wanted = package.number in {p.number for p in (self.active, *self.upcoming,
                                                             *self.queued) if p is not None}
            if wanted:
                self.received[package.number] = self._split(package, flat)

    def _mine(self, package: _Package) -> list[int]:
        return [i for i, h in enumerate(package.holders) if h == self.rank]

    def _portion_elements(self, package: _Package) -> int:
        return sum(_result_elements(package.recipe[i]) for i in self._mine(package))

    def _split(self, package: _Package, flat: torch.Tensor) -> dict[int, torch.Tensor]:
        mine = self._mine(package)
        sizes = []
        for i in mine:
            function, args, kwargs = package.recipe[i]
            sizes.append(wire.result_size(function, args, dict(kwargs)))
        parts = torch.split(flat, [math.prod(s) for s in sizes])
        return {i: p.view(s) for i, p, s in zip(mine, parts, sizes)}

    def take(self) -> torch.Tensor:
        number, entry, _ = self.hit
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
    """End prefetching (every party first receives what the dealer sent it: the dealer answers
    party 0 before it reads the goodbye)."""
    global _CURRENT
    state, _CURRENT = _CURRENT, None
    if state is not None:
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


def rehearse(step: Any, crypten: Any) -> tuple[list[Key] | None, list[int]]:
    """The dealer requests ``step()`` makes, found by running it here on zeros with no messages,
    no randomness drawn and no dealer asked (None if it made a request that cannot be
    prefetched, or failed), and what each party will gather in its truncations
    (:func:`mpc_fi.truncation.tally`, put back as it was). An active wire audit is rolled back
    to where it stood (nothing was sent)."""
    global _REHEARSAL
    from .crypten_rng import set_rehearsing  # noqa: PLC0415

    comm_module = crypten.communicator
    real_get = comm_module.get
    silent = _SilentCommunicator(real_get())
    world = silent.get_world_size()
    tally = truncation.tally(world)
    mark = audit.mark()
    _REHEARSAL = []
    set_rehearsing(True)
    comm_module.get = lambda: silent
    try:
        step()
        recipe = _REHEARSAL
    except Exception as exc:  # noqa: BLE001 - any failure: no package, the real run decides
        # the type only: the rehearsal ran on this party's own shares of the weights
        logging.getLogger("mpc_fi").info("no dealer package for this batch: its rehearsal "
                                         "stopped (%s)", type(exc).__name__)
        recipe = None
    finally:
        comm_module.get = real_get
        set_rehearsing(False)
        _REHEARSAL = None
        audit.rollback(mark)
        gathers = [a - b for a, b in zip(truncation.tally(world), tally)]
        truncation.set_tally(world, tally)
    if recipe is None or any(k is None for k in recipe):
        return None, gathers
    return recipe, gathers


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
            if state.hit is not None:
                return _from_package(function, state, args, kwargs)
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
        return original(self, func_name, device, *args, **kwargs)

    ttp_request.mpc_fi_prefetch = original  # type: ignore[attr-defined]
    return ttp_request


def _from_package(function: str, state: Prefetcher, args: tuple, kwargs: dict) -> Any:
    """A provider request answered from the package: this party draws its shares of ``a``,
    ``b`` (or ``r``) from its dealer stream as CrypTen's TTP provider does, and its share of
    the product (or square, wraps, arithmetic bit) from the stream too, unless it is the
    entry's holder: then the dealer's correction from its portion."""
    crypten = sys.modules["crypten"]
    primitives = crypten.mpc.primitives
    arith, binary = primitives.ArithmeticSharedTensor, primitives.BinarySharedTensor
    gen = state.client.generator
    holder = state.hit[2]
    if state.rank == 0:
        state.drain(upto=state.hit[0])  # the dealer's answers come in order
    held = state.take() if holder == state.rank else None
    state.hit = None
    size = wire.result_size(function, args, kwargs)

    def ring(shape):  # what CrypTen's samplers draw (mpc_fi.crypten_rng)
        return gen.ring(shape)

    def bits(shape, bitlength=None):
        return gen.kbits(shape, 64 if bitlength is None else bitlength)

    if function == "additive":
        a, b = ring(args[0]), ring(args[1])
        c = held if held is not None else ring(size)
        return (arith.from_shares(a, precision=0), arith.from_shares(b, precision=0),
                arith.from_shares(c, precision=0))
    if function == "square":
        r = ring(args[0])
        r2 = held if held is not None else ring(size)
        return arith.from_shares(r, precision=0), arith.from_shares(r2, precision=0)
    if function == "binary":
        a, b = bits(args[0]), bits(args[1])
        c = held if held is not None else bits(size)
        return binary.from_shares(a), binary.from_shares(b), binary.from_shares(c)
    if function == "wraps":
        r = ring(args[0])
        theta = held if held is not None else ring(size)
        return arith.from_shares(r, precision=0), arith.from_shares(theta, precision=0)
    if function == "B2A_mul":  # the bit and the mask, then (not held) the two shares
        r_b, a = bits(args[0], bitlength=1), ring(args[0])
        pair = held if held is not None else torch.stack([ring(args[0]), ring(args[0])])
        return (arith.from_shares(pair[0], precision=0), binary.from_shares(r_b),
                arith.from_shares(a, precision=0), arith.from_shares(pair[1], precision=0))
    r_b = bits(args[0], bitlength=1)  # B2A
    r_a = held if held is not None else ring(size)
    return arith.from_shares(r_a, precision=0), binary.from_shares(r_b)


def holder_share(server: Any, function: str, args: tuple, kwargs: dict, holder: int
                  ) -> torch.Tensor:
    """TTPServer: the correction of ``holder`` for one request, every other party's share of
    the product drawn from its stream in the order :func:`_from_package` draws it."""
    gens = list(server.generators)

    def generate_random_ring_element(shape, generator):
        return generator.ring(shape)

    def generate_kbit_random_tensor(shape, generator, bitlength=None):
        return generator.kbits(shape, 64 if bitlength is None else bitlength)

    if function in ("additive", "binary", "square"):
        # per stream: a then b (r for square), then the product share if not the holder
        firsts, seconds, rest = [], [], []
        for i, g in enumerate(gens):
            if function == "binary":
                firsts.append(generate_kbit_random_tensor(args[0], generator=g))
                seconds.append(generate_kbit_random_tensor(args[1], generator=g))
            elif function == "additive":
                firsts.append(generate_random_ring_element(args[0], generator=g))
                seconds.append(generate_random_ring_element(args[1], generator=g))
            else:
                firsts.append(generate_random_ring_element(args[0], generator=g))
            if i != holder:
                size = wire.result_size(function, args, kwargs)
                rest.append(generate_kbit_random_tensor(size, generator=g) if function == "binary"
                            else generate_random_ring_element(size, generator=g))
        if function == "binary":
            a, b = firsts[0].clone(), seconds[0].clone()
            for x, y in zip(firsts[1:], seconds[1:]):
                a ^= x
                b ^= y
            c = a & b
            for x in rest:
                c = c ^ x
            return c
        a = sum(firsts)
        if function == "square":
            return a * a - sum(rest)
        b = sum(seconds)
        extra = args[3:] if len(args) > 3 else ()
        return getattr(torch, args[2])(a, b, *extra, **kwargs) - sum(rest)
    if function == "wraps":
        shares, rest = [], []
        for i, g in enumerate(gens):
            shares.append(generate_random_ring_element(args[0], generator=g))
            if i != holder:
                rest.append(generate_random_ring_element(args[0], generator=g))
        count_wraps = sys.modules["crypten"].common.util.count_wraps
        return count_wraps(shares) - sum(rest)
    if function == "B2A_mul":  # per stream: bit, mask, then (not the holder) r and a*r shares
        r_b, a = torch.zeros(tuple(args[0]), dtype=torch.long), 0
        rest_r, rest_ar = [], []
        for i, g in enumerate(gens):
            r_b ^= generate_kbit_random_tensor(args[0], bitlength=1, generator=g)
            a = a + generate_random_ring_element(args[0], generator=g)
            if i != holder:
                rest_r.append(generate_random_ring_element(args[0], generator=g))
                rest_ar.append(generate_random_ring_element(args[0], generator=g))
        return torch.stack([r_b - sum(rest_r), a * r_b - sum(rest_ar)])
    # B2A: per stream the bit, then the arithmetic share if not the holder
    r_b, rest = torch.zeros(tuple(args[0]), dtype=torch.long), []
    for i, g in enumerate(gens):
        r_b ^= generate_kbit_random_tensor(args[0], bitlength=1, generator=g)
        if i != holder:
            rest.append(generate_random_ring_element(args[0], generator=g))
    return r_b - sum(rest)


def _server_prefetch(self: Any, number: int, kinds: tuple[dict[str, Any], ...],
                     order: tuple[int, ...], owners: tuple[int, ...]) -> torch.Tensor:
    """TTPServer: every party's corrections for a whole recipe, drawn from package ``number``'s
    region; each party's portion goes to it (party 0's is the answer)."""
    last = getattr(self, "_mpc_fi_prefetched", 0)
    if number <= last:
        raise ProtocolError(f"party 0 asked for package {number} after package {last}: a region "
                            "of the dealer streams is used once")
    self._mpc_fi_prefetched = number
    streams = list(self.generators)
    if len(owners) != len(order) or max(owners) >= len(streams):
        raise ProtocolError(f"party 0 named holders outside the {len(streams)} parties")
    main = [s.offset for s in streams]
    if max(main) >= 1 << REGION_BITS:
        raise ProtocolError("the dealer streams reached the prefetch regions (2**48 bytes)")
    for s in streams:
        s.seek(number << REGION_BITS)
    self.device = "cpu"
    portions: list[list[torch.Tensor]] = [[] for _ in streams]
    try:
        for i, h in zip(order, owners):
            k = kinds[i]
            portions[h].append(holder_share(self, k["function"], tuple(k["args"]),
                                             dict(k["kwargs"]), h).reshape(-1))
    finally:
        for s, offset in zip(streams, main):
            s.seek(offset)
    for r in range(1, len(streams)):
        if portions[r]:
            _send_portion(torch.cat(portions[r]), r)
    return torch.cat(portions[0]) if portions[0] else torch.empty(0, dtype=torch.long)


def _send_portion(portion: torch.Tensor, rank: int) -> None:
    """TTPServer: a party's part of a package, straight to it (party 0's is the answer)."""
    group = sys.modules["crypten"].communicator.get().ttp_group
    torch.distributed.send(portion, dst=rank, group=group)



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
