"""Real multi-host runs on one machine: every party in its own network namespace.

Each party runs the real entry point, ``ip netns exec <ns> mpc-fi party --federation F --party
NAME``, and the parties meet at rank 0's namespace address (``10.231.0.1``, plaintext
acknowledged). Part of the default run (select alone with ``-m netns``); skipped, with the
reason in pytest's summary, when namespaces cannot be created (not root, no iproute2, not
Linux). Namespaces are removed in the fixtures' teardown, also on failure.
"""

from __future__ import annotations


import numpy as np
import pytest

from fedkit import wait_for_line
from measure_links import PROFILES, measure
from multihost import federation_for, party_names, querier_labels, start_parties
from netns import Topology, shaper_unavailable_reason, unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")]


@pytest.fixture
def hosts():
    """``hosts(n, **kw)`` builds a topology; every one built is torn down after the test."""
    built: list[Topology] = []

    def make(n: int, **kwargs) -> Topology:
        built.append(Topology(n, **kwargs))
        return built[-1]

    yield make
    for topo in built:
        topo.close()


@pytest.mark.parametrize("transport", ["curve", "zmq", "gloo"])
def test_one_party_per_namespace_matches_local_run_and_plaintext_twin(small_federation, hosts,
                                                                      tmp_path, transport):
    """Between namespaces: with identities (curve, no acknowledgement needed) and with each
    plaintext transport on the acknowledged test network."""
    from mpc_fi.federation import Federation  # noqa: PLC0415

    path, twin = small_federation
    names = party_names(path)
    topo = hosts(len(names))
    fed = federation_for(topo, path, tmp_path / "fed.yaml", timeout_s=60, transport=transport)
    run = start_parties(topo, fed, tmp_path / "run", names)
    codes = run.wait(400)
    assert codes == dict.fromkeys(names, 0), {n: run.outputs[n][1][-2000:] for n in names}
    labels = querier_labels(run.outputs["querier"][0])
    local = Federation(path, run_dir=tmp_path / "local").predict()
    np.testing.assert_array_equal(labels, twin)
    np.testing.assert_array_equal(labels, local)
    # Each party met at rank 0's namespace address, over the transport asked for.
    for k, name in enumerate(names):
        assert f"rendezvous tcp://{topo.address(0)}:" in run.outputs[name][1]
        assert f"transport {transport}" in run.outputs[name][1]
        cost = run.result(name)["cost"]
        assert cost["party"] == name and cost["wall_s"] > 0
    for k in range(len(names)):
        assert topo.pids(k) == []


def test_unreachable_rendezvous_host_fails_within_the_timeout(small_federation, hosts, tmp_path):
    path, _ = small_federation
    names = party_names(path)
    topo = hosts(len(names))
    topo.set_link(0, up=False)  # owner0's host (the rendezvous) drops off the network
    fed = federation_for(topo, path, tmp_path / "fed.yaml", timeout_s=4)
    run = start_parties(topo, fed, tmp_path / "run", names, only=["querier"])
    codes = run.wait(300)
    err = run.outputs["querier"][1]
    # network.timeout_s (4 s) ended it, as the message says; not the test's hang guard.
    assert "waited 4 s for the rendezvous" in err, err
    assert "PartyFailedError" in run.log("querier").read_text()
    assert codes == {"querier": 7}, err
    assert f"{topo.address(0)}:29500" in err and "owner0 (rank 0, owner)" in err
    assert "could not reach it" in err


def test_a_missing_host_is_named_by_everyone(small_federation, hosts, tmp_path):
    path, _ = small_federation
    names = party_names(path)
    topo = hosts(len(names))
    fed = federation_for(topo, path, tmp_path / "fed.yaml", timeout_s=4)
    present = [n for n in names if n != "owner1"]
    run = start_parties(topo, fed, tmp_path / "run", names, only=present)
    codes = run.wait(300)
    assert codes == dict.fromkeys(present, 7)
    for name in present:
        assert "owner1 (rank 1, owner)" in run.outputs[name][1], run.outputs[name][1]
        assert run.result(name) is None


@pytest.mark.parametrize("victim", ["querier", "owner1"])
def test_a_link_dropping_mid_run_fails_everyone_cleanly(small_federation, hosts, tmp_path, victim):
    path, _ = small_federation
    names = party_names(path)
    topo = hosts(len(names))
    fed = federation_for(topo, path, tmp_path / "fed.yaml", timeout_s=5)
    run = start_parties(topo, fed, tmp_path / "run", names)
    assert wait_for_line(run.log(victim), r"batch 1/\d+ done", 120), run.wait(1)
    topo.set_link(names.index(victim), up=False)
    codes = run.wait(300)
    assert all(code == 7 for code in codes.values()), \
        (codes, {n: run.outputs[n][1][-3000:] for n in names if codes[n] != 7})
    # Each party gave up through the channels' bound (network.timeout_s) or a closed connection,
    # as its error says; the test's 300 s wait is only a hang guard (no wall-clock assertion).
    for name in names:
        err = run.outputs[name][1]
        assert any(why in err for why in ("within network.timeout_s", "(network.timeout_s)",
                                          "lost the connection", "lost its connection",
                                          "closed its connection", "never arrived")), \
            (name, err[-2000:])
    assert querier_labels(run.outputs["querier"][0]) is None  # no partial result
    assert run.result("querier") is None
    for name in names:
        assert "PartyFailedError" in run.outputs[name][1]
        assert f"party {name} (rank {names.index(name)}" in run.outputs[name][1]
    for k in range(len(names)):
        assert topo.pids(k) == []


@pytest.mark.skipif(REASON is None and shaper_unavailable_reason() is not None,
                    reason=f"link shaping: {REASON or shaper_unavailable_reason()}")
def test_an_emulated_wan_link_costs_time_not_rounds(small_federation, tmp_path):
    path, twin = small_federation
    native = measure("native", path, list(twin), tmp_path)
    wan = measure("wan-10", path, list(twin), tmp_path)  # 10 ms RTT, 100 Mbit/s
    assert wan["rounds"] == native["rounds"] and wan["bytes"] == native["bytes"]
    # A lower bound only (load can only add time): each of the querier's collectives waits for
    # its peers' data of that round, which crosses an emulated link (5 ms one way) after they
    # finished the round before; half of that is counted.
    one_way_s = PROFILES["wan-10"].rtt_ms / 2 / 1000
    assert wan["infer_s"] >= 0.5 * wan["rounds"]["querier"] * one_way_s
