"""Contribution scores: Shapley values of ensemble accuracy, computed on shares, and label-free
rewards compared with them.

The querier holds a labelled validation set; each owner holds its model. The value of a
coalition ``S`` of owners is the accuracy of the ensemble of ``S`` on the validation set:

    v(S) = (1/M) * #{q : argmax_j sum_{i in S} c_i(q)_j == y_q},    v(empty) = 0 by default

where ``c_i`` is owner ``i``'s contribution under an *additive* protocol (soft voting: softmax
probabilities; hard voting: one-hot votes), in CrypTen's fixed-point units, and the argmax breaks
ties to the lowest class index (:mod:`mpc_fi.secure`). ``v(empty)`` is a definition, not a
measurement: 0 (an empty ensemble answers nothing; then the Shapley values share out the whole
grand-coalition accuracy) or, with ``empty="chance"``, ``1/C``.

On shares (:func:`secure_coalition_values`), one run of owners + querier + TTP dealer:

1. the querier sends the validation queries to the owners (as in ``output`` mode: owners see
   queries, never labels); each owner evaluates its own model and checks its contribution
   against the public range agreed from probes (:mod:`mpc_fi.bounds`);
2. each owner secret-shares its contribution once (integer units, CrypTen precision 0);
3. every coalition sum is a local sum of shares (no traffic);
4. one batched argmax over all coalitions and queries (:func:`mpc_fi.secure.argmax_one_hot`)
   gives shared one-hot labels;
5. the querier secret-shares its labels one-hot; one Beaver product and a local sum give, per
   coalition, the number of correct answers: **the only values opened, and only to the querier.**
   No owner's prediction, no coalition's label and no single comparison is ever opened.

The same run also computes label-free rewards (no labels needed), each opened as one number per
owner to the querier: *agreement* (each query's unit of reward is split equally among the owners
whose own label equals the federation's answer; computed on shares with one more argmax) and
*entropy* (each owner's total certainty ``log C - H(p_i)`` over the queries, computed by the owner
on its own outputs and shared; self-reported, so an owner can inflate it). *Equal* split needs no
computation. Each reward is compared with the Shapley merit by the L1 distance between the two
normalised reward vectors (0 = identical split, 2 = disjoint).

Everything opened is an integer count (or an integer sum of public rational weights), so the
plaintext twin (:func:`plaintext_coalition_values`) gives exactly the same numbers.

The owners' defences against a querier that chooses the validation set to read their classes
(:mod:`studies.valuation_leakage`) run in the same computation: a minimum validation size and
pool, a validation subset the parties draw jointly from the querier's pool, and joint Gaussian
noise on the counts charged to each owner's own privacy ledger before anything is sent
(:mod:`studies.owner_defences`; with noise, only the noisy counts are opened).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import torch

from mpc_fi import plain
from mpc_fi.errors import InputError, ProtocolError
from .common import ProtocolSpec, protocol_specs

#: Exact Shapley values up to this many owners (2**N - 1 coalitions on shares); sampling above.
EXACT_MAX_OWNERS = 8
EMPTY_VALUES = ("zero", "chance")
#: Rows (coalitions x queries) per batched argmax on shares: bounds each party's memory.
MAX_ARGMAX_ROWS = 1 << 17
REWARDS = ("equal", "agreement", "entropy")
#: How a refusal of the validation set starts, on every party and in the launcher's report.
REFUSAL = "validation set refused"


class ValidationRefusedError(ProtocolError):
    """An owner refused to score coalitions on the querier's validation set.

    Each owner may set its own minimum number of validation queries (``min_validation``): the
    coalition counts are aggregates over the validation set, and the fewer the queries, the
    closer they come to per-query (and, with chosen queries, per-class) information about the
    owners' models (``studies.valuation_leakage``). The owner checks the size before evaluating
    its model, inside the first agreement step, so the refusal stops every party with the same
    error before anything is shared.
    """


# ---------------------------------------------------------------------------------------
# Coalitions
# ---------------------------------------------------------------------------------------
def mask_of(members: Sequence[bool] | np.ndarray) -> int:
    return int(sum(1 << i for i, m in enumerate(members) if m))


def all_coalitions(num_owners: int) -> np.ndarray:
    """Every non-empty coalition as a ``(2**N - 1, N)`` bool matrix, row ``m - 1`` = bitmask m."""
    masks = np.arange(1, 1 << num_owners)
    return ((masks[:, None] >> np.arange(num_owners)) & 1).astype(bool)


def sample_permutations(num_owners: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_owners) for _ in range(count)])


def permutation_coalitions(num_owners: int, permutations: np.ndarray) -> np.ndarray:
    """The distinct non-empty prefixes of ``permutations``, plus every singleton (the agreement
    reward needs them), as a bool membership matrix."""
    masks = {1 << i for i in range(num_owners)}
    for perm in permutations:
        m = 0
        for i in perm:
            m |= 1 << int(i)
            masks.add(m)
    ordered = sorted(masks)
    return np.array([[(m >> i) & 1 for i in range(num_owners)] for m in ordered], dtype=bool)


# ---------------------------------------------------------------------------------------
# Values and rewards
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoalitionValues:
    """What the querier learns: per coalition, the number of correct answers; per owner, the
    label-free reward totals.

    With noise on the counts (``count_sigma > 0``, :mod:`studies.owner_defences`) ``correct``
    holds the noisy counts (floats) and the reward fields are None (not computed). ``sample``:
    the indices of the scored queries in the querier's pool when the parties drew them.
    """

    coalitions: np.ndarray  # (K, N) bool
    correct: np.ndarray  # (K,) int (float when noisy)
    num_queries: int
    num_classes: int
    agreement_units: np.ndarray | None  # (N,) int: sum over queries of lcm(1..N) / #agreeing
    agreement_scale: int  # lcm(1..N)
    agreeing: np.ndarray | None  # (N,) int: queries where owner i's label equals the federation's
    certainty_units: np.ndarray | None  # (N,) int: sum over queries of log C - H(p_i), fixed point
    precision_bits: int
    count_sigma: float = 0.0
    sample: np.ndarray | None = None

    @property
    def num_owners(self) -> int:
        return int(self.coalitions.shape[1])

    def accuracy(self) -> dict[int, float]:
        """Coalition bitmask -> accuracy."""
        return {mask_of(row): int(c) / self.num_queries
                for row, c in zip(self.coalitions, self.correct)}

    def empty_value(self, empty: str) -> float:
        if empty not in EMPTY_VALUES:
            raise ValueError(f"empty must be one of {EMPTY_VALUES}, got {empty!r}")
        return 0.0 if empty == "zero" else 1.0 / self.num_classes


def encoded_contributions(proto: Any, logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each owner's contribution in fixed-point units (int64), as it is secret-shared."""
    return [plain.encode(proto.local_contribution(lg), proto.precision_bits) for lg in logits]


def certainty(logits: torch.Tensor) -> torch.Tensor:
    """Per query ``log C - H(softmax(logits))`` in nats (>= 0): what the entropy reward pays."""
    z = logits.to(torch.float64)
    logp = torch.log_softmax(z, dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    return math.log(z.shape[-1]) - h


def _agreement_weights(num_owners: int) -> tuple[int, torch.Tensor]:
    scale = reduce(math.lcm, range(1, num_owners + 1), 1)
    return scale, torch.tensor([0] + [scale // k for k in range(1, num_owners + 1)],
                               dtype=torch.long)


def plaintext_coalition_values(units: Sequence[torch.Tensor], labels: np.ndarray,
                               coalitions: np.ndarray, certainties: Sequence[torch.Tensor], *,
                               precision_bits: int = 16) -> CoalitionValues:
    """The twin of :func:`secure_coalition_values` from the owners' encoded contributions."""
    stack = torch.stack([u.long() for u in units])  # (N, M, C)
    n, m, c = stack.shape
    y = torch.as_tensor(labels, dtype=torch.long)
    memb = torch.as_tensor(coalitions, dtype=torch.long)
    sums = torch.tensordot(memb, stack, dims=1)  # (K, M, C)
    pred = plain.argmax_lowest(sums)  # (K, M)
    correct = (pred == y).sum(-1).numpy()
    own = plain.argmax_lowest(stack)  # (N, M)
    final = plain.argmax_lowest(stack.sum(0))  # (M,)
    agree = (own == final).long()  # (N, M)
    count = agree.sum(0)
    scale, weights = _agreement_weights(n)
    agreement = (agree * weights[count]).sum(-1).numpy()
    cert = torch.stack([plain.encode(ct.sum(), precision_bits) for ct in certainties]).numpy()
    return CoalitionValues(np.asarray(coalitions, bool), correct.astype(np.int64), m, c,
                           agreement.astype(np.int64), scale, agree.sum(-1).numpy(),
                           cert.astype(np.int64), precision_bits)


# ---------------------------------------------------------------------------------------
# On shares
# ---------------------------------------------------------------------------------------
def _party(rank: int, payload: dict[str, Any]) -> dict[str, Any] | None:
    """One computing party of the coalition-value computation (see the module docstring)."""
    from mpc_fi import runtime, secure, wire  # noqa: PLC0415
    from mpc_fi.bounds import contribution_range  # noqa: PLC0415
    from mpc_fi.compare import ValueRange  # noqa: PLC0415
    from mpc_fi.models import load_owner_model  # noqa: PLC0415
    from mpc_fi.party import MAX_ABS_VALUE  # noqa: PLC0415
    from mpc_fi.plugins import PROTOCOLS, lookup  # noqa: PLC0415

    session = runtime.current()  # started by the launcher: CrypTen set up, parties joined
    crypten = session.crypten
    group = session.comm.main_group
    n = payload["num_owners"]
    q = n  # the querier's rank
    bits = payload["precision_bits"]
    coalitions = torch.as_tensor(payload["coalitions"], dtype=torch.long)  # public
    role = "owner" if rank < n else "querier"

    def agree(step: Callable[[], Any], schema: Any, what: str) -> list[Any]:
        """Run ``step``, exchange (failure, value) as checked JSON; every party raises the same
        error (:meth:`mpc_fi.runtime.Session.agree`)."""
        return session.agree(step, schema, what)[1]

    sigma = payload.get("count_sigma")  # public: noise on the opened counts (None: exact)
    sample = payload.get("sample")  # public: queries drawn from the querier's pool (None: all)
    # 0. the querier's pool size (checked JSON), then each owner's own policy: its minimum pool,
    # scored set and count noise. A refusal stops every party before anything else happens.
    shape = session.broadcast(list(np.shape(payload["x"])) if role == "querier" else None,
                              wire.Shape(min_dims=2, max_elements=wire.MAX_ELEMENTS), src=q,
                              what="query shape")
    pool = int(shape[0])
    m = pool if sample is None else int(sample)

    def policy() -> None:
        if sample is not None and not 1 <= m <= pool:
            raise InputError(f"cannot sample {m} validation queries from a pool of {pool}")
        if role == "querier":
            return None
        if pool < payload.get("min_pool", 1):
            raise ValidationRefusedError(f"{REFUSAL}: a pool of {pool} queries, this owner "
                                         f"requires at least {payload['min_pool']}")
        if m < payload.get("min_validation", 1):
            raise ValidationRefusedError(f"{REFUSAL}: {m} queries, this owner requires at least "
                                         f"{payload['min_validation']}")
        floor = payload.get("min_count_sigma")
        if floor and not (sigma and sigma >= floor):
            raise ValidationRefusedError(f"{REFUSAL}: count noise sigma={sigma}, this owner "
                                         f"requires at least {floor:g}")
        return None

    agree(policy, wire.NULL, "owner policy")
    # every party draws its noise share and its sample from its own copy of these: they must agree
    terms = session.gather({"sigma": float(sigma or 0.0), "sample": int(sample or 0)},
                           wire.Record({"sigma": wire.Float(0.0, 1e300),
                                        "sample": wire.Int(0, 1 << 40)}), "run terms")
    if len({(t["sigma"], t["sample"]) for t in terms}) != 1:
        raise ProtocolError("the parties disagree on the count noise or the sample size: "
                            + ", ".join(f"{session.spec.names[r]} sigma={t['sigma']:g} sample="
                                        f"{t['sample']}" for r, t in enumerate(terms)))
    # 0b. each owner charges its own ledger for the run's K noisy counts before any query is
    # sent; every party refuses alike if one owner's total would exceed the budget.
    if sigma and payload.get("budget") is not None:
        from mpc_fi.budget import authorize_cost  # noqa: PLC0415
        from mpc_fi.privacy import PrivacyBudget  # noqa: PLC0415

        from .owner_defences import count_cost  # noqa: PLC0415

        eps, delta = payload["budget"]["epsilon"], payload["budget"]["delta"]
        authorize_cost(session, price=lambda: count_cost(len(coalitions), sigma),
                       ledger=lambda: PrivacyBudget(payload["ledger"], epsilon=eps, delta=delta),
                       epsilon=eps, delta=delta, owner_names=session.spec.names[:n])

    # 1. the queries go to the owners (output mode); labels stay with the querier. The values
    # travel as a float32 tensor: nothing a peer sends is unpickled.
    x = torch.as_tensor(payload["x"], dtype=torch.float32).contiguous() if role == "querier" \
        else torch.zeros(shape, dtype=torch.float32)
    torch.distributed.broadcast(x, src=q, group=group)
    labels = np.asarray(payload["y"], dtype=np.int64) if role == "querier" else None
    chosen = None
    if sample is not None:  # 1b. the scored subset, drawn with a key no party chooses alone
        from .owner_defences import joint_key, sample_indices  # noqa: PLC0415

        chosen = sample_indices(joint_key(session), pool, m)
        x = x[torch.as_tensor(chosen)]
        if labels is not None:
            labels = labels[chosen] if labels.shape == (pool,) else labels

    private: dict[str, Any] = {}  # this party's own values; never sent anywhere

    def local() -> dict[str, Any]:
        if role == "querier":
            return {}
        model = load_owner_model(payload["model"])
        with torch.no_grad():
            logits = model(x).to(torch.float64)
        if logits.ndim != 2 or not torch.isfinite(logits).all() \
                or logits.abs().max() > MAX_ABS_VALUE:
            raise InputError("model output is not a finite (queries, classes) tensor within "
                             f"|y| <= {MAX_ABS_VALUE:g}")
        private["logits"] = logits
        return {"classes": int(logits.shape[1])}  # public: the class count only

    published = agree(local, [wire.Record({"classes": wire.Int(2, 1 << 20)})] * n
                      + [wire.Record({})], "class count")
    num_classes = {p["classes"] for p in published[:n]}
    if len(num_classes) != 1:
        raise InputError(f"owners disagree on the number of classes: {sorted(num_classes)}")
    c = num_classes.pop()
    spec = payload["protocol"]
    proto = lookup(PROTOCOLS, spec["name"], key="protocol")(
        num_classes=c, num_owners=n, owner_weights=[1.0] * n, precision_bits=bits,
        **spec["params"])
    crange = contribution_range(proto, c, logit_limit=MAX_ABS_VALUE)

    def contribution() -> None:
        if role == "querier":
            y = labels
            if y.shape != (m,) or y.min() < 0 or y.max() >= c:
                raise InputError(f"labels must be {m} class indices in 0..{c - 1}")
            return None
        logits = private["logits"]
        contrib = proto.local_contribution(logits)
        if crange is not None and (problem := crange.problem(contrib)) is not None:
            raise InputError(problem)
        private["units"] = plain.encode(contrib, bits)
        private["certainty"] = plain.encode(certainty(logits).sum(), bits).reshape(1)
        return None

    agree(contribution, wire.NULL, "contribution check")

    # 2. each owner shares its contribution once (integer units at precision 0: exact)
    zeros = torch.zeros(m, c, dtype=torch.long)
    shares = [crypten.cryptensor(private["units"] if rank == i else zeros, src=i, precision=0)
              for i in range(n)]
    raw = torch.stack([s.share for s in shares])  # (N, M, C) raw int64 shares
    value_range = None
    if crange is not None:
        scale = 1 << bits
        # a coalition's sums lie in |S| * [lo, hi], inside N * [lo, hi] since lo <= 0 <= hi
        value_range = ValueRange(n * int(crange.lo * scale), n * int(crange.hi * scale),
                                 bits if crange.integer else 0)
    y_onehot = torch.zeros(m, c, dtype=torch.long)
    if role == "querier":
        y_onehot[torch.arange(m), torch.as_tensor(labels, dtype=torch.long)] = 1
    y_raw = crypten.cryptensor(y_onehot, src=q, precision=0).share
    # Blocks of coalitions bound the memory of the batched argmax (one argmax per block).
    k = coalitions.shape[0]
    masks = [mask_of(row) for row in coalitions.bool().tolist()]
    singles = [masks.index(1 << i) for i in range(n)]
    grand = masks.index((1 << n) - 1)
    kept: dict[int, torch.Tensor] = {}  # raw one-hot shares: singletons, grand coalition
    block = max(1, payload["max_argmax_rows"] // m)
    correct_parts = []
    for start in range(0, k, block):
        memb = coalitions[start:start + block]
        kb = memb.shape[0]
        # 3. coalition sums: local
        sums = torch.tensordot(memb, raw, dims=1).reshape(kb * m, c)
        sums = crypten.mpc.MPCTensor.from_shares(sums, precision=0)
        # 4. one batched argmax, lowest index on ties (0/1 integers at precision 0)
        one_hot_raw = secure.argmax_one_hot(sums, c, value_range=value_range).share.view(kb, m, c)
        kept.update({i: one_hot_raw[i - start] for i in (*singles, grand)
                     if start <= i < start + kb})
        # 5. the querier's one-hot labels times each coalition's one-hot answer: hits
        y_wide = crypten.mpc.MPCTensor.from_shares(y_raw.expand(kb, m, c).contiguous(),
                                                   precision=0)
        hits = crypten.mpc.MPCTensor.from_shares(one_hot_raw.clone(), precision=0) * y_wide
        correct_parts.append(hits.sum(2).sum(1))
    correct = crypten.cat(correct_parts) if len(correct_parts) > 1 else correct_parts[0]
    if sigma:  # joint noise from every computing party, then the only opening, to the querier
        from protocols.noise import SystemNoise  # noqa: PLC0415

        from .owner_defences import noisy_counts_on_shares  # noqa: PLC0415

        noisy = noisy_counts_on_shares(correct, float(sigma), SystemNoise(), bits)
        opened_noisy = noisy.get_plain_text(dst=q)
        if role != "querier":
            return None
        return {"correct": opened_noisy.to(torch.float64).numpy(), "num_queries": m,
                "num_classes": c, "sample": None if chosen is None else chosen.tolist()}

    # label-free rewards: agreement of each owner's own label with the federation's answer
    own = crypten.mpc.MPCTensor.from_shares(torch.stack([kept[i] for i in singles]), precision=0)
    final = crypten.mpc.MPCTensor.from_shares(
        kept[grand].unsqueeze(0).expand(n, m, c).contiguous(), precision=0)
    agree_bits = (own * final).sum(2)  # (N, M) 0/1
    count = agree_bits.sum(0)  # (M,) in 0..N
    ks = torch.arange(n + 1, dtype=torch.long)
    # f_k(a) = 2ka - k^2 is largest at k = a over integers: the one-hot of the count, linearly
    votes_for = count.unsqueeze(1) * (2 * ks) - ks * ks
    which = secure.argmax_one_hot(votes_for, n + 1, value_range=ValueRange(-n * n, n * n))
    scale, weights = _agreement_weights(n)
    per_query = (which * weights).sum(1)  # lcm / count, 0 when nobody agrees
    wide = crypten.mpc.MPCTensor.from_shares(per_query.share.unsqueeze(0).expand(n, m)
                                             .contiguous(), precision=0)
    agreement = (agree_bits * wide).sum(1)
    agreeing = agree_bits.sum(1)
    zero = torch.zeros(1, dtype=torch.long)
    cert = crypten.cat([crypten.cryptensor(private["certainty"] if rank == i else zero, src=i,
                                           precision=0) for i in range(n)])
    # the only openings, all to the querier
    opened = {name: t.get_plain_text(dst=q) for name, t in
              (("correct", correct), ("agreement", agreement), ("agreeing", agreeing),
               ("certainty", cert))}
    if role != "querier":
        return None
    out = {name: v.long().numpy() for name, v in opened.items()}
    out.update(num_queries=m, num_classes=c, scale=scale,
               sample=None if chosen is None else chosen.tolist())
    return out



def check_additive(proto: Any) -> None:
    """Coalition sums need an additive protocol: one column per class, ``combine`` = plain sum,
    no noise. Raise a :class:`ProtocolError` that says which protocols qualify otherwise."""
    c = proto.num_classes
    why = None
    if getattr(proto, "differentially_private", False):
        why = "its release is noisy (a coalition value would be random)"
    elif getattr(proto, "contribution_width", c) != c:
        why = f"its contributions have {proto.contribution_width} columns, not one per class"
    else:
        gen = torch.Generator().manual_seed(3)  # public test values for a structural check
        parts = [torch.rand(4, c, generator=gen, dtype=torch.float64) for _ in range(proto.num_owners)]
        try:
            total = torch.as_tensor(proto.combine(parts)).to(torch.float64)
            if not torch.allclose(total, sum(parts)):
                why = "its combine is not the plain sum of contributions"
        except Exception as exc:  # noqa: BLE001 - a combine that only works on shares
            why = f"its combine does not run on plaintext ({type(exc).__name__})"
    if why:
        raise ProtocolError(f"{proto.name} cannot score coalitions: {why}; use an additive "
                            "protocol such as soft_vote or hard_vote")


def secure_coalition_values(model_sources: Sequence[Any], x: np.ndarray, y: np.ndarray,
                            coalitions: np.ndarray, *, protocol: str = "soft_vote",
                            params: Mapping[str, Any] | None = None, precision_bits: int = 16,
                            timeout_s: float = 900.0, log_dir: str | None = None,
                            max_argmax_rows: int = MAX_ARGMAX_ROWS,
                            min_validation: int | Sequence[int] | None = None,
                            sample: int | None = None,
                            min_pool: int | Sequence[int] | None = None,
                            count_sigma: float | None = None,
                            min_count_sigma: float | Sequence[float] | None = None,
                            ledgers: Sequence[Any] | None = None,
                            budget: tuple[float, float] | None = None) -> CoalitionValues:
    """Coalition correct-counts and label-free reward totals, computed on shares.

    ``model_sources[i]`` (a :class:`~mpc_fi.config.ModelSource`) goes to owner ``i``'s process
    only; ``x`` and ``y`` go to the querier's only. ``coalitions`` (public) must contain every
    singleton and the grand coalition. Coalitions are processed in blocks of at most
    ``max_argmax_rows // len(x)`` (one batched argmax per block).

    ``min_validation`` is each owner's smallest acceptable validation set (one number for every
    owner, or one per owner); it travels in that owner's payload only and the owner enforces it.
    A refusal raises :class:`ValidationRefusedError` (every party stopped before sharing).

    The owners' other defences (:mod:`studies.owner_defences`):

    ``sample``
        ``x``/``y`` are a pool; the parties score ``sample`` queries drawn from it with a key no
        single party chooses (the indices come back as ``CoalitionValues.sample``). Each owner
        refuses a pool smaller than its ``min_pool`` (one number, or one per owner).
    ``count_sigma``
        joint Gaussian noise of this std on every count before it is opened; the label-free
        rewards are then not computed. Each owner refuses a run whose ``count_sigma`` is below
        its ``min_count_sigma`` (one number, or one per owner).
    ``ledgers``, ``budget``
        with ``count_sigma``: owner ``i`` charges the run to its own
        :class:`~mpc_fi.privacy.PrivacyBudget` file ``ledgers[i]`` made with ``budget =
        (epsilon, delta)`` before any query is sent, and every party raises
        :class:`~mpc_fi.errors.BudgetExceededError` if one owner's total would exceed it.
    """
    from mpc_fi.errors import BudgetExceededError, PartyFailedError  # noqa: PLC0415

    from .runner import run_parties  # noqa: PLC0415

    n = len(model_sources)
    coalitions = np.asarray(coalitions, dtype=bool)
    masks = {mask_of(row) for row in coalitions}
    if coalitions.shape[1] != n or not {1 << i for i in range(n)} | {(1 << n) - 1} <= masks:
        raise ValueError("coalitions must have one column per owner and include every singleton "
                         "and the grand coalition")
    common = {"num_owners": n, "precision_bits": precision_bits, "coalitions": coalitions,
              "max_argmax_rows": int(max_argmax_rows),
              "protocol": {"name": protocol, "params": dict(params or {})}}
    def per_owner(value: Any, name: str, kind: type, low: float) -> list[Any]:
        vals = [kind(low)] * n if value is None else (
            [kind(value)] * n if np.isscalar(value) else [kind(v) for v in value])
        if len(vals) != n or min(vals) < low:
            raise ValueError(f"{name} needs one number >= {low} per owner ({n}), got {vals}")
        return vals

    minimum = per_owner(min_validation, "min_validation", int, 1)
    pools = per_owner(min_pool, "min_pool", int, 1)
    floors = per_owner(min_count_sigma, "min_count_sigma", float, 0.0)
    if sample is not None and (isinstance(sample, bool) or int(sample) != sample or sample < 1):
        raise ValueError(f"sample must be an integer >= 1, got {sample!r}")
    if count_sigma is not None and not (math.isfinite(count_sigma) and count_sigma > 0):
        raise ValueError(f"count_sigma must be a finite number > 0, got {count_sigma!r}")
    if budget is not None and (count_sigma is None or ledgers is None or len(ledgers) != n):
        raise ValueError("a budget needs count_sigma and one ledger path per owner")
    common.update(sample=None if sample is None else int(sample),
                  count_sigma=None if count_sigma is None else float(count_sigma),
                  budget=None if budget is None else {"epsilon": float(budget[0]),
                                                      "delta": float(budget[1])})
    payloads = [{**common, "model": src, "min_validation": k, "min_pool": p, "min_count_sigma": f,
                 "ledger": None if ledgers is None else str(ledgers[i])}
                for i, (src, k, p, f) in enumerate(zip(model_sources, minimum, pools, floors))]
    payloads.append({**common, "x": np.asarray(x, dtype=np.float32),
                     "y": np.asarray(y, dtype=np.int64)})
    try:
        out = run_parties(_party, payloads, timeout_s=timeout_s, precision_bits=precision_bits,
                          log_dir=log_dir)[n]
    except PartyFailedError as exc:
        for marker, error in ((REFUSAL, ValidationRefusedError),
                              ("exceed its privacy budget", BudgetExceededError)):
            if marker in str(exc):  # every party stopped on the owners' agreed refusal: name it
                lines = [ln.strip() for ln in str(exc).splitlines() if marker in ln]
                raise error(lines[-1] if lines else marker) from exc
        raise
    chosen = None if out.get("sample") is None else np.asarray(out["sample"], dtype=np.int64)
    if count_sigma is not None:
        return CoalitionValues(coalitions, np.asarray(out["correct"], dtype=np.float64),
                               out["num_queries"], out["num_classes"], None, 1, None, None,
                               precision_bits, float(count_sigma), chosen)
    return CoalitionValues(coalitions, out["correct"], out["num_queries"], out["num_classes"],
                           out["agreement"], out["scale"], out["agreeing"], out["certainty"],
                           precision_bits, 0.0, chosen)


def shapley_exact(values: CoalitionValues, *, empty: str = "zero") -> np.ndarray:
    """Exact Shapley values from every coalition's accuracy (needs all ``2**N - 1``)."""
    n = values.num_owners
    acc = values.accuracy()
    if len(acc) != (1 << n) - 1:
        raise ValueError(f"exact Shapley values need all {(1 << n) - 1} coalitions, got {len(acc)}")
    return shapley_from_values(acc, n, empty_value=values.empty_value(empty))


def shapley_from_values(acc: dict[int, float], n: int, *, empty_value: float = 0.0
                        ) -> np.ndarray:
    """Exact Shapley values from ``v(S)`` for every non-empty coalition mask ``S``."""
    v = np.zeros(1 << n)
    v[0] = empty_value
    for mask, a in acc.items():
        v[mask] = a
    size = np.array([bin(s).count("1") for s in range(1 << n)])
    weight = np.array([math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                       for k in range(n)])
    phi = np.zeros(n)
    for i in range(n):
        bit = 1 << i
        without = np.array([s for s in range(1 << n) if not s & bit])
        phi[i] = float(np.sum(weight[size[without]] * (v[without | bit] - v[without])))
    return phi


def shapley_permutation(values: CoalitionValues, permutations: np.ndarray, *,
                        empty: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo permutation estimate and its standard error (std of the marginal
    contributions over permutations / sqrt(#permutations))."""
    acc = values.accuracy()
    n = values.num_owners
    base = values.empty_value(empty)
    marg = np.zeros((len(permutations), n))
    for p, perm in enumerate(permutations):
        mask, prev = 0, base
        for i in perm:
            mask |= 1 << int(i)
            cur = acc[mask]
            marg[p, int(i)] = cur - prev
            prev = cur
    se = marg.std(axis=0, ddof=1) / math.sqrt(len(permutations)) if len(permutations) > 1 \
        else np.full(n, math.nan)
    return marg.mean(axis=0), se


def normalise(v: np.ndarray) -> np.ndarray:
    total = float(np.sum(v))
    return np.full(len(v), 1.0 / len(v)) if total == 0 else np.asarray(v, float) / total


#: The two merit measures rewards are compared with.
MERITS = ("shapley", "own_accuracy")


def merit_shares(shapley: np.ndarray, own_accuracy: np.ndarray) -> dict[str, np.ndarray]:
    """Each merit measure as a split of one unit among the owners.

    ``shapley``: the Shapley values **clipped at 0**, then normalised. A Shapley value is
    negative when adding the owner lowers the ensemble's accuracy on average; such an owner earns
    nothing (a reward split cannot be negative, and ``φ/Σφ`` with a negative entry would leave
    the 0-2 range of the L1 distance). ``own_accuracy``: each owner's own accuracy on the
    validation set, normalised (the merit of the FI paper's reference code).
    """
    return {"shapley": normalise(np.clip(np.asarray(shapley, float), 0.0, None)),
            "own_accuracy": normalise(np.asarray(own_accuracy, float))}


def label_free_rewards(values: CoalitionValues) -> dict[str, np.ndarray]:
    """Each label-free scheme's split of one unit of reward among the owners."""
    if values.agreement_units is None or values.certainty_units is None:
        raise ValueError("these coalition values carry no label-free rewards (noisy counts "
                         "open the counts only)")
    n = values.num_owners
    return {"equal": np.full(n, 1.0 / n),
            "agreement": normalise(values.agreement_units.astype(float)),
            "entropy": normalise(values.certainty_units.astype(float))}


def l1_fairness(reward: np.ndarray, merit: np.ndarray) -> float:
    """L1 distance between two normalised splits (0: the reward follows merit exactly; 2: the
    most unfair)."""
    return float(np.abs(normalise(reward) - normalise(merit)).sum())


@dataclass
class ContributionReport:
    """Shapley values, label-free rewards and their fairness for one federation."""

    num_owners: int
    method: str  # "exact" or "permutation (P samples)"
    empty: str
    secure: bool
    shapley: np.ndarray
    shapley_se: np.ndarray | None
    values: CoalitionValues
    rewards: dict[str, np.ndarray]
    fairness: dict[str, float]
    twin_equal: bool | None = None  # secure values == plaintext twin (None: not checked)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: merit measure -> reward -> L1 distance (``fairness`` is ``fairness_by_merit["shapley"]``)
    fairness_by_merit: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def merits(self) -> dict[str, np.ndarray]:
        return merit_shares(self.shapley, self.singleton_accuracy)

    @property
    def grand_accuracy(self) -> float:
        return self.values.accuracy()[(1 << self.num_owners) - 1]

    @property
    def singleton_accuracy(self) -> np.ndarray:
        acc = self.values.accuracy()
        return np.array([acc[1 << i] for i in range(self.num_owners)])


def same_values(a: CoalitionValues, b: CoalitionValues) -> bool:
    return (np.array_equal(a.coalitions, b.coalitions) and np.array_equal(a.correct, b.correct)
            and np.array_equal(a.agreement_units, b.agreement_units)
            and np.array_equal(a.agreeing, b.agreeing)
            and np.array_equal(a.certainty_units, b.certainty_units))


def contribution_scores(models: Sequence[torch.nn.Module], x: np.ndarray, y: np.ndarray, *,
                        model_sources: Sequence[Any] | None = None, protocol: str = "soft_vote",
                        params: Mapping[str, Any] | None = None, secure: bool = True,
                        check_twin: bool = True, method: str = "auto", permutations: int = 200,
                        seed: int = 0, empty: str = "zero", precision_bits: int = 16,
                        timeout_s: float = 900.0,
                        min_validation: int | Sequence[int] | None = None) -> ContributionReport:
    """Shapley values of each owner's contribution to ensemble accuracy on ``(x, y)``.

    Parameters
    ----------
    models:
        Every owner's model, for the plaintext twin (only a study, which trained them all,
        has them). With ``secure=True`` the values come from shares and the twin only checks them.
    model_sources:
        Each owner's :class:`~mpc_fi.config.ModelSource` (needed with ``secure=True``).
    method:
        ``"exact"`` (all ``2**N - 1`` coalitions), ``"permutation"`` (Monte-Carlo over
        ``permutations`` random orders, with standard errors) or ``"auto"`` (exact up to
        :data:`EXACT_MAX_OWNERS` owners).
    empty:
        ``"zero"``: ``v(empty) = 0``; ``"chance"``: ``v(empty) = 1/C``. Efficiency then reads
        ``sum(shapley) == v(all) - v(empty)``.
    min_validation:
        Each owner's smallest acceptable validation set on shares
        (:class:`ValidationRefusedError` below it).

    Fairness is the L1 distance of each reward split to each merit measure
    (:func:`merit_shares`: clipped Shapley values, own accuracies).
    """
    import time  # noqa: PLC0415

    if empty not in EMPTY_VALUES:
        raise ValueError(f"empty must be one of {EMPTY_VALUES}, got {empty!r}")
    n = len(models)
    num_classes = int(models[0](torch.as_tensor(x[:1])).shape[-1])
    spec: ProtocolSpec = protocol_specs(n, only=[protocol],
                                        overrides={protocol: dict(params or {})})[0]
    proto = spec.build(num_classes=num_classes, num_owners=n, owner_weights=[1.0] * n,
                       precision_bits=precision_bits)
    check_additive(proto)
    if method == "auto":
        method = "exact" if n <= EXACT_MAX_OWNERS else "permutation"
    perms = None
    if method == "exact":
        coalitions = all_coalitions(n)
    elif method == "permutation":
        perms = sample_permutations(n, permutations, seed)
        coalitions = permutation_coalitions(n, perms)
    else:
        raise ValueError(f"method must be exact, permutation or auto, got {method!r}")
    t0 = time.perf_counter()
    twin = None
    if not secure or check_twin:
        with torch.no_grad():
            logits = [mdl(torch.as_tensor(x)).to(torch.float64) for mdl in models]
        twin = plaintext_coalition_values(encoded_contributions(proto, logits), y, coalitions,
                                          [certainty(lg) for lg in logits],
                                          precision_bits=precision_bits)
    if secure:
        if model_sources is None:
            raise ValueError("secure=True needs each owner's model_sources")
        values = secure_coalition_values(model_sources, x, y, coalitions, protocol=protocol,
                                         params=spec.params, precision_bits=precision_bits,
                                         timeout_s=timeout_s, min_validation=min_validation)
    else:
        values = twin
    seconds = time.perf_counter() - t0
    if method == "exact":
        phi, se, label = shapley_exact(values, empty=empty), None, "exact"
    else:
        phi, se = shapley_permutation(values, perms, empty=empty)
        label = f"permutation ({len(perms)} samples)"
    rewards = label_free_rewards(values)
    own = np.array([values.accuracy()[1 << i] for i in range(n)])
    merits = merit_shares(phi, own)
    by_merit = {name: {r: l1_fairness(split, merit) for r, split in rewards.items()}
                for name, merit in merits.items()}
    by_merit["shapley"]["own_accuracy"] = l1_fairness(merits["own_accuracy"], merits["shapley"])
    return ContributionReport(n, label, empty, secure, phi, se, values, rewards,
                              dict(by_merit["shapley"]),
                              twin_equal=None if not (secure and twin is not None)
                              else same_values(values, twin), seconds=seconds,
                              extra={"protocol": protocol}, fairness_by_merit=by_merit)


# ---------------------------------------------------------------------------------------
# The study: a small grid of federations
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapleyConfig:
    dataset: str = "digits"
    arch: str = "mlp"
    owners: tuple[int, ...] = (3, 5, 8)
    alphas: tuple[float, ...] = (0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    protocol: str = "soft_vote"
    secure: bool = True
    method: str = "auto"
    permutations: int = 200
    empty: str = "zero"
    validation: int | None = None  # use only the first N held-out examples
    timeout_s: float = 900.0


def run_shapley(cfg: ShapleyConfig = ShapleyConfig(), *, show_progress: bool = True
                ) -> tuple[list[dict[str, Any]], list[ContributionReport]]:
    """Contribution scores for every (N, alpha, seed); rows (one per owner) and the reports."""
    import tempfile  # noqa: PLC0415

    import demos as demo  # noqa: PLC0415
    from .common import Progress  # noqa: PLC0415

    torch.set_num_threads(1)
    cells = [(n, a, sd) for n in cfg.owners for a in cfg.alphas for sd in cfg.seeds]
    bar = Progress(len(cells), "shapley", enabled=show_progress)
    rows, reports = [], []
    with tempfile.TemporaryDirectory(prefix="mpc-fi-shapley-") as tmp:
        for n, alpha, seed in cells:
            setup = demo.prepare(f"{tmp}/n{n}-a{alpha}-s{seed}", dataset=cfg.dataset,
                                 num_owners=n, alpha=alpha, seed=seed, arch=cfg.arch)
            x, y = setup.x_test, setup.y_test
            if cfg.validation:
                x, y = x[:cfg.validation], y[:cfg.validation]
            rep = contribution_scores(setup.models, x, y,
                                      model_sources=[o.model for o in setup.federation.owners],
                                      protocol=cfg.protocol, secure=cfg.secure, method=cfg.method,
                                      permutations=cfg.permutations, seed=seed,
                                      empty=cfg.empty, timeout_s=cfg.timeout_s)
            rep.extra.update(alpha=alpha, seed=seed, dataset=cfg.dataset,
                             owner_sizes=setup.owner_sizes)
            if rep.method == "exact" and n > 2:  # how good would sampling have been?
                perms = sample_permutations(n, cfg.permutations, seed)
                est, se = shapley_permutation(rep.values, perms, empty=cfg.empty)
                err = np.abs(est - rep.shapley)
                rep.extra.update(mc_max_error=float(err.max()),
                                 mc_max_z=float(np.max(err / np.maximum(se, 1e-12))),
                                 mc_permutations=cfg.permutations)
            reports.append(rep)
            merits = rep.merits
            single = rep.singleton_accuracy
            for i in range(n):
                rows.append({"dataset": cfg.dataset, "arch": cfg.arch, "protocol": cfg.protocol,
                             "owners": n, "alpha": alpha, "seed": seed, "owner": i,
                             "train_size": setup.owner_sizes[i], "own_accuracy": single[i],
                             "shapley": rep.shapley[i],
                             "shapley_se": math.nan if rep.shapley_se is None else rep.shapley_se[i],
                             "merit_share": merits["shapley"][i],
                             "signed_share": float(rep.shapley[i] / rep.shapley.sum())
                             if rep.shapley.sum() else math.nan,
                             "own_accuracy_share": merits["own_accuracy"][i],
                             **{f"reward_{k}": v[i] for k, v in rep.rewards.items()},
                             "grand_accuracy": rep.grand_accuracy,
                             "empty_value": rep.values.empty_value(cfg.empty),
                             **{f"l1_{m}_{k}": v for m, d in rep.fairness_by_merit.items()
                                for k, v in d.items()},
                             "method": rep.method, "on_shares": rep.secure,
                             "shares_equal_twin": rep.twin_equal,
                             "coalitions": len(rep.values.correct), "queries": len(y),
                             "seconds": rep.seconds})
            bar.step(f"N={n} alpha={alpha:g} seed={seed} ({rep.seconds:.0f}s)")
    return rows, reports


def fairness_summary(reports: Sequence[ContributionReport]) -> list[dict[str, Any]]:
    """Per (N, alpha): intervals over seeds of every L1 distance, how often each reward is the
    closest to each merit, negative Shapley values, and the ensemble's paired gain over the best
    owner."""
    from .common import mean_ci  # noqa: PLC0415

    groups: dict[tuple[int, float], list[ContributionReport]] = {}
    for rep in reports:
        groups.setdefault((rep.num_owners, rep.extra["alpha"]), []).append(rep)
    out = []
    for (n, alpha), reps in sorted(groups.items()):
        row: dict[str, Any] = {"owners": n, "alpha": alpha, "seeds": len(reps)}
        for merit in MERITS:
            for reward in REWARDS:
                row[f"{merit}/{reward}"] = mean_ci(r.fairness_by_merit[merit][reward]
                                                   for r in reps)
            wins = [min(REWARDS, key=lambda k, r=r: r.fairness_by_merit[merit][k]) for r in reps]
            row[f"{merit}/wins"] = {k: wins.count(k) for k in REWARDS}
        row["merits"] = mean_ci(r.fairness_by_merit["shapley"]["own_accuracy"] for r in reps)
        row["negative"] = sum(int((r.shapley < 0).sum()) for r in reps)
        row["owners_total"] = sum(r.num_owners for r in reps)
        row["min_phi"] = min(float(r.shapley.min()) for r in reps)
        row["gain"] = mean_ci(r.grand_accuracy - float(r.singleton_accuracy.max()) for r in reps)
        row["v_all"] = mean_ci(r.grand_accuracy for r in reps)
        out.append(row)
    return out


def markdown_report(reports: Sequence[ContributionReport]) -> str:
    from .common import fmt, markdown_table  # noqa: PLC0415

    if not reports:
        return "(no federations)\n"
    r0 = reports[0]
    where = "on shares (owners + querier + TTP dealer)" if r0.secure else "in plaintext"
    seeds = sorted({r.extra["seed"] for r in reports})
    out = [f"{r0.extra['dataset']}, protocol {r0.extra['protocol']}, coalition values computed "
           f"{where}; v(empty) = {r0.values.empty_value(r0.empty):g} ({r0.empty}); seeds "
           f"{', '.join(map(str, seeds))}. Rewards and merits are splits of one unit; L1 = "
           "distance between a reward split and a merit split (0: identical, 2: disjoint). "
           "Merit `shapley`: Shapley values clipped at 0, normalised (negative values earn "
           "nothing); merit `own acc`: each owner's own validation accuracy, normalised.\n\n"]
    summary = fairness_summary(reports)
    out.append("**Fairness over seeds** (mean [95 % t-interval]; wins: in how many seeds each "
               "reward is the closest to the merit, equal / agreement / entropy).\n\n")
    table = []
    for row in summary:
        for merit, label in (("shapley", "Shapley (clipped)"), ("own_accuracy", "own acc")):
            wins = row[f"{merit}/wins"]
            table.append([row["owners"], f"{row['alpha']:g}", label]
                         + [row[f"{merit}/{k}"].text() for k in REWARDS]
                         + [" / ".join(str(wins[k]) for k in REWARDS)])
    out.append(markdown_table(table, ["N", "alpha", "merit", "L1 equal", "L1 agreement",
                                      "L1 entropy", "wins"], align="lrlrrrr"))
    out.append("\n**Merit measures and the ensemble** (L1 between the two merit splits; "
               "negative Shapley values over all owners of all seeds; the grand coalition's "
               "accuracy and its paired gain over the best owner).\n\n")
    table = [[row["owners"], f"{row['alpha']:g}", row["merits"].text(),
              f"{row['negative']} / {row['owners_total']}", f"{row['min_phi']:.4f}",
              row["v_all"].text(), row["gain"].text()] for row in summary]
    out.append(markdown_table(table, ["N", "alpha", "L1 own acc vs Shapley", "φ < 0",
                                      "min φ", "v(all)", "v(all) − best owner"]))
    with_mc = any("mc_max_error" in rep.extra for rep in reports)
    table = []
    for rep in reports:
        eff = float(rep.shapley.sum())
        target = rep.grand_accuracy - rep.values.empty_value(rep.empty)
        line = [rep.num_owners, f"{rep.extra['alpha']:g}", rep.extra["seed"],
                len(rep.values.correct), fmt(rep.grand_accuracy),
                fmt(float(rep.singleton_accuracy.max())), f"{eff:.4f} / {target:.4f}",
                fmt(rep.fairness["equal"]), fmt(rep.fairness["agreement"]),
                fmt(rep.fairness["entropy"]), fmt(rep.fairness["own_accuracy"]),
                {True: "yes", False: "**no**", None: "–"}[rep.twin_equal], f"{rep.seconds:.0f}"]
        if with_mc:
            line.append("–" if "mc_max_error" not in rep.extra else
                        f"{rep.extra['mc_max_error']:.4f} ({rep.extra['mc_max_z']:.1f})")
        table.append(line)
    header = ["N", "alpha", "seed", "coalitions", "v(all)", "best owner", "Σφ / v(all)−v(∅)",
              "L1 equal", "L1 agreement", "L1 entropy", "L1 own acc", "shares = twin", "s"]
    if with_mc:
        perms = next(r.extra["mc_permutations"] for r in reports if "mc_max_error" in r.extra)
        header.append(f"MC({perms}) vs exact: max err (max err/SE)")
    out.append("\n**Every run** (L1 to the clipped Shapley merit; `s`: seconds of the secure "
               "run, process start included).\n\n")
    out.append(markdown_table(table, header))
    for rep in reports:
        out.append(f"\nN={rep.num_owners}, alpha={rep.extra['alpha']:g}, seed="
                   f"{rep.extra['seed']} ({rep.method}):\n\n")
        se = rep.shapley_se
        merits = rep.merits
        table = [[i, rep.extra["owner_sizes"][i], fmt(rep.singleton_accuracy[i]),
                  fmt(rep.shapley[i], 4) + ("" if se is None else f" ± {se[i]:.4f}"),
                  fmt(merits["shapley"][i]), fmt(merits["own_accuracy"][i]),
                  fmt(rep.rewards["agreement"][i]), fmt(rep.rewards["entropy"][i])]
                 for i in range(rep.num_owners)]
        out.append(markdown_table(table, ["owner", "train size", "own acc", "Shapley φ",
                                          "merit share (clipped)", "own-acc share",
                                          "agreement share", "entropy share"]))
    return "".join(out)
