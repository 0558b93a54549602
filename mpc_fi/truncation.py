"""CrypTen's truncation with the party that counts the wraps taking turns.

With more than two computing parties, CrypTen truncates a product (every multiplication of two
fixed-point values) by counting how often the parties' shares wrap around the ring
(``crypten.mpc.primitives.beaver.wraps``): each party masks its share with dealer randomness
``r`` and sends ``z = x + r`` to party 0, which counts the wraps of the ``z`` shares and adds
that public count to its own share. Party 0 therefore receives ``P - 1`` tensors per
truncation while every other party sends one: in the full-mode digits MLP, 322 KB of party 0's
traffic against 108 KB at the others.

This module computes the same function with the gathering party changing from one truncation
to the next: each truncation gathers at the party that has gathered the fewest elements so far
(lowest rank on ties), so every party receives about the same. What is opened is unchanged
(each ``z`` is its sender's share masked by fresh dealer randomness), and so is the result,
exactly. The tally depends on public sizes only and every party runs the same computation (a
rehearsal included: it runs at every party too), so all parties pick the same party.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install", "installed", "uninstall", "wraps", "tally", "set_tally"]

_ORIGINAL: Any = None

#: tensors of at least this many elements are gathered in ``P`` parts, at ``P`` parties
SPLIT_ELEMENTS = 1 << 14
#: elements each party has gathered so far beyond its own part, per world size (the same at
#: every party)
_LOADS: dict[int, list[int]] = {}


def _crypten() -> Any:
    import sys  # noqa: PLC0415

    return sys.modules["crypten"]


def wraps(x: Any) -> Any:
    """CrypTen's ``beaver.wraps`` (shares of the number of wraparounds of ``x``'s shares),
    gathered at the party whose turn it is."""
    crypten = _crypten()
    beaver = crypten.mpc.primitives.beaver
    comm = crypten.communicator.get()
    world = comm.get_world_size()
    loads = _LOADS.setdefault(world, [0] * world)
    provider = crypten.mpc.get_default_provider()
    r, theta_r = provider.wrap_rng(x.size(), device=x.device)
    beta_xr = theta_r.clone()
    beta_xr._tensor = beaver.count_wraps([x._tensor, r._tensor])
    with beaver.IgnoreEncodings([x, r]):
        z = x + r
    theta_x = beta_xr - theta_r
    flat_z, flat_theta = z._tensor.reshape(-1), theta_x._tensor.view(-1)
    n = flat_z.numel()
    # a large tensor is gathered in parts at different parties (one collective per part)
    parts = world if n >= SPLIT_ELEMENTS and world > 2 else 1
    bounds = [n * i // parts for i in range(parts + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        root = min(range(world), key=lambda q: (loads[q], q))
        loads[root] += (hi - lo) * (world - 2)  # what the root counts beyond every party's part
        theta_z = comm.gather(flat_z[lo:hi].contiguous(), root)
        if x.rank == root:
            flat_theta[lo:hi] += beaver.count_wraps(theta_z)
    return theta_x


def tally(world: int) -> list[int]:
    """Elements each party has gathered beyond its own part so far (a copy)."""
    return list(_LOADS.get(world, [0] * world))


def set_tally(world: int, loads: list[int]) -> None:
    """Put the tally back (a rehearsal runs the truncations of a batch without sending them:
    the real batch then makes the same choices, which the rehearsal has measured)."""
    _LOADS[world] = list(loads)


def install(crypten: Any) -> dict[str, Any]:
    """Replace ``beaver.wraps`` in this process (CrypTen's ``truncate`` looks it up per call)."""
    global _ORIGINAL
    beaver = crypten.mpc.primitives.beaver
    saved: dict[str, Any] = {}
    if not installed(crypten):
        saved["beaver.wraps"] = _ORIGINAL = beaver.wraps
        beaver.wraps = wraps
    return saved


def uninstall(crypten: Any) -> None:
    """Give CrypTen its own ``beaver.wraps`` back (a baseline that measures CrypTen itself)."""
    if _ORIGINAL is not None and crypten.mpc.primitives.beaver.wraps is wraps:
        crypten.mpc.primitives.beaver.wraps = _ORIGINAL


def installed(crypten: Any) -> bool:
    """True when CrypTen's truncation counts wraps through :func:`wraps` (an audit may wrap it:
    then the function it wraps)."""
    current = crypten.mpc.primitives.beaver.wraps
    while current is not None and current is not wraps:
        current = getattr(current, "__wrapped__", None)
    return current is wraps
