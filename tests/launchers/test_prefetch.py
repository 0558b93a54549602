"""The dealer's material prepared between calls of a served session (:mod:`mpc_fi.prefetch`).

Calls that repeat the previous call's requests take every piece of dealer material from the
package; a call that differs (another batch size) leaves the package at its first different
request and asks online; answers equal the plaintext twin either way, and the wire audit
regenerates every mask any party used, from the package regions and the main streams alike,
with no piece of material used twice.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from launchers import LocalLauncher
from mpc_fi import audit, connect, prefetch, wire
from mpc_fi.config import FederationConfig
from mpc_fi.errors import ProtocolError, WireFormatError


def _counts(log: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(
        r"dealer material: (\d+) request\(s\) from the prefetched package, (\d+) online", log)]


@pytest.mark.parametrize("federation", ["small_federation",
                                        pytest.param("full_federation", marks=pytest.mark.slow)])
def test_prefetched_calls_answer_like_online_ones_and_every_mask_is_fresh(federation, request,
                                                                         tmp_path):
    path, twin = request.getfixturevalue(federation)
    x = np.load(Path(path).parent / "queries.npy")
    fed = FederationConfig.load(path)
    run_dir = tmp_path / "run"
    launcher = LocalLauncher(fed, run_dir=run_dir, audit=True, timeout_s=300,
                             serve_socket=str(tmp_path / "q.sock"))
    launcher.start()
    try:
        with connect(tmp_path / "q.sock", wait_s=120, timeout_s=300) as client:
            calls = [x[:8], x[:8], x[:8], x[:3], x[:3], x[:8]]
            for batch in calls:
                np.testing.assert_array_equal(client.predict(batch), twin[:len(batch)])
            client.stop()
        launcher.finish()
    finally:
        launcher.terminate()
    counts = _counts((run_dir / "party-0-owner0.log").read_text())
    assert len(counts) == len(calls)
    assert counts[0][0] == 0 and counts[0][1] > 0  # the first call: all online
    per_call = counts[0][1]
    # Same batch as the call before: everything from the package.
    assert counts[1] == (per_call, 0) and counts[2] == (per_call, 0)
    # Another batch size: the package is left at the first different request.
    assert counts[3][1] > 0 and sum(counts[3]) > 0
    assert counts[4][1] == 0 and counts[4][0] > 0
    assert counts[5][1] > 0  # back to 8 rows: the package was made for 3
    logs = {r: audit.load(str(run_dir / f"audit-{r}.npz")) for r in range(len(fed.party_names))}
    assert audit.verify(logs, querier=fed.querier_rank, mode=fed.mode,
                        dealer=len(fed.party_names) - 1) == []
    # The calls that left a package drew from the main stream, and the audit knows where.
    assert all(len(logs[r].relocations) == 2 for r in range(fed.querier_rank + 1))


@pytest.mark.parametrize("federation", ["full_federation",
                                        pytest.param("small_federation", marks=pytest.mark.slow)])
def test_a_one_shot_run_rehearses_each_batch_shape_and_asks_the_dealer_once_per_batch(
        federation, request, tmp_path):
    """Batches of 6, 6 and 4 rows: the first and the last are rehearsed, the second reuses the
    first's recipe; every request comes from a package, answers equal the twin, the audit
    regenerates every mask (the dealer's corrections went to every party in turn), and party 0
    makes far fewer rounds than when it asks online."""
    path, twin = request.getfixturevalue(federation)
    x = np.load(Path(path).parent / "queries.npy")[:16]
    fed = dataclasses.replace(FederationConfig.load(path), batch_size=6)
    results, logs = {}, {}
    for on in (True, False):
        run_dir = tmp_path / f"run-{on}"
        network = dataclasses.replace(fed.network, prefetch=on)
        launcher = LocalLauncher(dataclasses.replace(fed, network=network),
                                 run_dir=run_dir, audit=True, timeout_s=300)
        results[on] = launcher.run(query=x)
        logs[on] = (run_dir / "party-0-owner0.log").read_text()
        np.testing.assert_array_equal(results[on][fed.querier_rank]["labels"], twin[:16])
        audits = {r: audit.load(str(run_dir / f"audit-{r}.npz"))
                  for r in range(len(fed.party_names))}
        assert audit.verify(audits, querier=fed.querier_rank, mode=fed.mode,
                            dealer=len(fed.party_names) - 1) == []
    counts = _counts(logs[True])
    assert len(counts) == 3 and all(online == 0 and used > 0 for used, online in counts)
    assert counts[0] == counts[1] and counts[2][0] == counts[0][0]  # same requests, fewer rows
    assert _counts(logs[False]) == []
    rounds = {on: results[on][0]["cost"]["rounds"] for on in (True, False)}
    others = results[True][1]["cost"]["rounds"]
    # the other parties receive their part of each batch's package: one message per batch
    assert results[False][1]["cost"]["rounds"] <= others <= results[False][1]["cost"]["rounds"] + 3
    assert rounds[True] <= others + 12 < rounds[False]


def test_a_rehearsal_sends_nothing_draws_nothing_and_leaves_the_audit_as_it_was():
    """In one process: the rehearsal of a shared computation returns its dealer requests, with
    no message, no stream moved and no audit record left; a step that sends a point-to-point
    message (something a rehearsal cannot imitate) gives no recipe."""
    from launchers.local import run_functions  # noqa: PLC0415

    out = run_functions(_rehearse_in_party, [None, None], timeout_s=120)
    for got in out:
        assert got["recipe"] > 0 and got["refused"] is None
        assert got["moved"] == [] and got["rounds"] == 0 and got["audit_same"]


def _rehearse_in_party(rank, _):
    from mpc_fi._crypten import load_crypten  # noqa: PLC0415

    crypten = load_crypten()
    comm = crypten.communicator.get()
    generators = {f"{k}-{d}": g for k, gs in crypten.generators.items() for d, g in gs.items()}
    client = crypten.mpc.provider.ttp_provider.TTPClient.get()
    generators["dealer"] = client.generator
    before = {k: g.offset for k, g in generators.items()}
    stats = comm.get_communication_stats()["rounds"]
    mark = audit.mark()

    def step():
        x = crypten.cryptensor(torch.ones(4, 3, dtype=torch.float64), src=0)
        return ((x * x).relu().sum().get_plain_text(dst=1))

    recipe, _ = prefetch.rehearse(step, crypten)
    moved = [k for k, g in generators.items() if g.offset != before[k]]

    def talks():
        crypten.communicator.get().send(torch.zeros(1), 1 - rank)

    return {"recipe": len(recipe), "refused": prefetch.rehearse(talks, crypten)[0],
            "moved": moved, "rounds": comm.get_communication_stats()["rounds"] - stats,
            "audit_same": audit.mark() == mark}


def _request(function="additive", args=((4, 3), (3, 2), "matmul"), kwargs=None):
    return {"function": function, "args": [a if isinstance(a, str) else list(a) for a in args],
            "kwargs": kwargs or {}}


def _prefetch(number, kinds, order, holders=None):
    return {"function": "prefetch", "device": "cpu",
            "args": [number, kinds, order, [0] * len(order) if holders is None else holders],
            "kwargs": {}}


def test_the_dealer_checks_a_prefetch_request_like_any_other():
    ok = wire.TTP_REQUEST.check(_prefetch(3, [_request(), _request("B2A", ((7,),))], [0, 1, 1, 0],
                                          [0, 1, 2, 0]))
    assert ok["args"][0] == 3 and ok["args"][2] == (0, 1, 1, 0) and ok["args"][3] == (0, 1, 2, 0)
    assert wire.result_size(*(ok["args"][1][0][k] for k in ("function", "args", "kwargs"))) \
        == (4, 2)
    bad = {
        "an index past the requests": _prefetch(1, [_request()], [0, 1]),
        "an unknown function": _prefetch(1, [_request("decrypt", ((1,),))], [0]),
        "shapes that do not multiply": _prefetch(1, [_request(args=((4, 3), (2, 2), "matmul"))],
                                                 [0]),
        "package number 0": _prefetch(0, [_request()], [0]),
        "more than MAX_ELEMENTS": _prefetch(1, [_request("square", ((1 << 14, 1 << 14),))],
                                            [0, 0]),
        "keyword arguments": {**_prefetch(1, [_request()], [0]), "kwargs": {"x": 1}},
        "fewer holders than requests": _prefetch(1, [_request()], [0, 0], [0]),
        "a holder past any party": _prefetch(1, [_request()], [0], [5000]),
    }
    for why, message in bad.items():
        try:
            wire.TTP_REQUEST.check(message)
        except WireFormatError:
            continue
        pytest.fail(f"accepted a prefetch request with {why}")


def test_a_region_of_the_dealer_streams_serves_one_package_only(monkeypatch):
    """The dealer draws a package from its own region of every stream, restores the main
    positions, hands each party the corrections it holds, and refuses a region twice. Every
    entry adds up: the holder's correction plus the other parties' draws is the product."""
    from mpc_fi.csprng import CSPRNG

    class Server:  # the part of CrypTen's TTPServer that prefetch uses
        generators = [CSPRNG(bytes(32), purpose="dealer"), CSPRNG(bytes([1]) * 32,
                                                                   purpose="dealer")]
        device = "cpu"

    sent = {}
    monkeypatch.setattr(prefetch, "_send_portion", lambda t, rank: sent.setdefault(rank, t))
    server = Server()
    server.generators[0].ring((5,))
    kinds = ({"function": "square", "args": ((3,),), "kwargs": {}},)
    recipe = [("square", ((3,),), ())] * 2
    assert prefetch.holders(recipe, 2) == [1, 0]  # one entry each, the last rank first
    assert prefetch.holders(recipe, 2, initial=[0, 7]) == [0, 0]  # party 1 gathers more
    first = prefetch._server_prefetch(server, 2, kinds, (0, 0), (1, 0))
    assert [g.offset for g in server.generators] == [40, 0]  # main positions restored
    assert first.shape == (3,) and sent[1].shape == (3,)
    region = [g.at(2 << prefetch.REGION_BITS) for g in server.generators]
    # entry 0 (held by party 1): both draw r; party 0 also draws its r2 share
    r = region[0].ring((3,)) + region[1].ring((3,))
    assert torch.equal(sent[1] + region[0].ring((3,)), r * r)
    # entry 1 (held by party 0): both draw r; party 1 draws its r2 share
    r = region[0].ring((3,)) + region[1].ring((3,))
    assert torch.equal(first + region[1].ring((3,)), r * r)
    with pytest.raises(ProtocolError, match="used once"):
        prefetch._server_prefetch(server, 2, kinds, (0,), (0,))
    with pytest.raises(ProtocolError, match="holders outside"):
        prefetch._server_prefetch(server, 3, kinds, (0,), (2,))

def test_a_recipe_larger_than_a_package_is_prefetched_up_to_the_limit(monkeypatch):
    """The first requests that fit one package are prefetched; the rest go online."""

    class Comm:
        @staticmethod
        def get_world_size():
            return 3

    monkeypatch.setattr(prefetch, "MAX_PACKAGE_ELEMENTS", 100)
    monkeypatch.setattr(prefetch, "CHUNK_ELEMENTS", 60)
    state = prefetch.Prefetcher(rank=1, client=None, comm=Comm())
    recipe = [("wraps", ((30,),), ())] * 5  # 150 elements in all
    assert state.prepare(recipe)
    # 90 elements prefetched, in packages of at most 60: numbered in order, holders spread
    assert [p.recipe for p in state.queued] == [recipe[:2], recipe[2:3]]
    assert [p.number for p in state.queued] == [1, 2]
    assert sorted(h for p in state.queued for h in p.holders) == [0, 1, 2]
    assert not prefetch.Prefetcher(rank=1, client=None, comm=Comm()).prepare(
        [("wraps", ((200,),), ())])


def _chunked_party(rank, chunk):
    """One batch of a small softmax-and-argmax on shares, its dealer material prefetched in
    packages of at most ``chunk`` elements (several of them), then the same batch online."""
    from mpc_fi import secure  # noqa: PLC0415
    from mpc_fi._crypten import load_crypten  # noqa: PLC0415

    crypten = load_crypten()
    prefetch.CHUNK_ELEMENTS = chunk
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(6, 10)) * 3)

    def step():
        shared = crypten.cryptensor(x, src=0)
        return secure.argmax_index(secure.softmax(shared, -1), 10).get_plain_text(dst=2)

    client = crypten.mpc.provider.ttp_provider.TTPClient.get()
    state = prefetch.Prefetcher(rank, client, crypten.communicator.get())
    prefetch._CURRENT = state
    recipe, gathers = prefetch.rehearse(step, crypten)
    assert state.prepare(recipe, gathers)
    packages = len(state.queued)
    state.begin_call()
    labels = step()
    state.end_call(ok=True, ask=False)
    used, online = state.from_package, state.online
    prefetch.stop()
    again = step()
    return {"labels": None if labels is None else labels.numpy(),
            "again": None if again is None else again.numpy(), "packages": packages,
            "used": used, "online": online, "recipe": len(recipe)}


def test_a_batch_draws_from_several_packages_in_turn(mpc, tmp_path):
    """With small packages the batch's material comes in several, one after another (each from
    its own region); labels are right, nothing goes online, and the wire audit still
    regenerates every mask (the switch from one package to the next is recorded)."""
    out = mpc(_chunked_party, 3, 500, audit_dir=tmp_path)
    want = np.argmax(np.random.default_rng(3).normal(size=(6, 10)), axis=1)
    for r in out:
        assert r["packages"] > 2 and r["online"] == 0 and r["used"] == r["recipe"]
    np.testing.assert_array_equal(out[2]["labels"], want)  # opened at the querier (rank 2)
    np.testing.assert_array_equal(out[2]["again"], want)
    logs = {r: audit.load(str(tmp_path / f"audit-{r}.npz")) for r in range(4)}
    assert audit.verify(logs, querier=2, dealer=3) == []
    assert all(len(logs[r].relocations) >= out[r]["packages"] - 1 for r in range(3))
