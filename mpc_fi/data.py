"""Reading the querier's queries from a file (querier process only)."""

from __future__ import annotations

import os

import numpy as np
import torch

from .config import MAX_QUERY_VALUE, QuerierConfig
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


def validate_queries(data: object, querier: QuerierConfig) -> np.ndarray:
    """The querier's queries as float32 ``(batch, features...)``, or an :class:`InputError`.

    Refuses non-numeric data, fewer than two dimensions, no rows, NaN/inf, and values outside
    ``querier.input_range`` (or the fixed-point range when none is declared). Messages say how
    many rows, never their values (they reach every party).
    """
    x = np.asarray(data)
    if x.dtype.kind not in "fiu":
        raise InputError(f"queries must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.ndim < 2:
        raise InputError(f"queries must be (batch, features...), got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError("empty query: no rows to answer")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=tuple(range(1, x.ndim))).sum())
        raise InputError(f"{bad} query row(s) hold NaN or inf")
    low, high = querier.value_range
    outside = (x < low) | (x > high)
    if outside.any():
        rows = int(outside.any(axis=tuple(range(1, x.ndim))).sum())
        if querier.input_range is None:
            raise InputError(f"{rows} query row(s) hold values beyond the fixed-point range "
                             f"(|x| <= {MAX_QUERY_VALUE:g}); rescale the inputs")
        raise InputError(f"{rows} query row(s) hold values outside querier.input_range "
                         f"[{low:g}, {high:g}]; rescale them or declare the real range")
    return x
