"""The owners' privacy budgets: each owner checks and charges its own ledger before it
contributes to a differentially private release, and a release runs only if every owner agrees.

The querier cannot be trusted with its own budget: it can delete its ledger, or run parties
that never look at one. So every owner keeps a ledger of its own (``owners[i].ledger``, on its
own host, a :class:`~mpc_fi.privacy.PrivacyBudget` file), keyed by the identity the querier
proved in the session (:meth:`mpc_fi.runtime.Session.identity_of`: ``"key:<fingerprint>"``
with keys, ``"name:<querier name>"`` on loopback without them). The budget itself,
``privacy.epsilon`` and ``privacy.delta``, is in the federation's fingerprint: every party
holds the same one.

:func:`authorize_release` is the one function the party runtime calls, at every computing
party, before the owners contribute to a release (a one-shot run: once, for all its queries; a
long-lived party would call it per request). Three steps, the same on every party:

1. **check** (nothing written): each owner prices the release for the worst case (every query
   answered) and publishes what its ledger records for the querier (epsilon spent, charges)
   and the total this release would bring it to. The querier publishes nothing.
2. **decide**, from the same published figures at every party: if any owner's total would
   exceed the budget, every party raises the same :class:`~mpc_fi.errors.BudgetExceededError`
   naming those owners and what each ledger records. Nothing is computed or charged anywhere.
3. **charge**: each owner records the worst case in its ledger (an atomic, fsync'ed write; the
   ledger's lock re-checks the budget, in case a concurrent run spent it since step 1). The
   outcome is agreed again, and only then does any owner contribute.

:func:`authorize_cost` is the same three steps for any release the caller prices itself
(the contribution study's noisy coalition counts, :mod:`studies.owner_defences`), with each
owner's ledger opened by a callable instead of from a federation file.

Why the worst case: what the querier learns is opened to the querier alone
(``get_plain_text(dst=querier)``): an owner never sees which Confident-GNMax queries were
answered, so it cannot price the answers afterwards, and a count the querier reported back could
be anything. (GNMax answers every query: its worst case is its cost.)

Crash safety: an owner contributes only after its charge is on disk, and the release needs every
owner's contribution. A crash anywhere before the charge leaves no answer; a crash after it
leaves the charge (an over-charge, never an under-charge).

Ledgers that disagree (one owner records more than another: a ledger lost or restored from a
backup, an owner whose ledger also serves other federations, a crash between two owners'
charges): each owner enforces its own ledger, so the release runs only if it fits the owner that
has recorded the most; when it does not, every party refuses with the same error, which names
each owner's figures. A reset ledger never reopens the budget while another owner remembers it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import FederationConfig
from .errors import BudgetExceededError, ConfigError
from .plugins import PROTOCOLS, lookup, registry
from .result import BudgetReport, OwnerSpend

if TYPE_CHECKING:  # dp-accounting loads only where a budget is kept
    from .privacy import PrivacyBudget, QueryCost
    from .runtime import Session

#: Largest epsilon a ledger figure carries on the wire (the wire takes finite numbers only).
EPSILON_CAP = 1e300
#: Two owners' figures closer than this (relative) are the same record.
SAME_RECORD = 1e-9


@functools.cache
def _wire() -> tuple[Any, Any]:
    """The schemas of what an owner publishes: after its check, and after its charge."""
    from . import wire  # noqa: PLC0415 - wire imports torch; the read-only paths do not need it

    eps, count = wire.Float(0.0, EPSILON_CAP), wire.Int(0, 1 << 40)
    return (wire.Record({"spent": eps, "after": eps, "charges": count}),
            wire.Record({"spent": eps, "charges": count}))


def _cap(epsilon: float) -> float:
    return min(float(epsilon), EPSILON_CAP) if not math.isnan(epsilon) else EPSILON_CAP


def protocol_is_dp(federation: FederationConfig) -> Any:
    """The federation's protocol class; ConfigError (key ``privacy``) when a ``privacy`` section
    names a protocol that is not differentially private."""
    protocol_cls = lookup(PROTOCOLS, federation.protocol.name, key="protocol.name")
    if federation.privacy is not None and not getattr(protocol_cls, "differentially_private",
                                                      False):
        dp_names = sorted(n for n, c in registry(PROTOCOLS).items()
                          if getattr(c, "differentially_private", False))
        raise ConfigError(
            f"protocol {federation.protocol.name!r} is not differentially private, so its answers "
            f"cannot be charged to a privacy budget; use one of {', '.join(dp_names)}, or remove "
            "the privacy section", key="privacy")
    return protocol_cls


def worst_case_cost(federation: FederationConfig, *, queries: int) -> QueryCost:
    """What a release of ``queries`` queries costs if every one is answered."""
    protocol_cls = protocol_is_dp(federation)
    return protocol_cls.privacy_cost(params=dict(federation.protocol.params),
                                     num_owners=federation.num_owners, queries=queries,
                                     answered=queries)


def querier_identity(federation: FederationConfig) -> str:
    """The identity the owners key their ledgers by for this federation's querier (what
    :meth:`~mpc_fi.runtime.Session.identity_of` gives in a session of this federation)."""
    from .runtime import Session, SessionSpec  # noqa: PLC0415

    rank = federation.querier_rank
    return Session(SessionSpec.of_federation(federation), rank).identity_of(rank)


def open_ledger(federation: FederationConfig, index: int) -> PrivacyBudget:
    """Owner ``index``'s ledger on this host, created when missing (the default folder too).

    Raises :class:`~mpc_fi.errors.ConfigError` naming ``owners[index].ledger`` when it cannot
    be opened: its folder is missing, it was made with another budget, it is corrupt or
    unreadable (:class:`~mpc_fi.privacy.LedgerCorruptError`).
    """
    from .privacy import PrivacyBudget  # noqa: PLC0415

    if federation.privacy is None:
        raise ConfigError("this federation has no privacy section: no budget is kept",
                          key="privacy")
    owner = federation.owners[index]
    key = f"owners[{index}].ledger"
    path = owner.ledger_path()
    try:
        if owner.ledger is None:  # the default folder is this library's to make
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return PrivacyBudget(path, epsilon=federation.privacy.epsilon,
                             delta=federation.privacy.delta)
    except ConfigError as exc:
        hint = ""
        if exc.key == "path":
            hint = (f"; create it, or leave {key} out to keep the ledger under the owner's "
                    "state folder")
        raise type(exc)(f"owner {owner.name}: {exc.bare}{hint}", key=key) from None
    except OSError as exc:
        raise ConfigError(f"owner {owner.name} cannot open its ledger {path}: {exc}",
                          key=key) from None


def check_ledger(federation: FederationConfig, index: int) -> str:
    """What ``mpc-fi validate`` says about owner ``index``'s ledger on this host; raises the
    ConfigError :func:`open_ledger` would raise at start-up, without creating the ledger."""
    owner = federation.owners[index]
    path = owner.ledger_path()
    if path.exists():
        budget = open_ledger(federation, index)
        queriers = budget.queriers()
        charges = sum(len(budget.history(q)) for q in queriers)
        return (f"{owner.name}: privacy ledger {path} ({charges} charge(s) for "
                f"{len(queriers)} querier(s))")
    if owner.ledger is not None and not path.parent.is_dir():
        open_ledger(federation, index)  # raises, naming the missing folder and the key
    return f"{owner.name}: privacy ledger {path} (none yet: created at the first release)"


def _owner_check(budget: PrivacyBudget, querier: str, cost: QueryCost) -> dict[str, Any]:
    from .privacy import epsilon_for  # noqa: PLC0415

    history = budget.history(querier)
    spent = epsilon_for(history, delta=budget.delta)
    after = epsilon_for(history + [cost], delta=budget.delta)
    return {"spent": _cap(spent), "after": _cap(after), "charges": len(history)}


def judge(records: Mapping[str, Mapping[str, Any]], *, querier: str, epsilon: float,
          delta: float, cost: str) -> str | None:
    """Decide a release from every owner's published check (``{"spent", "after", "charges"}``
    by owner name, in rank order). Pure: every party reaches the same outcome from the same
    figures.

    Raises :class:`~mpc_fi.errors.BudgetExceededError` naming the owners whose total would
    exceed ``epsilon`` and what every owner's ledger records. Otherwise returns None, or a note
    when the owners' ledgers disagree (to log: the release still fits every one of them).
    """
    figures = "; ".join(
        f"{name} has recorded epsilon={r['spent']:.6g} in {r['charges']} charge(s), "
        f"{r['after']:.6g} after this release" for name, r in records.items())
    spent = [r["spent"] for r in records.values()]
    disagree = len({r["charges"] for r in records.values()}) > 1 or (
        max(spent) - min(spent) > SAME_RECORD * max(1.0, max(spent)))
    note = None
    if disagree:
        note = ("the owners' ledgers disagree (" + figures + "): each owner enforces its own, so "
                "the one that has recorded the most decides. A ledger lost or restored from a "
                "backup, one that also serves other federations, or a crash between two owners' "
                "charges explains it; see THREAT_MODEL.md, 'Privacy budgets'")
    refusing = [name for name, r in records.items() if r["after"] > epsilon]
    if refusing:
        raise BudgetExceededError(
            f"owner(s) {', '.join(refusing)} refuse this release: querier {querier} would "
            f"exceed its privacy budget (epsilon={epsilon:g}, delta={delta:g}). This release: "
            f"{cost} (charged as if every query were answered). Each owner's ledger: {figures}."
            + (" The ledgers disagree: each owner enforces its own, so the one that has "
               "recorded the most decides." if disagree else "")
            + " Nothing was computed or charged.")
    return note


def _owner_charge(budget: PrivacyBudget, owner: str, querier: str,
                  cost: QueryCost) -> dict[str, Any]:
    try:
        total = budget.charge(querier, cost)
    except BudgetExceededError as exc:
        raise BudgetExceededError(
            f"owner {owner}: another run charged querier {querier} in "
            f"this ledger between this release's check and its charge, and both no longer fit "
            f"({exc}). This release is refused everywhere; an owner that had charged it already "
            "keeps that charge (never an under-charge).") from None
    return {"spent": _cap(total), "charges": len(budget.history(querier))}


def authorize_release(session: Session, *, federation: FederationConfig,
                      queries: int) -> BudgetReport | None:
    """Check and charge every owner's ledger for a release of ``queries`` queries, before any
    owner contributes to it (see the module docstring). Collective: every computing party of
    ``session`` calls it at the same point.

    Returns what the owners' ledgers record for the querier once charged, or None when the
    federation has no ``privacy`` section (nothing is kept; a differentially private protocol
    then only warns). Raises, on every party alike, :class:`~mpc_fi.errors.BudgetExceededError`
    when an owner refuses and :class:`~mpc_fi.errors.ConfigError` when an owner cannot open its
    ledger (named ``owners[i].ledger``).
    """
    fed = federation
    if fed.privacy is None:
        return None
    return authorize_cost(session, price=lambda: worst_case_cost(fed, queries=queries),
                          ledger=lambda: open_ledger(fed, session.rank),
                          epsilon=fed.privacy.epsilon, delta=fed.privacy.delta,
                          owner_names=fed.party_names[:fed.num_owners])


def authorize_cost(session: Session, *, price: Callable[[], QueryCost],
                   ledger: Callable[[], PrivacyBudget], epsilon: float, delta: float,
                   owner_names: Sequence[str]) -> BudgetReport:
    """The owners' check-decide-charge of the module docstring for any priced release.

    Collective over the computing parties of ``session``: ranks ``0..len(owner_names) - 1``
    are the owners, every other computing party publishes nothing. ``price()`` runs at every
    party (a failure there is agreed like any other); ``ledger()`` runs at the owners only and
    opens that owner's own :class:`~mpc_fi.privacy.PrivacyBudget` (made with ``epsilon`` and
    ``delta``, the budget every party holds). Raises, on every party alike,
    :class:`~mpc_fi.errors.BudgetExceededError` before anything is charged when an owner's
    total would exceed ``epsilon``.
    """
    check_wire, charge_wire = _wire()
    from .wire import NULL  # noqa: PLC0415

    querier = session.identity_of(session.querier)
    owners = range(len(owner_names))
    is_owner = session.role == "owner"
    per_rank = [check_wire if r in owners else NULL for r in range(session.world)]
    holder: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        holder["cost"] = price()  # ConfigError alike everywhere
        if not is_owner:
            return None
        holder["ledger"] = ledger()
        return _owner_check(holder["ledger"], querier, holder["cost"])

    _, checks = session.agree(check, per_rank, "privacy budget check")
    cost = holder["cost"]
    records = {owner_names[r]: checks[r] for r in owners}
    note = judge(records, querier=querier, epsilon=epsilon, delta=delta, cost=cost.describe())
    if note:
        session.log.warning("privacy budget: %s", note)

    def charge() -> dict[str, Any] | None:
        if not is_owner:
            return None
        return _owner_charge(holder["ledger"], owner_names[session.rank], querier, cost)

    per_rank = [charge_wire if r in owners else NULL for r in range(session.world)]
    mine, charged = session.agree(charge, per_rank, "privacy budget charge")
    report = BudgetReport(querier=querier, epsilon=epsilon, delta=delta,
                          owners=tuple(OwnerSpend(owner=owner_names[r], spent=charged[r]["spent"],
                                                  charges=charged[r]["charges"])
                                       for r in owners))
    if is_owner:
        session.log.info("privacy budget: charged querier %s %s (the worst case) in %s; it "
                         "records epsilon=%.6g of %g", querier, cost.describe(),
                         holder["ledger"].path, mine["spent"], epsilon)
    session.log.info("privacy budget: every owner charged this release; %s", report.describe())
    return report


def read_budget(federation: FederationConfig, *, owners: Sequence[str] | None = None,
                querier: str | None = None) -> BudgetReport:
    """What the owners' ledgers on this host record for ``querier`` (default: this
    federation's querier, :func:`querier_identity`); ``owners`` limits it to those names.

    A ledger file that is not on this host counts as nothing recorded: right for the local
    launcher (every owner runs here); across hosts, read each owner's ledger on its host
    (``mpc-fi budget --party OWNER``) or the figures every run returns
    (:attr:`mpc_fi.RunResult.budget`). Reading never creates a ledger.
    """
    from .privacy import epsilon_for  # noqa: PLC0415

    if federation.privacy is None:
        raise ConfigError("this federation has no privacy section: no budget is kept",
                          key="privacy")
    querier = querier_identity(federation) if querier is None else querier
    wanted = list(owners) if owners is not None else [o.name for o in federation.owners]
    spends = []
    for name in wanted:
        index = _owner_index(federation, name)
        charges, spent = 0, 0.0
        if federation.owners[index].ledger_path().exists():
            budget = open_ledger(federation, index)
            history = budget.history(querier)
            charges, spent = len(history), epsilon_for(history, delta=budget.delta)
        spends.append(OwnerSpend(owner=name, spent=spent, charges=charges))
    return BudgetReport(querier=querier, epsilon=federation.privacy.epsilon,
                        delta=federation.privacy.delta, owners=tuple(spends))


def _owner_index(federation: FederationConfig, name: str) -> int:
    for index, owner in enumerate(federation.owners):
        if owner.name == name:
            return index
    raise ConfigError(f"{name!r} is not an owner of this federation; owners keep the ledgers: "
                      f"{', '.join(o.name for o in federation.owners)}", key="party")
