"""A public backbone (the foundation-model setting): the querier runs a public feature
extractor in plaintext, the features are secret-shared, the owners' private heads run on shares.

Checked against the plaintext twin and against full mode on the same owners (each owner's whole
model -- the same backbone and its own head -- on shares): the same labels wherever the twin's
top-two margin exceeds 0.05 (soft voting on shares approximates the softmax, full mode also the
sigmoid), fewer rounds and bytes; owners never load the backbone nor see the query; the settings are checked by name.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mpc_fi import BackboneConfig, ConfigError, Federation, FederationConfig, InputError, \
    ModelSource, OwnerConfig, ProtocolConfig, QuerierConfig
from mpc_fi.demo import backbone, head

N, FEATURES, CLASSES = 3, 32, 10


def _setup(tmp_path, queries: int = 12):
    torch.manual_seed(3)
    base = backbone(64, FEATURES)
    torch.save(base.state_dict(), tmp_path / "backbone.pt")
    heads, whole = [], []
    for k in range(N):
        h = head(FEATURES, CLASSES)
        with torch.no_grad():  # spread the logits so that most queries have a clear winner
            h[0].weight.mul_(4.0)
            h[0].bias.mul_(4.0)
        torch.save(h.state_dict(), tmp_path / f"head{k}.pt")
        full = torch.nn.Sequential(*base, *h)  # the same backbone, then this owner's head
        torch.save(full.state_dict(), tmp_path / f"whole{k}.pt")
        heads.append(h)
        whole.append(full)
    x = np.random.default_rng(4).uniform(0, 16, size=(queries, 64)).astype(np.float32)
    with torch.no_grad():
        logits = [m(torch.from_numpy(x)).double() for m in whole]
    split = FederationConfig(
        owners=tuple(OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory="mpc_fi.demo:head", weights=str(tmp_path / f"head{k}.pt"),
            kwargs={"features": FEATURES, "num_classes": CLASSES})) for k in range(N)),
        mode="full", protocol=ProtocolConfig(name="soft_vote"),
        querier=QuerierConfig(input_range=(0.0, 16.0)),
        public_backbone=BackboneConfig(model=ModelSource(
            factory="mpc_fi.demo:backbone", weights=str(tmp_path / "backbone.pt"),
            kwargs={"features": FEATURES}), output_range=(0.0, 1.0)))
    full = dataclasses.replace(split, public_backbone=None, owners=tuple(
        OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory="tests.mpc_fi.test_backbone:whole_model",
            weights=str(tmp_path / f"whole{k}.pt"))) for k in range(N)))
    return split, full, x, logits


def whole_model() -> torch.nn.Sequential:
    return torch.nn.Sequential(*backbone(64, FEATURES), *head(FEATURES, CLASSES))


def test_backbone_mode_equals_full_mode_and_the_twin_at_lower_cost(tmp_path):
    from mpc_fi.plugins import build_protocol

    split, full, x, logits = _setup(tmp_path)
    twin = build_protocol(split, num_classes=CLASSES).plaintext(logits).labels
    a = Federation(split, run_dir=tmp_path / "split").run(x)
    b = Federation(full, run_dir=tmp_path / "full").run(x)
    # Soft voting on shares approximates the softmax (and full mode the backbone's sigmoid):
    # both must agree with the twin wherever its averaged probabilities separate the top two
    # classes by more than 0.05.
    probs = torch.stack([torch.softmax(z, dim=1) for z in logits]).mean(0)
    top2 = probs.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 0.05).numpy()
    assert clear.sum() >= 4  # the check is not empty
    for labels in (a.prediction.labels, b.prediction.labels):
        np.testing.assert_array_equal(labels[clear], np.asarray(twin)[clear])
    owner = {c.party: c for c in a.costs}["owner0"]
    owner_full = {c.party: c for c in b.costs}["owner0"]
    assert owner.rounds < owner_full.rounds and owner.bytes_sent < owner_full.bytes_sent
    # Only the querier loaded the backbone: each owner read its own head's weights, no more.
    for k in range(N):
        log = (tmp_path / "split" / f"party-{k}-owner{k}.log").read_text()
        assert "public backbone" not in log
    querier_log = (tmp_path / "split" / f"party-{N}-querier.log").read_text()
    assert "loaded the public backbone" in querier_log


def test_backbone_settings_are_checked_by_name(tmp_path):
    split, _, x, _ = _setup(tmp_path, queries=4)
    with pytest.raises(ConfigError, match="public_backbone: a public backbone needs mode: full"):
        dataclasses.replace(split, mode="output")
    with pytest.raises(ConfigError, match="public_backbone.output_range"):
        BackboneConfig(model=split.public_backbone.model, output_range=(1.0, 0.0))
    narrow = dataclasses.replace(split, public_backbone=dataclasses.replace(
        split.public_backbone, output_range=(0.0, 0.01)))
    with pytest.raises(InputError, match="leave public_backbone.output_range"):
        Federation(narrow, run_dir=tmp_path / "narrow").run(x)
