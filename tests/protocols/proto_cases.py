"""Shared inputs and the in-party driver for the protocol tests (no tests in here).

Everything a party needs is derived from a seed that every party knows (the inputs are agreed
across parties, as the harness requires); each owner still shares only its own logits, exactly as
:mod:`mpc_fi.party` does. The driver calls the protocol hooks in the engine's order:
``local_contribution`` (output mode) or ``secure_contribution`` on shared logits (full mode),
``combine``, ``to_reveal``, an opening to the querier only, ``decode``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

PRECISION_BITS = 16
SCALE = 1 << PRECISION_BITS


def make_logits(seed: int, num_owners: int, rows: int, num_classes: int) -> list[torch.Tensor]:
    """Random logits on the fixed-point grid, with deliberately tied rows mixed in.

    * plain rows: Gaussian logits at scales 0.5, 2 and 8 (few and many near-ties);
    * mirrored rows: for two classes ``a < b``, owners come in pairs whose logits are each
      other's with ``a`` and ``b`` swapped (an odd owner out gets ``z_a = z_b``): every symmetric
      aggregate ties exactly between ``a`` and ``b``;
    * identical rows: all owners hold the same logits with a tie at the top.

    Values sit on the 2**-16 grid, so the shares hold exactly what the twins see.
    """
    g = torch.Generator().manual_seed(seed)
    n, c = num_owners, num_classes
    out = torch.randn(n, rows, c, generator=g, dtype=torch.float64)
    scales = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    out *= scales[torch.randint(0, 3, (rows,), generator=g)].view(1, rows, 1)
    kind = torch.randint(0, 5, (rows,), generator=g)  # 0-2 plain, 3 mirrored, 4 identical
    for r in range(rows):
        a, b = sorted(torch.randperm(c, generator=g)[:2].tolist())
        if kind[r] == 3:
            for i in range(0, n - 1, 2):
                out[i + 1, r] = out[i, r]
                out[i + 1, r, [a, b]] = out[i, r, [b, a]]
            if n % 2:
                out[n - 1, r, b] = out[n - 1, r, a]
        elif kind[r] == 4:
            top = out[0, r].max() + 1.0
            out[0, r, a] = out[0, r, b] = top
            out[:, r] = out[0, r]
    out = torch.round(out * SCALE) / SCALE
    return [out[i].clone() for i in range(n)]


def build(name: str, num_classes: int, num_owners: int, kwargs: dict[str, Any]) -> Any:
    from protocols import REGISTRY

    return REGISTRY[name](num_classes=num_classes, num_owners=num_owners,
                          precision_bits=PRECISION_BITS, **kwargs)


def noise_seed(base: int, rank: int) -> int:
    return base * 1000 + rank


def noise_sources(base: int, parties: int) -> list[Any]:
    """The sources every party used in a run with ``noise`` seed ``base`` (test replay)."""
    from protocols.noise import SeededNoise

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [SeededNoise(noise_seed(base, r)) for r in range(parties)]


def contribution_key(proto: Any) -> tuple[str, Any]:
    """Which ``secure_contribution`` implementation (and parameter) ``proto`` really runs."""
    inner = proto
    while hasattr(inner, "inner"):
        inner = inner.inner
    return type(inner).secure_contribution.__qualname__, getattr(inner, "sharpness", None)


def run_hooks(proto: Any, logits: list[torch.Tensor], mode: str, rank: int,
              cache: dict | None = None) -> Any:
    """One batch through the engine's hooks; the querier gets the decoded Prediction.

    ``cache`` reuses full-mode contributions between protocols that run the same
    ``secure_contribution`` (e.g. every soft-voting variant): the costly part on shares is
    computed once per implementation, the protocol-specific combine and release every time.
    """
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    n = len(logits)
    rows = logits[0].shape[0]
    if mode == "output":
        shares = []
        for i, lg in enumerate(logits):
            mine = proto.local_contribution(lg) if rank == i else \
                torch.zeros(rows, proto.contribution_width, dtype=torch.float64)
            shares.append(crypten.cryptensor(mine, src=i))
    else:
        key = contribution_key(proto)
        if cache is None or key not in cache:
            shared = [crypten.cryptensor(lg if rank == i else torch.zeros_like(lg), src=i)
                      for i, lg in enumerate(logits)]
            shares = [proto.secure_contribution(x) for x in shared]
            if cache is not None:
                cache[key] = shares
        shares = cache[key] if cache is not None else shares
    opened = proto.to_reveal(proto.combine(shares)).get_plain_text(dst=n)
    return proto.decode(opened) if rank == n else None


def party_cases(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run every case of ``spec`` in this party; the querier returns labels/scores per case.

    ``spec``: ``num_owners``, ``num_classes``, ``rows``, ``seed`` and ``cases``, a list of
    ``(case_id, protocol, kwargs, mode, noise)``; ``noise`` is None or a seed base for
    :class:`protocols.noise.SeededNoise` (replayed by the test's twin).
    """
    n, c = spec["num_owners"], spec["num_classes"]
    logits = make_logits(spec["seed"], n, spec["rows"], c)

    out: dict[str, Any] = {}
    cache: dict = {}
    for case_id, name, kwargs, mode, noise in spec["cases"]:
        kwargs = dict(kwargs)
        proto = build(name, c, n, kwargs)
        if noise is not None:
            proto.noise_source = noise_sources(noise, n + 1)[rank]
        pred = run_hooks(proto, logits, mode, rank, cache)
        if pred is not None:
            out[case_id] = {"labels": np.asarray(pred.labels),
                            "scores": None if pred.scores is None else np.asarray(pred.scores)}
    return out
