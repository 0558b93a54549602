"""Where full mode's rounds and bytes go: the benchmark's soft-voting MLP, stage by stage.

Runs the steps of one full-mode batch (:meth:`mpc_fi.party._Party._release`) in local parties
(3 owners + querier + TTP dealer, the benchmark's random owners of ``mpcfi_bench``), with
CrypTen's counters read between stages, and prints rounds and bytes per party and stage. The
dealer is asked online here (no prefetched package), so party 0's dealer round trips show in
its rows; the other parties' rows are the computation's own traffic. ``--bound`` only picks the
comparisons' widths (what a federation's ``activation_bound`` would): costs do not depend on the
values, and this script checks no label (the benchmarks do).

    .venv/bin/python benchmarks/full_mode_stages.py [--classes 10] [--batch 32] [--bound 64]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("forward", "shift", "clamp", "exp", "reciprocal", "product", "argmax", "open")


def _party(rank: int, payload: dict) -> dict:
    import mpcfi_bench as mb

    from mpc_fi import compare, secure
    from mpc_fi._crypten import load_crypten
    from mpc_fi.bounds import full_mode_aggregate_range
    from protocols.soft_vote import SoftVote
    from mpc_fi.models import extract_architecture, fused_first_layers, secure_forward
    from mpc_fi.ranges import comparison_limit

    crypten = load_crypten()
    comm = crypten.communicator.get()
    classes, batch, owners = payload["classes"], payload["batch"], 3
    case = mb.Case("soft_vote", "full", owners, classes, batch)
    models = [mb.owner_model(case, k) for k in range(owners)]
    x = torch.from_numpy(mb.queries(case)).clamp(-5, 5).to(torch.float64)
    archs, shared = [], []
    for k, model in enumerate(models):
        arch, params = extract_architecture(model, (x.shape[1],))
        archs.append(arch)
        shared.append({key: crypten.cryptensor(v.to(torch.float64) if rank == k
                                               else torch.zeros_like(v, dtype=torch.float64),
                                               src=k) for key, v in params.items()})
    query = crypten.cryptensor(x if rank == owners else torch.zeros_like(x), src=owners)
    out: dict[str, list[float]] = {}
    comm.reset_communication_stats()
    mark = [0, 0, time.perf_counter()]

    def stage(name: str) -> None:
        stats = comm.get_communication_stats()
        now = time.perf_counter()
        out[name] = [stats["rounds"] - mark[0], stats["bytes"] - mark[1], now - mark[2]]
        mark[:] = [stats["rounds"], stats["bytes"], now]

    with compare.bounded(comparison_limit(payload["bound"])):
        firsts = fused_first_layers(archs, query, shared)
        logits = crypten.cat([secure_forward(a, query, p, f)
                              for a, p, f in zip(archs, shared, firsts)], dim=0)
        stage("forward")
        shift = secure.shift_for_softmax(logits)
        stage("shift")
        clamped = secure.clamp_exponent(logits - shift)
        stage("clamp")
        e = secure.exp_clamped(clamped)
        stage("exp")
        # the bound secure.softmax uses, and soft voting's scale for a label release
        high = classes * math.exp(secure.MAX_SLACK) * 1.01 + 1
        scale = SoftVote(num_classes=classes, num_owners=owners, precision_bits=16).label_scale
        inverse = secure.reciprocal_in(e.sum(-1, keepdim=True), high, scale)
        stage("reciprocal")
        p = e * inverse
        stage("product")
    total = p[:batch] + p[batch:2 * batch] + p[2 * batch:]
    protocol = SoftVote(num_classes=classes, num_owners=owners, precision_bits=16)
    label = secure.argmax_index(total, classes, value_range=full_mode_aggregate_range(
        protocol, num_owners=owners, num_classes=classes, precision_bits=16,
        activation_bound=payload["bound"]))
    stage("argmax")
    label.get_plain_text(dst=owners)
    stage("open")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bound", type=float, default=None,
                        help="activation_bound (queries are clipped to [-5, 5]; default: none)")
    args = parser.parse_args(argv)
    from launchers.local import run_functions

    payload = {"classes": args.classes, "batch": args.batch, "bound": args.bound}
    results = run_functions(_party, [payload] * 4, dealer="ttp")
    names = ["owner0", "owner1", "owner2", "querier"]
    print(f"soft voting, 3 owners, B={args.batch}, C={args.classes}, "
          f"activation_bound={args.bound}: rounds / bytes per stage")
    print(f"{'stage':<11}" + "".join(f"{n:>22}" for n in names))
    for name in STAGES:
        print(f"{name:<11}" + "".join(f"{int(r[name][0]):>8} {int(r[name][1]):>13,}"
                                      for r in results))
    totals = [(sum(r[s][0] for s in STAGES), sum(r[s][1] for s in STAGES)) for r in results]
    print(f"{'total':<11}" + "".join(f"{int(a):>8} {int(b):>13,}" for a, b in totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
