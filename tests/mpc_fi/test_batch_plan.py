"""The default batch size comes from the parties' memory plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from launchers.local import LocalLauncher
from mpc_fi import ConfigError, FederationConfig
from mpc_fi.memory import row_bytes
from mpc_fi.plugins import build_protocol


def _querier_log(run_dir: Path) -> str:
    return next(run_dir.glob("party-*-querier.log")).read_text()


def test_batch_size_is_unset_by_default_and_still_validated(federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3, batch_size=None)
    assert fed.batch_size is None
    assert FederationConfig.from_dict({"owners": [
        {"name": o.name, "model": {"factory": o.model.factory, "weights": o.model.weights,
                                   "kwargs": dict(o.model.kwargs)}} for o in fed.owners]}
    ).batch_size is None
    with pytest.raises(ConfigError, match="batch_size"):
        FederationConfig(owners=fed.owners, batch_size=0)


def test_unset_batch_size_answers_in_one_batch_when_memory_allows(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3, batch_size=None)
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)  # > the old 256
    results = LocalLauncher(fed, run_dir=tmp_path).run(query=x)
    assert {results[r]["batch_rows"] for r in results} == {300}
    log = _querier_log(tmp_path)
    assert "batch size from the memory plan: 300 queries in 1 batch(es)" in log
    assert "batch 1/1 done" in log


@pytest.mark.slow
def test_unset_batch_size_follows_the_memory_limit(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3, batch_size=None)
    per_row = row_bytes(input_shape=(6,), num_owners=2,
                        protocol_elements=build_protocol(fed, num_classes=3).row_elements)
    x = np.random.default_rng(0).normal(size=(250, 6)).astype(np.float32)
    results = LocalLauncher(fed, run_dir=tmp_path,
                            memory_limit_mb=100 * per_row / 2**20).run(query=x)
    assert {results[r]["batch_rows"] for r in results} == {100}
    log = _querier_log(tmp_path)
    assert "250 queries in 3 batch(es) of up to 100" in log
    assert "would need about" not in log  # no warning: the user asked for nothing larger
