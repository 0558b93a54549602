"""LocalLauncher hardening: tagged logs, bounded stops, Ctrl-C without orphans, exit codes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedkit import alive, listening, logged_pids, session_members, wait_for_line
from launchers import LocalLauncher
from launchers.base import sigterm_raises
from mpc_fi.cli import build_parser
from mpc_fi import records
from mpc_fi.config import FederationConfig
from mpc_fi.errors import EXIT_CODES, PartyFailedError, Terminated

MPC_FI = str(Path(sys.executable).with_name("mpc-fi"))
LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \[rank (\d) (owner|querier|dealer) (\w+)\] "
                  r"(INFO|WARNING|ERROR) ")


def test_exit_codes_are_documented_in_help():
    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if a.dest == "command")
    texts += [sub.choices[name].format_help() for name in ("run", "party")]
    for text in texts:
        for code, meaning in EXIT_CODES.items():
            assert re.search(rf"^\s+{code}\s+{re.escape(meaning)}$", text, re.M), (code, text)


def test_every_log_line_names_its_party_and_labels_match_the_twin(small_federation, tmp_path):
    path, twin = small_federation
    fed = FederationConfig.load(path)
    results = LocalLauncher(fed, run_dir=tmp_path, timeout_s=180).run()
    np.testing.assert_array_equal(results[fed.querier_rank]["labels"], twin)
    for rank, name in enumerate(fed.party_names):
        lines = (tmp_path / f"party-{rank}-{name}.log").read_text().splitlines()
        assert lines
        for line in lines:
            m = LINE.match(line)
            assert m, line
            assert (int(m.group(1)), m.group(2), m.group(3)) == (rank, fed.role_of(rank), name)
    assert not any(alive(pid) for pid in logged_pids(tmp_path).values())


@pytest.mark.parametrize("transport", ["curve", pytest.param("gloo", marks=pytest.mark.slow)])
def test_every_transport_gives_the_twin_labels(small_federation, tmp_path, transport):
    """Transport curve without identities on loopback: one-run keys made by the launcher."""
    from fedkit import with_network

    path, twin = small_federation
    fed = FederationConfig.load(with_network(path, tmp_path / "fed.yaml", transport=transport))
    results = LocalLauncher(fed, run_dir=tmp_path / "run", timeout_s=180).run()
    np.testing.assert_array_equal(results[fed.querier_rank]["labels"], twin)
    assert f"transport {transport}" in (tmp_path / "run" / "party-0-owner0.log").read_text()


def test_parties_listen_on_the_loopback_address_only(small_federation, tmp_path):
    path, twin = small_federation
    fed = FederationConfig.load(path)
    launcher = LocalLauncher(fed, run_dir=tmp_path, timeout_s=180)
    launcher.start()
    try:
        assert wait_for_line(launcher.log_path(fed.querier_rank), "handshake ok", 120)
        sockets = listening(pids=[p.pid for p in launcher.procs])
        results = launcher.wait()
    finally:
        launcher.terminate()
    port = int(re.search(r"rendezvous tcp://127\.0\.0\.1:(\d+)",
                         launcher.log_path(0).read_text()).group(1))
    assert ("127.0.0.1", port) in sockets  # the rendezvous store, hosted by rank 0
    assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets  # no '0.0.0.0', '::'
    np.testing.assert_array_equal(results[fed.querier_rank]["labels"], twin)


def test_a_reused_run_dir_ignores_the_previous_runs_files(small_federation, tmp_path):
    path, twin = small_federation
    fed = FederationConfig.load(path)
    # What an earlier run leaves behind: heartbeats older than hang_timeout_s (taken for frozen
    # parties before the new ones beat), an error and a result that are not this run's.
    hour_ago = time.time() - 3600
    for rank, name in enumerate(fed.party_names):
        heartbeat = tmp_path / f".heartbeat-{rank}"
        heartbeat.touch()
        os.utime(heartbeat, (hour_ago, hour_ago))
        (tmp_path / f"party-{rank}-{name}.log").write_text("a line of the previous run\n")
    records.save(tmp_path / "error-0.npz", {"type": "ConfigError", "message": "stale",
                                            "party": "owner0", "rank": 0, "phase": None})
    records.save(tmp_path / "result-2.npz", {"labels": np.full(len(twin), 99)})
    launcher = LocalLauncher(fed, run_dir=tmp_path, timeout_s=180)
    launcher.start()
    try:
        assert not (tmp_path / "error-0.npz").exists()
        results = launcher.wait()
    finally:
        launcher.terminate()
    np.testing.assert_array_equal(results[fed.querier_rank]["labels"], twin)
    for rank in range(len(fed.party_names)):
        log = launcher.log_path(rank)
        assert "previous run" not in log.read_text()
        assert log.with_name(log.name + ".1").read_text() == "a line of the previous run\n"


def test_a_frozen_party_stops_everyone_within_the_hang_timeout(small_federation, tmp_path):
    path, _ = small_federation
    fed = FederationConfig.load(path)
    launcher = LocalLauncher(fed, run_dir=tmp_path, timeout_s=180, hang_timeout_s=4,
                             stop_grace_s=3)
    launcher.start()
    try:
        assert wait_for_line(launcher.log_path(1), "handshake ok", 120)
        os.kill(launcher.procs[1].pid, signal.SIGSTOP)
        with pytest.raises(PartyFailedError) as info:
            launcher.wait()
    finally:
        launcher.terminate()
    # The watchdog, not the run's 180 s timeout, ended it: its message says so (no wall-clock
    # assertion: a loaded machine may take longer to notice, never forever).
    assert info.value.party == "owner1"
    assert "stopped responding" in str(info.value) and "handshake ok" in str(info.value)
    assert not any(p.is_alive() for p in launcher.procs)


def test_run_timeout_stops_everyone_and_names_who_was_running(small_federation, tmp_path):
    path, _ = small_federation
    fed = FederationConfig.load(path)
    # owner1 freezes; the others wait on it (gloo's timeout is far away): only the run's own
    # timeout can end this.
    launcher = LocalLauncher(fed, run_dir=tmp_path, stop_grace_s=2, hang_timeout_s=600)
    launcher.start()
    try:
        assert wait_for_line(launcher.log_path(1), "handshake ok", 120)
        os.kill(launcher.procs[1].pid, signal.SIGSTOP)
        with pytest.raises(PartyFailedError,
                           match=r"timed out after 3 s; still running: owner0, owner1, querier"):
            launcher.wait(timeout_s=3)
    finally:
        launcher.terminate()
    assert not any(p.is_alive() for p in launcher.procs)


def run_cli_until(tmp_path: Path, path: Path, line: str) -> subprocess.Popen:
    """`mpc-fi run --federation` in its own session, returned once a party logged ``line``."""
    # SIGINT as in a terminal's foreground job: a test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and so would the CLI.
    proc = subprocess.Popen([MPC_FI, "run", "--federation", str(path), "--run-dir",
                             str(tmp_path), "--timeout", "180"], start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait_for_line(tmp_path / "party-2-querier.log", line, 120):
        proc.kill()
        pytest.fail("the parties never got going: " + proc.communicate()[1][-2000:])
    return proc


@pytest.mark.parametrize("to_group", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["parent-only", "terminal-ctrl-c"])
def test_ctrl_c_stops_every_party_and_leaves_no_orphans(long_federation, tmp_path, to_group):
    # 120 batches: the interrupt lands while the parties work, not after a run that finished
    proc = run_cli_until(tmp_path, long_federation, "handshake ok")
    assert len(session_members(proc.pid)) >= 5  # the launcher and its 4 parties
    if to_group:  # what a terminal does: SIGINT to the whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "interrupted; every party was stopped" in err
    deadline = time.monotonic() + 30
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(proc.pid) == []
    pids = logged_pids(tmp_path)
    assert len(pids) == 4 and not any(alive(pid) for pid in pids.values())


def test_sigterm_raises_terminated_but_never_cuts_terminate_short(small_federation, tmp_path):
    launcher = LocalLauncher(FederationConfig.load(small_federation[0]), run_dir=tmp_path)
    with pytest.raises(Terminated):
        with sigterm_raises(launcher):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    stopped = []
    with pytest.raises(Terminated):
        with sigterm_raises(launcher):
            with launcher.terminating():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler runs here, and lets terminate() go on
                stopped.append(True)
    assert stopped == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.fixture(scope="module")
def long_federation(small_federation, tmp_path_factory):
    """The small federation's owners on 240 queries in batches of 2: 120 batches, several
    seconds of work after the first ones."""
    path, _ = small_federation
    data = yaml.safe_load(path.read_text())
    folder = tmp_path_factory.mktemp("fed-long")
    np.save(folder / "queries.npy", np.tile(np.load(data["querier"]["data"]), (10, 1)))
    data["querier"]["data"] = str(folder / "queries.npy")
    data["batch_size"] = 2
    (folder / "federation.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / "federation.yaml"


API_RUN = """
import sys

from mpc_fi import Federation

if __name__ == "__main__":
    Federation(sys.argv[1], run_dir=sys.argv[2], timeout_s=300).run()
"""


@pytest.mark.parametrize("how, sig", [
    ("cli", signal.SIGKILL), pytest.param("cli", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("api", signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("api", signal.SIGTERM, marks=pytest.mark.slow)],
    ids=["cli-sigkill", "cli-sigterm", "api-sigkill", "api-sigterm"])
def test_the_federation_never_outlives_its_launcher(long_federation, tmp_path, how, sig):
    run_dir = tmp_path / "run"
    if how == "cli":
        cmd = [MPC_FI, "run", "--federation", str(long_federation), "--run-dir", str(run_dir),
               "--timeout", "300"]
    else:  # a Python program inside Federation.run
        (tmp_path / "api_run.py").write_text(API_RUN)
        cmd = [sys.executable, str(tmp_path / "api_run.py"), str(long_federation), str(run_dir)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    querier_log = run_dir / "party-2-querier.log"
    if not wait_for_line(querier_log, r"batch 2/120 done", 180):
        proc.kill()
        pytest.fail("the parties never got going: " + proc.communicate()[1][-2000:])
    assert len(session_members(proc.pid)) >= 6  # launcher, fork server, 4 parties
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # the launcher stopped the parties itself, then left with 128 + SIGTERM
        assert proc.returncode == 143, err
        if how == "cli":
            assert "terminated (SIGTERM); every party was stopped" in err
    # Every party and the fork server leave within seconds (10 s asked; generous hang guard).
    deadline = time.monotonic() + 30
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(proc.pid) == []
    pids = logged_pids(run_dir)
    assert len(pids) == 4 and not any(alive(pid) for pid in pids.values())
    # They stopped; they did not finish the run.
    assert "batch 120/120" not in querier_log.read_text()
    assert not list(run_dir.glob("result-*.npz"))
