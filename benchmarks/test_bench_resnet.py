"""ResNets in full mode: what one query costs when the owners' whole forward passes run on shares.

2 owners (each its own ResNet, same architecture, random weights with non-trivial batch-norm
statistics, traced by its owner; batch norms folded into the convolutions) + querier + TTP
dealer, loopback, soft voting, label release, one query (B=1), inputs in [0, 1]:

* ``quick``/``targets``/``full`` grids: ResNet-18 (CIFAR variant: 3x3 stem, no max pooling,
  widths 64-512, 11.2 M parameters per owner) on a 3x32x32 query;
* ``smoke`` grid: ResNet-8 (one block per stage) at width 4 on 3x16x16.

What a query costs does not depend on the weights' values, but whether an owner may share its
model does: each owner first bounds its activations over the whole declared input range by
interval arithmetic (:mod:`mpc_fi.ranges`), and for a ResNet-18 at PyTorch's default
initialisation those sound bounds pass the 2^30 a product holds at 16 fractional bits from the
third stage on (the real activations stay below 10: interval bounds grow with depth). Here every
convolution's weights are scaled to a largest row 1-norm of 1, so that the bounds fit and the
run measures the cost.

``extra_info``: inference wall time (max over parties), rounds, bytes sent and peak RSS per
party, label agreement with the plaintext ensemble. One warm-up run and ``ROUNDS`` measured runs
(each run starts the parties, shares the owners' weights and answers the query).

    .venv/bin/python -m pytest benchmarks/test_bench_resnet.py --benchmark-enable -s
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mpcfi_bench as mb

OWNERS, CLASSES, ROUNDS = 2, 10, 1


def _federation(folder: Path, smoke: bool, batch: int = 1, bounded: bool = False):
    from mpc_fi import FederationConfig, ModelSource, OwnerConfig, ProtocolConfig, QuerierConfig
    from mpc_fi.demo import resnet, resnet18

    folder.mkdir(parents=True, exist_ok=True)
    factory, kwargs, shape = (("mpc_fi.demo:resnet", {"depth": 8, "width": 4}, (3, 16, 16))
                              if smoke else ("mpc_fi.demo:resnet18", {"width": 64}, (3, 32, 32)))
    build = resnet if smoke else resnet18
    models = []
    for k in range(OWNERS):
        torch.manual_seed(30 + k)
        model = build(num_classes=CLASSES, **kwargs)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(1.0, 2.0)
                if isinstance(m, torch.nn.Conv2d) and not smoke:  # see the module docstring
                    m.weight.div_(m.weight.abs().sum((1, 2, 3)).max())
        torch.save(model.state_dict(), folder / f"owner{k}.pt")
        models.append(model.eval())
    bound = None
    if bounded:  # the federation's public bound: the next power of two above every owner's
        from mpc_fi.models import extract_architecture  # noqa: PLC0415
        from mpc_fi.ranges import activation_ranges  # noqa: PLC0415

        top = max(r.magnitude for m in models
                  for r in activation_ranges(*extract_architecture(m, shape), (0.0, 1.0)))
        bound = float(2 ** math.ceil(math.log2(top)))
    fed = FederationConfig(
        owners=tuple(OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory=factory, weights=str(folder / f"owner{k}.pt"),
            kwargs={**kwargs, "num_classes": CLASSES})) for k in range(OWNERS)),
        mode="full", protocol=ProtocolConfig(name="soft_vote"), batch_size=batch,
        querier=QuerierConfig(input_range=(0.0, 1.0)), activation_bound=bound)
    x = np.random.default_rng(31).uniform(0, 1, size=(batch, *shape)).astype(np.float32)
    with torch.no_grad():
        logits = [m(torch.from_numpy(x)).double() for m in models]
    return fed, x, logits


@pytest.mark.parametrize("batch, bounded", [(1, False), (8, False), (8, True)],
                         ids=["B1", "B8", "B8-bounded"])
def test_resnet_full_mode_one_query(benchmark, bench_dir: Path, bench_timeout, bench_grid,
                                    batch, bounded):
    from mpc_fi.plugins import build_protocol

    smoke = bench_grid == "smoke"
    if smoke and (batch, bounded) != (1, False):
        pytest.skip("the smoke grid runs one query of a small ResNet")
    fed, x, logits = _federation(bench_dir / f"resnet-{batch}-{bounded}", smoke, batch, bounded)
    out = mb.timed_federation_runs(benchmark, fed, x, timeout_s=bench_timeout, rounds=ROUNDS)
    twin = build_protocol(fed, num_classes=CLASSES).plaintext(logits).labels
    agree = float((out["labels"] == np.asarray(twin)).mean())
    cost = out["cost"]
    model = "resnet8-w4-3x16x16" if smoke else "resnet18-w64-3x32x32"
    benchmark.extra_info.update({"model": model, "batch": batch,
                                 "activation_bound": fed.activation_bound,
                                 "inference_wall_s_median": out["inference_s"],
                                 "per_party": cost["per_party"], "max_rounds": cost["max_rounds"],
                                 "max_bytes": cost["max_bytes"], "max_rss_mb": cost["max_rss_mb"],
                                 "agreement": agree})
    print(f"\n{model}, B={batch}, activation_bound={fed.activation_bound}, {OWNERS} owners: "
          f"inference {out['inference_s']:.2f} s, whole call "
          f"{out['call_s']:.2f} s, agreement with the plaintext ensemble {agree:.0%}")
    for c in cost["per_party"]:
        print(f"  {c['party']:<8} {c['role']:<8} wall {c['wall_s']:8.2f} s  rounds "
              f"{c['rounds']:>6}  bytes {c['bytes_sent']:>15,}  peak RSS {c['peak_rss_mb']:8.0f} MB")
