"""The owners' privacy budgets (:mod:`mpc_fi.budget`): each owner checks and charges its own
ledger before it contributes, and a release runs only if every owner agrees.

Three layers:

* pure: where each owner's ledger lives (``owners[i].ledger``, the XDG default), and the
  decision every party takes from the owners' published figures (:func:`mpc_fi.budget.judge`);
* the collective function itself, every computing party a thread whose
  :class:`~mpc_fi.runtime.Session` agrees through shared memory instead of gloo (no CrypTen):
  the worst case charged, one owner's refusal stopping everyone, a write that fails mid-charge,
  a concurrent run charging between the check and the charge;
* real parties through the local launcher: a querier that deletes every file it controls is
  still refused; owners whose ledgers disagree refuse together with a named error; the charge
  is on every owner's disk before any answer exists.

One-party-per-host runs (``mpc-fi party``) are checked in ``tests/launchers/test_host.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from launchers import LocalLauncher
from mpc_fi import Federation, cli, records, wire
from mpc_fi.budget import authorize_release, judge, open_ledger, read_budget, worst_case_cost
from mpc_fi.config import FederationConfig, PrivacyConfig, default_ledger_dir
from mpc_fi.errors import BudgetExceededError, ConfigError, MpcFiError, PartyFailedError
from mpc_fi.privacy import PrivacyBudget, confident_gnmax_cost, epsilon_for, gnmax_cost
from mpc_fi.result import BudgetReport
from mpc_fi.runtime import Session, SessionSpec
from tests.launchers.fedkit import wait_for_line

QUERIER = "name:querier"  # the querier's identity on loopback without keys
DELTA = 1e-5
SIGMA = 20.0
CONFIDENT = {"threshold": 1.5, "sigma_threshold": 1.0, "sigma": 2.0}


def with_budget(fed: FederationConfig, folder: Path, *, epsilon: float,
                protocol: str = "gnmax", params: dict | None = None,
                budget_file: Path | None = None) -> FederationConfig:
    """``fed`` with a DP protocol, a privacy section, and each owner's ledger in ``folder``."""
    owners = tuple(dataclasses.replace(o, ledger=str(folder / f"{o.name}.json"))
                   for o in fed.owners)
    return dataclasses.replace(
        fed, owners=owners,
        protocol=dataclasses.replace(fed.protocol, name=protocol,
                                     params=params if params is not None else {"sigma": SIGMA}),
        privacy=PrivacyConfig(epsilon=epsilon, delta=DELTA,
                              budget_file=None if budget_file is None else str(budget_file)))


def ledger(fed: FederationConfig, owner: int) -> PrivacyBudget:
    return PrivacyBudget(fed.owners[owner].ledger_path(), epsilon=fed.privacy.epsilon,
                         delta=fed.privacy.delta)


def one_run_fits(num_owners: int, queries: int) -> tuple[float, float]:
    """(epsilon of one GNMax run, a budget that holds one run but not two)."""
    eff = SIGMA * math.sqrt(num_owners / (num_owners + 1))
    one = epsilon_for([gnmax_cost(sigma=eff, queries=queries)], delta=DELTA)
    two = epsilon_for([gnmax_cost(sigma=eff, queries=2 * queries)], delta=DELTA)
    return one, (one + two) / 2


# -- where each owner's ledger lives ----------------------------------------------------------------

OWNERS_YAML = """
owners:
  - {name: a, model: {factory: "mpc_fi.demo:mlp"}, ledger: ledgers/a.json}
  - {name: b, model: {factory: "mpc_fi.demo:mlp"}}
protocol: {name: gnmax, sigma: 40.0}
privacy: {epsilon: 2.0, delta: 1.0e-5}
"""


def test_each_owner_names_its_ledger_or_gets_one_in_its_state_folder(tmp_path, monkeypatch):
    path = tmp_path / "fed.yaml"
    path.write_text(OWNERS_YAML)
    fed = FederationConfig.load(path)
    assert fed.privacy.budget_file is None  # the querier's own ledger is optional
    assert fed.owners[0].ledger_path() == tmp_path / "ledgers" / "a.json"  # beside the file
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert fed.owners[1].ledger_path() == tmp_path / "state" / "mpc-fi" / "ledgers" / "b.json"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert default_ledger_dir() == Path.home() / ".local" / "state" / "mpc-fi" / "ledgers"
    # where an owner keeps its ledger is its own business: the parties' fingerprints agree
    moved = dataclasses.replace(fed, owners=(dataclasses.replace(fed.owners[0], ledger="/x.json"),
                                             fed.owners[1]))
    assert moved.fingerprint() == fed.fingerprint()
    for bad in ("", 3):
        text = OWNERS_YAML.replace("ledger: ledgers/a.json", f"ledger: {bad!r}")
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"^owners\[0\]\.ledger: must be the path"):
            FederationConfig.load(path)


def test_a_ledger_an_owner_cannot_open_is_named_by_its_key(tmp_path):
    path = tmp_path / "fed.yaml"
    path.write_text(OWNERS_YAML)
    fed = FederationConfig.load(path)
    with pytest.raises(ConfigError, match=r"^owners\[0\]\.ledger: owner a: directory .* does not "
                                          r"exist; create it, or leave owners\[0\]\.ledger out"):
        open_ledger(fed, 0)  # an explicit folder is never made up: a typo would hide a ledger
    (tmp_path / "ledgers").mkdir()
    PrivacyBudget(tmp_path / "ledgers" / "a.json", epsilon=9.0, delta=1e-5)
    with pytest.raises(ConfigError, match=r"^owners\[0\]\.ledger: .*different budget parameters"):
        open_ledger(fed, 0)
    (tmp_path / "ledgers" / "a.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^owners\[0\]\.ledger: .*corrupt.*NOT reset"):
        open_ledger(fed, 0)


def test_validate_checks_each_owners_ledger_without_creating_it(tmp_path):
    from mpc_fi.preflight import check_files

    path = tmp_path / "fed.yaml"
    path.write_text(OWNERS_YAML.replace("ledger: ledgers/a.json", "ledger: a.json"))
    fed = FederationConfig.load(path)
    lines = check_files(fed, parties=["a"])
    assert f"a: privacy ledger {tmp_path / 'a.json'} (none yet: created at the first release)" \
        in lines
    assert not (tmp_path / "a.json").exists()
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"^\[a\] owners\[0\]\.ledger: owner a: privacy "
                                          r"ledger .* is corrupt"):
        check_files(fed, parties=["a"])


# -- the decision every party takes -------------------------------------------------------------

def test_the_owner_that_recorded_most_decides_and_the_error_names_every_figure():
    fits = {"a": {"spent": 0.5, "after": 0.9, "charges": 1},
            "b": {"spent": 0.5, "after": 0.9, "charges": 1}}
    assert judge(fits, querier=QUERIER, epsilon=1.0, delta=DELTA, cost="c") is None
    apart = {"a": {"spent": 0.7, "after": 0.95, "charges": 2},
             "b": {"spent": 0.0, "after": 0.4, "charges": 0}}
    note = judge(apart, querier=QUERIER, epsilon=1.0, delta=DELTA, cost="c")
    assert "ledgers disagree" in note and "a has recorded epsilon=0.7 in 2" in note
    over = {**apart, "a": {"spent": 0.7, "after": 1.2, "charges": 2}}
    with pytest.raises(BudgetExceededError) as info:
        judge(over, querier=QUERIER, epsilon=1.0, delta=DELTA, cost="24 GNMax answer(s)")
    msg = str(info.value)
    assert msg.startswith("owner(s) a refuse this release: querier name:querier would exceed")
    assert "a has recorded epsilon=0.7 in 2 charge(s), 1.2 after" in msg
    assert "b has recorded epsilon=0 in 0 charge(s), 0.4 after" in msg
    assert "The ledgers disagree" in msg and msg.endswith("Nothing was computed or charged.")


# -- the collective function, every party a thread ----------------------------------------------

class ThreadSession(Session):
    """A party's session whose agreements go through memory shared with the other threads,
    checked against the same wire schemas; nothing else of the runtime is started."""

    def __init__(self, spec: SessionSpec, rank: int, exchange: "Exchange") -> None:
        super().__init__(spec, rank)
        self.exchange = exchange

    def agree(self, step, schema, what):
        try:
            value, failure = step(), None
        except Exception as exc:  # noqa: BLE001 - agreed, as wire.agree does
            value, failure = None, wire.describe_failure(exc)
        ex = self.exchange
        ex.slots[self.rank] = wire.encode({"failure": failure, "value": value})
        ex.barrier.wait()
        sent = list(ex.slots)
        if self.rank == 0:
            ex.rounds.append(what)
            if what in ex.after:
                ex.after[what]()
        ex.barrier.wait()
        values = []
        for rank, data in enumerate(sent):
            one = schema if isinstance(schema, wire.Schema) else schema[rank]
            outcome = wire.decode(data, wire.Outcome(one))
            if outcome["failure"] is not None:
                raise wire.peer_error(outcome["failure"], party=self.spec.names[rank], rank=rank)
            values.append(outcome["value"])
        return values[self.rank], values


class Exchange:
    def __init__(self, world: int, after: dict | None = None) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world
        self.rounds: list[str] = []
        self.after = after or {}  # agreement name -> called once when it is complete


def release_everywhere(fed: FederationConfig, *, queries: int, after: dict | None = None):
    """:func:`authorize_release` at every computing party; ``(outcome by rank, rounds)``."""
    spec = SessionSpec.of_federation(fed)
    exchange = Exchange(fed.compute_world_size, after)
    out: dict = {}

    def party(rank: int) -> None:
        try:
            out[rank] = authorize_release(ThreadSession(spec, rank, exchange), federation=fed,
                                          queries=queries)
        except Exception as exc:  # noqa: BLE001 - collected per rank
            out[rank] = exc

    threads = [threading.Thread(target=party, args=(r,)) for r in range(fed.compute_world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == fed.compute_world_size, "a party never returned"
    return out, exchange.rounds


def test_every_owner_charges_the_worst_case_and_everyone_learns_the_figures(
        federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=3, num_classes=3)
    fed = with_budget(fed, tmp_path, epsilon=100.0, protocol="confident_gnmax", params=CONFIDENT)
    out, rounds = release_everywhere(fed, queries=6)
    eff = math.sqrt(3 / 4)
    worst = confident_gnmax_cost(threshold_sigma=1.0 * eff, sigma=2.0 * eff, checked=6,
                                 answered=6)  # owners never see which queries were answered
    assert worst_case_cost(fed, queries=6) == worst
    assert rounds == ["privacy budget check", "privacy budget charge"]
    for k in range(3):
        assert ledger(fed, k).history(QUERIER) == [worst]
    reports = set(out.values())
    assert len(reports) == 1  # the querier and every owner hold the same figures
    report = reports.pop()
    assert isinstance(report, BudgetReport) and report.querier == QUERIER
    assert report.spent == pytest.approx(epsilon_for([worst], delta=DELTA))
    assert report.remaining == pytest.approx(100.0 - report.spent)
    assert [o.charges for o in report.owners] == [1, 1, 1]
    assert read_budget(fed) == report  # what the ledgers on this host say afterwards


def test_one_owner_over_budget_stops_every_party_and_nothing_is_charged(federation_factory,
                                                                        tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    one, epsilon = one_run_fits(2, queries=24)
    fed = with_budget(fed, tmp_path, epsilon=epsilon)
    ledger(fed, 0).charge(QUERIER, gnmax_cost(sigma=SIGMA * math.sqrt(2 / 3), queries=24))
    ledger(fed, 1)  # a fresh, empty ledger
    before = [Path(o.ledger).read_bytes() for o in fed.owners]
    out, rounds = release_everywhere(fed, queries=24)
    assert rounds == ["privacy budget check"]  # refused before anyone charged
    errors = {str(e) for e in out.values()}
    assert all(isinstance(e, BudgetExceededError) for e in out.values())
    assert len(errors) == 1, errors  # the same error on every party
    msg = errors.pop()
    assert msg.startswith("owner(s) owner0 refuse this release")
    assert f"owner0 has recorded epsilon={one:.6g} in 1 charge(s)" in msg
    assert "owner1 has recorded epsilon=0 in 0 charge(s)" in msg
    assert [Path(o.ledger).read_bytes() for o in fed.owners] == before


def test_a_write_that_fails_mid_charge_leaves_the_ledger_whole_and_stops_everyone(
        federation_factory, tmp_path, monkeypatch):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    fed = with_budget(fed, tmp_path, epsilon=100.0)
    doomed = str(fed.owners[1].ledger_path())
    before = ledger(fed, 1).path.read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # the crash lands after the new file is written
        if str(dst) == doomed:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    out, _ = release_everywhere(fed, queries=24)
    assert all(isinstance(e, MpcFiError) for e in out.values())  # nobody goes on to contribute
    assert {str(e) for e in out.values()} == {
        "[owner1] OSError: [Errno 28] No space left on device"}
    assert ledger(fed, 1).path.read_bytes() == before  # the old ledger, whole
    assert not list(tmp_path.glob(".owner1.json.*.tmp"))
    # owner0 had charged already: an over-charge for an answer that never existed, never less
    assert len(ledger(fed, 0).history(QUERIER)) == 1


def test_a_run_that_spends_the_room_between_check_and_charge_is_refused(federation_factory,
                                                                        tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    _, epsilon = one_run_fits(2, queries=24)
    fed = with_budget(fed, tmp_path, epsilon=epsilon)
    cost = gnmax_cost(sigma=SIGMA * math.sqrt(2 / 3), queries=24)
    concurrent = {"privacy budget check": lambda: ledger(fed, 0).charge(QUERIER, cost)}
    out, _ = release_everywhere(fed, queries=24, after=concurrent)
    assert all(isinstance(e, BudgetExceededError) for e in out.values())
    assert "another run charged querier name:querier in this ledger" in str(out[2])
    assert ledger(fed, 0).history(QUERIER) == [cost]  # the other run's charge only
    assert ledger(fed, 1).history(QUERIER) == [cost]  # owner1 charged this one: never less


def test_a_corrupt_ledger_stops_every_party_naming_its_key_and_is_never_reset(
        federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    fed = with_budget(fed, tmp_path, epsilon=100.0)
    fed.owners[1].ledger_path().write_text('{"format": "mpc-fi-privacy-ledger", "versi')
    out, rounds = release_everywhere(fed, queries=4)
    assert rounds == ["privacy budget check"]
    assert all(type(e) is ConfigError for e in out.values())  # exit code 2 everywhere
    named = (f"[owner1] owners[1].ledger: owner owner1: privacy ledger "
             f"{fed.owners[1].ledger_path()} is corrupt or unreadable")
    assert {str(e).split(" (", 1)[0] for e in out.values()} == {named}
    assert fed.owners[1].ledger_path().read_text().endswith('"versi')
    assert not ledger(fed, 0).history(QUERIER)


def test_without_a_privacy_section_no_ledger_is_touched(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3, protocol="gnmax",
                                params={"sigma": SIGMA})
    out, rounds = release_everywhere(fed, queries=4)
    assert out == {0: None, 1: None, 2: None} and rounds == []


# -- reading the budget ----------------------------------------------------------------------------

def test_mpc_fi_budget_reads_each_owners_ledger_on_this_host(tmp_path, capsys):
    path = tmp_path / "fed.yaml"
    path.write_text(OWNERS_YAML.replace("privacy: {", "privacy: {budget_file: mine.json, "))
    fed = FederationConfig.load(path)
    (tmp_path / "ledgers").mkdir()
    cost = gnmax_cost(sigma=40.0 * math.sqrt(2 / 3), queries=3)
    open_ledger(fed, 0).charge(QUERIER, cost)
    open_ledger(fed, 0).charge("key:someone-else", cost)
    spent = epsilon_for([cost], delta=DELTA)
    assert cli.main(["budget", "--federation", str(path)]) == 0
    out = capsys.readouterr().out
    assert "this federation's querier is name:querier" in out
    assert f"  name:querier: spent epsilon={spent:.6g} of 2, remaining {2 - spent:.6g}, in 1 " \
           "charge(s)  (this federation's querier)" in out
    assert "  key:someone-else: spent" in out
    assert f"b: no ledger at {fed.owners[1].ledger_path()} on this host" in out
    assert "querier's own ledger (a convenience" in out and "none at" in out
    assert not fed.owners[1].ledger_path().exists()  # reading creates nothing
    assert cli.main(["budget", "--federation", str(path), "--party", "a", "--querier",
                     "key:nobody"]) == 0
    assert "  key:nobody: spent epsilon=0 of 2" in capsys.readouterr().out
    assert cli.main(["budget", "--federation", str(path), "--party", "querier"]) == 2
    assert "ConfigError: --party: 'querier' is not an owner" in capsys.readouterr().err
    report = Federation(fed).budget()
    assert report.spent == pytest.approx(spent) and [o.charges for o in report.owners] == [1, 0]


# -- real parties ----------------------------------------------------------------------------------

def test_a_querier_over_budget_is_refused_by_the_owners_after_deleting_its_files(
        federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    mine = tmp_path / "querier" / "budget.json"
    mine.parent.mkdir()
    owners = tmp_path / "owners"
    owners.mkdir()
    one, epsilon = one_run_fits(2, queries=24)
    fed = with_budget(fed, owners, epsilon=epsilon, budget_file=mine)
    x = np.random.default_rng(5).normal(size=(24, 6)).astype(np.float32)
    runs = tmp_path / "querier" / "runs"

    first = Federation(fed, timeout_s=300, run_dir=runs / "1").run(x)
    assert first.budget.spent == pytest.approx(one) and first.budget.remaining < one
    assert Federation(fed).budget() == first.budget
    with pytest.raises(BudgetExceededError, match="querier 'querier' would exceed"):
        Federation(fed, timeout_s=300, run_dir=runs / "2").run(x)  # its own ledger says no
    charged = [Path(o.ledger).read_bytes() for o in fed.owners]

    # The querier deletes every file it controls: its ledger, its locks, its run folders.
    for path in mine.parent.rglob("*"):
        if path.is_file():
            path.unlink()
    with pytest.raises(BudgetExceededError) as info:
        Federation(fed, timeout_s=300, run_dir=runs / "3").run(x)
    msg = str(info.value)
    assert msg.startswith("owner(s) owner0, owner1 refuse this release: querier name:querier")
    assert f"owner0 has recorded epsilon={one:.6g} in 1 charge(s)" in msg
    assert [Path(o.ledger).read_bytes() for o in fed.owners] == charged  # nothing more charged


def test_owners_with_different_ledgers_refuse_together_with_a_named_error(federation_factory,
                                                                          tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    one, epsilon = one_run_fits(2, queries=24)
    fed = with_budget(fed, tmp_path, epsilon=epsilon)
    # owner1 lost its ledger (or restored an old backup); owner0 remembers an earlier run
    ledger(fed, 0).charge(QUERIER, gnmax_cost(sigma=SIGMA * math.sqrt(2 / 3), queries=24))
    before = [Path(o.ledger_path()).read_bytes() if o.ledger_path().exists() else None
              for o in fed.owners]
    x = np.zeros((24, 6), dtype=np.float32)
    with pytest.raises(BudgetExceededError) as info:
        Federation(fed, timeout_s=300, run_dir=tmp_path / "run").run(x)
    assert str(info.value).startswith("owner(s) owner0 refuse this release")
    # every computing party stopped with the very same error, naming both owners' records
    messages = {records.load(tmp_path / "run" / f"error-{r}.npz")["message"]
                for r in range(fed.compute_world_size)}
    assert len(messages) == 1, messages
    msg = messages.pop()
    assert f"owner0 has recorded epsilon={one:.6g} in 1 charge(s)" in msg
    assert "owner1 has recorded epsilon=0 in 0 charge(s)" in msg
    assert "The ledgers disagree" in msg and "Nothing was computed or charged." in msg
    assert not list((tmp_path / "run").glob("result-*.npz"))
    after = [Path(o.ledger_path()).read_bytes() if o.ledger_path().exists() else None
             for o in fed.owners]
    assert after[0] == before[0]  # owner0's ledger untouched
    assert after[1] is None or not ledger(fed, 1).history(QUERIER)  # nothing charged to owner1


def test_the_charge_is_on_every_owners_disk_before_any_answer_exists(federation_factory,
                                                                       tmp_path):
    """The window of the querier-side design (answer first, charge after) is closed: when the
    querier holds its labels, every owner's ledger has the charge, and killing the querier
    right then (before anything it could charge) leaves the charge in place."""
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    fed = with_budget(fed, tmp_path, epsilon=100.0)
    worst = worst_case_cost(fed, queries=24)
    launcher = LocalLauncher(fed, run_dir=tmp_path / "run", timeout_s=180, stop_grace_s=3)
    launcher.start(query=np.zeros((24, 6), dtype=np.float32))
    querier = fed.querier_rank
    try:
        assert wait_for_line(launcher.log_path(querier), r"batch (\d+)/\1 done", 120), \
            "the querier never opened its labels"
        charged = [ledger(fed, k).history(QUERIER) for k in range(2)]
        os.kill(launcher.procs[querier].pid, signal.SIGKILL)
        try:
            launcher.wait()  # fails, unless the querier finished before the kill landed
        except PartyFailedError:
            pass
    finally:
        launcher.terminate()
    assert charged == [[worst], [worst]]
    assert [ledger(fed, k).history(QUERIER) for k in range(2)] == [[worst], [worst]]


def test_a_served_session_charges_every_request_and_refuses_past_the_budget(
        federation_factory, tmp_path):
    """Long-lived parties: the owners check and charge per request; the request that would
    overspend is refused by all of them, and the session goes on (health answers)."""
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    owners = tmp_path / "owners"
    owners.mkdir()
    one, epsilon = one_run_fits(2, queries=8)
    fed = with_budget(fed, owners, epsilon=epsilon)
    x = np.random.default_rng(6).normal(size=(8, 6)).astype(np.float32)
    with Federation(fed, timeout_s=300, run_dir=tmp_path / "run").start() as served:
        assert served.predict(x).shape == (8,)
        assert ledger(fed, 0).spent(QUERIER) == pytest.approx(one)
        with pytest.raises(BudgetExceededError, match="owner0, owner1 refuse this release"):
            served.predict(x)
        assert served.health()["requests"] == 1
    assert ledger(fed, 1).spent(QUERIER) == pytest.approx(one)
