"""The wire format (mpc_fi.wire): no party interprets a peer's bytes outside a fixed schema.

Unit tests of the codec and of each message kind's schema, then three multi-party checks:
a rogue querier whose handshake is a pickle that would run a shell command, an oversized
length, or a schema violation (every honest party stops with WireFormatError naming it, and
the command never runs); party 0 sending the dealer a request CrypTen's client never sends
(the dealer stops with WireFormatError); and CrypTen's object messages still working through
the JSON channel in every party.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from launchers.entry import error_file
from launchers.local import run_functions
from mpc_fi import errors, records, wire
from mpc_fi.bounds import AGGREGATE_RANGE_WIRE, ContributionRange
from mpc_fi.compare import VALUE_RANGE_WIRE, ValueRange
from mpc_fi.errors import (HandshakeError, InputError, MpcFiError, PartyFailedError,
                           ProtocolError, WireFormatError)
from mpc_fi.models import ARCHITECTURE_WIRE, Architecture, extract_architecture
from tests.mpc_fi import wire_rogue


def roundtrip(obj, schema, **kw):
    return wire.decode(wire.encode(obj, **kw), schema, **kw)


def refused(data: bytes, schema, match: str | None = None, **kw) -> WireFormatError:
    with pytest.raises(WireFormatError, match=match) as info:
        wire.decode(data, schema, **kw)
    return info.value


# ---------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------
def test_messages_round_trip_to_typed_values():
    hello = {"name": "owner0", "fingerprint": "ab12", "versions": {"torch": "2.13.0"}}
    assert roundtrip(hello, wire.HELLO) == hello
    assert roundtrip((24, (3, 8, 8)), wire.QUERY_META) == (24, (3, 8, 8))
    assert roundtrip((16, None), wire.BATCH_PLAN) == (16, None)
    assert roundtrip((16, 512), wire.BATCH_PLAN) == (16, 512.0)
    size = wire.decode(wire.encode(torch.Size([2, 3])), wire.TTP_REPLY)
    assert isinstance(size, torch.Size) and size == torch.Size([2, 3])
    vr = ValueRange(-(3 << 16), 5 << 16, 16)
    assert roundtrip(vr, VALUE_RANGE_WIRE) == vr
    found = (vr, ContributionRange(-0.5, 1.0, False))
    assert roundtrip(found, AGGREGATE_RANGE_WIRE) == found
    assert roundtrip((None, None), AGGREGATE_RANGE_WIRE) == (None, None)
    assert roundtrip(None, wire.BROADCAST_OBJECT) is None
    assert roundtrip(-1, wire.BROADCAST_OBJECT) == -1


def test_every_layer_kind_round_trips_as_an_architecture():
    # (a batch norm right after a convolution is folded into it: this one stays an affine map)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.MaxPool2d(2), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2), nn.Sigmoid(),
                          nn.Tanh(), nn.Dropout(), nn.Identity(), nn.Flatten(),
                          nn.Linear(16, 5, bias=False), nn.Softmax(dim=1),
                          nn.LogSoftmax(dim=1)).eval()
    arch, _ = extract_architecture(model, (1, 8, 8))
    back = roundtrip(arch, ARCHITECTURE_WIRE)
    assert back == arch and isinstance(back, Architecture)
    assert {layer.op for layer in back.layers} >= {"conv2d", "affine", "linear", "flatten",
                                                  "max_pool2d", "avg_pool2d", "identity"}


def test_encode_refuses_what_has_no_json_form():
    for bad in (torch.zeros(2), np.int64(3), float("nan"), b"raw", {1, 2}):
        with pytest.raises(WireFormatError, match="cannot encode"):
            wire.encode(bad)
    with pytest.raises(WireFormatError, match="exceeds"):
        wire.encode("x" * 100, limit=50)


@pytest.mark.parametrize("attack", ["pickle", "pickle0"])
def test_a_pickle_is_refused_without_being_unpickled(tmp_path, attack):
    marker = tmp_path / "pwned"
    data = wire_rogue.attack_bytes(attack, str(marker))
    refused(data, wire.HELLO, "not UTF-8" if attack == "pickle" else "not JSON")
    refused(data, wire.TTP_REQUEST, limit=wire.OBJECT_LIMIT)
    assert not marker.exists()


def test_malformed_messages_are_refused_with_the_reason():
    hello = {"name": "q", "fingerprint": "f", "versions": {}}
    ok = json.dumps(hello).encode()
    assert wire.decode(ok, wire.HELLO) == hello
    refused(b"x" * 65, wire.NULL, "exceeds the 64-byte limit", limit=64)
    refused(b"\xff\xfe{}", wire.HELLO, "not UTF-8")
    refused(b'{"name": "q"', wire.HELLO, "not JSON")
    refused(b"NaN", wire.Float(), "not JSON")
    refused(b'{"a": 1, "a": 2}', wire.Map(wire.Str(4), wire.Int(0, 9), 4), "duplicate")
    refused(b"[" * 17 + b"]" * 17, wire.Any_, "deeper than 16")
    assert wire.decode(b'"[[[[[[[[[[[[[[[[[["', wire.Str(40)) == "[" * 18  # brackets in strings
    refused(json.dumps({**hello, "extra": 1}).encode(), wire.HELLO, r"unexpected keys \['extra'\]")
    refused(json.dumps({"name": "q", "versions": {}}).encode(), wire.HELLO,
            r"missing keys \['fingerprint'\]")
    refused(json.dumps({**hello, "name": 7}).encode(), wire.HELLO, r"\$\.name: expected a string")
    refused(json.dumps({**hello, "name": "a\x1b[2J"}).encode(), wire.HELLO, "control characters")
    refused(json.dumps({**hello, "name": "n" * 129}).encode(), wire.HELLO, "129 characters")
    refused(b"[true, [3]]", wire.QUERY_META, r"\$\[0\]: expected an integer, got boolean")
    refused(b"[4, [3, -1]]", wire.QUERY_META, "outside")
    refused(b"[4, [65536, 65536]]", wire.QUERY_META, "more than")
    refused(b"[4, [1, 2, 3, 4, 5, 6, 7, 8, 9]]", wire.QUERY_META, "9 items")
    refused(b'{"lo": 5, "hi": 1, "zero_low_bits": 0}', VALUE_RANGE_WIRE, "empty range")
    refused(b'{"lo": 0, "hi": 1, "zero_low_bits": 63}', VALUE_RANGE_WIRE, "outside")
    refused(b'[null, {"lo": 1.0, "hi": 0.0, "integer": true}]', AGGREGATE_RANGE_WIRE, "empty")


@pytest.mark.parametrize("length, why", [(-1, "could not encode"), (0, "announced 0 bytes"),
                                         (1 << 20 | 1, f"announced {1 << 20 | 1} bytes")])
def test_a_bad_length_prefix_is_refused_naming_the_sender(length, why):
    names = ["owner0", "owner1", "querier"]
    with pytest.raises(WireFormatError, match=rf"party querier \(rank 2\) .*{why}") as info:
        wire._refuse_length(length, 1 << 20, 2, 0, None, names, "hello")
    assert (info.value.party, info.value.rank) == ("querier", 2)
    wire._refuse_length(1 << 20, 1 << 20, 2, 0, None, names, "hello")  # at the limit: fine
    own = WireFormatError("cannot encode a Tensor for the wire")
    with pytest.raises(WireFormatError, match="this party could not send its hello: cannot"):
        wire._refuse_length(-1, 1 << 20, 2, 2, own, names, "hello")


def _arch_message(**layer):
    base = {"path": "0", "op": "linear", "args": {}, "params": {"weight": [3, 4]}}
    return {"layers": [{**base, **layer}], "input_shape": [4], "num_classes": 3}


@pytest.mark.parametrize("layer, why", [
    ({"op": "exec"}, "unknown kind 'exec'"),
    ({"params": {"weight": [3, -4]}}, "outside"),
    ({"params": {"weight": [3, 4, 5]}}, "3 items"),
    ({"params": {"weight": [1 << 16, 1 << 16]}}, "more than"),
    ({"params": {}}, r"missing keys \['weight'\]"),
    ({"params": {"weight": [3, 4], "extra": [1]}}, "unexpected keys"),
    ({"args": {"stride": [1, 1]}}, "unexpected keys"),
    ({"op": "conv2d", "params": {"weight": [4, 1, 3, 3]},
      "args": {"stride": [0, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}}, "outside"),
    ({"op": "flatten", "params": {}, "args": {"start_dim": "1", "end_dim": -1}}, "integer"),
])
def test_an_architecture_is_checked_field_by_field(layer, why):
    assert wire.decode(json.dumps(_arch_message()).encode(), ARCHITECTURE_WIRE).num_classes == 3
    refused(json.dumps(_arch_message(**layer)).encode(), ARCHITECTURE_WIRE, why)


def test_an_architecture_has_bounded_layers_and_parameters():
    many = _arch_message()
    many["layers"] = [{"path": str(i), "op": "relu", "args": {}, "params": {}}
                      for i in range(4097)]
    refused(json.dumps(many).encode(), ARCHITECTURE_WIRE, "4097 items")
    big = _arch_message()
    big["layers"] = [{"path": str(i), "op": "linear", "args": {},
                      "params": {"weight": [1 << 14, 1 << 14]}} for i in range(5)]
    refused(json.dumps(big).encode(), ARCHITECTURE_WIRE, "parameters")
    twins = _arch_message()
    twins["layers"] = twins["layers"] * 2
    refused(json.dumps(twins).encode(), ARCHITECTURE_WIRE, "share a path")


# ---------------------------------------------------------------------------------------
# Error agreement
# ---------------------------------------------------------------------------------------
class _PluginError(ProtocolError):
    """A protocol's own error class: travels as its nearest allow-listed base."""


def test_failures_travel_as_allow_listed_classes_with_clean_messages():
    assert wire.describe_failure(InputError("bad row")) == {"type": "InputError",
                                                          "message": "bad row"}
    assert wire.describe_failure(_PluginError("p"))["type"] == "ProtocolError"
    assert wire.describe_failure(KeyError("k")) == {"type": "MpcFiError",
                                                   "message": "KeyError: 'k'"}
    sent = {"type": "InputError", "message": "two\nlines\x1b[31m red\u202e" + "x" * 10_000}
    failure = roundtrip(sent, wire.FAILURE)
    assert "\x1b" not in failure["message"] and "\u202e" not in failure["message"]
    assert failure["message"].startswith("two\nlines[31m red")
    assert len(failure["message"]) <= wire.MAX_ERROR_CHARS + len(" [cut]")
    exc = wire.peer_error(failure, party="querier", rank=2)
    assert type(exc) is InputError and str(exc).startswith("[querier] two")
    exc = wire.peer_error({"type": "PartyFailedError", "message": "gone"}, party="owner1", rank=1)
    assert type(exc) is PartyFailedError and (exc.party, exc.rank) == ("owner1", 1)


@pytest.mark.parametrize("name", ["SystemExit", "__class__", "InsecureSettingWarning", "exit_code",
                                  "PEER_ERRORS", "ValueError"])
def test_a_peer_cannot_name_any_class_outside_the_allow_list(name):
    refused(json.dumps({"type": name, "message": "m"}).encode(), wire.FAILURE, "not one of")


def test_the_allow_list_holds_exactly_the_mpc_fi_errors():
    assert set(errors.PEER_ERRORS.values()) == {
        c for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, MpcFiError)}
    assert HandshakeError in errors.PEER_ERRORS.values()
    assert WireFormatError.exit_code not in {c.exit_code for c in errors.PEER_ERRORS.values()
                                             if c is not WireFormatError}
    assert WireFormatError.exit_code in errors.EXIT_CODES


def test_an_outcome_has_a_failure_or_a_value_of_its_schema():
    schema = wire.Outcome(wire.QUERY_META)
    ok = {"failure": None, "value": [3, [4]]}
    assert roundtrip(ok, schema)["value"] == (3, (4,))
    failed = {"failure": {"type": "InputError", "message": "m"}, "value": None}
    assert roundtrip(failed, schema)["failure"]["type"] == "InputError"
    refused(json.dumps({"failure": None, "value": None}).encode(), schema, "expected an array")
    refused(json.dumps({**failed, "value": [3, [4]]}).encode(), schema, "expected null")


# ---------------------------------------------------------------------------------------
# The dealer's requests
# ---------------------------------------------------------------------------------------
def _request(function="additive", args=([3, 4], [4, 5], "matmul"), kwargs=None, device="cpu"):
    return {"function": function, "device": device, "args": list(args), "kwargs": kwargs or {}}


@pytest.mark.parametrize("message", [
    _request(), _request(args=([2, 3], [2, 3], "mul")),
    _request(args=([1, 2, 8, 8], [3, 2, 3, 3], "conv2d"),
             kwargs={"stride": [1, 1], "padding": 1, "dilation": 1, "groups": 1}),
    _request(args=([1, 2, 8], [2, 3, 3], "conv_transpose1d"),
             kwargs={"stride": 2, "padding": 0, "output_padding": 1, "groups": 1, "dilation": 1}),
    _request("square", [[5]]), _request("binary", [[2, 3], [2, 3]]), _request("wraps", [[4]]),
    _request("B2A", [[4, 2]], device=None),
])
def test_the_dealer_accepts_what_cryptens_client_sends(message):
    out = roundtrip(message, wire.TTP_REQUEST, limit=wire.OBJECT_LIMIT)
    assert out["function"] == message["function"]
    assert all(isinstance(a, torch.Size) for a in out["args"] if not isinstance(a, str))
    assert roundtrip("terminate", wire.TTP_REQUEST) == "terminate"


@pytest.mark.parametrize("message, why", [
    (_request("__init__", []), "'__init__' is not one of"),
    (_request("_get_additive_PRSS", [[3]]), "not one of"),
    (_request(args=([3, 4], [4, 5], "exec")), "'exec' is not one of"),
    (_request(args=([3, 4], [4, 5], "matmul"), kwargs={"out": 1}), "unexpected keys"),
    (_request(args=([1, 1, 4, 4], [1, 1, 1, 1], "conv2d"), kwargs={"padding": "same"}), "padding"),
    (_request(args=([3, 4], [5, 6], "matmul")), "does not describe a valid additive"),
    (_request(args=([1, 1, 1 << 12, 1 << 12], [1, 1, 1, 1], "conv_transpose2d"),
              kwargs={"stride": 1 << 10}), "elements"),
    (_request("square", [[1 << 15, 1 << 15]]), "more than"),
    (_request("square", [[4]], kwargs={"x": 1}), "unexpected keys"),
    (_request("square", [[4]], device="cuda; rm -rf /"), "does not match"),
    ("shutdown", "not one of terminate"),
    ({"function": "square", "args": [[4]], "kwargs": {}}, "missing keys"),
])
def test_the_dealer_refuses_anything_else(message, why):
    refused(wire.encode(message), wire.TTP_REQUEST, why, limit=wire.OBJECT_LIMIT)


# ---------------------------------------------------------------------------------------
# Multi-party: a rogue seat, a rogue request, the channel in every party
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["pickle", "oversize", "schema"])
def test_a_rogue_querier_stops_every_honest_party_and_runs_nothing(federation_factory, tmp_path,
                                                                    monkeypatch, attack):
    import launchers.local
    from launchers import LocalLauncher

    fed, _ = federation_factory(num_owners=2, num_classes=3)
    q = fed.querier_rank
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "pwned"
    (run_dir / wire_rogue.ROGUE_FILE).write_text(
        json.dumps({"rank": q, "attack": attack, "marker": str(marker)}))
    monkeypatch.setattr(launchers.local, "child_main", wire_rogue.child_main)
    launcher = LocalLauncher(fed, run_dir=run_dir, timeout_s=120, stop_grace_s=3)
    launcher.start(query=np.zeros((4, 6), dtype=np.float32))
    try:
        with pytest.raises(WireFormatError, match=r"party querier \(rank 2\)"):
            launcher.wait()
    finally:
        launcher.terminate()
    assert not marker.exists()
    why = {"pickle": "not UTF-8", "oversize": f"announced {1 << 40} bytes",
           "schema": "unexpected keys"}[attack]
    for rank in range(fed.num_owners):  # every honest party, on its own
        record = records.load(error_file(run_dir, rank))  # our own party's error record
        assert record["type"] == "WireFormatError", record
        assert "party querier (rank 2) sent a malformed handshake message" in record["message"]
        assert why in record["message"], record["message"]


@pytest.mark.parametrize("request_, why", [
    (_request("__init__", []), "'__init__' is not one of"),
    (_request(args=([2, 2], [2, 2], "exec")), "'exec' is not one of"),
    ("oversize", f"announced {1 << 40} bytes"),
])
def test_a_rogue_request_stops_the_dealer_with_a_named_error(request_, why):
    with pytest.raises(PartyFailedError) as info:
        run_functions(wire_rogue.send_ttp_request, [request_, None], dealer="ttp", timeout_s=90)
    text = str(info.value)
    dealer = text[text.index("--- party rank 2 (dealer) ---"):]
    assert "WireFormatError: rank 0 sent a malformed object message" in dealer, text
    assert why in dealer, text


def test_every_party_sends_cryptens_objects_as_checked_json():
    out = run_functions(wire_rogue.channel_check, [(), (), ()], dealer="ttp", star=True,
                        timeout_s=90)
    for result in out:
        assert result["installed"] is True
        assert np.allclose(result["product"], [2.25, 4.0], atol=1e-3)
    assert math.isclose(out[0]["product"][1], 4.0, abs_tol=1e-3)


def test_the_dealer_sizes_answers_like_torch_without_meta_tensors():
    """Shape arithmetic in plain Python (a first meta-tensor op costs a second per process)."""
    import random

    import torch

    rnd = random.Random(0)
    checked = 0
    for _ in range(300):
        op = rnd.choice(wire.BEAVER_OPS)
        d = 1 if op.endswith("1d") else 2
        if op == "mul":
            a = tuple(rnd.choice([1, 3]) for _ in range(rnd.randint(1, 3)))
            b = tuple(rnd.choice([1, 3]) for _ in range(rnd.randint(1, 3)))
            kw = {}
        elif op == "matmul":
            k = rnd.randint(1, 3)
            a = tuple([rnd.randint(1, 3) for _ in range(rnd.randint(0, 2))]
                      + [rnd.randint(1, 3), k])[-rnd.randint(1, 4):]
            b = (k, rnd.randint(1, 3)) if rnd.random() < 0.7 else (k,)
            kw = {}
        elif op.startswith("conv_transpose"):
            g = rnd.choice([1, 2])
            a = (2, 2 * g) + tuple(rnd.randint(4, 7) for _ in range(d))
            b = (2 * g, rnd.randint(1, 2)) + tuple(rnd.randint(1, 3) for _ in range(d))
            kw = {"stride": rnd.randint(1, 2), "padding": rnd.randint(0, 1), "groups": g}
        else:
            g = rnd.choice([1, 2])
            a = (2, 2 * g) + tuple(rnd.randint(4, 7) for _ in range(d))
            b = (rnd.randint(1, 2) * g, 2) + tuple(rnd.randint(1, 3) for _ in range(d))
            kw = {"stride": [rnd.randint(1, 2)] * d, "padding": rnd.randint(0, 1),
                  "dilation": rnd.randint(1, 2), "groups": g}
        try:
            want = tuple(getattr(torch, op)(torch.zeros(a), torch.zeros(b), **kw).shape)
        except RuntimeError:
            with pytest.raises(ValueError):
                wire.result_size("additive", (a, b, op), kw)
            continue
        assert wire.result_size("additive", (a, b, op), kw) == want, (op, a, b, kw)
        checked += 1
    assert checked > 200
