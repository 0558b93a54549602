"""A public backbone against full mode on the same owners (issue #15's foundation-model setting).

3 owners + querier + TTP dealer, loopback, B=32, C=10, soft voting. Every owner's model is the
same public backbone (64 -> 32, sigmoid) followed by its own head (32 -> 10):

* ``full``: each owner's whole model runs on shares (the query is shared);
* ``backbone``: the querier runs the backbone in plaintext and shares the 32 features; only the
  heads run on shares.

``extra_info``: inference wall time (median of 4 after a warm-up, max over parties), rounds and
bytes per party (max), label agreement with the plaintext twin (full mode approximates the
backbone's sigmoid on shares; the backbone variant computes it exactly at the querier).

    .venv/bin/python -m pytest benchmarks/test_bench_backbone.py --benchmark-enable -s
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import mpcfi_bench as mb

FEATURES, CLASSES, OWNERS, BATCH = 32, 10, 3, 32


def whole_model() -> torch.nn.Sequential:
    from mpc_fi.demo import backbone, head

    return torch.nn.Sequential(*backbone(64, FEATURES), *head(FEATURES, CLASSES))


def _federations(folder: Path):
    from mpc_fi import BackboneConfig, FederationConfig, ModelSource, OwnerConfig, \
        ProtocolConfig, QuerierConfig
    from mpc_fi.demo import backbone, head

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(11)
    base = backbone(64, FEATURES)
    torch.save(base.state_dict(), folder / "backbone.pt")
    wholes = []
    for k in range(OWNERS):
        h = head(FEATURES, CLASSES)
        torch.save(h.state_dict(), folder / f"head{k}.pt")
        whole = torch.nn.Sequential(*base, *h)
        torch.save(whole.state_dict(), folder / f"whole{k}.pt")
        wholes.append(whole)
    common = dict(mode="full", protocol=ProtocolConfig(name="soft_vote"), batch_size=BATCH,
                  querier=QuerierConfig(input_range=(0.0, 16.0)))
    split = FederationConfig(owners=tuple(OwnerConfig(name=f"owner{k}", model=ModelSource(
        factory="mpc_fi.demo:head", weights=str(folder / f"head{k}.pt"),
        kwargs={"features": FEATURES, "num_classes": CLASSES})) for k in range(OWNERS)),
        public_backbone=BackboneConfig(model=ModelSource(
            factory="mpc_fi.demo:backbone", weights=str(folder / "backbone.pt"),
            kwargs={"features": FEATURES}), output_range=(0.0, 1.0)), **common)
    full = FederationConfig(owners=tuple(OwnerConfig(name=f"owner{k}", model=ModelSource(
        factory="test_bench_backbone:whole_model", weights=str(folder / f"whole{k}.pt")))
        for k in range(OWNERS)), **common)
    x = np.random.default_rng(12).uniform(0, 16, size=(BATCH, 64)).astype(np.float32)
    with torch.no_grad():
        logits = [m(torch.from_numpy(x)).double() for m in wholes]
    return {"backbone": split, "full": full}, x, logits


@pytest.mark.parametrize("variant", ["full", "backbone"])
def test_backbone_against_full_mode(benchmark, variant, bench_dir: Path, bench_timeout,
                                    bench_grid):
    from mpc_fi.plugins import build_protocol

    if bench_grid == "smoke" and variant == "full":
        pytest.skip("the smoke grid runs the backbone variant only")
    feds, x, logits = _federations(bench_dir / "backbone")
    fed = feds[variant]
    out = mb.timed_federation_runs(benchmark, fed, x, timeout_s=bench_timeout)
    twin = build_protocol(fed, num_classes=CLASSES).plaintext(logits).labels
    agree = float((out["labels"] == np.asarray(twin)).mean())
    cost = out["cost"]
    benchmark.extra_info.update({"variant": variant, "inference_wall_s_median": out["inference_s"],
                                 "max_rounds": cost["max_rounds"], "max_bytes": cost["max_bytes"],
                                 "agreement": agree})
    print(f"\n{variant}: inference {out['inference_s']:.3f} s (median of {out['runs']}), "
          f"{cost['max_rounds']} rounds, {cost['max_bytes']:,} bytes per party (max), "
          f"agreement with the plaintext twin {agree:.4f}")
