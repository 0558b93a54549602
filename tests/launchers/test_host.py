"""HostLauncher: one party per process, from --party or from torchrun/scheduler variables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkit import free_port, with_identities, with_network
from launchers import REGISTRY, HostLauncher
from launchers.host import resolve_party
from mpc_fi.config import FederationConfig, ModelSource, NetworkConfig, OwnerConfig
from mpc_fi.errors import ConfigError

MPC_FI = str(Path(sys.executable).with_name("mpc-fi"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def federation(port: int | None = 29500, address: str = "127.0.0.1", ack: bool = False,
               dealer: str = "ttp") -> FederationConfig:
    return FederationConfig(
        owners=tuple(OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory="mpc_fi.demo:mlp", weights=f"/nonexistent/{k}.pt")) for k in range(2)),
        dealer=dealer,
        network=NetworkConfig(address=address, port=port, acknowledge_plaintext_network=ack))


# -- which party, which rendezvous ------------------------------------------------------
def test_registered_as_host():
    assert REGISTRY["host"] is HostLauncher


def test_party_and_rendezvous_from_the_federation_file():
    assert resolve_party(federation(), "querier", {}) == (
        2, "tcp://127.0.0.1:29500", "network.address/network.port")
    assert resolve_party(federation(), None, {"RANK": "3"})[0] == 3  # RANK alone picks the party


def test_port_is_required_across_hosts():
    with pytest.raises(ConfigError) as info:
        resolve_party(federation(port=None), "owner0", {})
    assert info.value.key == "network.port" and "owner0" in str(info.value)


def test_party_must_be_named():
    with pytest.raises(ConfigError, match="--party NAME .*owner0, owner1, querier, dealer"):
        resolve_party(federation(), None, {})
    with pytest.raises(ConfigError, match="no party named 'owner7'"):
        resolve_party(federation(), "owner7", {})


def test_torchrun_variables_win_and_world_size_counts_the_dealer():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "4321", "RANK": "1", "WORLD_SIZE": "4"}
    assert resolve_party(federation(port=None), None, env) == (
        1, "tcp://127.0.0.1:4321", "MASTER_ADDR/MASTER_PORT")
    with pytest.raises(ConfigError) as info:
        resolve_party(federation(), None, {**env, "WORLD_SIZE": "3"})
    msg = str(info.value)
    assert "WORLD_SIZE=3" in msg and "4 processes" in msg and "the dealer counts" in msg
    assert "0=owner0, 1=owner1, 2=querier, 3=dealer" in msg
    # Without a dealer process (insecure-party-dealer), three processes are right.
    assert resolve_party(federation(dealer="insecure-party-dealer"), None,
                         {**env, "WORLD_SIZE": "3"})[0] == 1


def test_torchrun_inconsistencies_are_named():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "4321", "RANK": "1", "WORLD_SIZE": "4"}
    with pytest.raises(ConfigError, match="--party querier is rank 2 .* RANK=1"):
        resolve_party(federation(), "querier", env)
    with pytest.raises(ConfigError, match="RANK=9 .* ranks 0..3"):
        resolve_party(federation(), None, {**env, "RANK": "9"})
    with pytest.raises(ConfigError, match="WORLD_SIZE missing"):
        resolve_party(federation(), None, {k: v for k, v in env.items() if k != "WORLD_SIZE"})


def test_remote_master_addr_needs_the_plaintext_acknowledgement():
    env = {"MASTER_ADDR": "10.231.0.1", "MASTER_PORT": "4321", "RANK": "0", "WORLD_SIZE": "4"}
    with pytest.raises(ConfigError) as info:
        resolve_party(federation(), None, env)
    assert info.value.key == "network.acknowledge_plaintext_network"
    assert "WireGuard" in str(info.value)
    assert resolve_party(federation(ack=True), None, env)[1] == "tcp://10.231.0.1:4321"


# -- real processes -------------------------------------------------------------------
def test_a_reused_run_dir_is_cleared_for_this_party(tmp_path, monkeypatch):
    """The previous run's files of this party are gone before it starts; others' are kept."""
    import launchers.host
    from mpc_fi import records

    fed = federation()
    stale = [tmp_path / n for n in (".heartbeat-1", "error-1.npz", "result-1.npz",
                                    "result-1.npz.tmp", "audit-1.npz")]
    for path in stale + [tmp_path / "result-0.npz"]:
        path.write_bytes(b"previous run")
    (tmp_path / "party-1-owner1.log").write_text("previous run\n")
    seen = {}

    def party_main(federation, rank, run_dir, *args, **kwargs):
        seen["left"] = sorted(p.name for p in Path(run_dir).iterdir())
        records.save(Path(run_dir) / f"result-{rank}.npz", {"cost": None})
        return 0

    monkeypatch.setattr(launchers.host, "party_main", party_main)
    out = HostLauncher(fed, party="owner1", run_dir=tmp_path, environ={}).run()
    assert out == {1: {"cost": None}}
    assert seen["left"] == ["party-1-owner1.log.1", "result-0.npz"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([MPC_FI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cli_reports_a_missing_port_with_exit_code_2(small_federation, tmp_path):
    path, _ = small_federation
    proc = run_cli("party", "--federation", str(path), "--party", "owner0",
                   "--run-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "network.port" in proc.stderr and "ConfigError" in proc.stderr


def start_party(fed: Path, name: str, run_dir: Path, *extra: str,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([MPC_FI, "party", "--federation", str(fed), "--party", name,
                             "--run-dir", str(run_dir / name), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_one_process_per_party_over_tcp_matches_the_plaintext_twin(small_federation, tmp_path):
    """Every party proves its key (identities: transport curve) and answers like the twin."""
    path, twin = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=60)
    fed = with_identities(fed, fed, tmp_path / "keys")
    names = list(FederationConfig.load(fed).party_names)
    procs = {n: start_party(fed, n, tmp_path, "--output", str(tmp_path / f"{n}.npy"))
             for n in names}
    outs = {n: p.communicate(timeout=400) for n, p in procs.items()}
    assert {n: p.returncode for n, p in procs.items()} == dict.fromkeys(names, 0), \
        {n: o[1][-2000:] for n, o in outs.items()}
    np.testing.assert_array_equal(np.load(tmp_path / "querier.npy"), twin)
    assert not (tmp_path / "owner0.npy").exists()  # only the querier learns labels
    # Each host's log: its own lines only, tagged with rank and role.
    log = (tmp_path / "owner1" / "party-1-owner1.log").read_text().splitlines()
    assert log and all("[rank 1 owner owner1]" in line for line in log)
    assert "running querier (rank 2, querier) of 4 processes" in outs["querier"][1]
    # The one patch handle is live in every process of this runner too, the dealer included.
    for rank, name in enumerate(names):
        text = (tmp_path / name / f"party-{rank}-{name}.log").read_text()
        live = text.split("patches live: ")[1].splitlines()[0]
        assert "csprng, fast-comparisons, object-channel" in live, (name, live)
    assert "transport curve" in (tmp_path / "owner0" / "party-0-owner0.log").read_text()


def test_a_key_file_of_another_party_is_refused_before_anything_starts(small_federation,
                                                                       tmp_path):
    path, _ = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=30)
    fed = with_identities(fed, fed, tmp_path / "keys")
    proc = start_party(fed, "querier", tmp_path, "--key", str(tmp_path / "keys" /
                                                              "owner0.key_secret"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "another party" in err and "identities.querier" in err


ROGUE = """
import sys
from launchers.entry import channel_configs, party_env, party_main
from mpc_fi import channel, keys
from mpc_fi.config import FederationConfig
import dataclasses
fed = FederationConfig.load(sys.argv[1])
rank = fed.querier_rank
publics = tuple(fed.identities[n].public_key for n in fed.party_names)
# the querier's seat, with every public key right but a secret key of its own
config = channel.ChannelConfig(names=fed.party_names, public_keys=publics,
                               secret_key=keys.ephemeral_pair()[1], timeout_s=30)
env = party_env(fed, rank, f"tcp://127.0.0.1:{fed.network.port}")
import os
os.environ.update(env)
sys.exit(party_main(fed, rank, sys.argv[2], env, None, log_to_file=True, echo_stderr=True,
                    channel_config=config))
"""


def test_an_impostor_in_a_seat_is_refused_by_name_and_learns_nothing(small_federation,
                                                                     tmp_path):
    """A rogue process takes the querier's seat with the federation's file and every public key,
    but not the querier's secret key: the handshake fails before any protocol byte; every
    honest party stops with an error naming the querier; nobody has a result."""
    path, _ = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=30)
    fed = with_identities(fed, fed, tmp_path / "keys")
    procs = {n: start_party(fed, n, tmp_path) for n in ("owner0", "owner1", "dealer")}
    (tmp_path / "rogue").mkdir()
    rogue = subprocess.Popen([sys.executable, "-c", ROGUE, str(fed), str(tmp_path / "rogue")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=str(Path(__file__).resolve().parents[2]))
    outs = {n: p.communicate(timeout=300) for n, p in procs.items()}
    rogue_out = rogue.communicate(timeout=300)
    for name in ("owner0", "owner1", "dealer"):
        assert procs[name].returncode == 7, outs[name][1]
        assert "could not authenticate querier (rank 2)" in outs[name][1], outs[name][1]
        assert not list((tmp_path / name).glob("result-*.npz"))
    assert rogue.returncode != 0, rogue_out[1][-2000:]
    assert not list((tmp_path / "rogue").glob("result-*.npz"))
    # Nothing reached the rogue: the handshake is the first thing on every connection.
    assert "query" not in rogue_out[1].lower() or "batch" not in rogue_out[1].lower()


@pytest.mark.slow  # the same check in-process: test_rendezvous.py; across namespaces: test_netns.py
def test_a_missing_party_is_named_within_network_timeout(small_federation, tmp_path):
    path, _ = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=4)
    procs = {n: start_party(fed, n, tmp_path) for n in ("owner0", "querier", "dealer")}
    outs = {n: p.communicate(timeout=400) for n, p in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 7, outs[name][1]
        assert "owner1 (rank 1, owner)" in outs[name][1]
        assert "never arrived" in outs[name][1]
        assert not list((tmp_path / name).glob("result-*.npz"))
    # The roll call's own bound (network.timeout_s = 4) ended it, not the test's hang guard: the
    # message says how long it waited (no wall-clock assertion: a loaded machine starts slowly).
    assert "waited 4 s" in outs["owner0"][1], outs["owner0"][1]


@pytest.mark.skipif(shutil.which(TORCHRUN) is None and not Path(TORCHRUN).exists(),
                    reason="torchrun not installed")
@pytest.mark.slow  # the torchrun path across namespaces: test_netns.py
def test_torchrun_starts_every_party(small_federation, tmp_path):
    path, twin = small_federation
    port = free_port()
    cmd = [TORCHRUN, "--nnodes", "1", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "--no-python", MPC_FI, "party", "--federation", str(path),
           "--run-dir", str(tmp_path), "--output", str(tmp_path / "labels.npy")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), twin)
    assert "(from MASTER_ADDR/MASTER_PORT)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_torchrun_with_the_wrong_process_count_says_so(small_federation, tmp_path):
    path, _ = small_federation
    cmd = [TORCHRUN, "--nnodes", "1", "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", MPC_FI, "party", "--federation",
           str(path), "--run-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "WORLD_SIZE=3 but this federation runs 4 processes" in proc.stdout + proc.stderr


@pytest.mark.slow  # the same refusal in-process: tests/mpc_fi/test_wire.py (rogue seats)
def test_a_party_started_with_another_federation_file_is_refused_by_everyone(small_federation,
                                                                             tmp_path):
    import yaml

    path, _ = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=20)
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(fed.read_text())
    data["reveal"] = "scores"  # one public setting differs
    other.write_text(yaml.safe_dump(data))
    names = list(FederationConfig.load(fed).party_names)
    procs = {n: start_party(other if n == "owner1" else fed, n, tmp_path) for n in names}
    outs = {n: p.communicate(timeout=400) for n, p in procs.items()}
    for name in names[:-1]:  # every computing party stops with the same handshake error
        assert procs[name].returncode == 8, outs[name][1][-2000:]
        assert "different federation" in outs[name][1]
        assert not list((tmp_path / name).glob("result-*.npz"))


def test_a_busy_rendezvous_port_is_named_by_the_party_that_hosts_it(small_federation, tmp_path):
    import socket

    path, _ = small_federation
    with socket.socket() as busy:  # another program holds the federation's port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fed = with_network(path, tmp_path / "fed.yaml", port=port, timeout_s=10)
        proc = start_party(fed, "owner0", tmp_path)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 7, err[-2000:]
    assert f"owner0 (rank 0, owner) hosts the rendezvous but cannot listen on 127.0.0.1:{port}" \
        in err
    assert "Is the port in use" in err
    assert not list((tmp_path / "owner0").glob("result-*.npz"))


SITECUSTOMIZE = """
import importlib.metadata as _metadata

_real_version = _metadata.version


def _version(name):
    found = _real_version(name)
    return found + "+other" if name == "crypten" else found


_metadata.version = _version
"""


@pytest.mark.slow
def test_parties_with_different_package_versions_are_refused_by_everyone(small_federation,
                                                                         tmp_path):
    path, _ = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=20)
    # owner1's host has another CrypTen build: its interpreter reports a different version.
    shim = tmp_path / "other-crypten"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    other_env = {**os.environ, "PYTHONPATH": str(shim)}
    names = list(FederationConfig.load(fed).party_names)
    procs = {n: start_party(fed, n, tmp_path, env=other_env if n == "owner1" else None)
             for n in names}
    outs = {n: p.communicate(timeout=400) for n, p in procs.items()}
    for name in names[:-1]:  # every computing party stops with the same handshake error
        err = outs[name][1]
        assert procs[name].returncode == 8, err[-2000:]
        assert "HandshakeError" in err and "install the same versions" in err
        assert "'crypten': '0.4.1+other'" in err
        assert not list((tmp_path / name).glob("result-*.npz"))


class BudgetedHosts:
    """``small_federation`` as GNMax with a privacy budget that holds one run of its 24 queries
    but not two, each owner's ledger beside the federation file (``ledgers/<owner>.json``);
    :meth:`run` starts every party with ``mpc-fi party``, one process each."""

    def __init__(self, path: Path, folder: Path) -> None:
        import math

        import yaml

        from mpc_fi.privacy import epsilon_for, gnmax_cost

        self.folder = folder
        self.cost = gnmax_cost(sigma=20.0 * math.sqrt(2 / 3), queries=24)  # 24 answers
        self.one, two = (epsilon_for([self.cost] * k, delta=1e-5) for k in (1, 2))
        self.epsilon = (self.one + two) / 2
        data = yaml.safe_load(path.read_text())
        data["protocol"] = {"name": "gnmax", "sigma": 20.0}
        data["privacy"] = {"epsilon": self.epsilon, "delta": 1.0e-5}
        for owner in data["owners"]:
            owner["ledger"] = f"ledgers/{owner['name']}.json"  # relative to the federation file
        (folder / "ledgers").mkdir()
        self.template = folder / "template.yaml"
        self.template.write_text(yaml.safe_dump(data, sort_keys=False))
        self.names = list(FederationConfig.load(self.template).party_names)

    def run(self, attempt: str) -> dict[str, tuple[int, str, str]]:
        """``{party: (exit code, stdout, stderr)}``; the querier's labels in ``<attempt>.npy``."""
        fed = with_network(self.template, self.folder / "fed.yaml", port=free_port(), timeout_s=60)
        output = ["--output", str(self.folder / f"{attempt}.npy")]
        procs = {n: start_party(fed, n, self.folder / attempt, *(output if n == "querier" else []))
                 for n in self.names}
        outs = {n: p.communicate(timeout=400) for n, p in procs.items()}
        return {n: (procs[n].returncode, *outs[n]) for n in self.names}

    def ledger(self, owner: str) -> Path:
        return self.folder / "ledgers" / f"{owner}.json"

    def history(self, owner: str) -> list:
        from mpc_fi.privacy import PrivacyBudget

        return PrivacyBudget(self.ledger(owner), epsilon=self.epsilon,
                             delta=1e-5).history("name:querier")

    def charge_and_answer(self) -> None:
        first = self.run("first")
        assert {n: first[n][0] for n in self.names} == dict.fromkeys(self.names, 0), \
            {n: first[n][2][-2000:] for n in self.names}
        assert np.load(self.folder / "first.npy").shape == (24,)
        assert f"querier name:querier has spent epsilon={self.one:.4g}" in first["querier"][1]
        assert self.history("owner0") == self.history("owner1") == [self.cost]


@pytest.mark.slow  # the same ledgers with local processes: tests/mpc_fi/test_owner_budget.py
def test_owners_charge_their_own_ledgers_in_one_party_per_host_runs(small_federation, tmp_path):
    """``mpc-fi party`` used to answer a DP federation without any budget. Each owner now
    checks and charges its own ledger (``owners[i].ledger``, beside the federation file on its
    host): the run is charged the worst case at both owners, and the querier is told what is
    left."""
    BudgetedHosts(small_federation[0], tmp_path).charge_and_answer()


@pytest.mark.slow  # the same refusal with local processes: tests/mpc_fi/test_owner_budget.py
def test_owners_refuse_the_run_that_would_overspend_in_one_party_per_host_runs(small_federation,
                                                                               tmp_path):
    hosts = BudgetedHosts(small_federation[0], tmp_path)
    hosts.charge_and_answer()
    charged = [hosts.ledger(n).read_bytes() for n in ("owner0", "owner1")]
    second = hosts.run("second")
    for name in hosts.names[:-1]:  # every computing party stops with the budget's exit code
        code, _, err = second[name]
        assert code == 6, err[-2000:]
        assert "owner(s) owner0, owner1 refuse this release: querier name:querier" in err
    assert not (tmp_path / "second.npy").exists()
    assert [hosts.ledger(n).read_bytes() for n in ("owner0", "owner1")] == charged
