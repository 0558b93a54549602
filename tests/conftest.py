"""Shared fixtures: the multi-party harness and small random federations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Helper modules of the test suite (harness.py) stay importable by their short name too; appended,
# so that tests/mpc_fi never shadows the mpc_fi package.
sys.path.append(str(Path(__file__).parent))

from tests.harness import run_parties  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_state_home(tmp_path_factory):
    """Owners keep their privacy ledgers under ``$XDG_STATE_HOME`` when a federation names no
    ledger: never the tester's own. Set before any party process (or the local launcher's fork
    server, which keeps the environment it started with) exists; tests that run owners with a
    budget still name their ledgers, so that two tests never share one."""
    import os

    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if previous is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = previous


@pytest.fixture
def mpc():
    """``mpc(fn, world_size, *args, dealer="ttp")``: run ``fn(rank, *args)`` in N CrypTen parties."""
    return run_parties


def random_federation(workdir, *, num_owners: int, num_classes: int, mode: str = "output",
                      protocol: str = "soft_vote", reveal: str = "label", in_features: int = 6,
                      seed: int = 0, dealer: str = "ttp", batch_size: int = 256, params=None):
    """A federation of random MLP owners (weights saved to their own files) and their models."""
    import torch

    from mpc_fi import FederationConfig, ModelSource, OwnerConfig, ProtocolConfig
    from mpc_fi.demo import mlp

    torch.manual_seed(seed)
    owners, models = [], []
    for k in range(num_owners):
        kwargs = {"in_features": in_features, "hidden": 8, "num_classes": num_classes}
        model = mlp(**kwargs).eval()
        with torch.no_grad():  # spread the logits so that top-two margins vary widely
            model[2].weight.mul_(3.0)
        path = Path(workdir) / f"owner{k}.pt"
        torch.save(model.state_dict(), path)
        models.append(model)
        owners.append(OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory="mpc_fi.demo:mlp", weights=str(path), kwargs=kwargs)))
    fed = FederationConfig(owners=tuple(owners), mode=mode, reveal=reveal, dealer=dealer,
                           protocol=ProtocolConfig(name=protocol, params=params or {}),
                           batch_size=batch_size)
    return fed, models


def logits_of(models, x):
    import torch

    with torch.no_grad():
        return [m(torch.as_tensor(x)).to(torch.float64) for m in models]


@pytest.fixture
def federation_factory(tmp_path):
    return lambda **kw: random_federation(tmp_path, **kw)
