"""Batch sizing to memory: split a batch that would not fit, refuse one query that cannot.

A batch's working memory on shares grows linearly with its rows and is dominated by the largest
single step: CrypTen's comparisons (ReLU, max pooling, argmax) hold dozens of int64 temporaries
per element of their input. Measured as the growth of each party's peak RSS per query
(``pytest tests/mpc_fi/test_memory.py -k measured -s`` prints it): full mode, two CNN owners,
299-335 KB against a bound of 516 KB (the largest step, a ReLU over 512 activations, costs up
to ~670 bytes per element; the bound takes 1024); full mode, two ResNet-8 owners (width 4,
3x16x16: a ReLU over 1,024 activations while the residual branch's 1,024 wait), 458-559 KB
against 2,052 KB; output mode, 3 owners and 10 classes, soft
voting 3.0-3.3 KB against 34 KB, top-k ranking 15.6-16.4 KB against 79 KB.

:func:`row_bytes` bounds a query's share of a batch from public facts only (input shape, the
owners' architectures in ``full`` mode, class count, contribution width), so every party
computes the same figure; :func:`plan_rows` turns a party's memory limit into the largest batch
it can run. The engine takes the smallest plan over all parties (``_Party._plan_batches`` in
:mod:`mpc_fi.party`) and answers in batches of that many rows, or refuses with
:class:`~mpc_fi.errors.InputError` on every party when a single query does not fit.
``tests/mpc_fi/test_memory.py`` checks the bound against measured peaks.

Not counted: an owner's own plaintext forward pass in ``output`` mode (any PyTorch model, run
locally on the batch's queries); an owner with a large model should keep ``batch_size`` to what
its model can evaluate at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path


from .errors import InputError
from .layers import LAYERS
from .models import Architecture, input_indices

#: Bytes of peak working memory per element of the largest operation's input. Measured end to
#: end (full mode, CNN owners, ReLU the largest step): up to ~670 per element; 128 int64 here.
BYTES_PER_ELEMENT = 128 * 8
#: Bytes per row that every batch holds whatever the model (the query and its shares, the
#: contributions, Python and gloo buffers).
ROW_OVERHEAD_BYTES = 4096
#: Share of the available memory the local launcher gives away when no limit is set (the rest
#: covers each process's start-up footprint: torch and CrypTen, ~250 MiB per party).
AUTO_FRACTION = 0.5


def layer_elements(arch: Architecture) -> list[int]:
    """Per query, the input elements of each operation of ``arch`` on shares (shapes only).

    Max pooling compares every window element: ``kernel_h * kernel_w`` times its output. In a
    graph, the activations kept for a later reader (a residual branch waiting for its addition,
    the parts of a concatenation) are added to every step they wait across: counted at the
    largest step's rate, which is loose for them but keeps the bound sound.
    """
    layers = arch.layers
    edges = input_indices(layers)
    last_use: dict[int, int] = {}
    for i, ins in enumerate(edges):
        for j in ins:
            last_use[j] = i
    shapes: dict[int, tuple[int, ...]] = {-1: (1, *arch.input_shape)}
    sizes = [math.prod(shapes[-1])]
    for i, (layer, ins) in enumerate(zip(layers, edges)):
        kind = LAYERS[layer.op]
        arg = shapes[ins[0]] if kind.arity == 1 else [shapes[j] for j in ins]
        shapes[i], extra = kind.shape(arg, layer.args, layer.params)
        held = sum(math.prod(shapes[j]) for j in shapes if j != i and last_use.get(j, -2) > i)
        sizes.extend(e + held for e in extra)
        sizes.append(math.prod(shapes[i]) + held)
        for j in [j for j in shapes if last_use.get(j, len(layers)) <= i]:
            del shapes[j]
    return sizes


def row_bytes(*, input_shape: Sequence[int], num_owners: int, protocol_elements: int,
              archs: Sequence[Architecture] = ()) -> int:
    """Upper bound of one query's peak working memory at any party, in bytes.

    ``protocol_elements`` is the protocol's :attr:`~protocols.base.Protocol.row_elements`;
    ``archs`` the owners' architectures in ``full`` mode (every party evaluates every model).
    In ``full`` mode the owners' logits are stacked for one contribution step (``N * C``).
    """
    largest = max(math.prod(input_shape), protocol_elements)
    for arch in archs:
        largest = max(largest, *layer_elements(arch), num_owners * arch.num_classes)
    return BYTES_PER_ELEMENT * largest + ROW_OVERHEAD_BYTES


def available_bytes() -> int | None:
    """Memory this process may still take: ``MemAvailable``, capped by a cgroup v2 limit."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def auto_limit_mb(parties_on_host: int = 1) -> float | None:
    """The default per-party limit: a share of the available memory (None if unknown)."""
    avail = available_bytes()
    if avail is None:
        return None
    return AUTO_FRACTION * avail / max(1, parties_on_host) / 2**20


def plan_rows(batch_size: int, per_row: int, limit_mb: float | None) -> int:
    """Rows per batch under ``limit_mb`` (``batch_size`` if unlimited); 0: one row is too many."""
    if limit_mb is None:
        return batch_size
    return min(batch_size, int(limit_mb * 2**20 // per_row))


def refuse_message(*, party: str, limit_mb: float, per_row: int) -> str:
    return (f"one query needs about {per_row / 2**20:.1f} MiB of working memory on shares but "
            f"party {party} may use {limit_mb:.1f} MiB: give it more memory (or a larger "
            "--memory-limit-mb), or use a smaller model")


def check_limit(limit_mb: float | None) -> float | None:
    if limit_mb is not None and not (isinstance(limit_mb, (int, float)) and limit_mb > 0
                                     and math.isfinite(limit_mb)):
        raise InputError(f"memory limit must be a positive number of MiB, got {limit_mb!r}")
    return None if limit_mb is None else float(limit_mb)
