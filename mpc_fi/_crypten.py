"""The one place that imports CrypTen.

CrypTen 0.4.1 (December 2022) imports ``torch.onnx.symbolic_registry`` and falls back to
``torch.onnx._internal.registration``; torch 2.13 has neither. The registry now lives at
``torch.onnx._internal.torchscript_exporter.registration``. Aliasing it under the old name before
CrypTen's first import lets ``import crypten`` succeed; mpc-fi never uses CrypTen's ONNX
converter, so nothing else depends on the alias.

It also repairs one bug of CrypTen 0.4.1 that makes opened values wrong: its
``FixedPointEncoder.decode`` divides negative integers by ``scale - 1`` instead of ``scale``
(``tensor.div(self._scale - correction, ...)``, an operator-precedence slip), so
``get_plain_text`` returns ``x - 1`` for a negative ``x`` whenever the fraction of ``x * 2**p``
falls within ``|x| / (2**p - 1)`` of an integer: about one value in 65,000 near -1, one in 110
near -580, and every value below ``-2**p``. :func:`_exact_decode` replaces it. And
``crypten.manual_seed`` (fixed seeds for the generators that mask shares: a testing hook) warns
with :class:`~mpc_fi.errors.InsecureSettingWarning` when called.

Every party process must import CrypTen through :func:`load_crypten`: spawned children do not
inherit a patch made in the parent. ``tests/mpc_fi/test_crypten_shim.py`` fails when the alias
or the decoding fix stops being needed or stops working.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

from .errors import InsecureSettingWarning

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


#: CrypTen's own ``FixedPointEncoder.decode``, kept for the test that the repair is still needed.
CRYPTEN_DECODE: Any = None


def _exact_decode(self, tensor):  # noqa: ANN001 - CrypTen's signature
    """``FixedPointEncoder.decode`` without the negative-value bug (same float32 result type)."""
    if tensor is None:
        return None
    if tensor.is_floating_point():
        raise TypeError("FixedPointEncoder.decode needs an integer tensor")
    if self._scale == 1:
        return tensor.data
    whole = tensor.div(self._scale, rounding_mode="floor")
    fraction = tensor - whole * self._scale  # in [0, scale)
    return (whole.float() + fraction.float() / self._scale).data


def load_crypten() -> types.ModuleType:
    """Import CrypTen on this torch and return the module (idempotent, per process)."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    install_alias()
    import crypten  # noqa: PLC0415 - the only import of crypten in the code base

    global CRYPTEN_DECODE
    CRYPTEN_DECODE = crypten.encoder.FixedPointEncoder.decode
    crypten.encoder.FixedPointEncoder.decode = _exact_decode
    crypten.manual_seed = _loud_manual_seed(crypten.manual_seed)
    return crypten


def _loud_manual_seed(real: Any) -> Any:
    """CrypTen's testing hook that fixes the share generators' seeds, with a warning."""
    def manual_seed(*args: Any, **kwargs: Any) -> Any:
        warnings.warn("crypten.manual_seed fixes the seeds of the generators that mask every "
                      "share: anyone who knows them can undo the sharing. Use it in tests only.",
                      InsecureSettingWarning, stacklevel=2)
        return real(*args, **kwargs)

    manual_seed.__doc__ = real.__doc__
    return manual_seed
