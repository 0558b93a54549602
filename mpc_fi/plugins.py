"""Explicit registries, found through package metadata, resolved lazily.

``mpc_fi`` never imports ``protocols`` or ``launchers``: each package publishes a mapping from
name to class under an entry-point group (``mpc_fi.protocols``, ``mpc_fi.launchers``; see
``setup.cfg``). Third-party packages can add their own mapping the same way.

A mapping's values are classes or ``"module:Class"`` strings. A string is imported only when
its name is looked up (:func:`lookup`): a party that runs soft voting imports only
``protocols.soft_vote``, never the differentially private protocols and their accounting
libraries (dp-accounting, scipy). :func:`registry` resolves every entry (listings, studies).

Two entry points, or a call to :func:`register`, that give one name two different targets are
refused (:class:`~mpc_fi.errors.MpcFiError`) unless ``register(..., force=True)``: a plug-in
never silently replaces a built-in protocol.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from .errors import ConfigError, MpcFiError

PROTOCOLS = "mpc_fi.protocols"
LAUNCHERS = "mpc_fi.launchers"
DEMO = "mpc_fi.demo"

#: Names registered in this process with :func:`register`, by group (over the entry points).
_REGISTERED: dict[str, dict[str, Any]] = {}


def _target_id(target: Any) -> str:
    """What a registry value designates, comparable between a class and its string."""
    if isinstance(target, str):
        return target
    return f"{target.__module__}:{target.__qualname__}"


def resolve(target: Any) -> Any:
    """The class a registry value designates (imports its module for a ``"module:Class"``)."""
    if not isinstance(target, str):
        return target
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise MpcFiError(f"registry entry {target!r} must be 'package.module:Class'")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class LazyRegistry(Mapping[str, Any]):
    """One package's name -> class mapping whose classes are imported on first access.

    Built from ``{name: "module:Class"}`` (classes are accepted too); ``registry[name]`` imports
    that one module. :meth:`register` adds a name and refuses to replace a different one unless
    ``force`` (Opacus' accountant registry does the same).
    """

    def __init__(self, targets: Mapping[str, Any]) -> None:
        self._targets: dict[str, Any] = {}
        for name, target in targets.items():
            self.register(name, target)

    def register(self, name: str, target: Any, *, force: bool = False) -> None:
        if not force and name in self._targets \
                and _target_id(self._targets[name]) != _target_id(target):
            raise MpcFiError(f"{name!r} is already registered as "
                             f"{_target_id(self._targets[name])}; pass force=True to replace it")
        self._targets[name] = target

    def targets(self) -> dict[str, Any]:
        """The unresolved mapping (nothing imported)."""
        return dict(self._targets)

    def __getitem__(self, name: str) -> Any:
        return resolve(self._targets[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"LazyRegistry({self._targets!r})"


def _merge(merged: dict[str, Any], name: str, target: Any, source: str) -> None:
    if name in merged and _target_id(merged[name]) != _target_id(target):
        raise MpcFiError(f"{source} registers {name!r} as {_target_id(target)}, but it is "
                         f"already {_target_id(merged[name])}: rename one of them")
    merged.setdefault(name, target)


@cache
def _entry_table(group: str) -> dict[str, Any]:
    """Merged name -> target mapping of every entry point in ``group`` (nothing imported
    beyond the packages that publish the mappings)."""
    merged: dict[str, Any] = {}
    for ep in entry_points(group=group):
        mapping = ep.load()
        if not hasattr(mapping, "items"):
            raise MpcFiError(f"entry point {ep.name} in {group} must name a mapping, "
                             f"got {type(mapping)}")
        items = mapping.targets() if isinstance(mapping, LazyRegistry) else mapping
        for name, target in items.items():
            _merge(merged, name, target, f"entry point {ep.name} in {group}")
    return merged


def _table(group: str) -> dict[str, Any]:
    table = dict(_entry_table(group))
    table.update(_REGISTERED.get(group, {}))
    if not table:
        raise MpcFiError(f"no {group} registered: is mpc-fi installed (pip install -e .)?")
    return table


def register(group: str, name: str, target: Any, *, force: bool = False) -> None:
    """Register ``target`` (a class or ``"module:Class"``) as ``name`` in ``group``, in this
    process only (parties started by a launcher see entry points, not this call).

    Raises :class:`~mpc_fi.errors.MpcFiError` if ``name`` is already registered to something
    else, unless ``force``.
    """
    if not force and name in (table := {**_entry_table(group), **_REGISTERED.get(group, {})}) \
            and _target_id(table[name]) != _target_id(target):
        raise MpcFiError(f"{name!r} is already registered in {group} as "
                         f"{_target_id(table[name])}; pass force=True to replace it")
    _REGISTERED.setdefault(group, {})[name] = target


def names(group: str) -> list[str]:
    """The registered names of ``group``, sorted, without importing any of them."""
    return sorted(_table(group))


def registry(group: str) -> dict[str, Any]:
    """Every name -> class of ``group``, resolved (imports every registered module)."""
    return {name: resolve(target) for name, target in _table(group).items()}


def lookup(group: str, name: str, *, key: str) -> Any:
    """Class registered as ``name`` in ``group`` (only its module is imported); a ConfigError
    naming ``key`` otherwise."""
    table = _table(group)
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {group.split('.')[-1][:-1]} {name!r}{hint} "
                          f"(available: {', '.join(sorted(table))})", key=key)
    return resolve(table[name])


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
