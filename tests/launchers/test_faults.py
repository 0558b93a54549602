"""Kill each role at each phase, from the outside, and check the run fails cleanly.

Faults are injected only from outside the library: the test watches a party log for the line
that opens a phase and sends SIGKILL to the target process right away (polling every 2 ms).
Each case must: not hang, raise :class:`PartyFailedError` naming the killed party, return no
result (even when the querier already holds its labels), and leave no party process behind.

Phases and the line that opens each (watched in the target's own log; the dealer logs no
phases, so for it owner0's log is watched):

* ``setup``: "handshake ok" (models loading, classes agreed);
* ``sharing`` (full mode): "protocol ... mode full" (owners secret-share their weights next);
* ``inference``: "batch 1/N done" (aggregation of batch 2 on shares is under way);
* ``reveal``: the querier's final "batch N/N done": the querier has opened its labels and the
  parties are closing the session. A run that dies here must still not be reported as a success.

The whole matrix (3 roles x 4 phases, about 2 s a case) is part of the default run.
"""

from __future__ import annotations

import os
import signal

import pytest

from fedkit import alive, logged_pids, wait_for_line
from launchers import LocalLauncher
from mpc_fi.config import FederationConfig
from mpc_fi.errors import PartyFailedError

ROLES = {"owner": "owner1", "querier": "querier", "dealer": "dealer"}
PHASES = {
    "setup": ("output", r"handshake ok"),
    "sharing": ("full", r"protocol \S+, \d+ classes, mode full"),
    "inference": ("output", r"batch 1/\d+ done"),
    "reveal": ("output", r"batch (\d+)/\1 done"),
}


def kill_at(federation: FederationConfig, run_dir, target: str, phase: str) -> tuple:
    """Run the federation, SIGKILL ``target`` when ``phase`` opens; return (error, launcher)."""
    names = federation.party_names
    watch = "querier" if phase == "reveal" else (target if target != "dealer" else names[0])
    launcher = LocalLauncher(federation, run_dir=run_dir, timeout_s=180, stop_grace_s=3)
    launcher.start()
    try:
        assert wait_for_line(launcher.log_path(names.index(watch)), PHASES[phase][1], 120), \
            f"{watch} never reached {phase}"
        proc = launcher.procs[names.index(target)]
        os.kill(proc.pid, signal.SIGKILL)
        try:
            launcher.wait()
        except PartyFailedError as exc:
            return exc, launcher
        return None, launcher
    finally:
        launcher.terminate()


def check_fault(request, role: str, phase: str, tmp_path) -> None:
    mode = PHASES[phase][0]
    path, _ = request.getfixturevalue("full_federation" if mode == "full" else "small_federation")
    fed = FederationConfig.load(path)
    target = ROLES[role]
    for attempt in range(2):  # a kill at "reveal" can lose the race with a fast exit: once more
        run_dir = tmp_path / f"attempt{attempt}"
        error, launcher = kill_at(fed, run_dir, target, phase)
        if launcher.procs[fed.party_names.index(target)].exitcode == -signal.SIGKILL:
            break
    assert launcher.procs[fed.party_names.index(target)].exitcode == -signal.SIGKILL, \
        "the target finished before the kill landed, twice"
    assert error is not None, "a run with a killed party was reported as a success"
    # The run's own 180 s timeout is only a hang guard: the error below names the killed party,
    # which the timeout would not (no wall-clock assertion).
    assert error.party == target, str(error)
    assert f"party {target} (rank {fed.party_names.index(target)}, {role}) was killed by " \
           f"signal 9" in str(error)
    assert not any(p.is_alive() for p in launcher.procs)
    pids = logged_pids(run_dir)
    assert pids and not any(alive(pid) for pid in pids.values())


#: One owner killed during set-up and the dealer killed at the opening run by default; the rest
#: of the 3 roles x 4 phases under -m slow (make test-all).
DEFAULT = {("owner", "setup"), ("dealer", "reveal")}
MATRIX = [pytest.param(r, p, marks=() if (r, p) in DEFAULT else pytest.mark.slow)
          for r in ROLES for p in PHASES]


@pytest.mark.parametrize("role, phase", MATRIX)
def test_kill(request, role, phase, tmp_path):
    check_fault(request, role, phase, tmp_path)
