"""Protocol cost across emulated LAN/WAN links: one real ``mpc-fi party`` per namespace host.

    sudo .venv/bin/python tests/launchers/measure_links.py [--owners 3] [--queries 100]
        [--mode output] [--profiles native,lan,...] [--transports curve,zmq,gloo]
        [--served 30]

For each link profile it builds the hosts (``netns.Topology``), runs the federation with every
party in its own namespace, checks the querier's labels against the plaintext twin, and prints
one row per profile: the inference wall time (slowest party, from each party's result file
"cost"), the set-up time (handshake, model loading, sharing), rounds and bytes sent per party
(CrypTen's counters: a round is one collective call; bytes are elements x 8) and the whole
process wall time seen from outside (Python and CrypTen start-up included).

``--served K``: instead of one-shot runs, every party runs ``mpc-fi serve`` in its namespace and
a client (a pipeline, from the root namespace, through the querier's Unix socket) answers one
warm-up request of 32 queries, then K timed requests of 1 query and K of 32; the row gives
p50/p95 per size (labels checked on every call). ``--prefetch on,off`` adds rows with
``network.prefetch: false`` (every call asks the dealer as it goes).

Shaping: ``tc qdisc ... netem`` on each host's link when the kernel has ``sch_netem``, otherwise
the userspace emulator ``linkemu.py`` (same model: delay RTT/2 and rate R on every host's egress).
Needs root and iproute2. Used by ``test_netns.py`` too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fedkit import make_federation  # noqa: E402
from multihost import federation_for, party_names, querier_labels, start_parties  # noqa: E402
from netns import Profile, Topology, netem_available, unavailable_reason  # noqa: E402

PROFILES = {
    "native": Profile("native (veth + bridge, no shaping)", 0.0, None),
    "emu-0": Profile("emulator only (0 ms, unshaped)", 0.0, None),
    "lan": Profile("LAN 0.5 ms RTT, 1 Gbit/s", 0.5, 1000.0),
    "lan-100m": Profile("LAN 0.5 ms RTT, 100 Mbit/s", 0.5, 100.0),
    "10ms-1g": Profile("10 ms RTT, 1 Gbit/s", 10.0, 1000.0),
    "wan-10": Profile("WAN 10 ms RTT, 100 Mbit/s", 10.0, 100.0),
    "50ms-1g": Profile("50 ms RTT, 1 Gbit/s", 50.0, 1000.0),
    "wan-50": Profile("WAN 50 ms RTT, 100 Mbit/s", 50.0, 100.0),
}


def measure(profile_key: str, federation: Path, twin: list[int], workdir: Path, *,
            timeout_s: float = 600.0, shaper: str | None = None, transport: str = "auto") -> dict:
    """Run once under ``profile_key``; return the row (raises if the run fails or disagrees)."""
    profile = PROFILES[profile_key]
    names = party_names(federation)
    if profile_key == "native":
        kind, used = "bridge", "none"
    else:
        shaper = shaper or ("netem" if netem_available() else "emulated")
        kind, used = ("bridge", "netem") if shaper == "netem" else ("emulated", "linkemu")
    with Topology(len(names), kind=kind, profile=None if kind == "bridge" and used == "none"
                  else profile) as topo:
        fed = federation_for(topo, federation, workdir / f"{profile_key}-{transport}.yaml",
                             timeout_s=120, transport=transport)
        run = start_parties(topo, fed, workdir / profile_key, names, timeout_s=timeout_s)
        codes = run.wait(timeout_s)
        failed = {n: c for n, c in codes.items() if c != 0}
        if failed:
            detail = "\n".join(f"--- {n} (exit {c}) ---\n{run.outputs[n][1][-2000:]}"
                               for n, c in failed.items())
            raise RuntimeError(f"{profile_key}: parties failed {failed}\n{detail}")
        labels = querier_labels(run.outputs[names[-2]][0])
        if labels != list(twin):
            raise RuntimeError(f"{profile_key}: labels differ from the plaintext twin")
        costs = {n: run.result(n)["cost"] for n in names}
        setup = max(run.result(n).get("setup_s", 0.0) for n in names if n != "dealer")
    compute = [n for n in names if n != "dealer"]
    return {"profile": f"{profile.name}, {transport}", "shaper": used,
            "infer_s": max(costs[n]["wall_s"] for n in compute), "setup_s": setup,
            "process_s": run.wall_s,
            "rounds": {n: costs[n]["rounds"] for n in compute},
            "bytes": {n: costs[n]["bytes_sent"] for n in compute}}


def measure_served(profile_key: str, federation: Path, twin: list[int], x, workdir: Path, *,
                   calls: int, transport: str = "auto", shaper: str | None = None,
                   prefetch: bool = True) -> dict:
    """Warm calls of a served session under ``profile_key``: p50/p95 for 1 and 32 queries."""
    import subprocess  # noqa: PLC0415
    import time  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from mpc_fi import connect  # noqa: PLC0415
    from multihost import MPC_FI  # noqa: PLC0415

    profile = PROFILES[profile_key]
    names = party_names(federation)
    shaper = shaper or ("netem" if netem_available() else "emulated")
    kind, used = ("bridge", "netem") if shaper == "netem" else ("emulated", "linkemu")
    if profile_key == "native":
        kind, used = "bridge", "none"
    sock = Path(tempfile.mkdtemp(prefix="mpc-fi-served-")) / "q.sock"
    with Topology(len(names), kind=kind, profile=None if used == "none" else profile) as topo:
        fed = federation_for(topo, federation, workdir / f"served-{profile_key}-{transport}.yaml",
                             timeout_s=120, transport=transport, prefetch=prefetch)
        procs = [topo.popen(k, [MPC_FI, "serve", "--federation", str(fed), "--party", name,
                                "--run-dir", str(workdir / f"served-{profile_key}" / name),
                                "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k, name in enumerate(names)]
        figures: dict[str, float] = {}
        try:
            with connect(sock, wait_s=300, timeout_s=600) as client:
                deadline = time.monotonic() + 300
                while client.health()["status"] != "ready":  # every party joined
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{profile_key}: the served parties never all joined")
                    time.sleep(0.2)
                if list(client.predict(x[:32])) != list(twin[:32]):
                    raise RuntimeError(f"{profile_key}: labels differ from the plaintext twin")
                for size in (1, 32):
                    times = []
                    for _ in range(calls):
                        t = time.perf_counter()
                        labels = client.predict(x[:size])
                        times.append(time.perf_counter() - t)
                        if list(labels) != list(twin[:size]):
                            raise RuntimeError(f"{profile_key}: labels differ from the twin")
                    figures[f"p50_{size}"] = float(np.percentile(times, 50))
                    figures[f"p95_{size}"] = float(np.percentile(times, 95))
                client.stop()
            for proc in procs:
                proc.wait(timeout=120)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    return {"profile": f"{profile.name}, {transport}"
            + ("" if prefetch else ", no prefetch"), "shaper": used, **figures}


def served_table(rows: list[dict]) -> str:
    lines = ["| profile | shaper | 1 query p50 / p95 | 32 queries p50 / p95 |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['profile']} | {r['shaper']} | {r['p50_1'] * 1e3:.0f} / "
                     f"{r['p95_1'] * 1e3:.0f} ms | {r['p50_32'] * 1e3:.0f} / "
                     f"{r['p95_32'] * 1e3:.0f} ms |")
    return "\n".join(lines)


def median_row(runs: list[dict]) -> dict:
    """The run with the median inference time, with the spread of all runs."""
    ordered = sorted(runs, key=lambda r: r["infer_s"])
    row = dict(ordered[len(ordered) // 2])
    row["spread"] = (ordered[0]["infer_s"], ordered[-1]["infer_s"])
    row["setup_s"] = sorted(r["setup_s"] for r in runs)[len(runs) // 2]
    row["process_s"] = sorted(r["process_s"] for r in runs)[len(runs) // 2]
    return row


def table(rows: list[dict]) -> str:
    names = list(rows[0]["rounds"])
    head = ("| profile | shaper | inference s (min-max) | set-up s | process s | "
            + " | ".join(f"{n} rounds / MB" for n in names) + " |")
    sep = "|" + "---|" * (5 + len(names))
    lines = [head, sep]
    for r in rows:
        cells = [f"{r['rounds'][n]} / {r['bytes'][n] / 1e6:.2f}" for n in names]
        spread = r.get("spread", (r["infer_s"], r["infer_s"]))
        lines.append(f"| {r['profile']} | {r['shaper']} | {r['infer_s']:.2f} "
                     f"({spread[0]:.2f}-{spread[1]:.2f}) | {r['setup_s']:.2f} "
                     f"| {r['process_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--mode", default="output", choices=["output", "full"])
    parser.add_argument("--profiles", default=",".join(PROFILES),
                        help=f"comma-separated, from {', '.join(PROFILES)}")
    parser.add_argument("--shaper", choices=["netem", "emulated"],
                        help="default: netem when the kernel has it, else the emulator")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per profile; the table shows the median (default 3)")
    parser.add_argument("--workdir", help="where the federation and run folders go")
    parser.add_argument("--transports", default="auto",
                        help="comma-separated, from auto, curve, zmq, gloo (default auto: zmq "
                             "on these acknowledged test links)")
    parser.add_argument("--served", type=int, default=0, metavar="K",
                        help="measure warm calls of a served session instead (K timed calls "
                             "per size; --queries must be at least 32)")
    parser.add_argument("--activation-bound", type=float, default=None, metavar="A",
                        help="full mode: the federation's activation_bound (default: none)")
    parser.add_argument("--prefetch", default="on",
                        help="with --served: on, off or on,off (network.prefetch; default on)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"cannot measure: {reason}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpc-fi-links-"))
    federation, twin = make_federation(workdir / "fed", num_owners=args.owners,
                                       queries=args.queries, mode=args.mode,
                                       batch_size=args.batch_size)
    if args.activation_bound is not None:
        import yaml  # noqa: PLC0415

        data = yaml.safe_load(federation.read_text())
        data["activation_bound"] = args.activation_bound
        federation.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"{args.owners} owners + querier + dealer, {args.queries} queries, batch "
          f"{args.batch_size}, mode {args.mode}, soft_vote; one namespace per party; "
          f"netem available: {netem_available()}", flush=True)
    if args.served:
        import numpy as np  # noqa: PLC0415

        x = np.load(federation.parent / "queries.npy")
        served_rows = [measure_served(key.strip(), federation, list(twin), x, workdir,
                                      calls=args.served, transport=transport.strip(),
                                      shaper=args.shaper, prefetch=prefetch == "on")
                       for transport in args.transports.split(",")
                       for key in args.profiles.split(",")
                       for prefetch in args.prefetch.split(",")]
        print(served_table(served_rows))
        return 0
    rows = []
    for transport in args.transports.split(","):
        for key in args.profiles.split(","):
            runs = []
            for _ in range(args.repeat):
                runs.append(measure(key.strip(), federation, list(twin), workdir,
                                    shaper=args.shaper, transport=transport.strip()))
                print(f"  {key} {transport}: inference {runs[-1]['infer_s']:.2f} s", flush=True)
            rows.append(median_row(runs))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
