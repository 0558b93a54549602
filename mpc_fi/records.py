"""Local result records: plain values and numpy arrays in one ``.npz`` file, never pickle.

A party process hands its result (or its error) to the process that launched it through a file
in the run folder, the function runner's parties do the same, and the wire audit writes one file
per party. None of them is a peer's message, but a run folder is a place other processes can
write to, so nothing read back from it is unpickled either: the structure travels as JSON and
the arrays as ``.npy`` members loaded with ``allow_pickle=False``.

What can be stored: ``None``, booleans, integers, floats, strings, ``bytes``, lists, tuples,
dicts (keys: strings or integers), numpy arrays (not of dtype object) and scalars, torch tensors
(stored as numpy arrays) and dataclass instances (stored as dicts). Anything else is refused
with ``TypeError`` when the record is written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

_META = "__record__"


def _encode(obj: Any, arrays: list[np.ndarray]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError("an array of Python objects cannot be stored (numeric arrays only)")
        arrays.append(np.ascontiguousarray(obj))
        return {"__array__": len(arrays) - 1}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": bytes(obj).hex()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"dict keys must be strings or integers, got {type(key).__name__}")
        return {"__map__": [[k, _encode(v, arrays)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} (plain values and numpy arrays only)")


def _decode(obj: Any, arrays: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__array__" in obj:
        return arrays[f"a{int(obj['__array__'])}"]
    if "__bytes__" in obj:
        return bytes.fromhex(obj["__bytes__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, arrays) for v in obj["__tuple__"])
    if "__map__" in obj:
        return {k: _decode(v, arrays) for k, v in obj["__map__"]}
    raise ValueError("not a record: unknown tagged value")


def dumps(obj: Any) -> bytes:
    """``obj`` as the bytes of one ``.npz`` record."""
    arrays: list[np.ndarray] = []
    meta = json.dumps(_encode(obj, arrays)).encode()
    buf = io.BytesIO()
    np.savez(buf, **{_META: np.frombuffer(meta, dtype=np.uint8)},
             **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """The value of a record made by :func:`dumps` (arrays loaded without pickle)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files if name != _META}
        return _decode(json.loads(npz[_META].tobytes().decode()), arrays)


def save(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(dumps(obj))
    tmp.replace(path)


def load(path: str | os.PathLike[str]) -> Any:
    return loads(Path(path).read_bytes())
