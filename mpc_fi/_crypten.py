"""The one place that imports CrypTen.

CrypTen 0.4.1 (December 2022) imports ``torch.onnx.symbolic_registry`` and falls back to
``torch.onnx._internal.registration``; torch 2.13 has neither. The registry now lives at
``torch.onnx._internal.torchscript_exporter.registration``. Aliasing it under the old name before
CrypTen's first import lets ``import crypten`` succeed; mpc-fi never uses CrypTen's ONNX
converter, so nothing else depends on the alias.

Every party process must import CrypTen through :func:`load_crypten`: spawned children do not
inherit a patch made in the parent. ``tests/mpc_fi/test_crypten_shim.py`` fails when the alias
stops being needed or stops working.
"""

from __future__ import annotations

import importlib
import sys
import types

_OLD_NAME = "torch.onnx._internal.registration"
_NEW_NAME = "torch.onnx._internal.torchscript_exporter.registration"


def _needs_alias() -> bool:
    try:
        importlib.import_module(_OLD_NAME)
    except ModuleNotFoundError:
        return True
    return False


def install_alias() -> bool:
    """Alias the moved ONNX registry under its old name; return True if an alias was needed."""
    if _OLD_NAME in sys.modules or not _needs_alias():
        return False
    sys.modules[_OLD_NAME] = importlib.import_module(_NEW_NAME)
    return True


def load_crypten() -> types.ModuleType:
    """Import CrypTen on this torch and return the module (idempotent, per process)."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    install_alias()
    import crypten  # noqa: PLC0415 - the only import of crypten in the code base

    return crypten
