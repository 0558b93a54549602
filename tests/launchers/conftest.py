"""Fixtures for the launcher tests: small trained federations on disk, shared per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fedkit import make_federation  # noqa: E402


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory):
    """Two owners, output mode, 24 queries in 3 batches: ``(federation.yaml, twin labels)``."""
    return make_federation(tmp_path_factory.mktemp("fed-output"), queries=24, batch_size=8)


@pytest.fixture(scope="session")
def full_federation(tmp_path_factory):
    """Two owners, full mode (weights shared), 16 queries in 2 batches."""
    return make_federation(tmp_path_factory.mktemp("fed-full"), queries=16, batch_size=8,
                           mode="full")
