"""Typed, validated description of a federation.

A federation is described once: as a :class:`FederationConfig` object, or as a YAML/TOML file
with the same keys (see the README's federation file). Every validation error names the exact
key at fault (``owners[1].model.weights``) and, for a misspelt key, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MODES = ("output", "full")
#: Largest |value| a query or a model output may hold before it is shared (fixed-point range).
MAX_QUERY_VALUE = 2.0 ** 15
DEALERS = ("ttp", "insecure-party-dealer")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", key=where or None)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(f"unknown key{hint}", key=f"{where}.{key}" if where else str(key))


def _check_name(name: Any, key: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            "a party name must start with a letter and use only letters, digits, '_', '.', '-' "
            f"(at most 64 characters), got {name!r}", key=key)
    return name


@dataclass(frozen=True)
class ModelSource:
    """Where an owner's model comes from; only that owner's process ever reads it.

    Either ``factory`` (``package.module:function`` building a ``torch.nn.Module``, with
    ``kwargs``) plus ``weights`` (a ``state_dict`` file, loaded with ``weights_only=True``),
    or ``onnx`` (an ONNX file). ``factory_dir``: the folder the factory module is imported from
    first (before ``sys.path``); a federation file sets it to its own folder by default.
    """

    factory: str | None = None
    weights: str | None = None
    onnx: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    factory_dir: str | None = None

    def __post_init__(self) -> None:
        self.validate("model")

    def validate(self, key: str) -> None:
        if self.onnx is not None:
            if self.factory is not None or self.weights is not None or self.factory_dir is not None:
                raise ConfigError("give either 'onnx' or 'factory' + 'weights', not both", key=key)
            if not isinstance(self.onnx, str) or not self.onnx:
                raise ConfigError("must be a path to an ONNX file", key=f"{key}.onnx")
            return
        if self.factory is None:
            raise ConfigError("missing: give 'factory' (package.module:function) and 'weights', "
                              "or 'onnx'", key=f"{key}.factory")
        if not isinstance(self.factory, str) or not _FACTORY_RE.match(self.factory):
            raise ConfigError(f"must look like 'package.module:function', got {self.factory!r}",
                              key=f"{key}.factory")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ConfigError("must be a path to a state_dict file", key=f"{key}.weights")
        if self.factory_dir is not None and (not isinstance(self.factory_dir, str)
                                             or not self.factory_dir):
            raise ConfigError("must be the folder of the factory module", key=f"{key}.factory_dir")
        if not isinstance(self.kwargs, Mapping):
            raise ConfigError("must be a mapping of keyword arguments for the factory",
                              key=f"{key}.kwargs")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str) -> "ModelSource":
        _check_keys(data, ("factory", "weights", "onnx", "kwargs", "factory_dir"), key)
        try:
            return cls(factory=data.get("factory"), weights=data.get("weights"),
                       onnx=data.get("onnx"), kwargs=dict(data.get("kwargs") or {}),
                       factory_dir=data.get("factory_dir"))
        except ConfigError as exc:  # name the key as the file has it
            raise ConfigError(exc.bare, key=key + (exc.key or "model")[len("model"):]) from None

    def resolved(self, base: Path) -> "ModelSource":
        """Paths relative to the federation file's folder; a factory module is looked up there."""
        def fix(p: str | None) -> str | None:
            return None if p is None else str((base / os.path.expanduser(p)).resolve())
        factory_dir = self.factory_dir if self.factory_dir is not None else (
            "." if self.factory is not None else None)
        return dataclasses.replace(self, weights=fix(self.weights), onnx=fix(self.onnx),
                                   factory_dir=fix(factory_dir))


def default_ledger_dir() -> Path:
    """Where an owner keeps its privacy ledgers when the federation names none:
    ``$XDG_STATE_HOME/mpc-fi/ledgers`` (``~/.local/state/mpc-fi/ledgers`` when unset or not
    absolute, as the XDG base directory specification says). Read in the owner's own process."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "mpc-fi" / "ledgers"


@dataclass(frozen=True)
class OwnerConfig:
    """A model owner: one CrypTen party that holds one private model.

    ``ledger``: the file where this owner keeps its differential-privacy ledger, one entry per
    authenticated querier (:mod:`mpc_fi.budget`; used only with a ``privacy`` section). A
    federation file gives it relative to its own folder; None: ``<name>.json`` under
    :func:`default_ledger_dir` on the owner's host. Only that owner's process reads or writes it.
    """

    name: str
    model: ModelSource
    host: str | None = None
    weight: float = 1.0  # public voting weight (used by weighted protocols)
    ledger: str | None = None

    def __post_init__(self) -> None:
        self.validate("owner")

    def validate(self, key: str) -> None:
        _check_name(self.name, f"{key}.name")
        if not isinstance(self.model, ModelSource):
            raise ConfigError("must be a ModelSource", key=f"{key}.model")
        self.model.validate(f"{key}.model")
        if self.host is not None and (not isinstance(self.host, str) or not self.host):
            raise ConfigError(f"must be a host name or address, got {self.host!r}",
                              key=f"{key}.host")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or not weight > 0:
            raise ConfigError(f"must be a positive number, got {weight!r}", key=f"{key}.weight")
        object.__setattr__(self, "weight", float(weight))
        if self.ledger is not None and (not isinstance(self.ledger, (str, os.PathLike))
                                        or not os.fspath(self.ledger)):
            raise ConfigError(f"must be the path of this owner's privacy ledger (a JSON file), "
                              f"got {self.ledger!r}", key=f"{key}.ledger")
        if self.ledger is not None:
            object.__setattr__(self, "ledger", os.fspath(self.ledger))

    def ledger_path(self) -> Path:
        """This owner's ledger file: ``ledger`` when set, else ``<name>.json`` under
        :func:`default_ledger_dir` (read from this process's environment now)."""
        if self.ledger is not None:
            return Path(os.path.expanduser(self.ledger)).absolute()
        return default_ledger_dir() / f"{self.name}.json"

    def resolved(self, base: Path) -> "OwnerConfig":
        """Model and ledger paths relative to the federation file's folder."""
        ledger = None if self.ledger is None else str(
            (base / os.path.expanduser(self.ledger)).resolve())
        return dataclasses.replace(self, model=self.model.resolved(base), ledger=ledger)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str) -> "OwnerConfig":
        _check_keys(data, ("name", "model", "host", "weight", "ledger"), key)
        if "name" not in data:
            raise ConfigError("missing", key=f"{key}.name")
        if "model" not in data:
            raise ConfigError("missing", key=f"{key}.model")
        model = ModelSource.from_dict(data["model"], f"{key}.model")
        try:
            return cls(name=data["name"], model=model, host=data.get("host"),
                       weight=data.get("weight", 1.0), ledger=data.get("ledger"))
        except ConfigError as exc:
            raise ConfigError(exc.bare, key=key + (exc.key or "owner")[len("owner"):]) from None


def _value_range(value: Any, key: str) -> tuple[float, float]:
    """``[low, high]`` of public values that are secret-shared: finite, ordered, within the
    fixed-point range of a query."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ConfigError(f"must be [low, high], got {value!r}", key=key)
    low = _number(value[0], f"{key}[0]", what="a number")
    high = _number(value[1], f"{key}[1]", what="a number")
    if not low < high:
        raise ConfigError(f"low must be below high, got [{low:g}, {high:g}]", key=key)
    if max(abs(low), abs(high)) > MAX_QUERY_VALUE:
        raise ConfigError(f"must lie within +-{MAX_QUERY_VALUE:g} (the fixed-point range of a "
                          f"query), got [{low:g}, {high:g}]", key=key)
    return low, high


@dataclass(frozen=True)
class BackboneConfig:
    """A public feature extractor (the foundation-model setting, ``full`` mode only).

    The querier runs ``model`` on its queries in plaintext, on its own host; the features are
    what it secret-shares, and the owners' models are heads that take those features. Owners
    never see the query or its features. ``output_range``: public bounds of every feature (the
    querier refuses a query whose features leave it; owners check their heads' fixed-point
    range for inputs inside it).
    """

    model: ModelSource
    output_range: tuple[float, float]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "public_backbone") -> None:
        if not isinstance(self.model, ModelSource):
            raise ConfigError("must be a ModelSource", key=f"{key}.model")
        self.model.validate(f"{key}.model")
        object.__setattr__(self, "output_range", _value_range(self.output_range,
                                                              f"{key}.output_range"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str, base: Path | None = None
                  ) -> "BackboneConfig":
        if not isinstance(data, Mapping):
            raise ConfigError("must be a mapping with model and output_range", key=key)
        _check_keys(data, ("model", "output_range"), key)
        for name in ("model", "output_range"):
            if name not in data:
                raise ConfigError("missing", key=f"{key}.{name}")
        model = ModelSource.from_dict(data["model"], f"{key}.model")
        if base is not None:
            model = model.resolved(base)
        return cls(model=model, output_range=data["output_range"])


@dataclass(frozen=True)
class QuerierConfig:
    """The querier: holds the queries, receives the aggregate and nothing else."""

    name: str = "querier"
    data: str | None = None  # .npy / .pt / .csv file of queries (optional for the Python API)
    host: str | None = None
    #: Public bounds ``[low, high]`` of every query value. The querier refuses queries outside
    #: it; in ``full`` mode owners check that their models stay in the fixed-point range for
    #: any input inside it (:mod:`mpc_fi.ranges`). None: ``+-MAX_QUERY_VALUE``.
    input_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "querier") -> None:
        _check_name(self.name, f"{key}.name")
        if self.data is not None and (not isinstance(self.data, (str, os.PathLike))
                                      or not str(self.data)):
            raise ConfigError(f"must be the path of a .npy, .pt or .csv file, got {self.data!r}",
                              key=f"{key}.data")
        if self.host is not None and (not isinstance(self.host, str) or not self.host):
            raise ConfigError(f"must be a host name or address, got {self.host!r}",
                              key=f"{key}.host")
        if self.input_range is None:
            return
        object.__setattr__(self, "input_range", _value_range(self.input_range,
                                                             f"{key}.input_range"))

    @property
    def value_range(self) -> tuple[float, float]:
        """The declared input range, or the widest one a query may have."""
        return self.input_range or (-MAX_QUERY_VALUE, MAX_QUERY_VALUE)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str) -> "QuerierConfig":
        _check_keys(data, ("name", "data", "host", "input_range"), key)
        return cls(name=data.get("name", "querier"), data=data.get("data"),
                   host=data.get("host"), input_range=data.get("input_range"))


@dataclass(frozen=True)
class ProtocolConfig:
    """Which aggregation protocol runs on the shares, and its parameters."""

    name: str = "soft_vote"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"must be a protocol name, got {self.name!r}", key="protocol.name")
        if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
            raise ConfigError("parameters must be a mapping from names to values",
                              key="protocol")

    @classmethod
    def from_value(cls, value: Any, key: str) -> "ProtocolConfig":
        if isinstance(value, str):
            return cls(name=value)
        if not isinstance(value, Mapping):
            raise ConfigError("must be a protocol name or a mapping with 'name'", key=key)
        params = {k: v for k, v in value.items() if k != "name"}
        if "name" not in value:
            raise ConfigError("missing", key=f"{key}.name")
        return cls(name=str(value["name"]), params=params)


TRANSPORTS = ("auto", "curve", "zmq", "gloo")
#: what ``transport: auto`` means on loopback (or an acknowledged network) without identities
PLAINTEXT_DEFAULT = "zmq"


@dataclass(frozen=True)
class Identity:
    """A party's public key (Z85 text) and the file it was read from, if any (the local
    launcher finds ``NAME.key_secret`` beside ``NAME.key``)."""

    public_key: str
    file: str | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """How the parties meet and talk.

    ``address``/``port``: the rendezvous (a store on the host of rank 0) where the parties find
    each other. ``transport`` (see :mod:`mpc_fi.channel`): ``curve`` (ZeroMQ with CurveZMQ:
    every party proves its key, every message is encrypted and authenticated; the default
    whenever the federation names ``identities``), ``zmq`` (the same channels without keys or
    encryption; the default on loopback without identities), ``gloo`` (torch's own plaintext
    backend), or ``auto`` for those defaults. A plaintext transport on a non-loopback address
    needs ``acknowledge_plaintext_network: true``.

    ``prefetch`` (with the TTP dealer, :mod:`mpc_fi.prefetch`): party 0 receives a batch's
    dealer material in one answer instead of a round trip per request. A served session's
    dealer prepares the next call's material between calls (the parties hold up to 512 MiB of it);
    a one-shot run rehearses each batch shape locally (no message) to learn what to ask for.
    ``false``: every request goes to the dealer as the computation reaches it.
    """

    address: str = "127.0.0.1"
    port: int | None = None  # None: the local launcher picks a free port per run
    acknowledge_plaintext_network: bool = False
    timeout_s: float = 120.0  # bound on start-up rendezvous and on any single wait
    transport: str = "auto"
    prefetch: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "network") -> None:
        if not isinstance(self.address, str) or not self.address:
            raise ConfigError(f"must be a host name or address, got {self.address!r}",
                              key=f"{key}.address")
        port = self.port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 1 <= port <= 65535):
            raise ConfigError(f"must be an integer in 1..65535, got {port!r}", key=f"{key}.port")
        if not isinstance(self.acknowledge_plaintext_network, bool):
            raise ConfigError("must be true or false", key=f"{key}.acknowledge_plaintext_network")
        if not isinstance(self.prefetch, bool):
            raise ConfigError("must be true or false", key=f"{key}.prefetch")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(f"must be a positive number of seconds, got {timeout!r}",
                              key=f"{key}.timeout_s")
        object.__setattr__(self, "timeout_s", float(timeout))
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}",
                              key=f"{key}.transport")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str) -> "NetworkConfig":
        _check_keys(data, ("address", "port", "acknowledge_plaintext_network", "timeout_s",
                           "transport", "prefetch"), key)
        address = data.get("address", "127.0.0.1")
        return cls(address=address if not isinstance(address, (int, float)) else str(address),
                   port=data.get("port"),
                   acknowledge_plaintext_network=data.get("acknowledge_plaintext_network", False),
                   timeout_s=data.get("timeout_s", 120.0),
                   transport=data.get("transport", "auto"),
                   prefetch=data.get("prefetch", True))

    def is_loopback(self) -> bool:
        if self.address == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.address).is_loopback
        except ValueError:
            return False


def _number(value: Any, key: str, *, what: str) -> float:
    """A finite real number from a config value; the message says how to fix a quoted one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            hint = (" (it was read as text: YAML 1.1 reads 1e-5 as a string; write 1.0e-5)"
                    if "e" in value.lower() else " (it was read as text; remove the quotes)")
        raise ConfigError(f"must be {what}, got {value!r}{hint}", key=key)
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"must be {what}, got {value!r}", key=key)
    return value


@dataclass(frozen=True)
class PrivacyConfig:
    """The querier's differential-privacy budget: ``(epsilon, delta)`` in total over every run.

    **Every owner enforces it** in its own ledger (``owners[i].ledger``; :mod:`mpc_fi.budget`):
    before it contributes to a differentially private release it checks and charges the worst
    case, and the release runs only if every owner agrees. ``epsilon`` and ``delta`` are part of
    the federation's fingerprint, so every party holds the same budget.

    ``budget_file`` (optional) is the querier's own ledger, a convenience of
    :class:`~mpc_fi.Federation` only: it refuses a run before any party starts and records the
    actual cost (answered queries) where the querier can read it. The querier can delete it;
    the owners' ledgers are what binds. Relative paths are from the federation file's folder.
    """

    epsilon: float
    delta: float
    budget_file: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "privacy") -> None:
        if self.budget_file is not None and (not isinstance(self.budget_file, str)
                                             or not self.budget_file):
            raise ConfigError(f"must be the path of the querier's own ledger (a JSON file), or "
                              f"left out; got {self.budget_file!r}", key=f"{key}.budget_file")
        epsilon = _number(self.epsilon, f"{key}.epsilon", what="a number > 0")
        if epsilon <= 0:
            raise ConfigError(f"must be a number > 0, got {self.epsilon!r}", key=f"{key}.epsilon")
        delta = _number(self.delta, f"{key}.delta", what="a number in (0, 1)")
        if not 0 < delta < 1:
            raise ConfigError(f"must be a number in (0, 1), typically below 1/(training examples), "
                              f"got {self.delta!r}", key=f"{key}.delta")
        object.__setattr__(self, "epsilon", epsilon)
        object.__setattr__(self, "delta", delta)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str) -> "PrivacyConfig":
        _check_keys(data, ("budget_file", "epsilon", "delta"), key)
        for name in ("epsilon", "delta"):
            if name not in data:
                raise ConfigError("missing", key=f"{key}.{name}")
        return cls(budget_file=data.get("budget_file"), epsilon=data["epsilon"],
                   delta=data["delta"])

    def resolved(self, base: Path) -> "PrivacyConfig":
        """The querier's ledger path relative to the federation file's folder."""
        if self.budget_file is None:
            return self
        return dataclasses.replace(
            self, budget_file=str((base / os.path.expanduser(self.budget_file)).resolve()))


@dataclass(frozen=True)
class FederationConfig:
    """A whole federation: owners, querier, dealer, mode, protocol and release policy.

    ``reveal`` says what reaches the querier: ``"label"`` (default) or ``"scores"`` (the
    protocol's aggregate: averaged distribution, vote counts, ...), where the protocol allows it.
    """

    owners: tuple[OwnerConfig, ...]
    querier: QuerierConfig = field(default_factory=QuerierConfig)
    mode: str = "output"
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    reveal: str = "label"
    dealer: str = "ttp"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    #: queries per secure batch; None (default): as few batches as the parties' memory allows
    batch_size: int | None = None
    precision_bits: int = 16
    privacy: PrivacyConfig | None = None  # the querier's DP budget, kept by every owner
    #: each party's public key (``mpc-fi keygen``), by party name, the dealer included
    identities: Mapping[str, Identity] = field(default_factory=dict)
    #: a public feature extractor the querier runs before sharing (full mode only)
    public_backbone: BackboneConfig | None = None
    #: full mode: a public bound on every activation of every owner's model (each owner checks
    #: its own against it before sharing), so comparisons on shares carry fewer bits
    activation_bound: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        if not isinstance(self.owners, tuple):
            object.__setattr__(self, "owners", tuple(self.owners))
        if len(self.owners) < 2:
            raise ConfigError(f"a federation needs at least two owners, got {len(self.owners)} "
                              "(with one owner, its prediction is the aggregate)", key="owners")
        for i, owner in enumerate(self.owners):
            if not isinstance(owner, OwnerConfig):
                raise ConfigError("must be an OwnerConfig", key=f"owners[{i}]")
            owner.validate(f"owners[{i}]")
        if not isinstance(self.querier, QuerierConfig):
            raise ConfigError("must be a QuerierConfig", key="querier")
        self.querier.validate("querier")
        names = [o.name for o in self.owners] + [self.querier.name]
        seen: set[str] = set()
        for i, name in enumerate(names):
            key = f"owners[{i}].name" if i < len(self.owners) else "querier.name"
            if name in seen:
                raise ConfigError(f"duplicate party name {name!r}: every party needs its own name",
                                  key=key)
            seen.add(name)
        if self.mode not in MODES:
            raise ConfigError(f"must be one of {', '.join(MODES)}, got {self.mode!r}", key="mode")
        if self.dealer not in DEALERS:
            raise ConfigError(f"must be one of {', '.join(DEALERS)}, got {self.dealer!r}",
                              key="dealer")
        if self.reveal not in ("label", "scores"):
            raise ConfigError(f"must be 'label' or 'scores', got {self.reveal!r}", key="reveal")
        if self.batch_size is not None and (
                isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                or not 1 <= self.batch_size <= 65536):
            raise ConfigError("must be an integer in 1..65536, or left out to answer in as few "
                              f"batches as memory allows; got {self.batch_size!r}",
                              key="batch_size")
        if isinstance(self.precision_bits, bool) or not isinstance(self.precision_bits, int) \
                or not 8 <= self.precision_bits <= 16:
            raise ConfigError("must be an integer in 8..16 (CrypTen is wrong above 16 fractional "
                              f"bits), got {self.precision_bits!r}", key="precision_bits")
        if self.privacy is not None:
            if not isinstance(self.privacy, PrivacyConfig):
                raise ConfigError("must be a PrivacyConfig (epsilon, delta, budget_file)",
                                  key="privacy")
            self.privacy.validate("privacy")
        if not isinstance(self.protocol, ProtocolConfig):
            raise ConfigError("must be a ProtocolConfig", key="protocol")
        if not isinstance(self.network, NetworkConfig):
            raise ConfigError("must be a NetworkConfig", key="network")
        self.network.validate("network")
        # The protocol's own parameters, before any party starts (mpc_fi.plugins finds the
        # class through its registry; mpc_fi never imports the protocols package itself).
        from .plugins import check_protocol_params  # noqa: PLC0415 - plugins imports config

        check_protocol_params(self)
        self._validate_identities()
        self.transport()  # the transport these settings resolve to, or a ConfigError
        if self.activation_bound is not None:
            bound = self.activation_bound
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) \
                    or not math.isfinite(bound) or not 0 < bound <= 2.0 ** 40:
                raise ConfigError("must be a number in (0, 2**40]: the largest magnitude any "
                                  "activation of any owner's model may reach, or left out for "
                                  f"full-width comparisons; got {bound!r}", key="activation_bound")
            if self.mode != "full":
                raise ConfigError("only full mode compares activations on shares (in output "
                                  "mode each owner runs its model itself)", key="activation_bound")
        if self.public_backbone is not None:
            if not isinstance(self.public_backbone, BackboneConfig):
                raise ConfigError("must be a BackboneConfig (model, output_range)",
                                  key="public_backbone")
            self.public_backbone.validate()
            if self.mode != "full":
                raise ConfigError("a public backbone needs mode: full (in output mode the owners "
                                  "see the query anyway and run their whole models on it)",
                                  key="public_backbone")

    def _validate_identities(self) -> None:
        if not isinstance(self.identities, Mapping):
            raise ConfigError("must map each party's name to its public key", key="identities")
        if not self.identities:
            return
        names = self.party_names
        for name in self.identities:
            if name not in names:
                raise ConfigError(f"{name!r} is not a party of this federation (parties: "
                                  f"{', '.join(names)})", key=f"identities.{name}")
        missing = [n for n in names if n not in self.identities]
        if missing:
            raise ConfigError(f"no public key for {', '.join(missing)}: every party, the dealer "
                              "included, needs one (mpc-fi keygen NAME)", key="identities")
        seen: dict[str, str] = {}
        for name in names:
            ident = self.identities[name]
            if not isinstance(ident, Identity):
                raise ConfigError("must be an Identity", key=f"identities.{name}")
            if ident.public_key in seen:
                raise ConfigError(f"{name} and {seen[ident.public_key]} have the same public key: "
                                  "every party needs its own key pair", key=f"identities.{name}")
            seen[ident.public_key] = name

    def transport(self) -> str:
        """The transport these settings resolve to: ``curve``, ``zmq`` or ``gloo``.

        Raises :class:`ConfigError` for a combination that would be insecure without saying so
        (plaintext between hosts without the acknowledgement) or cannot work (identities with a
        transport that does not prove them).
        """
        net = self.network
        plaintext_ok = net.is_loopback() or net.acknowledge_plaintext_network
        wanted = net.transport
        if self.identities:
            if wanted in ("zmq", "gloo"):
                raise ConfigError(f"transport {wanted} does not prove the identities the "
                                  "federation names: use transport curve (or auto), or remove "
                                  "identities", key="network.transport")
            return "curve"
        if wanted == "auto":
            if not plaintext_ok:
                raise ConfigError(
                    f"address {net.address} is not loopback: name every party's public key "
                    "under identities (mpc-fi keygen NAME; the parties then authenticate each "
                    "other and encrypt every message), or, on a network protected otherwise "
                    "(WireGuard, see docs/multihost.md), set "
                    "network.acknowledge_plaintext_network: true", key="network.address")
            return PLAINTEXT_DEFAULT
        if wanted == "curve":
            if not net.is_loopback():
                raise ConfigError("transport curve between hosts needs identities: every "
                                  "party's public key (mpc-fi keygen NAME)", key="identities")
            return "curve"  # loopback: the local launcher makes one-run keys
        if not plaintext_ok:
            raise ConfigError(
                f"address {net.address} is not loopback and transport {wanted} is plaintext: "
                "use identities (transport curve), or set "
                "network.acknowledge_plaintext_network: true on a protected network",
                key="network.transport")
        return wanted

    # -- derived facts ------------------------------------------------------------------
    @property
    def shared_input_key(self) -> str:
        """Where :attr:`shared_input_range` is declared (for error messages)."""
        return "public_backbone.output_range" if self.public_backbone is not None \
            else "querier.input_range"

    @property
    def shared_input_range(self) -> tuple[float, float]:
        """Public bounds of what the querier secret-shares in full mode: its queries, or the
        public backbone's features."""
        if self.public_backbone is not None:
            return self.public_backbone.output_range
        return self.querier.value_range

    @property
    def num_owners(self) -> int:
        return len(self.owners)

    @property
    def party_names(self) -> tuple[str, ...]:
        """Names by rank: owners 0..N-1, querier N, dealer N+1 (when there is one)."""
        names = tuple(o.name for o in self.owners) + (self.querier.name,)
        return names + (("dealer",) if self.dealer == "ttp" else ())

    @property
    def querier_rank(self) -> int:
        return len(self.owners)

    @property
    def compute_world_size(self) -> int:
        """Parties that hold shares (owners and querier); a TTP dealer comes on top."""
        return len(self.owners) + 1

    def rank_of(self, name: str) -> int:
        try:
            return self.party_names.index(name)
        except ValueError:
            raise ConfigError(f"no party named {name!r}; parties: {', '.join(self.party_names)}",
                              key="party") from None

    def role_of(self, rank: int) -> str:
        if rank < len(self.owners):
            return "owner"
        return "querier" if rank == len(self.owners) else "dealer"

    def to_dict(self) -> dict[str, Any]:
        def plain(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            if isinstance(obj, Mapping):
                return {str(k): plain(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [plain(v) for v in obj]
            return obj
        out = plain(self)
        # the file form of identities: each party's public key, as text
        out["identities"] = {name: ident.public_key for name, ident in self.identities.items()}
        # the file form of a protocol: its name beside its parameters
        out["protocol"] = {"name": self.protocol.name, **plain(self.protocol.params)}
        return out

    def fingerprint(self) -> str:
        """Hash of everything the parties must agree on (not of any secret: paths are local)."""
        public = self.to_dict()
        for owner in public["owners"]:
            owner["model"] = {"kind": "onnx" if owner["model"]["onnx"] else "torch"}
            owner.pop("host", None)
            owner.pop("ledger", None)  # local to that owner's host
        public["querier"].pop("data", None)
        public["querier"].pop("host", None)
        if public.get("public_backbone"):
            model = public["public_backbone"]["model"]
            public["public_backbone"]["model"] = {"kind": "onnx" if model["onnx"] else "torch"}
        if public.get("privacy"):
            public["privacy"].pop("budget_file", None)  # local to the querier
        if public.get("activation_bound") is None:
            public.pop("activation_bound", None)  # unchanged fingerprints without one
        text = json.dumps(public, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Path | None = None) -> "FederationConfig":
        _check_keys(data, ("owners", "querier", "mode", "protocol", "reveal", "dealer", "network",
                           "batch_size", "precision_bits", "privacy", "identities",
                           "public_backbone", "activation_bound"), "")
        if "owners" not in data:
            raise ConfigError("missing: list the model owners", key="owners")
        if not isinstance(data["owners"], list):
            raise ConfigError("must be a list of owners", key="owners")
        owners = tuple(OwnerConfig.from_dict(o, f"owners[{i}]") for i, o in enumerate(data["owners"]))
        querier = QuerierConfig.from_dict(data.get("querier") or {}, "querier")
        privacy = None
        if data.get("privacy") is not None:
            privacy = PrivacyConfig.from_dict(data["privacy"], "privacy")
            if base is not None:
                privacy = privacy.resolved(base)
        if base is not None:
            owners = tuple(o.resolved(base) for o in owners)
            if querier.data:
                querier = dataclasses.replace(
                    querier, data=str((base / os.path.expanduser(querier.data)).resolve()))
        return cls(
            owners=owners, querier=querier, mode=data.get("mode", "output"),
            protocol=ProtocolConfig.from_value(data.get("protocol", "soft_vote"), "protocol"),
            reveal=data.get("reveal", "label"), dealer=data.get("dealer", "ttp"),
            network=NetworkConfig.from_dict(data.get("network") or {}, "network"),
            batch_size=data.get("batch_size"), precision_bits=data.get("precision_bits", 16),
            privacy=privacy, identities=_identities(data.get("identities"), base),
            public_backbone=None if data.get("public_backbone") is None else
            BackboneConfig.from_dict(data["public_backbone"], "public_backbone", base),
            activation_bound=data.get("activation_bound"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "FederationConfig":
        """Read a federation from a ``.yaml``/``.yml`` or ``.toml`` file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read federation file: {exc.strerror}", key=str(path)) from None
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = _load_yaml(text, path.name)
            else:
                raise ConfigError("federation files end in .yaml, .yml or .toml", key=str(path))
        except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"not valid {path.suffix[1:].upper()}: {exc}", key=str(path)) from None
        if not isinstance(data, Mapping):
            raise ConfigError("the federation file must hold a mapping at top level", key=str(path))
        return cls.from_dict(data, base=path.parent.resolve())


def _identities(value: Any, base: Path | None) -> dict[str, "Identity"]:
    """``identities`` of a federation file: party name -> public key text or ``.key`` file."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("must map each party's name to its public key (Z85 text, or the path "
                          "of the NAME.key file made by mpc-fi keygen)", key="identities")
    from .keys import read_public  # noqa: PLC0415

    out = {}
    for name, spec in value.items():
        where = f"identities.{name}"
        public = read_public(spec, base=base, where=where)
        file = None
        if isinstance(spec, str) and public != spec:
            path = Path(os.path.expanduser(spec))
            file = str(path if path.is_absolute() or base is None else (base / path).resolve())
        out[str(name)] = Identity(public_key=public, file=file)
    return out


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping.

    PyYAML keeps the last of two equal keys without a word, so ``mode: full`` followed by
    ``mode: output`` would silently run in output mode. (TOML forbids it already.)
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.Node, source: str,
                           where: str = "", visited: set[int] | None = None) -> None:
    """Raise :class:`ConfigError` naming the dotted path and the lines of the first key (in
    document order) given twice in one mapping."""
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias points at a node seen before (or at itself)
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, source, f"{where}[{i}]", visited)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        dotted = where
        # '<<: *defaults' merges a mapping whose keys this one may override
        if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(key_node, yaml.ScalarNode):
            key = loader.construct_object(key_node)  # so that 1 and 0x1 are the same key
            dotted = f"{where}.{key}" if where else str(key)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(
                    f"given twice in {source} (lines {lines[key]} and {line}); YAML would "
                    "silently keep the last one. Keep one of them.", key=dotted)
            lines[key] = line
        _refuse_duplicate_keys(loader, value_node, source, dotted, visited)
