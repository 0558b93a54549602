"""One party of a federation: what runs inside each process, whatever started it.

Ranks: owners ``0..N-1``, the querier ``N``, and (with the ``ttp`` dealer) the dealer ``N+1``.
Phases, identical on every computing party so that none is left waiting:

1. **handshake** — every party publishes the federation fingerprint and package versions; any
   disagreement stops all of them with the same :class:`HandshakeError`.
2. **setup** — the querier publishes the number and shape of its queries (public); each owner
   loads its own model (nobody else reads its files) and publishes its class count, and in
   ``full`` mode its :class:`~mpc_fi.models.Architecture` (no weights). Local failures are
   gathered and re-raised identically everywhere. In ``full`` mode the owners then secret-share
   their parameters.
3. **privacy budget** (federations with a ``privacy`` section) — every owner checks its own
   ledger for the worst case of all the queries, the parties agree, every owner charges it
   (:func:`mpc_fi.budget.authorize_release`); a refusal anywhere stops every party here, before
   any contribution.
4. **inference**, batch by batch — contributions are secret-shared, combined on shares, and the
   protocol's one release is opened to the querier alone.

Errors a party raises locally are exchanged first (``_agree``), so every party raises the same
exception at the same point and the communication pattern never diverges.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from . import audit, compare, prefetch, runtime, secure, wire
from .bounds import AGGREGATE_RANGE_WIRE, aggregate_range, full_mode_aggregate_range, \
    states_secure_range
from .config import MAX_QUERY_VALUE, FederationConfig
from .data import validate_queries
from .errors import BudgetExceededError, ConfigError, HandshakeError, InputError, MpcFiError, \
    PartyFailedError, ProtocolError, SessionLost
from .logs import party_logger
from .memory import auto_limit_mb, plan_rows, refuse_message, row_bytes
from .models import ARCHITECTURE_WIRE, LOAD_AUDIT, Architecture, extract_architecture, \
    fused_first_layers, load_owner_model, output_classes, secure_forward
from .plugins import build_protocol
from .ranges import check_activation_bound, check_model_ranges, comparison_limit
from .result import PartyCost
from .runtime import Session, SessionSpec

#: Largest |value| accepted in a query or model output before sharing. Fixed-point products are
#: formed at scale 2**(2*precision) inside 64-bit integers; this keeps them far from overflow.
MAX_ABS_VALUE = MAX_QUERY_VALUE
#: Rows per batch when ``batch_size`` is unset and no party can tell how much memory it has.
UNPLANNED_BATCH_ROWS = 256


@dataclass(frozen=True)
class PartyContext:
    """Everything a party process needs; the launcher builds it."""

    federation: FederationConfig
    rank: int
    query: np.ndarray | None = None  # the querier's queries (Python API); else querier.data
    #: record this party's outgoing traffic and decryptions here (tests; weakens security)
    audit_path: str | None = None
    #: working memory this party may use for a batch, in MiB (None: half of what is available)
    memory_limit_mb: float | None = None
    #: a served session (mpc_fi.serve): the querier's socket path; None: a one-shot run
    serve_socket: str | None = None


def package_versions() -> dict[str, str]:
    out = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for pkg in ("mpc-fi", "crypten", "torch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_dealer(fed: FederationConfig, *, served: bool = False) -> dict[str, Any]:
    """The trusted dealer: generates correlated randomness, sees no input and no output.

    ``served``: in a served session party 0's next request may come after any idle time, so the
    dealer waits for it without a deadline (it still sees party 0 leave)."""
    from . import channel  # noqa: PLC0415

    session = Session(SessionSpec.of_federation(fed), fed.compute_world_size).start()
    with channel.unbounded(0) if served else contextlib.nullcontext():
        wall = session.serve_dealer()  # its channels open here, inside the block
    return {"cost": asdict(PartyCost(party="dealer", role="dealer", wall_s=wall, rounds=0,
                                     bytes_sent=0, peak_rss_mb=_peak_rss_mb()))}


class _Party:
    def __init__(self, ctx: PartyContext):
        self.ctx = ctx
        self.fed = ctx.federation
        self.rank = ctx.rank
        self.role = self.fed.role_of(self.rank)
        self.name = self.fed.party_names[self.rank]
        self.log = party_logger()
        self.session = Session(SessionSpec.of_federation(self.fed), self.rank).start()
        self.crypten = self.session.crypten
        self.comm = self.session.comm
        self.q = self.fed.querier_rank
        self.owner_ranks = list(range(self.fed.num_owners))

    # -- collective helpers -------------------------------------------------------------
    def _gather(self, obj: Any, schema: wire.Schema | list[wire.Schema], what: str) -> list[Any]:
        return self.session.gather(obj, schema, what)

    def _agree(self, step: Callable[[], Any], schema: wire.Schema | list[wire.Schema],
               what: str) -> tuple[Any, list[Any]]:
        return self.session.agree(step, schema, what)

    # -- phases -------------------------------------------------------------------------
    def handshake(self) -> None:
        mine = {"name": self.name, "fingerprint": self.fed.fingerprint(),
                "versions": package_versions()}
        hellos = self._gather(mine, wire.HELLO, "handshake message")
        for rank, hello in enumerate(hellos):
            expected = self.fed.party_names[rank]
            if hello["name"] != expected:
                raise HandshakeError(f"rank {rank} is {hello['name']!r} but this federation file "
                                     f"puts {expected!r} there: the parties use different files")
            if hello["fingerprint"] != mine["fingerprint"]:
                raise HandshakeError(
                    f"party {hello['name']} was started with a different federation "
                    f"(fingerprint {hello['fingerprint']} != {mine['fingerprint']}): every party "
                    "must use the same federation file")
            if hello["versions"] != mine["versions"]:
                raise HandshakeError(f"party {hello['name']} runs {hello['versions']}, party "
                                     f"{self.name} runs {mine['versions']}: install the same versions")
        self.log.info("handshake ok: fingerprint %s, %d parties", mine["fingerprint"], len(hellos))

    def _load_queries(self) -> np.ndarray:
        data = self.ctx.query
        if data is None:
            from .data import load_queries  # noqa: PLC0415

            if not self.fed.querier.data:
                raise InputError("the querier has no queries: pass X to the API or set querier.data")
            data = load_queries(self.fed.querier.data)
        return validate_queries(data, self.fed.querier)

    def setup(self) -> None:
        """One-shot run: the querier announces its queries, then :meth:`prepare` and
        :meth:`plan`."""
        fed = self.fed
        self.queries = None
        # Only the querier announces queries; anything else from another seat is malformed.
        meta_schema = [wire.QUERY_META if r == self.q else wire.NULL
                       for r in range(fed.compute_world_size)]
        meta, all_meta = self._agree(lambda: self._querier_meta() if self.role == "querier" else None,
                                     meta_schema, "query announcement")
        n, shape = all_meta[self.q]
        self.num_queries, self.input_shape = n, tuple(shape)
        self.log.info("querier announced %d queries of shape %s", n, self.input_shape)
        self.prepare()
        self.plan()

    def prepare(self) -> None:
        """What does not depend on the number of queries, done once per session: owners load
        their models and publish class counts (and, in full mode, architectures), the protocol
        and its value range are fixed, and in full mode the owners share their weights."""
        fed = self.fed

        def owner_setup() -> Any:
            if self.role != "owner":
                return None
            self.model = load_owner_model(fed.owners[self.rank].model, mode=fed.mode)
            self.log.info("loaded own model (%d weight file(s) read by this process)", len(LOAD_AUDIT))
            if fed.mode == "full":
                self.arch, self.params = extract_architecture(self.model, self.input_shape)
                # Before anything is shared: could this model overflow the fixed-point encoding
                # for some query in the public input range? (Only this owner can tell.)
                ranges = check_model_ranges(self.arch, self.params, fed.shared_input_range,
                                            fed.precision_bits, range_key=fed.shared_input_key)
                self.log.info("fixed-point range check passed: largest bound 2^%.1f",
                              math.log2(max([r.magnitude for r in ranges] + [1.0])))
                if fed.activation_bound is not None:
                    check_activation_bound(ranges, fed.shared_input_range, fed.activation_bound,
                                           range_key=fed.shared_input_key)
                return {"classes": self.arch.num_classes, "arch": self.arch}
            return {"classes": output_classes(self.model, self.input_shape)}

        setup_schema = wire.Record({"classes": wire.Int(2, 1 << 20), "arch": ARCHITECTURE_WIRE}
                                   if fed.mode == "full" else {"classes": wire.Int(2, 1 << 20)})
        _, published = self._agree(owner_setup, [setup_schema if r in self.owner_ranks
                                                 else wire.NULL
                                                 for r in range(fed.compute_world_size)],
                                   "owner set-up")
        classes = {fed.party_names[r]: published[r]["classes"] for r in self.owner_ranks}
        if len(set(classes.values())) != 1:
            raise InputError("owners disagree on the number of classes: "
                             + ", ".join(f"{k}={v}" for k, v in classes.items()))
        self.num_classes = next(iter(classes.values()))
        self.archs: list[Architecture] = [published[r].get("arch") for r in self.owner_ranks]
        self.protocol = build_protocol(fed, num_classes=self.num_classes)
        # Output mode: a public range of the aggregate lets comparisons carry few bits
        # (mpc_fi.bounds); every owner checks its contributions against it batch by batch.
        self.aggregate_range, self.contribution_range = None, None
        if fed.mode == "output":
            found = aggregate_range(self.protocol, num_owners=fed.num_owners,
                                    num_classes=self.num_classes,
                                    precision_bits=fed.precision_bits, logit_limit=MAX_ABS_VALUE)
            # The range picks the comparison circuit: every party must use the same one.
            agreed = self._gather(found, AGGREGATE_RANGE_WIRE, "value range")
            if all(other == found for other in agreed):
                self.aggregate_range, self.contribution_range = found
        else:  # stated by the protocol from public facts only: the same at every party
            self.aggregate_range = full_mode_aggregate_range(
                self.protocol, num_owners=fed.num_owners, num_classes=self.num_classes,
                precision_bits=fed.precision_bits, activation_bound=fed.activation_bound)
        self.log.info("protocol %s, %d classes, mode %s", self.protocol.name, self.num_classes, fed.mode)
        if fed.mode == "full":
            self._share_parameters()
        self.prepared = True

    def plan(self) -> None:
        """Rows per batch for this run's (or this request's) queries; see _plan_batches."""
        self.batch_rows = self._plan_batches()

    def charge_budget(self) -> dict[str, Any] | None:
        """Before the first contribution: every owner checks and charges its ledger for all the
        queries of this run (one release: refused or charged whole, so an honest querier never
        pays for batches it does not receive). ``BudgetReport.to_dict()``, or None without a
        ``privacy`` section."""
        fed = self.fed
        if fed.privacy is None:
            if getattr(self.protocol, "differentially_private", False) and self.role == "owner":
                self.log.warning("protocol %s adds differential-privacy noise but the federation "
                                 "has no privacy section: this owner keeps no budget for the "
                                 "querier", fed.protocol.name)
            return None
        from .budget import authorize_release  # noqa: PLC0415 - dp-accounting only with a budget

        report = authorize_release(self.session, federation=fed, queries=self.num_queries)
        return None if report is None else report.to_dict()

    def _plan_batches(self) -> int:
        """Rows per batch that fit every party's memory; the same on every party (or refuse).

        With ``batch_size`` unset, as many rows as the tightest party's plan allows (all the
        queries in one batch when they fit): fewer batches mean fewer rounds, and a batch's
        rounds barely grow with its rows. A party that cannot tell its memory plans
        :data:`UNPLANNED_BATCH_ROWS` rows.
        """
        fed = self.fed
        per_row = row_bytes(input_shape=self.input_shape, num_owners=fed.num_owners,
                            protocol_elements=self.protocol.row_elements,
                            archs=self.archs if fed.mode == "full" else ())
        requested = fed.batch_size
        want = max(1, self.num_queries) if requested is None else requested

        def plan() -> tuple[int, float | None]:
            limit = self.ctx.memory_limit_mb
            if limit is None:
                limit = auto_limit_mb()
            if limit is None and requested is None:
                return min(want, UNPLANNED_BATCH_ROWS), None
            return plan_rows(want, per_row, limit), limit

        _, plans = self._agree(plan, wire.BATCH_PLAN, "batch plan")
        tightest = min(range(len(plans)), key=lambda r: (plans[r][0], r))
        rows, its_limit = plans[tightest]
        who = self.fed.party_names[tightest]
        if rows < 1:
            raise InputError(refuse_message(party=who, limit_mb=its_limit, per_row=per_row))
        batches = math.ceil(self.num_queries / rows) if self.num_queries else 0
        if requested is None:
            limit_text = "unknown" if its_limit is None else f"{its_limit:.0f} MiB"
            self.log.info("batch size from the memory plan: %d queries in %d batch(es) of up to "
                          "%d (about %.1f KiB per query on shares; party %s may use %s)",
                          self.num_queries, batches, rows, per_row / 1024, who, limit_text)
        elif rows < min(requested, self.num_queries):
            self.log.warning("batch_size %d would need about %.0f MiB per batch on shares; party %s "
                             "may use %.0f MiB: answering in batches of %d queries",
                             requested, requested * per_row / 2**20, who, its_limit, rows)
        return rows

    def _querier_meta(self) -> tuple[int, tuple[int, ...]]:
        self.queries = self.shared_input(self._load_queries())
        return int(self.queries.shape[0]), tuple(self.queries.shape[1:])

    def shared_input(self, x: np.ndarray) -> np.ndarray:
        """What the querier secret-shares for validated queries ``x``: the queries, or the
        features the federation's public backbone computes from them here, in plaintext."""
        backbone = self.fed.public_backbone
        if backbone is None:
            return x
        if getattr(self, "backbone", None) is None:
            self.backbone = load_owner_model(backbone.model, mode="output")
            self.log.info("loaded the public backbone (it runs here only; its features are "
                          "secret-shared)")
        try:
            with torch.no_grad():
                features = self.backbone(torch.from_numpy(np.ascontiguousarray(x)))
        except Exception as exc:  # a user's model: its message may quote query values, so it
            # stays in this party's log; the error every party agrees on names the type only
            self.log.exception("the public backbone failed on the queries")
            raise InputError(f"the public backbone failed on the queries ({type(exc).__name__}; "
                             "the querier's log has the details)") from None
        out = np.asarray(features.detach().numpy() if hasattr(features, "detach") else features,
                         dtype=np.float32)
        if out.ndim < 2 or out.shape[0] != x.shape[0]:
            raise InputError(f"the public backbone gave features of shape {out.shape} for "
                             f"{x.shape[0]} queries")
        low, high = backbone.output_range
        if not np.isfinite(out).all() or out.min() < low or out.max() > high:
            raise InputError(f"the public backbone's features leave public_backbone.output_range "
                             f"[{low:g}, {high:g}] (or are not finite) for some query: widen the "
                             "declared range or clip the backbone's output")
        return out

    def _share_parameters(self) -> None:
        cryptensor = self.crypten.cryptensor
        self.shared_params: list[dict[str, Any]] = []
        for r, arch in zip(self.owner_ranks, self.archs):
            shared = {}
            for layer in arch.layers:
                for pname, pshape in layer.params.items():
                    key = f"{layer.path}/{pname}"
                    value = self.params[key] if self.rank == r else torch.zeros(pshape, dtype=torch.float64)
                    shared[key] = cryptensor(value, src=r)
            self.shared_params.append(shared)
        self.log.info("owners' parameters secret-shared")

    def _status(self, problem: str | None) -> None:
        """One tiny collective per batch so that an owner's failure stops everyone together."""
        with audit.opening("status", "batch"):
            flags = self.comm.all_gather(torch.tensor([0 if problem is None else 1]))
        if problem is not None:
            raise InputError(f"[{self.name}] {problem}")
        for rank, flag in enumerate(flags):
            if int(flag.item()):
                raise InputError(f"[{self.fed.party_names[rank]}] reported a bad model output "
                                 "(see its log); the run was stopped everywhere")

    def _secure_contributions(self, logits: list[Any]) -> list[Any]:
        """Every owner's full-mode contribution from one call on the owners' stacked logits.

        ``secure_contribution`` works row by row on ``(batch, classes)`` logits, so one call on
        the ``(N * batch, classes)`` stack returns the same rows while its comparisons, ``exp``
        and reciprocals run once for all owners: the rounds of this step do not grow with N.
        """
        size = logits[0].size(0)
        out = self.protocol.secure_contribution(self.crypten.cat(logits, dim=0))
        return [out[k * size:(k + 1) * size] for k in range(len(logits))]

    def _broadcast_query(self, x: torch.Tensor) -> torch.Tensor:
        """Send the querier's float32 query to everyone as raw 4-byte floats.

        CrypTen counts 8 bytes per element whatever the dtype; viewing pairs of float32 as one
        int64 makes the count match what gloo really sends.
        """
        flat = x.to(torch.float32).flatten()
        padded = torch.zeros(flat.numel() + flat.numel() % 2, dtype=torch.float32)
        padded[:flat.numel()] = flat
        with audit.opening("query", "output-mode query"):
            words = self.comm.broadcast(padded.view(torch.int64), self.q)
        return words.view(torch.float32)[:flat.numel()].view(x.shape)

    def _owner_logits(self, x: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
        try:
            with torch.no_grad():
                logits = self.model(x)
        except Exception as exc:  # reported through _status, so every party stops together
            self.log.exception("the model failed on a batch")
            return None, f"the model failed on a batch: {type(exc).__name__}: {exc}"
        want = (x.shape[0], self.num_classes)
        if tuple(logits.shape) != want:
            return None, f"model output has shape {tuple(logits.shape)}, expected {want}"
        if not torch.isfinite(logits).all():
            return None, "model output holds NaN or inf"
        if logits.abs().max() > MAX_ABS_VALUE:
            return None, f"model output exceeds the fixed-point range (|y| <= {MAX_ABS_VALUE:g})"
        return logits, None

    def _release(self, inputs: torch.Tensor) -> torch.Tensor:
        """One batch on shares: from the querier's input (full mode) or each owner's
        contribution (output mode; every other party passes zeros of its shape) to the value
        the protocol releases, opened at the querier (zeros elsewhere)."""
        cryptensor = self.crypten.cryptensor
        if self.fed.mode == "output":
            shares = [cryptensor(inputs, src=r) for r in self.owner_ranks]
        else:
            x_enc = cryptensor(inputs.to(torch.float64), src=self.q)
            bound = self.fed.activation_bound
            limits = (comparison_limit(bound), None if bound is None else bound + 1)
            with compare.bounded(*limits):  # every owner checked its activations against it
                firsts = fused_first_layers(self.archs, x_enc, self.shared_params)
                logits = [secure_forward(arch, x_enc, params, first)
                          for arch, params, first in zip(self.archs, self.shared_params, firsts)]
            # The protocol's own steps on the logits compare only within the bound if it
            # vouches for what they compute (bounds.states_secure_range).
            with compare.bounded(*(limits if states_secure_range(self.protocol) else (None,))):
                shares = self._secure_contributions(logits)
        aggregate = self.protocol.combine(shares)
        if self.aggregate_range is not None:
            secure.annotate(aggregate, value_range=self.aggregate_range)
        return self.protocol.to_reveal(aggregate).get_plain_text(dst=self.q)

    def _package_for(self, inputs: torch.Tensor) -> None:
        """One-shot runs: rehearse a batch of this shape (no message, no randomness), compare
        recipe digests, and let party 0 ask the dealer for the whole batch's material."""
        pf = self.prefetcher
        recipe, gathers = prefetch.rehearse(lambda: self._release(torch.zeros_like(inputs)),
                                            self.crypten)
        digests = self._gather(prefetch.recipe_digest(recipe), wire.RECIPE_DIGEST,
                               "dealer recipe digest")
        self._package_rows = None
        if recipe is not None and all(d == digests[0] for d in digests) \
                and pf.prepare(recipe, gathers):
            self._package_rows = int(inputs.shape[0])

    def infer(self) -> tuple[np.ndarray, np.ndarray | None]:
        fed = self.fed
        labels, scores = [], []
        rows = self.batch_rows
        batches = math.ceil(self.num_queries / rows)
        pf = getattr(self, "prefetcher", None)  # one-shot runs with a TTP dealer
        self._package_rows = None
        for b in range(batches):
            start = b * rows
            size = min(rows, self.num_queries - start)
            shape = (size, *self.input_shape)
            if self.role == "querier":
                x = torch.from_numpy(self.queries[start:start + size])
            else:
                x = torch.zeros(shape, dtype=torch.float32)
            if fed.mode == "output":
                # Output mode: the query goes to the owners in plaintext (documented release).
                x = self._broadcast_query(x)
                # The placeholder every non-owner shares must have the owner's shape: the
                # protocol may share more than one column per class (contribution_width).
                width = getattr(self.protocol, "contribution_width", self.num_classes)
                contribution, problem = torch.zeros(size, width, dtype=torch.float64), None
                if self.role == "owner":
                    logits, problem = self._owner_logits(x)
                    if problem is None:
                        contribution = self.protocol.local_contribution(logits)
                        if self.contribution_range is not None:
                            problem = self.contribution_range.problem(contribution)
                self._status(problem)
                inputs = contribution
            else:
                inputs = x
            if pf is not None:
                if self._package_rows != size:
                    self._package_for(inputs)
                pf.begin_call()
            opened = self._release(inputs)
            if pf is not None:
                following = min(rows, self.num_queries - start - size)
                pf.end_call(ok=True, ask=following == size)
                self._package_rows = size if following == size and pf.queued else None
            if self.role == "querier":
                pred = self.protocol.decode(opened)
                labels.append(pred.labels)
                if pred.scores is not None:
                    scores.append(pred.scores)
            self.log.info("batch %d/%d done", b + 1, batches)
        if self.role != "querier":
            return np.empty(0, dtype=np.int64), None
        return np.concatenate(labels), (np.concatenate(scores) if scores else None)


def run_party(ctx: PartyContext) -> dict[str, Any]:
    """Run one party to completion; return plain Python values (no live tensors)."""
    recorder = audit.WireAudit(ctx.rank).install() if ctx.audit_path else None
    try:
        return _run_party(ctx)
    finally:
        if recorder is not None:
            recorder.uninstall()
            recorder.dump(ctx.audit_path)


def _run_party(ctx: PartyContext) -> dict[str, Any]:
    fed = ctx.federation
    role = fed.role_of(ctx.rank)
    if ctx.serve_socket is not None:
        return _serve_party(ctx)
    if role == "dealer":
        return run_dealer(fed)
    t0 = time.perf_counter()
    party = _Party(ctx)
    party.handshake()
    party.setup()
    budget = party.charge_budget()
    setup_s = time.perf_counter() - t0
    party.comm.reset_communication_stats()
    t1 = time.perf_counter()
    # The dealer's material for each batch in one message (a rehearsal finds what it is).
    party.prefetcher = prefetch.start(party.session) if fed.network.prefetch else None
    labels, scores = party.infer()
    prefetch.stop()
    stats = party.comm.get_communication_stats()
    cost = PartyCost(party=party.name, role=role, wall_s=time.perf_counter() - t1,
                     rounds=int(stats["rounds"]), bytes_sent=int(stats["bytes"]),
                     peak_rss_mb=_peak_rss_mb())
    party.log.info("done: %.3f s, %d rounds, %d bytes", cost.wall_s, cost.rounds, cost.bytes_sent)
    out: dict[str, Any] = {"cost": asdict(cost), "setup_s": setup_s,
                           "loaded_files": [p for _, p in LOAD_AUDIT],
                           "batch_rows": party.batch_rows}
    if role == "querier":
        out.update(labels=labels, scores=scores, budget=budget)
    # CrypTen's shutdown only after a success: it has party 0 send the dealer "terminate", so
    # after a failure the dealer would report success for a failed run. A failed party's process
    # ends right after (the launchers exit without teardown); the dealer sees the connection
    # close and fails too.
    party.session.close()
    return out


def _serve_party(ctx: PartyContext) -> dict[str, Any]:
    """A served session (:mod:`mpc_fi.serve`): set up once, then answer the querier's requests
    until it says stop. Every party runs the same steps per request; a failure every party
    agrees on (bad input, a refused budget, a bad model output) ends that request only."""
    from . import channel  # noqa: PLC0415
    from .serve import Endpoint, ServingStopped, error_reply  # noqa: PLC0415

    fed = ctx.federation
    if fed.transport() == "gloo":
        raise ConfigError("a served session needs mpc-fi's channels (network.transport: auto, "
                          "zmq or curve): gloo bounds every idle wait by network.timeout_s",
                          key="network.transport")

    def stopped(role: str, served: int, wall: float) -> dict[str, Any]:
        party_logger().info("stopped while waiting for the parties; served %d request(s)", served)
        return {"cost": asdict(PartyCost(party=fed.party_names[ctx.rank], role=role, wall_s=wall,
                                         rounds=0, bytes_sent=0, peak_rss_mb=_peak_rss_mb())),
                "served": served}

    def rejoin(exc: PartyFailedError) -> PartyFailedError:
        """A peer is gone: leave this session, to rejoin a new one with the same parties."""
        if isinstance(exc, SessionLost) or exc.rank is None or exc.rank == ctx.rank:
            return exc
        return SessionLost(f"{exc} (this party leaves the session and rejoins a new one)",
                           party=exc.party, rank=exc.rank)

    if fed.role_of(ctx.rank) == "dealer":
        try:
            return run_dealer(fed, served=True)
        except ServingStopped:
            return stopped("dealer", 0, 0.0)
        except PartyFailedError as exc:
            lost = rejoin(exc)
            if lost is exc:
                raise
            raise lost from exc
    t0 = time.perf_counter()
    endpoint = None
    if fed.role_of(ctx.rank) == "querier":
        import signal  # noqa: PLC0415

        # The querier's clients are answered from the start, also while the parties gather
        # (runtime.waiting: "waiting for <who>").
        endpoint = Endpoint(ctx.serve_socket)
        runtime.while_waiting(endpoint.waiting)
        # SIGTERM: finish the request in flight, then tell every party to stop.
        signal.signal(signal.SIGTERM, lambda *_: endpoint.stopping.set())
    served, wall = 0, 0.0
    try:
        party = _Party(ctx)
        party.handshake()
        runtime.while_waiting(None)
        # The dealer prepares each call's material during the previous one's idle time.
        prefetcher = prefetch.start(party.session) if fed.network.prefetch else None
        party.log.info("serving: ready after %.2f s", time.perf_counter() - t0)
        while True:
            x = None
            if endpoint is not None:
                request = endpoint.next()
                if request["op"] == "health":
                    endpoint.reply({"ok": True, "status": "ready", "requests": served,
                                    "parties": list(fed.party_names), "mode": fed.mode,
                                    "protocol": fed.protocol.name})
                    continue
                if request["op"] == "predict":
                    try:
                        x = party.shared_input(validate_queries(request.get("x"),
                                                                fed.querier))
                        shape = tuple(x.shape[1:])
                        if getattr(party, "input_shape", shape) != shape:
                            raise InputError(f"this session answers queries of shape "
                                             f"{party.input_shape}, got {shape}: start another "
                                             "session for another shape")
                    except MpcFiError as exc:
                        endpoint.reply(error_reply(exc))
                        continue
                step = ({"op": "batch", "n": int(x.shape[0]), "shape": list(x.shape[1:])}
                        if x is not None else {"op": "stop", "n": 0, "shape": []})
            else:
                step = None
            with channel.unbounded(party.q):  # owners wait for the next request without end
                step = party.session.broadcast(step, wire.SERVED_STEP, src=party.q,
                                               what="served request")
            if step["op"] == "stop":
                break
            t1 = time.perf_counter()
            try:
                if not getattr(party, "prepared", False):  # the first request (or a retry
                    party.input_shape = tuple(step["shape"])  # after a refused set-up)
                    party.prepare()
                party.num_queries, party.queries = step["n"], x
                party.plan()
                budget = party.charge_budget()
                if prefetcher is not None:
                    prefetcher.begin_call()
                labels, scores = party.infer()
            except (InputError, BudgetExceededError, ProtocolError) as exc:
                # Raised alike on every party (agreed): this request fails, the session goes on.
                if prefetcher is not None:
                    prefetcher.end_call(ok=False)
                party.log.warning("request %d refused: %s: %s", served + 1, type(exc).__name__,
                                  exc)
                if endpoint is not None:
                    endpoint.reply(error_reply(exc))
                continue
            if prefetcher is not None:
                prefetcher.end_call(ok=True)
            served += 1
            wall += time.perf_counter() - t1
            if endpoint is not None:
                endpoint.reply({"ok": True, "labels": labels, "scores": scores,
                                "budget": budget})
    except ServingStopped:  # stopped while no session ran: nothing to close
        return stopped(fed.role_of(ctx.rank), served, wall)
    except PartyFailedError as exc:
        if endpoint is not None:
            endpoint.reply(error_reply(exc))
        lost = rejoin(exc)
        if lost is exc:
            raise
        raise lost from exc
    except BaseException as exc:
        if endpoint is not None:
            endpoint.reply(error_reply(exc))
        raise
    finally:
        runtime.while_waiting(None)
        if endpoint is not None:
            endpoint.close()
    stats = party.comm.get_communication_stats()
    cost = PartyCost(party=party.name, role=party.role, wall_s=wall, rounds=int(stats["rounds"]),
                     bytes_sent=int(stats["bytes"]), peak_rss_mb=_peak_rss_mb())
    party.log.info("served %d request(s); stopping", served)
    prefetch.stop()
    party.session.close()
    return {"cost": asdict(cost), "served": served}
