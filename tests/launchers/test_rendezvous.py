"""The bounded, named rendezvous: who is missing, unreachable hosts, timeouts on every group."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from fedkit import free_port, listening
from launchers import rendezvous
from mpc_fi.config import FederationConfig, ModelSource, OwnerConfig
from mpc_fi.errors import PartyFailedError


def federation(owners: int = 2, **kwargs) -> FederationConfig:
    """A federation that is never run: model paths need not exist."""
    return FederationConfig(owners=tuple(
        OwnerConfig(name=f"owner{k}", model=ModelSource(factory="mpc_fi.demo:mlp",
                                                        weights=f"/nonexistent/{k}.pt"))
        for k in range(owners)), **kwargs)


def test_roll_call_names_every_missing_party_within_the_timeout():
    fed = federation()
    with pytest.raises(PartyFailedError) as info:
        rendezvous.roll_call(fed, host="127.0.0.1", port=free_port(), rank=0, world_size=4,
                             timeout_s=1.0)
    msg = str(info.value)
    assert "owner0 (rank 0, owner) waited 1 s" in msg
    for who in ("owner1 (rank 1, owner)", "querier (rank 2, querier)", "dealer (rank 3, dealer)"):
        assert who in msg
    assert info.value.party == "owner0"


def test_unreachable_rendezvous_names_host_port_and_the_party_hosting_it():
    fed = federation()
    port = free_port()  # nothing listens there
    with pytest.raises(PartyFailedError) as info:
        rendezvous.roll_call(fed, host="127.0.0.1", port=port, rank=2, world_size=4,
                             timeout_s=1.5)
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "owner0 (rank 0, owner)" in msg
    assert "querier (rank 2, querier) waited 1.5 s" in msg
    assert "connection refused" in msg


def test_rendezvous_host_port_in_use_is_explained():
    fed = federation()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PartyFailedError, match="cannot listen on 127.0.0.1"):
            rendezvous.roll_call(fed, host="127.0.0.1", port=port, rank=0, world_size=4,
                                 timeout_s=1.0)


def test_roll_call_meets_everyone_and_records_peers():
    fed = federation()
    port = free_port()
    out, errors = {}, []

    def party(rank: int) -> None:
        try:
            out[rank] = rendezvous.roll_call(fed, host="127.0.0.1", port=port, rank=rank,
                                             world_size=4, timeout_s=20)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=party, args=(r,)) for r in (3, 1, 0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(out) == [0, 1, 2, 3]
    assert [rendezvous.PEERS[r]["name"] for r in range(4)] == list(fed.party_names)


def test_world_size_must_match_the_federation():
    with pytest.raises(Exception, match="federation has 4"):
        rendezvous.roll_call(federation(), host="127.0.0.1", port=free_port(), rank=0,
                             world_size=3, timeout_s=1)


def test_install_bounds_every_group_and_uses_the_roll_call_store(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(init=kw))
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout, *a, **kw: seen.update(
        group=(ranks, timeout)))
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: (prefix, store))
    monkeypatch.setattr(rendezvous, "roll_call", lambda fed, **kw: ("store", kw))
    fed = federation()
    rendezvous.install(fed, 1, 7.0)
    # What CrypTen calls (distributed_communicator.py): no timeout, a tcp:// init method.
    dist.init_process_group(backend="gloo", init_method="tcp://127.0.0.1:1234", world_size=4,
                            rank=1)
    dist.new_group([0, 1, 2])
    init = seen["init"]
    assert init["timeout"] == timedelta(seconds=7) and init["init_method"] is None
    prefix, (store, kw) = init["store"]
    assert store == "store" and kw["host"] == "127.0.0.1" and kw["port"] == 1234
    assert kw["rank"] == 1 and kw["world_size"] == 4 and kw["timeout_s"] == 7.0
    assert seen["group"] == ([0, 1, 2], timedelta(seconds=7))
    # Another run in the same process (one HostLauncher after another) gets its own settings.
    rendezvous.install(fed, 1, 3.0)
    dist.new_group([0, 1])
    assert seen["group"] == ([0, 1], timedelta(seconds=3))


@pytest.mark.parametrize("text, expected", [
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
     "[10.231.0.3]:14251: Connection reset by peer. This is typically caused by a remote worker "
     "hanging", "lost the connection to owner1 (10.231.0.3) (last step: batch 1/3 done): that "
     "party stopped or its link failed [Read error [10.231.0.3]:14251: Connection reset by peer]"),
    ("[/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 8000ms for recv operation to "
     "complete", "no message from the other parties within network.timeout_s (last step: batch "
     "1/3 done): a peer hung or a link dropped [Timed out waiting 8000ms for recv operation to "
     "complete]"),
])
def test_gloo_errors_are_explained(text, expected, monkeypatch):
    fed = federation()
    monkeypatch.setattr(rendezvous, "PEERS", {0: {"name": "owner0", "address": "10.231.0.1"},
                                              1: {"name": "owner1", "address": "10.231.0.3"}})
    assert rendezvous.explain_failure(fed, 0, RuntimeError(text), "batch 1/3 done") == expected


def test_other_errors_are_left_alone():
    assert rendezvous.explain_failure(federation(), 0, ValueError("timed out"), None) is None
    assert rendezvous.explain_failure(federation(), 0, RuntimeError("shape mismatch"), None) is None


def test_gloo_interface_is_left_to_gloo_on_loopback():
    assert rendezvous.gloo_interface("127.0.0.1", 29500) is None
    assert rendezvous.interface_with_address("127.0.0.1") == "lo"


def this_hosts_address() -> str:
    """A non-loopback IPv4 address of this host (the one its default route uses)."""
    try:
        address = rendezvous.local_address_towards("192.0.2.1", 9)  # UDP connect: sends nothing
    except OSError:
        pytest.skip("no IPv4 route out of this host")
    if rendezvous.is_loopback(address):
        pytest.skip("this host has no non-loopback IPv4 address")
    return address


@pytest.mark.parametrize("kind", ["loopback", "ipv4"])
def test_the_rendezvous_store_listens_on_the_configured_address_only(kind):
    fed = federation()
    host = "127.0.0.1" if kind == "loopback" else this_hosts_address()
    port = free_port(host)
    stores, errors = {}, []

    def party(rank: int) -> None:
        try:
            stores[rank] = rendezvous.roll_call(fed, host=host, port=port, rank=rank,
                                                world_size=4, timeout_s=20)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=party, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(stores) == [0, 1, 2, 3]
    # TCPStore left to itself listens on [::] (every interface, IPv4 included).
    assert listening(port=port) == [(host, port)]
    stores[1].set("k", "v")  # the store still works through that one socket
    assert stores[0].get("k") == b"v"
    stores.clear()


def test_a_peers_roll_call_entry_is_read_against_a_fixed_schema():
    import json

    from mpc_fi import wire
    from mpc_fi.errors import WireFormatError

    good = json.dumps({"name": "owner0", "address": "127.0.0.1", "pid": 7, "host": "h"}).encode()
    assert wire.decode(good, rendezvous.ROLL_CALL_WIRE, limit=rendezvous.ROLL_CALL_LIMIT)["pid"] == 7
    for bad in (b"\x80\x04K\x01.", b"{" * 5000, json.dumps({"name": "x", "extra": 1}).encode()):
        with pytest.raises(WireFormatError):
            wire.decode(bad, rendezvous.ROLL_CALL_WIRE, limit=rendezvous.ROLL_CALL_LIMIT)
