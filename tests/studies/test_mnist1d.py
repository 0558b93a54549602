"""MNIST-1D as a data set of the studies: generated here (no download), deterministic from its
seed, ten balanced classes, and usable by the non-IID and local-DP studies at any size."""

from __future__ import annotations

import random
import socket

import numpy as np
import pytest

import demos
from studies import local_dp as ldp
from studies.cli import study_main
from studies.noniid import NoniidConfig, run_noniid


def test_generation_is_deterministic_balanced_and_leaves_global_rngs_alone():
    np_state, py_state = np.random.get_state(), random.getstate()
    x, y = demos.make_mnist1d(200, seed=1)
    again_x, again_y = demos.make_mnist1d(200, seed=1)
    other_x, _ = demos.make_mnist1d(200, seed=2)
    assert x.shape == (200, 40) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 20))
    np.testing.assert_array_equal(x, again_x)
    np.testing.assert_array_equal(y, again_y)
    assert not np.array_equal(x, other_x)
    assert np.isfinite(x).all() and abs(float(x.mean())) < 1e-3  # the generator standardises
    # the package seeds numpy's and random's global state: both must be restored
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) \
        and after[2:] == np_state[2:]
    x[0, 0] = 99.0  # callers get copies of the cached arrays
    assert demos.make_mnist1d(200, seed=1)[0][0, 0] != 99.0


def test_generation_opens_no_network_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("MNIST-1D generation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    x, y = demos.make_mnist1d(120, seed=12345)  # a pair not in the cache: really generated
    assert x.shape == (120, 40) and set(np.unique(y)) == set(range(10))


def test_sizes_and_errors():
    x, y = demos.load_dataset("mnist1d", samples=105)
    assert x.shape == (100, 40)  # samples // 10 per class
    with pytest.raises(ValueError, match="at least 10"):
        demos.make_mnist1d(5)
    with pytest.raises(ValueError, match="fixed size"):
        demos.load_dataset("digits", samples=100)


def test_noniid_and_local_dp_run_on_mnist1d(tmp_path):
    rows = run_noniid(NoniidConfig(combos=(("mnist1d", "mlp"),), owners=(3,), alphas=(1.0,),
                                   seeds=(0,), protocols=("soft_vote",), secure=None,
                                   samples=300), show_progress=False)
    owners = [r for r in rows if r["kind"] == "owner"]
    assert len(owners) == 3 and all(r["dataset"] == "mnist1d" for r in rows)
    assert sum(r["train_size"] for r in owners) == 210  # the 70 % training part of 300
    split = ldp.split_data("mnist1d", 0, None, samples=300)
    assert split.x_train.shape == (210, 40) and split.x_query.shape == (90, 40)
    assert split.num_classes == 10


def test_cli_takes_mnist1d_and_refuses_a_sample_count_for_digits(tmp_path):
    assert study_main(["noniid", "--combos", "mnist1d:mlp", "--samples", "200", "--owners", "3",
                       "--alphas", "1", "--seeds", "0", "1", "--protocols", "soft_vote",
                       "--no-secure", "--no-plots", "--quiet", "--out", str(tmp_path)]) == 0
    assert "mnist1d" in (tmp_path / "noniid.csv").read_text()
    assert study_main(["local-dp", "--samples", "200", "--owners", "3", "--epsilons", "4",
                       "--seeds", "0", "--no-secure", "--no-plots", "--quiet",
                       "--out", str(tmp_path)]) != 0
