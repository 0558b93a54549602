"""Served sessions: long-lived parties that answer many requests (mpc_fi.serve).

Locally through ``Federation(cfg).start()``; one process per party through ``mpc-fi serve`` and
``mpc-fi ask``. Checked: every answer equals the plaintext twin and the one-shot run; set-up
happens once (models loaded, full-mode weights shared once); a request every party refuses ends
that request only; a party that stops ends the session with an error naming it, the others wait
for it (requests are refused, naming it) and a restarted party rejoins them; SIGTERM to the
querier finishes and stops every party cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedkit import free_port, with_identities, with_network
from mpc_fi import Federation, connect
from mpc_fi.errors import InputError, PartyFailedError, ProtocolError

MPC_FI = str(Path(sys.executable).with_name("mpc-fi"))


def test_a_local_session_answers_many_requests_like_one_shot_runs(small_federation, tmp_path):
    path, twin = small_federation
    x = np.load(Path(path).parent / "queries.npy")
    one_shot = Federation(path).predict(x[:5])
    with Federation(path, run_dir=tmp_path / "run").start() as fed:
        health = fed.health()
        assert health["status"] == "ready" and health["parties"][-1] == "dealer"
        for _ in range(3):
            np.testing.assert_array_equal(fed.predict(x), twin)
        # 100 calls of every size, some repeated (prefetched dealer material) and some not.
        for k in range(100):
            rows = slice(k % 17, k % 17 + 1 + (k // 2) % 8)
            np.testing.assert_array_equal(fed.predict(x[rows]), twin[rows])
        np.testing.assert_array_equal(fed.predict(x[:5]), one_shot)
        np.testing.assert_array_equal(fed.predict(x[7:8]), twin[7:8])
        # Refused by everyone alike: this request fails, the session goes on.
        with pytest.raises(InputError, match="shape"):
            fed.predict(x[:, :10])
        with pytest.raises(InputError, match="NaN"):
            fed.predict(np.full_like(x[:2], np.nan))
        with pytest.raises(ProtocolError, match="reveal: scores"):
            fed.predict_proba(x[:2])
        np.testing.assert_array_equal(fed.predict(x[:4]), twin[:4])
        assert fed.health()["requests"] == 106
    # Each owner loaded its model once for the whole session.
    log = (tmp_path / "run" / "party-0-owner0.log").read_text()
    assert log.count("loaded own model") == 1
    assert "served 106 request(s)" in log
    assert not list(tmp_path.glob("run/error-*"))


@pytest.mark.slow  # it idles past network.timeout_s on purpose
def test_a_session_idle_longer_than_network_timeout_still_answers(small_federation, tmp_path):
    """Between requests every party (the dealer too) waits without a deadline; inside a
    request network.timeout_s still bounds each wait."""
    path, twin = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", timeout_s=2)
    x = np.load(Path(path).parent / "queries.npy")
    with Federation(fed, run_dir=tmp_path / "run").start() as served:
        np.testing.assert_array_equal(served.predict(x[:3]), twin[:3])
        time.sleep(5)  # idle for more than twice network.timeout_s
        np.testing.assert_array_equal(served.predict(x), twin)


def test_full_mode_shares_the_weights_once(full_federation, tmp_path):
    path, twin = full_federation
    x = np.load(Path(path).parent / "queries.npy")
    with Federation(path, run_dir=tmp_path / "run").start() as fed:
        np.testing.assert_array_equal(fed.predict(x), twin)
        np.testing.assert_array_equal(fed.predict(x[:3]), twin[:3])
    log = (tmp_path / "run" / "party-1-owner1.log").read_text()
    assert log.count("owners' parameters secret-shared") == 1


@pytest.mark.slow  # by default: test_a_killed_owner_is_named_until_it_is_restarted_and_rejoins
def test_an_owner_that_stops_ends_the_session_with_its_name(small_federation, tmp_path):
    path, twin = small_federation
    x = np.load(Path(path).parent / "queries.npy")
    fed = Federation(path, run_dir=tmp_path / "run").start()
    try:
        np.testing.assert_array_equal(fed.predict(x[:2]), twin[:2])
        victim = fed.launcher.procs[1]  # owner1
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(30)
        with pytest.raises(PartyFailedError, match="owner1"):
            fed.predict(x[:2])
    finally:
        fed.launcher.terminate()
    assert not any(p.is_alive() for p in fed.launcher.procs)


def _ready(fed) -> None:
    """Wait until the served federation has re-formed (every party joined)."""
    _wait_until(lambda: _health_or_none(fed) == "ready")


def test_a_killed_owner_is_named_until_it_is_restarted_and_rejoins(small_federation, tmp_path):
    path, twin = small_federation
    x = np.load(Path(path).parent / "queries.npy")
    with Federation(path, run_dir=tmp_path / "run").start() as fed:
        np.testing.assert_array_equal(fed.predict(x[:2]), twin[:2])
        victim = fed.launcher.procs[1]  # owner1, mid-session
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(30)
        with pytest.raises(PartyFailedError, match="owner1"):
            fed.predict(x[:2])  # the request in flight fails, naming the lost party
        # The others left that session and wait for owner1: every request names it.
        for _ in range(2):
            with pytest.raises(PartyFailedError, match="owner1"):
                fed.predict(x[:2])
        fed.launcher.restart("owner1")
        _ready(fed)
        np.testing.assert_array_equal(fed.predict(x), twin)
        np.testing.assert_array_equal(fed.predict(x[3:9]), twin[3:9])
        assert fed.launcher.rejoins == {0: 1, 2: 1, 3: 1}  # owner0, querier, dealer
    assert not any(p.is_alive() for p in fed.launcher.procs)
    log = (tmp_path / "run" / "party-0-owner0.log").read_text()
    assert "SessionLost" in log and "owner1 (rank 1)" in log


def _serve(fed: Path, name: str, tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([MPC_FI, "serve", "--federation", str(fed), "--party", name,
                             "--run-dir", str(tmp_path / name), "--socket",
                             str(tmp_path / "q.sock"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_mpc_fi_serve_per_host_with_identities_answers_and_stops(small_federation, tmp_path):
    path, twin = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=60)
    fed = with_identities(fed, fed, tmp_path / "keys")
    names = ["owner0", "owner1", "querier", "dealer"]
    procs = {n: _serve(fed, n, tmp_path) for n in names}
    try:
        x = np.load(Path(path).parent / "queries.npy")
        with connect(tmp_path / "q.sock", wait_s=120, timeout_s=120) as client:
            np.testing.assert_array_equal(client.predict(x), twin)
            np.testing.assert_array_equal(client.predict(x[3:9]), twin[3:9])
        np.save(tmp_path / "few.npy", x[:4])
        asked = subprocess.run([MPC_FI, "ask", "--socket", str(tmp_path / "q.sock"),
                                str(tmp_path / "few.npy"), "--output",
                                str(tmp_path / "labels.npy")],
                               capture_output=True, text=True, timeout=120)
        assert asked.returncode == 0, asked.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), twin[:4])
        # SIGTERM to the querier: it finishes and tells every party to stop.
        procs["querier"].send_signal(signal.SIGTERM)
        outs = {n: p.communicate(timeout=120) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert {n: p.returncode for n, p in procs.items()} == dict.fromkeys(names, 0), \
        {n: o[1][-1500:] for n, o in outs.items()}
    assert "served 3 request(s)" in outs["querier"][1]
    assert "transport curve" in outs["owner0"][1]
    assert not (tmp_path / "q.sock").exists()


@pytest.mark.slow
def test_mpc_fi_serve_parties_rejoin_a_restarted_owner(small_federation, tmp_path):
    """One process per party: owner1 is killed; the querier's next answer names it, the others
    re-execute themselves into a new session and wait; owner1 started again (same command)
    rejoins, and the session answers again."""
    path, twin = small_federation
    fed = with_network(path, tmp_path / "fed.yaml", port=free_port(), timeout_s=60)
    names = ["owner0", "owner1", "querier", "dealer"]
    procs = {n: _serve(fed, n, tmp_path) for n in names}
    outs: dict[str, tuple[str, str]] = {}
    try:
        x = np.load(Path(path).parent / "queries.npy")
        with connect(tmp_path / "q.sock", wait_s=120, timeout_s=120) as client:
            _ready(client)
            np.testing.assert_array_equal(client.predict(x[:4]), twin[:4])
            pid = procs["owner1"].pid
            procs["owner1"].kill()
            outs["owner1 (killed)"] = procs["owner1"].communicate(timeout=60)
            with pytest.raises(PartyFailedError, match="owner1"):
                client.predict(x[:4])
            _wait_until(lambda: "waiting" == _health_or_none(client))
            with pytest.raises(PartyFailedError, match="waiting for owner1"):
                client.predict(x[:4])
            # The survivors are the same processes (re-executed), not new ones.
            assert all(p.poll() is None for n, p in procs.items() if n != "owner1")
            procs["owner1"] = _serve(fed, "owner1", tmp_path)
            assert procs["owner1"].pid != pid
            _ready(client)
            np.testing.assert_array_equal(client.predict(x), twin)
            # SIGTERM to owner1 in the middle of a large request: the request fails naming it
            # (or had finished), nobody hangs: the others wait, and stop ends them all.
            big = np.tile(x, (400, 1))
            threading.Timer(0.2, procs["owner1"].send_signal, (signal.SIGTERM,)).start()
            try:
                np.testing.assert_array_equal(client.predict(big), np.tile(twin, 400))
            except PartyFailedError as exc:
                assert "owner1" in str(exc)
            assert procs["owner1"].wait(300) == 143  # 300 s: a hang guard
            # Stop once every other party waits at the rendezvous: all of them stop.
            _wait_until(lambda: _missing(client) == ["owner1 (rank 1, owner)"])
            client.stop()
        outs.update({n: p.communicate(timeout=120) for n, p in procs.items()})
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert {n: p.returncode for n, p in procs.items()} == {**dict.fromkeys(names, 0),
                                                           "owner1": 143}, \
        {n: o[1][-1500:] for n, o in outs.items()}
    assert "owner1 (rank 1) closed its connection" in outs["owner0"][1]
    assert "stopped while waiting for the parties" in outs["dealer"][1]


def _health_or_none(client) -> str | None:
    try:
        return client.health()["status"]
    except PartyFailedError:
        return None


def _missing(client) -> list[str] | None:
    try:
        return client.health().get("missing")
    except PartyFailedError:
        return None


def _wait_until(condition, wait_s: float = 300.0) -> None:  # a hang guard
    deadline = time.monotonic() + wait_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.2)


def test_an_impostor_knocking_on_a_served_party_is_refused_and_the_session_stays_up(
        small_federation, tmp_path):
    """A process with its own key pair connects to owner0's channel (whose public key it knows)
    during a served session: the handshake refuses it, owner0 logs the refusal, and the
    session answers as before."""
    import zmq

    from fedkit import listening
    from mpc_fi import keys

    path, twin = small_federation
    fed = with_identities(path, tmp_path / "fed.yaml", tmp_path / "keys")
    x = np.load(Path(path).parent / "queries.npy")
    with Federation(fed, run_dir=tmp_path / "run").start() as served:
        np.testing.assert_array_equal(served.predict(x[:4]), twin[:4])
        owner0 = served.launcher.procs[0].pid
        ports = [port for _, port in listening(pids=[owner0])]
        public, secret = keys.ephemeral_pair()
        server_key = keys.read_public(str(tmp_path / "keys" / "owner0.key"))
        ctx = zmq.Context()
        try:
            for port in ports:
                sock = ctx.socket(zmq.DEALER)
                sock.curve_publickey, sock.curve_secretkey = public.encode(), secret.encode()
                sock.curve_serverkey = server_key.encode()
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://127.0.0.1:{port}")
                sock.send_multipart([b"MPF1" + b"\0" * 36, b"\0" * 64])
                assert sock.poll(1000) == 0  # nothing comes back
                sock.close()
        finally:
            ctx.term()
        np.testing.assert_array_equal(served.predict(x), twin)
        assert served.health()["requests"] == 2
    log = (tmp_path / "run" / "party-0-owner0.log").read_text()
    assert "refused a connection" in log
