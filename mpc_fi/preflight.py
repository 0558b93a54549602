"""Checks of what one host names in a federation, before any party starts (``mpc-fi validate``).

:class:`~mpc_fi.config.FederationConfig` already refuses every bad setting when it is built
(each section and the protocol's parameters, :mod:`mpc_fi.plugins`). What remains are the files:
each owner's model (the factory imports and builds, the weights or ONNX file exists and loads
into it) and, with a ``privacy`` section, its ledger (readable, made for this budget; never
created here), the querier's query file, and what the parties would check once they meet: the owners'
class counts against each other and, in full mode, the supported layers and the fixed-point
range of every model for the declared input range. :func:`check_files` runs those checks with
the same functions the parties run, so it raises the same error classes (prefixed with the
party's name, as the parties' agreed errors are); a party whose files live on another host is
skipped when ``parties`` leaves it out.

The launcher of a local run does not call it: loading every owner's model in one process would
read every owner's private files there. ``mpc-fi validate`` runs on each host for its own parties.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


from .config import FederationConfig
from .errors import ConfigError, InputError, MpcFiError


def _named(party: str, exc: MpcFiError) -> MpcFiError:
    """The same error class, prefixed with the party like the parties' agreed errors."""
    out = type(exc).__new__(type(exc))
    MpcFiError.__init__(out, f"[{party}] {exc}")
    out.__dict__.update({k: v for k, v in exc.__dict__.items() if k != "args"})
    return out


def check_files(federation: FederationConfig, *, parties: Sequence[str] | None = None
                ) -> list[str]:
    """Load what ``parties`` (default: every party) name; one line per check, or raise.

    Raises the first :class:`~mpc_fi.errors.MpcFiError` a party would raise at start-up for the
    same file: ``UnsupportedModelError`` (missing, corrupt or pickled weights, an ONNX file that
    does not load, a factory that cannot be imported or built, full mode: an unsupported layer),
    ``InputError`` (a missing or unreadable query file, bad query values, owners disagreeing on
    the class count, a model that could overflow the fixed-point range), ``ConfigError`` (an
    owner's ledger whose folder is missing, made with another budget, or corrupt).
    """
    from .data import load_queries, validate_queries  # noqa: PLC0415
    from .models import extract_architecture, load_owner_model, output_classes  # noqa: PLC0415

    wanted = set(parties) if parties is not None else set(federation.party_names)
    unknown = wanted - set(federation.party_names)
    if unknown:
        federation.rank_of(sorted(unknown)[0])  # raises a ConfigError listing the parties
    lines: list[str] = []
    shape = None
    q = federation.querier
    if q.name in wanted and q.data:
        try:
            x = validate_queries(load_queries(q.data), q)
        except MpcFiError as exc:
            raise _named(q.name, exc) from None
        shape = tuple(x.shape[1:])
        lines.append(f"{q.name}: {x.shape[0]} queries of shape {shape} in {q.data}")
        backbone = federation.public_backbone
        if backbone is not None:  # the querier's own check: its features are what is shared
            import torch  # noqa: PLC0415

            try:
                net = load_owner_model(backbone.model, mode="output")
                with torch.no_grad():
                    feats = np.asarray(net(torch.from_numpy(np.ascontiguousarray(x))),
                                       dtype=np.float32)
            except MpcFiError as exc:
                raise _named(q.name, exc) from None
            low, high = backbone.output_range
            if not np.isfinite(feats).all() or feats.min() < low or feats.max() > high:
                raise _named(q.name, InputError(
                    f"the public backbone's features of these queries leave "
                    f"public_backbone.output_range [{low:g}, {high:g}]"))
            shape = tuple(feats.shape[1:])
            lines.append(f"{q.name}: public backbone gives features of shape {shape} within "
                         f"[{low:g}, {high:g}]")
    classes: dict[str, int] = {}
    for owner in federation.owners:
        if owner.name not in wanted:
            continue
        try:
            model = load_owner_model(owner.model, mode=federation.mode)
            what = f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} " \
                   "parameters"
            if shape is not None:
                classes[owner.name] = output_classes(model, shape)
                what += f", {classes[owner.name]} classes"
                if federation.mode == "full":
                    from .ranges import check_activation_bound, check_model_ranges  # noqa: PLC0415

                    arch, params = extract_architecture(model, shape)
                    ranges = check_model_ranges(arch, params, federation.shared_input_range,
                                                federation.precision_bits,
                                                range_key=federation.shared_input_key)
                    what += ", supported on shares, fixed-point range ok"
                    if federation.activation_bound is not None:
                        check_activation_bound(ranges, federation.shared_input_range,
                                               federation.activation_bound,
                                               range_key=federation.shared_input_key)
                        what += f", within activation_bound {federation.activation_bound:g}"
        except MpcFiError as exc:
            raise _named(owner.name, exc) from None
        lines.append(f"{owner.name}: model loads ({what})")
        if federation.privacy is not None:
            from .budget import check_ledger  # noqa: PLC0415

            index = federation.owners.index(owner)
            try:
                lines.append(check_ledger(federation, index))
            except MpcFiError as exc:
                raise _named(owner.name, exc) from None
    for name in sorted(wanted & set(federation.identities)):
        lines.append(_identity_line(federation, name))
    if len(set(classes.values())) > 1:
        raise InputError("owners disagree on the number of classes: "
                         + ", ".join(f"{k}={v}" for k, v in classes.items()))
    return lines


def _identity_line(federation: FederationConfig, name: str) -> str:
    """This host's secret key for ``name``, when it lies beside the public key the federation
    names (the convention of ``mpc-fi keygen``): readable by its owner only, of the right pair."""
    from .keys import fingerprint, load_secret  # noqa: PLC0415

    ident = federation.identities[name]
    where = f"identities.{name}"
    short = fingerprint(ident.public_key)[:16]
    if ident.file is None or not Path(ident.file + "_secret").exists():
        return (f"{name}: public key {short}...; no secret key beside it here (pass "
                "--key NAME.key_secret to mpc-fi party / serve on that party's host)")
    public, _ = load_secret(ident.file + "_secret", where=where)
    if public != ident.public_key:
        raise ConfigError(f"{ident.file}_secret holds another key pair than {ident.file}",
                          key=where)
    return f"{name}: key pair {short}... ok (secret key readable by its owner only)"
