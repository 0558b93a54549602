"""The dealer's material prepared between calls of a served session (:mod:`mpc_fi.prefetch`).

Calls that repeat the previous call's requests take every piece of dealer material from the
package; a call that differs (another batch size) leaves the package at its first different
request and asks online; answers equal the plaintext twin either way, and the wire audit
regenerates every mask any party used, from the package regions and the main streams alike,
with no piece of material used twice.
"""

from __future__ import annotations

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


def _request(function="additive", args=((4, 3), (3, 2), "matmul"), kwargs=None):
    return {"function": function, "args": [a if isinstance(a, str) else list(a) for a in args],
            "kwargs": kwargs or {}}


def _prefetch(number, kinds, order):
    return {"function": "prefetch", "device": "cpu", "args": [number, kinds, order], "kwargs": {}}


def test_the_dealer_checks_a_prefetch_request_like_any_other():
    ok = wire.TTP_REQUEST.check(_prefetch(3, [_request(), _request("B2A", ((7,),))], [0, 1, 1, 0]))
    assert ok["args"][0] == 3 and ok["args"][2] == (0, 1, 1, 0)
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
    }
    for why, message in bad.items():
        try:
            wire.TTP_REQUEST.check(message)
        except WireFormatError:
            continue
        pytest.fail(f"accepted a prefetch request with {why}")


def test_a_region_of_the_dealer_streams_serves_one_package_only():
    from mpc_fi.csprng import CSPRNG

    class Server:  # the part of CrypTen's TTPServer that prefetch uses
        generators = [CSPRNG(bytes(32), purpose="dealer"), CSPRNG(bytes([1]) * 32,
                                                                   purpose="dealer")]
        device = "cpu"

        def square(self, size):
            return sum(g.ring(size) for g in self.generators)

    server = Server()
    server.generators[0].ring((5,))
    first = prefetch._server_prefetch(server, 2, ({"function": "square", "args": ((3,),),
                                                   "kwargs": {}},), (0, 0))
    assert first.shape == (6,)
    assert [g.offset for g in server.generators] == [40, 0]  # main positions restored
    expected = sum(g.at(2 << prefetch.REGION_BITS).ring((6,)) for g in server.generators)
    assert torch.equal(first, expected)
    with pytest.raises(ProtocolError, match="used once"):
        prefetch._server_prefetch(server, 2, ({"function": "square", "args": ((3,),),
                                               "kwargs": {}},), (0,))
