"""mpc_fi.channel: the parties' torch.distributed backend over ZeroMQ (CURVE or plaintext).

Each test starts real processes (spawn) that meet through a TCPStore on loopback, as parties
do. Checked: every collective CrypTen and mpc_fi.wire use gives what gloo gives; an impostor
without the federation's key is refused by name and receives nothing; a party's traffic, as
captured on the wire by a relay, holds no value in the clear under CURVE (and does under the
plaintext transport, the control); a party that dies is named at once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import struct
import threading
import traceback
from pathlib import Path

import pytest

from mpc_fi import keys

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NAMES = ("owner0", "owner1", "querier", "dealer")
#: A value no protocol would produce by chance: its bytes are searched for in captured traffic.
MARKER = 0x5EC12E7_0DDBA11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(target: str, record: Path) -> str:
    """A TCP relay to ``target`` (``tcp://host:port``) that appends every byte it forwards (both
    ways) to ``record``: what an eavesdropper on that link sees. Returns its endpoint."""
    host, port = target[len("tcp://"):].rsplit(":", 1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    lock = threading.Lock()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with lock, open(record, "ab") as f:
                    f.write(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection((host, int(port)))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"tcp://127.0.0.1:{server.getsockname()[1]}"


def _worker(rank: int, port: int, publics: tuple[str, ...], secret: str | None, scenario: str,
            out: str) -> None:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from mpc_fi import channel  # noqa: PLC0415

    torch.set_num_threads(1)
    world = len(NAMES)
    result: dict = {}
    try:
        if scenario.startswith("capture") and rank == 0:
            real = channel.Mesh._endpoint

            def through_relay(self, store, peer, deadline):  # noqa: ANN001
                return _relay(real(self, store, peer, deadline), Path(out + ".wire"))

            channel.Mesh._endpoint = through_relay
        channel.configure(channel.ChannelConfig(names=NAMES, public_keys=publics,
                                                secret_key=secret, timeout_s=20.0))
        dist.init_process_group(channel.BACKEND, init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=__import__(
                                    "datetime").timedelta(seconds=20))
        main = dist.new_group(list(range(world - 1)))
        pair = dist.new_group([0, world - 1])
        if scenario == "collectives":
            t = torch.full((5,), rank + 1, dtype=torch.int64)
            dist.all_reduce(t)
            result["sum"] = t.tolist()
            x = torch.tensor([rank ^ 0b1011, 7], dtype=torch.int64)
            dist.all_reduce(x, op=dist.ReduceOp.BXOR)
            result["xor"] = x.tolist()
            gathered = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(gathered, torch.tensor([rank, 10 * rank]))
            result["all_gather"] = [g.tolist() for g in gathered]
            b = torch.arange(4.0) if rank == 2 else torch.zeros(4)
            dist.broadcast(b, 2)
            result["broadcast"] = b.tolist()
            if rank < world - 1:
                y = torch.tensor([float(rank)])
                dist.all_reduce(y, group=main)
                result["main_sum"] = y.item()
                r = torch.tensor([rank + 1])
                dist.reduce(r, 1, group=main)
                if rank == 1:
                    result["reduce"] = r.item()
                g = [torch.zeros(1, dtype=torch.int64) for _ in range(world - 1)] if rank == 0 \
                    else None
                dist.gather(torch.tensor([rank * 3]), g, dst=0, group=main)
                if rank == 0:
                    result["gather"] = [v.item() for v in g]
                s = torch.zeros(1, dtype=torch.int64)
                pieces = [torch.tensor([100 + i]) for i in range(world - 1)] if rank == 0 \
                    else None
                dist.scatter(s, pieces, src=0, group=main)
                result["scatter"] = s.item()
            if rank in (0, world - 1):
                z = torch.tensor([42]) if rank == world - 1 else torch.zeros(1, dtype=torch.int64)
                dist.broadcast(z, world - 1, group=pair)
                result["pair"] = z.item()
            if rank == 0:
                dist.send(torch.tensor([1, 2, 3]), 1)
                dist.isend(torch.tensor([4, 5, 6]), 1).wait()
            if rank == 1:
                a, c = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
                dist.recv(a, 0)
                dist.irecv(c, 0).wait()
                result["p2p"] = a.tolist() + c.tolist()
            dist.barrier()
        elif scenario.startswith("capture"):
            secret_value = torch.full((256,), MARKER, dtype=torch.int64)
            if rank == 0:
                dist.send(secret_value, 1)
            if rank == 1:
                got = torch.zeros(256, dtype=torch.int64)
                dist.recv(got, 0)
                result["received"] = bool((got == MARKER).all())
            dist.all_reduce(secret_value if rank == 0 else torch.zeros(256, dtype=torch.int64))
            dist.barrier()
        elif scenario == "death":
            dist.barrier()
            if rank == 1:
                os._exit(3)  # a party dies mid-protocol
            dist.all_reduce(torch.zeros(3))  # raises: owner1 is gone
        dist.destroy_process_group()
        channel.close()
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["trace"] = traceback.format_exc()
    Path(out).write_text(repr(result))
    os._exit(0)


def _run(tmp_path: Path, scenario: str, *, curve: bool = True, impostor: int | None = None,
         ranks: range | None = None) -> dict[int, dict]:
    pairs = [keys.ephemeral_pair() for _ in NAMES]
    publics = tuple(p for p, _ in pairs) if curve else ()
    secrets = [s for _, s in pairs]
    if impostor is not None:  # this seat's process holds some other key pair
        secrets[impostor] = keys.ephemeral_pair()[1]
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = {}
    for rank in ranks or range(len(NAMES)):
        out = str(tmp_path / f"{scenario}-{rank}.txt")
        procs[rank] = ctx.Process(target=_worker, args=(
            rank, port, publics, secrets[rank] if curve else None, scenario, out))
        procs[rank].start()
    for p in procs.values():
        p.join(90)
        if p.is_alive():
            p.kill()
            pytest.fail(f"a party of scenario {scenario} hung")
    results = {}
    for rank in procs:
        path = tmp_path / f"{scenario}-{rank}.txt"
        results[rank] = eval(path.read_text()) if path.exists() else {}  # noqa: S307 - our repr
    return results


@pytest.mark.parametrize("curve", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["curve", "zmq"])
def test_collectives_give_what_gloo_gives(tmp_path: Path, curve: bool) -> None:
    res = _run(tmp_path, "collectives", curve=curve)
    for rank, r in res.items():
        assert r.get("ok"), r.get("trace") or r
        assert r["sum"] == [10] * 5
        assert r["xor"] == [0b1011 ^ 0b1010 ^ 0b1001 ^ 0b1000 ^ 0, 0]
        assert r["all_gather"] == [[i, 10 * i] for i in range(4)]
        assert r["broadcast"] == [0.0, 1.0, 2.0, 3.0]
        if rank < 3:
            assert r["main_sum"] == 3.0
            assert r["scatter"] == 100 + rank
    assert res[1]["reduce"] == 6
    assert res[0]["gather"] == [0, 3, 6]
    assert res[0]["pair"] == res[3]["pair"] == 42
    assert res[1]["p2p"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # the same refusal with host processes: tests/launchers/test_host.py
def test_impostor_is_refused_by_name_and_learns_nothing(tmp_path: Path) -> None:
    res = _run(tmp_path, "collectives", impostor=2)  # the querier's seat, someone else's key
    for rank in (0, 1, 3):
        err = res[rank].get("error", "")
        assert "PartyFailedError" in err and "querier (rank 2)" in err, res[rank]
        assert "authenticate" in err
    assert not res[2].get("ok")
    assert "sum" not in res[2]  # not one collective completed at the impostor


@pytest.mark.parametrize("curve", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["curve", "zmq-control"])
def test_captured_traffic_holds_no_value_in_the_clear(tmp_path: Path, curve: bool) -> None:
    scenario = "capture-" + ("curve" if curve else "zmq")
    res = _run(tmp_path, scenario, curve=curve)
    assert all(r.get("ok") for r in res.values()), res
    assert res[1]["received"]
    wire = (tmp_path / f"{scenario}-0.txt.wire").read_bytes()
    assert len(wire) > 256 * 8 * 2  # the value crossed this link (twice)
    pattern = struct.pack("<q", MARKER) * 4
    assert (pattern in wire) is (not curve)


@pytest.mark.slow  # a killed served owner named by the session: tests/launchers/test_serve.py
def test_a_party_that_dies_is_named_at_once(tmp_path: Path) -> None:
    res = _run(tmp_path, "death")
    for rank in (0, 2, 3):
        err = res[rank].get("error", "")
        assert "PartyFailedError" in err and "owner1 (rank 1)" in err, res[rank]
        # Seen from its closed connection, not from network.timeout_s running out.
        assert "closed its connection" in err, err


def test_key_files(tmp_path: Path) -> None:
    public, secret = keys.generate(tmp_path, "owner0")
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    text = keys.read_public(str(public))
    assert keys.load_secret(secret)[0] == text
    assert keys.read_public(text) == text
    with pytest.raises(Exception, match="never overwritten"):
        keys.generate(tmp_path, "owner0")
    secret.chmod(0o644)
    with pytest.raises(Exception, match="too open"):
        keys.load_secret(secret)
    with pytest.raises(Exception, match="public key only"):
        public.chmod(0o600)
        keys.load_secret(public)
    with pytest.raises(Exception, match="neither a public key"):
        keys.read_public("not-a-key")
