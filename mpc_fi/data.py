"""Reading the querier's queries from a file (querier process only)."""

from __future__ import annotations

import os

import numpy as np
import torch

from .errors import InputError


def load_queries(path: str) -> np.ndarray:
    """Queries from ``.npy``, ``.pt`` (a tensor saved with ``torch.save``) or ``.csv``."""
    if not os.path.isfile(path):
        raise InputError(f"query file not found: {path}")
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        if path.endswith(".pt"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, torch.Tensor):
                raise InputError(f"{path} must hold one tensor, got {type(data).__name__}")
            return data.numpy()
        if path.endswith(".csv"):
            return np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float32)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read queries from {path}: {type(exc).__name__}: {exc}") from None
    raise InputError(f"query files end in .npy, .pt or .csv: {path}")
