"""What a party hands back to its launcher, and the audit files: records, never pickle."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mpc_fi import records


@dataclass
class _Point:
    x: int
    y: list


def test_plain_values_arrays_and_tensors_round_trip(tmp_path):
    value = {"cost": {"rounds": 3, "wall_s": 0.5}, 1: [None, True, "a", b"\x00\xff"],
             "labels": np.arange(5), "scores": torch.ones(2, 3, dtype=torch.float64),
             "shape": (2, (3, 4)), "point": _Point(1, [2.5])}
    records.save(tmp_path / "r.npz", value)
    back = records.load(tmp_path / "r.npz")
    assert back["cost"] == {"rounds": 3, "wall_s": 0.5} and back[1] == [None, True, "a", b"\x00\xff"]
    np.testing.assert_array_equal(back["labels"], np.arange(5))
    np.testing.assert_array_equal(back["scores"], np.ones((2, 3)))
    assert back["shape"] == (2, (3, 4)) and back["point"] == {"x": 1, "y": [2.5]}


def test_objects_are_refused_when_written():
    with pytest.raises(TypeError):
        records.dumps({"f": open})
    with pytest.raises(TypeError):
        records.dumps(np.array([object()], dtype=object))


def test_a_pickle_planted_in_a_run_folder_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "result-0.npz").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(Exception):
        records.load(tmp_path / "result-0.npz")
    assert not marker.exists()
