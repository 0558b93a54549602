"""What cryptographic randomness costs: generator throughput and three workloads' wall time.

* ``test_generator_throughput`` -- uniform 64-bit ring elements, 8 MiB per call, from the
  engine's CSPRNG (AES-256-CTR, :mod:`mpc_fi.csprng`) and from a ``torch.Generator`` (MT19937,
  what CrypTen used), in the same session; ``extra_info["mb_per_s"]``.
* ``test_workload`` -- ``Federation(config).run(X)`` on three workloads (3 owners + querier + TTP
  dealer, loopback, B=32, C=10, the benchmark suite's random MLP owners):

  - **W1**: output mode, hard voting;
  - **W2**: output mode, soft voting;
  - **W3**: full mode (query and weights secret-shared), soft voting.

  ``extra_info``: inference wall time (max over parties), whole-call wall time, rounds and bytes
  per party (max). The suite only uses the public API, so the same file measures an older tree:
  ``PYTHONPATH=<that tree> python -m pytest benchmarks/test_bench_randomness.py`` (the
  throughput case of the CSPRNG is skipped where the tree has none). benchmarks/RESULTS.md has
  the commands and the figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import mpcfi_bench as mb

WORKLOADS = {
    "W1": mb.Case("hard_vote", "output", 3, 10, 32),
    "W2": mb.Case("soft_vote", "output", 3, 10, 32),
    "W3": mb.Case("soft_vote", "full", 3, 10, 32),
}
WORDS = 1 << 20  # 8 MiB of int64 per call


@pytest.mark.parametrize("source", ["csprng", "torch-mt19937"])
def test_generator_throughput(benchmark, source):
    if source == "csprng":
        csprng = pytest.importorskip("mpc_fi.csprng", reason="this tree has no CSPRNG")
        stream = csprng.CSPRNG.from_os("bench")

        def draw():
            return stream.ring((WORDS,))
    else:
        generator = torch.Generator().manual_seed(1)

        def draw():
            return torch.randint(-(2 ** 63), 2 ** 63 - 1, (WORDS,), generator=generator)

    out = benchmark.pedantic(draw, rounds=20, warmup_rounds=2)
    if out.numel() != WORDS:
        raise RuntimeError("short draw")
    mb_s = 8 * WORDS / benchmark.stats.stats.median / 1e6
    benchmark.extra_info.update({"source": source, "mb_per_s": round(mb_s, 1)})
    print(f"\n{source}: {mb_s:,.0f} MB/s (median of 20 draws of 8 MiB)")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload(benchmark, name, bench_dir: Path, bench_timeout):
    from mpc_fi import __file__ as engine_file

    case = WORKLOADS[name]
    wl = mb.workload(case, bench_dir / f"rand-{name}")
    out = mb.timed_federation_runs(benchmark, wl.federation, wl.x, timeout_s=bench_timeout,
                                   run_dir=lambda k: bench_dir / f"rand-{name}" / f"run{k}")
    cost = out["cost"]
    agree = float((out["labels"] == mb.plaintext_labels(case, wl)).mean())
    benchmark.extra_info.update({
        "workload": name, "case": case.id, "tree": str(Path(engine_file).parents[1]),
        "inference_wall_s_median": out["inference_s"], "call_wall_s_median": out["call_s"],
        "max_rounds": cost["max_rounds"], "max_bytes": cost["max_bytes"], "agreement": agree})
    print(f"\n{name} ({case.id}) from {Path(engine_file).parents[1]}: inference "
          f"{out['inference_s']:.3f} s (median of {out['runs']}, max over parties), call "
          f"{out['call_s']:.2f} s, {cost['max_rounds']} rounds, "
          f"{cost['max_bytes']:,} bytes per party (max), agreement {agree:.4f}")
