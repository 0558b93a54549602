"""The owners' defences of the contribution protocol, on shares and in the plaintext twin.

:mod:`studies.valuation_leakage` shows that the coalition counts opened to the querier tell
which classes each owner trained on when the querier picks the validation set. Three defences
the owners enforce inside :func:`studies.contribution._party`, each before the step it guards:

**A minimum size** (``min_validation``, per owner): the number of validation queries scored.

**A jointly sampled validation set.** The querier submits a *pool* of labelled queries; each
owner refuses a pool smaller than its ``min_pool``; the computing parties then draw a
``sample``-element subset uniformly at random with a key none of them chooses alone
(:func:`joint_key`: every party commits to 32 random bytes by their SHA-256, then all reveal; the
key hashes every reveal, so it is uniform as long as one party drew honestly, and a party that
changes its bytes after seeing the others' is caught by its commitment). The subset is
:func:`sample_indices` under that key (AES-CTR stream, :class:`~mpc_fi.csprng.CSPRNG`; never a
``torch.Generator``). What it prevents: choosing the scored queries *example by example* --
the exact differencing of two padded sets (section 3 of docs/STUDY.md), which needs both runs
to score the same padding. What it does **not** prevent: the querier still chooses the pool,
inputs and labels; a pool that is one class plus padding it knows the answers to (padding
labelled with classes no model predicts) gives each owner's accuracy on that class from one
run, up to the sampling error of ``sample`` draws. A querier can also rerun the same pool: each
rerun is a fresh sample (charged to the owners' ledgers when the counts are noisy, see below).
A party can abort after the reveal and so veto a sample; the runs are charged before the key is
drawn, so vetoes cost the querier its budget as any other run.

**Gaussian noise on the coalition counts, with every run charged.** Before the counts are
opened to the querier, every computing party (the ``N`` owners and the querier) adds its own
``N(0, sigma**2 / (N + 1))`` share of noise from its private CSPRNG
(:func:`protocols.secure_ops.joint_gaussian`, the GNMax protocols' joint noise): the total is
``N(0, sigma**2)`` per count and a coalition of parties learns only the parts its members drew.
The counts are integers at CrypTen precision 0; they are lifted to the session's fixed-point
precision (``2**-16``) before the noise is added, so the querier receives real numbers.

*Sensitivity and accounting.* Neighbouring validation sets differ in one query, replaced (or
added, or removed): each coalition's count of correct answers changes by at most 1. A run opens
``K`` counts (``K`` coalitions), each a Gaussian mechanism of sensitivity 1 and std ``sigma``;
:func:`count_cost` prices it as ``K`` such mechanisms (:class:`~mpc_fi.privacy.QueryCost` with
``K`` checks at ``threshold_sigma = sigma``, whose sensitivity
:data:`mpc_fi.privacy.THRESHOLD_SENSITIVITY` is 1), composed by Rényi DP (the ``K`` counts
together: an L2 sensitivity of ``sqrt(K)``, the same curve). Each owner charges its own ledger
(:func:`mpc_fi.budget.authorize_cost`) before the pool is even sent, and every party refuses with
the same :class:`~mpc_fi.errors.BudgetExceededError` when any owner's total would exceed the
budget. The ``(epsilon, delta)`` bound covers what the noisy counts of all charged runs reveal
about any **one validation query** (whether each coalition answers it correctly) at the
querier; it does not cover the owners' training data, a property of a whole model measured on
many queries, or the counts' sampling: amplification by subsampling is not claimed. With noise
on, the label-free rewards (exact aggregates outside this accounting) are neither computed nor
opened.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mpc_fi.csprng import CSPRNG
from mpc_fi.errors import ProtocolError

#: How one query moves a coalition's count of correct answers (replace, add or remove it).
COUNT_SENSITIVITY = 1
#: Purpose string of the stream the validation subset is drawn from.
SAMPLE_PURPOSE = "validation-sample"
_SEED_BYTES = 32
_HEX64 = "[0-9a-f]{64}"


def count_cost(num_coalitions: int, sigma: float) -> Any:
    """The privacy cost of one run: ``num_coalitions`` Gaussian counts of sensitivity 1."""
    from mpc_fi.privacy import QueryCost  # noqa: PLC0415 - dp-accounting only with noise

    return QueryCost(gnmax_sigma=None, threshold_sigma=float(sigma), answered=0,
                     checked=int(num_coalitions))


def epsilon_of_runs(num_coalitions: int, sigma: float, runs: int, *, delta: float) -> float:
    """Epsilon at ``delta`` of ``runs`` noisy runs (0 when none)."""
    from mpc_fi.privacy import epsilon_for  # noqa: PLC0415

    return epsilon_for([count_cost(num_coalitions, sigma)] * runs, delta=delta) if runs else 0.0


# ---------------------------------------------------------------------------------------
# The jointly sampled validation set
# ---------------------------------------------------------------------------------------
def sample_indices(key: bytes, pool: int, size: int) -> np.ndarray:
    """``size`` distinct indices of ``range(pool)``, uniform under ``key``, in increasing order.

    Every party computes the same subset from the same key: the order of ``pool`` uniform 64-bit
    words from the key's stream (ties, of probability below ``pool**2 / 2**64``, broken by
    index).
    """
    if not 1 <= size <= pool:
        raise ProtocolError(f"cannot sample {size} queries from a pool of {pool}")
    words = CSPRNG(key, purpose=SAMPLE_PURPOSE).ring((pool,)).numpy()
    order = np.argsort(words, kind="stable")
    return np.sort(order[:size])


def combine_reveals(reveals: Sequence[bytes]) -> bytes:
    """The sampling key from every party's revealed bytes, in rank order."""
    digest = hashlib.sha256(b"mpc-fi/validation-sample/v1")
    for r in reveals:
        digest.update(len(r).to_bytes(2, "big") + r)
    return digest.digest()


def check_reveals(commits: Sequence[str], reveals: Sequence[str], names: Sequence[str]) -> bytes:
    """The key, once every reveal matches its commitment; a ProtocolError naming who cheated.

    Pure: every party runs it on the same published values and reaches the same outcome.
    """
    bad = [names[r] for r, (c, v) in enumerate(zip(commits, reveals, strict=True))
           if hashlib.sha256(bytes.fromhex(v)).hexdigest() != c]
    if bad:
        raise ProtocolError(f"the validation sample's coin toss failed: {', '.join(bad)} revealed "
                            "bytes that do not match its commitment")
    return combine_reveals([bytes.fromhex(v) for v in reveals])


def joint_key(session: Any) -> bytes:
    """A 256-bit key that no single computing party chooses (commit, then reveal; see the
    module docstring). Collective: every computing party calls it at the same point."""
    from mpc_fi import wire  # noqa: PLC0415

    mine = os.urandom(_SEED_BYTES)
    hexes = wire.Str(64, pattern=_HEX64)
    _, commits = session.agree(lambda: hashlib.sha256(mine).hexdigest(), hexes,
                               "validation sample commitment")
    _, reveals = session.agree(lambda: mine.hex(), hexes, "validation sample reveal")
    return check_reveals(commits, reveals, session.spec.names)


# ---------------------------------------------------------------------------------------
# Noisy counts
# ---------------------------------------------------------------------------------------
def noisy_counts_on_shares(correct: Any, sigma: float, source: Any, precision_bits: int) -> Any:
    """``correct`` (integer counts shared at precision 0) plus joint ``N(0, sigma**2)`` noise,
    shared at ``precision_bits``: the one tensor to open to the querier."""
    from mpc_fi._crypten import load_crypten  # noqa: PLC0415
    from protocols.secure_ops import joint_gaussian  # noqa: PLC0415

    crypten = load_crypten()

    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ProtocolError(f"count noise must be a finite sigma > 0, got {sigma!r}")
    if crypten.cfg.encoder.precision_bits != precision_bits:
        raise ProtocolError("the session's fixed-point precision is "
                            f"{crypten.cfg.encoder.precision_bits} bits, not {precision_bits}")
    lifted = crypten.mpc.MPCTensor.from_shares(correct.share * (1 << precision_bits),
                                               precision=precision_bits)
    return lifted + joint_gaussian(tuple(correct.share.shape), float(sigma), source)


def twin_noise(shape: Sequence[int], sigma: float, rng: np.random.Generator, *, parties: int,
               precision_bits: int = 16) -> np.ndarray:
    """The noise the parties add, in plaintext: ``parties`` draws of ``N(0, sigma**2/parties)``,
    each encoded as CrypTen encodes a float (scaled by ``2**precision_bits`` and truncated to an
    integer), summed and decoded. Reproducible from ``rng`` (experiments only)."""
    scale = float(1 << precision_bits)
    parts = rng.normal(0.0, sigma / math.sqrt(parties), (parties, *shape))
    units = torch.from_numpy(parts * scale).long().sum(0)
    return units.numpy() / scale
