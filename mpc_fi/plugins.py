"""Explicit registries, found through package metadata.

``mpc_fi`` never imports ``protocols`` or ``launchers``: each package publishes a mapping from
name to class under an entry-point group (``mpc_fi.protocols``, ``mpc_fi.launchers``; see
``setup.cfg``). Third-party packages can add their own mapping the same way.
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from .errors import ConfigError, MpcFiError

PROTOCOLS = "mpc_fi.protocols"
LAUNCHERS = "mpc_fi.launchers"
DEMO = "mpc_fi.demo"


@cache
def registry(group: str) -> dict[str, Any]:
    """Merged name -> class mapping of every entry point in ``group``."""
    merged: dict[str, Any] = {}
    for ep in entry_points(group=group):
        mapping = ep.load()
        if not isinstance(mapping, dict):
            raise MpcFiError(f"entry point {ep.name} in {group} must name a dict, got {type(mapping)}")
        merged.update(mapping)
    if not merged:
        raise MpcFiError(f"no {group} registered: is mpc-fi installed (pip install -e .)?")
    return merged


def lookup(group: str, name: str, *, key: str) -> Any:
    """Class registered as ``name`` in ``group``; a ConfigError naming ``key`` otherwise."""
    table = registry(group)
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {group.split('.')[-1][:-1]} {name!r}{hint} "
                          f"(available: {', '.join(sorted(table))})", key=key)
    return table[name]


def build_protocol(federation: Any, *, num_classes: int) -> Any:
    """Instantiate the federation's protocol with its validated parameters."""
    cls = lookup(PROTOCOLS, federation.protocol.name, key="protocol.name")
    params = dict(federation.protocol.params)
    try:
        return cls(num_classes=num_classes, num_owners=federation.num_owners,
                   reveal=federation.reveal,
                   owner_weights=[o.weight for o in federation.owners],
                   precision_bits=federation.precision_bits, **params)
    except TypeError as exc:
        bad = [k for k in params if f"'{k}'" in str(exc)]
        raise ConfigError(f"{federation.protocol.name} does not take this parameter ({exc})",
                          key=f"protocol.{bad[0]}" if bad else "protocol") from None


def check_protocol_params(federation: Any) -> None:
    """The federation's protocol exists and its parameters are valid (before any party starts).

    Raises :class:`~mpc_fi.errors.ConfigError` for an unknown protocol or parameter name and the
    protocol's :class:`~mpc_fi.errors.ProtocolError` for a missing or out-of-range value, each
    naming its key. Checks that need the class count wait for start-up.
    """
    cls = lookup(PROTOCOLS, federation.protocol.name, key="protocol.name")
    parse = getattr(cls, "parse_params", None)
    if parse is not None:
        parse(dict(federation.protocol.params), num_owners=federation.num_owners)


def demo_module() -> Any:
    """The embedded demo (data, split, training: the ``demos`` package), by its entry point."""
    found = sorted(entry_points(group=DEMO), key=lambda ep: ep.name)
    if not found:
        raise MpcFiError(f"no {DEMO} entry point: is mpc-fi installed (pip install -e .)?")
    return found[0].load()
