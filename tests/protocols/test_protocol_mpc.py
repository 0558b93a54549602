"""Every protocol on shares equals its plaintext twin, in both modes, for N in {2, 3, 5}.

One multi-party run per (N, mode) batches every case (48 random rows each by default, 192 with
``-m slow``); each case's protocol hooks run exactly as the engine calls them
(``tests/protocols/proto_cases.py``). Inputs mix plain random logits with deliberately tied rows.

Tolerances (explicit):

* **Exact** (labels and scores equal the twin; scores only up to CrypTen's float32 decoding,
  ``SCORE_ATOL``): sums of encoded contributions, integer weights, comparisons and argmaxes are
  exact on the integer encodings. Covers ``logit_average``, ``weighted_soft_vote``,
  ``weighted_hard_vote``, ``top_k``, ``confident_vote`` and, with every party's noise replayed
  from seeds, ``gnmax`` and ``confident_gnmax``, in output mode; in full mode all of those whose
  per-owner contribution is exact on shares (raw logits, an argmax: logits on the fixed-point grid).
* **Full-mode softmax** (``weighted_soft_vote``, ``top_k``, ``confident_vote`` with
  ``basis: probability``): CrypTen's softmax on shares. Labels must agree wherever the twin's
  deciding margin (top-two gap, every gap among the first k, or the distance of the top
  probability to the threshold) is at least ``FULL_SOFTMAX_TOL``; distributions within it.
* **Entropy weighting**: a reciprocal and truncated products on shares (output mode), plus the
  softmax/log/exp approximations (full mode). Labels agree wherever the twin's top-two margin is
  at least ``ENTROPY_TOL[mode]``; distributions within it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.harness import run_parties
from tests.protocols import proto_cases as pc

SCORE_ATOL = 1e-5
FULL_SOFTMAX_TOL = 1e-2
ENTROPY_TOL = {"output": 1e-3, "full": 2e-2}
#: classes per federation size (many ties with few classes; C=10 with 5 owners)
CLASSES = {2: 4, 3: 5, 5: 10}
SOFT_WEIGHTS = {2: [1, 3], 3: [0.5, 0.25, 1], 5: [0.3, 1.7, 1, 1, 2]}
IRRATIONAL_WEIGHTS = {2: [math.pi, 1.0], 3: [math.pi, 1.0, math.e], 5: [math.pi, 1, math.e, 2, 0.1]}
HARD_WEIGHTS = {2: [1.5, 1.5], 3: [1, 2, 1], 5: [1, 1, 2, 1, 1]}
VOTE_THRESHOLD = {2: 2, 3: 2, 5: 3}


def case_list(n: int) -> list[tuple[str, str, dict, int | None]]:
    """``(case_id, protocol, kwargs, noise seed)`` for a federation of ``n`` owners."""
    return [
        ("logit_average", "logit_average", {}, None),
        ("logit_average-scores", "logit_average", {"reveal": "scores"}, None),
        ("weighted_soft_vote", "weighted_soft_vote", {"owner_weights": SOFT_WEIGHTS[n]}, None),
        ("weighted_soft_vote-quantised-scores", "weighted_soft_vote",
         {"owner_weights": IRRATIONAL_WEIGHTS[n], "reveal": "scores"}, None),
        ("weighted_hard_vote", "weighted_hard_vote", {"owner_weights": HARD_WEIGHTS[n]}, None),
        ("weighted_hard_vote-scores", "weighted_hard_vote",
         {"owner_weights": HARD_WEIGHTS[n], "reveal": "scores"}, None),
        ("entropy_weighted_vote", "entropy_weighted_vote", {}, None),
        ("entropy_weighted_vote-k2-scores", "entropy_weighted_vote",
         {"sharpness": 2, "reveal": "scores"}, None),
        ("top_k-3", "top_k", {"k": 3}, None),
        ("top_k-3-iterative", "top_k", {"k": 3, "method": "iterative"}, None),
        ("top_k-2-scores", "top_k", {"k": 2, "reveal": "scores"}, None),
        ("confident_vote-votes", "confident_vote", {"threshold": VOTE_THRESHOLD[n]}, None),
        ("confident_vote-probability", "confident_vote",
         {"threshold": 0.6, "basis": "probability"}, None),
        ("gnmax", "gnmax", {"sigma": 0.5}, 11),
        ("gnmax-scores", "gnmax", {"sigma": 2.0, "reveal": "scores"}, 12),
        ("confident_gnmax", "confident_gnmax",
         {"threshold": VOTE_THRESHOLD[n] - 0.5, "sigma_threshold": 1.0, "sigma": 0.5}, 13),
    ]


#: cases of the default run for N in {2, 5} (each protocol once, output mode); N = 3 runs every
#: case in output mode and CORE_FULL in full mode. ``-m slow`` adds, per N, a 192-row run of
#: every case in both modes.
CORE = ["logit_average", "weighted_soft_vote", "weighted_hard_vote", "entropy_weighted_vote",
        "top_k-3", "confident_vote-votes", "confident_vote-probability", "gnmax",
        "confident_gnmax"]
#: one case per secure_contribution implementation, plus every release built on them (full-mode
#: contributions are computed once per implementation and reused, see proto_cases.run_hooks)
CORE_FULL = [c for c in CORE] + ["weighted_hard_vote-scores", "top_k-2-scores"]
DEFAULT_ROWS, SLOW_ROWS = 48, 192


def selected(n: int, rows: int) -> list[tuple[str, str]]:
    """``(mode, case_id)`` pairs of the run for (N, rows)."""
    ids = [c[0] for c in case_list(n)]
    if rows == SLOW_ROWS:
        return [(m, cid) for m in ("output", "full") for cid in ids]
    if n == 3:
        return [("output", cid) for cid in ids] + [("full", cid) for cid in CORE_FULL]
    return [("output", cid) for cid in CORE]


_RESULTS: dict[tuple[int, int], object] = {}


def run_results(n: int, rows: int) -> dict:
    """Results of the one multi-party run for (N, rows), made on first use."""
    key = (n, rows)
    if key not in _RESULTS:
        cases = {c[0]: c for c in case_list(n)}
        spec = {"num_owners": n, "num_classes": CLASSES[n], "rows": rows, "seed": 100 + n,
                "cases": [(f"{mode}/{cid}", cases[cid][1], cases[cid][2], mode, cases[cid][3])
                          for mode, cid in selected(n, rows)]}
        try:
            _RESULTS[key] = run_parties(pc.party_cases, n + 1, spec, timeout_s=900)[n]
        except Exception as exc:  # noqa: BLE001 - report once, not once per case
            _RESULTS[key] = exc
    value = _RESULTS[key]
    if isinstance(value, Exception):
        raise value
    return value


def params() -> list:
    out = []
    for n in (2, 3, 5):
        for rows in (DEFAULT_ROWS, SLOW_ROWS):
            marks = (pytest.mark.slow,) if rows == SLOW_ROWS else ()
            for mode, cid in selected(n, rows):
                out.append(pytest.param(n, rows, mode, cid, id=f"{mode}-N{n}-R{rows}-{cid}",
                                        marks=marks))
    return out


def exact(name: str, kwargs: dict, mode: str) -> bool:
    if name == "entropy_weighted_vote":
        return False
    if mode == "output":
        return True
    soft = name in ("weighted_soft_vote", "top_k") or kwargs.get("basis") == "probability"
    return not soft


def margin_of_sorted(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Smallest gap among the first ``k + 1`` sorted entries (what decides a top-k order)."""
    top = torch.sort(dist, dim=-1, descending=True).values[..., :k + 1]
    return (top[..., :-1] - top[..., 1:]).min(dim=-1).values


def stable_positions(dist: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """``(rows, k)``: position r is decided if its value is ``tol`` away from both neighbours."""
    top = torch.sort(dist, dim=-1, descending=True).values[..., :k + 1]
    gaps = top[..., :-1] - top[..., 1:]  # gap r: between positions r and r + 1
    before = torch.cat([torch.full_like(gaps[..., :1], math.inf), gaps[..., :-1]], dim=-1)
    return torch.minimum(before, gaps) >= tol


def average(proto, logits) -> torch.Tensor:
    """The twin's aggregate as the protocol normalises it (a distribution or averages)."""
    units = proto.plaintext_aggregate(logits).to(torch.float64) / pc.SCALE
    if name_of(proto) == "entropy_weighted_vote":
        return units
    inner = getattr(proto, "inner", proto)
    total = sum(getattr(inner, "integer_weights", [1] * proto.num_owners))
    return units / total


def name_of(proto) -> str:
    return type(proto).name


@pytest.mark.parametrize("n, rows, mode, case_id", params())
def test_secure_equals_twin(n, rows, mode, case_id):
    _, name, kwargs, noise = next(c for c in case_list(n) if c[0] == case_id)
    got = run_results(n, rows)[f"{mode}/{case_id}"]
    c = CLASSES[n]
    logits = pc.make_logits(100 + n, n, rows, c)
    proto = pc.build(name, c, n, {k: v for k, v in kwargs.items() if not k.startswith("_")})
    twin = (proto.plaintext(logits, noise_sources=pc.noise_sources(noise, n + 1))
            if noise is not None else proto.plaintext(logits))
    labels, want = got["labels"], twin.labels
    assert labels.shape == want.shape

    if exact(name, kwargs, mode):
        np.testing.assert_array_equal(labels, want)
        if twin.scores is not None:
            np.testing.assert_allclose(got["scores"], twin.scores, rtol=1e-6, atol=SCORE_ATOL)
        check_coverage(proto, name, noise, logits, want)
        return

    tol = ENTROPY_TOL[mode] if name == "entropy_weighted_vote" else FULL_SOFTMAX_TOL
    dist = average(proto, logits)
    if name == "top_k":  # (rows, k): each position on its own
        stable = stable_positions(dist, proto.k, tol)
    else:
        stable = margin_of_sorted(dist, 1) >= tol
        if name == "confident_vote":
            stable &= (dist.max(dim=-1).values - proto.threshold).abs() >= tol
    stable = stable.numpy()
    assert stable.mean() > 0.5, f"only {stable.mean():.0%} rows above the tolerance {tol}"
    np.testing.assert_array_equal(labels[stable], want[stable])
    if twin.scores is not None:
        np.testing.assert_allclose(got["scores"], twin.scores, atol=tol)


def check_coverage(proto, name, noise, logits, labels) -> None:
    """The inputs must exercise ties (and, for gated releases, both answers and abstentions)."""
    if name in ("confident_vote", "confident_gnmax"):
        assert (labels == -1).any() and (labels != -1).any(), "abstain and answer paths both hit"
    if noise is not None:
        return
    units = proto.plaintext_aggregate(logits)
    top2 = torch.topk(units, 2, dim=-1).values
    assert (top2[:, 0] == top2[:, 1]).any(), "no exactly tied row: the tie rule went untested"
