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
near -580, and every value below ``-2**p``. :func:`_exact_decode` replaces it. 
Every party process must import CrypTen through :func:`load_crypten`: spawned children do not
inherit a patch made in the parent. ``tests/mpc_fi/test_crypten_shim.py`` fails when the alias
or the decoding fix stops being needed or stops working.

Randomness: every ``torch.Generator`` CrypTen masks secrets with (32 bits of seed state) is
replaced by a 256-bit-key CSPRNG (:mod:`mpc_fi.crypten_rng`). ``crypten.manual_seed`` (a testing
hook) derives keys from every bit of its seeds and warns with
:class:`~mpc_fi.errors.InsecureSettingWarning`.

All of it is held by one handle, :func:`patches`; :func:`configure` is the one call a party or
dealer makes to set CrypTen up.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

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


class Patches:
    """Every change mpc-fi makes to CrypTen's behaviour in this process, and their state.

    One handle per process (:func:`patches`). :func:`load_crypten` installs what every process
    that touches CrypTen needs (the import alias, exact decoding, CSPRNG randomness); a computing
    party or dealer then calls :func:`configure`, which adds the rest (the cheaper comparison
    circuit, CrypTen's object messages as checked JSON, the dealer's prefetched packages, the
    truncations' rotating gather) and
    sets CrypTen's configuration. :meth:`installed` reads the live state, so a test can check
    inside each party that nothing was left out or undone.
    """

    def __init__(self) -> None:
        self.originals: dict[str, Any] = {}
        self.components: list[str] = []

    def add(self, name: str, saved: dict[str, Any] | None = None) -> None:
        if name not in self.components:
            self.components.append(name)
        self.originals.update(saved or {})

    def installed(self) -> dict[str, bool]:
        """Which patches are live right now (read from CrypTen itself, not from flags)."""
        crypten = sys.modules.get("crypten")
        if crypten is None:
            return {}
        from . import compare, crypten_rng, prefetch, truncation, wire  # noqa: PLC0415

        rng = crypten.common.rng
        ttp = crypten.mpc.provider.ttp_provider
        return {
            "onnx-alias": _OLD_NAME in sys.modules,
            "exact-decode": crypten.encoder.FixedPointEncoder.decode is _exact_decode,
            "csprng": (rng.generate_random_ring_element is crypten_rng.generate_random_ring_element
                       and ttp.generate_kbit_random_tensor is crypten_rng.generate_kbit_random_tensor
                       and crypten._setup_prng is crypten_rng.setup_prng
                       and ttp.TTPServer._setup_generators
                       is crypten_rng._server_setup_generators),
            "fast-comparisons": (crypten.mpc.MPCTensor.__dict__.get("_ltz") is compare._ltz
                                 and crypten.mpc.MPCTensor.__dict__.get("relu") is compare._relu),
            "object-channel": wire.object_channel_installed(crypten),
            "dealer-prefetch": prefetch.installed(crypten),
            "rotating-wraps": truncation.installed(crypten),
        }


_PATCHES = Patches()


def patches() -> Patches:
    """This process's patch handle."""
    return _PATCHES


def load_crypten() -> types.ModuleType:
    """Import CrypTen on this torch and return the module (idempotent, per process).

    Installs, before anything can use CrypTen: the ONNX alias, exact fixed-point decoding, and
    CSPRNG streams in place of every ``torch.Generator`` CrypTen would mask a secret with.
    """
    if "crypten" in sys.modules and "csprng" in _PATCHES.components:
        return sys.modules["crypten"]
    install_alias()
    _PATCHES.add("onnx-alias")
    import crypten  # noqa: PLC0415 - the only import of crypten in the code base

    from . import crypten_rng  # noqa: PLC0415 - needs crypten imported

    global CRYPTEN_DECODE
    if crypten.encoder.FixedPointEncoder.decode is not _exact_decode:
        CRYPTEN_DECODE = crypten.encoder.FixedPointEncoder.decode
        crypten.encoder.FixedPointEncoder.decode = _exact_decode
    _PATCHES.add("exact-decode", {"FixedPointEncoder.decode": CRYPTEN_DECODE})
    _PATCHES.add("csprng", crypten_rng.install(crypten))
    # Truncations gather the masked shares at each party in turn, not always at party 0
    # (installed here, before a wire audit wraps the same function).
    from . import truncation  # noqa: PLC0415

    _PATCHES.add("rotating-wraps", truncation.install(crypten))
    return crypten


def configure(*, dealer: str, precision_bits: int, count_communication: bool = True
              ) -> types.ModuleType:
    """Set CrypTen up for one party or dealer process and install every patch; return CrypTen.

    ``dealer`` is ``"ttp"`` (a separate trusted dealer) or ``"insecure-party-dealer"`` (CrypTen's
    TFP: party 0 generates all correlated randomness). Every party of a run must call it alike.
    """
    from . import prefetch  # noqa: PLC0415
    from .compare import install_fast_comparisons  # noqa: PLC0415 - compare imports this module
    from .wire import install_object_channel  # noqa: PLC0415

    crypten = load_crypten()
    crypten.cfg.mpc.provider = "TTP" if dealer == "ttp" else "TFP"
    crypten.cfg.encoder.precision_bits = precision_bits
    crypten.cfg.communicator.verbose = count_communication  # count rounds and bytes
    # Every comparison (relu, max, argmax, softmax's max, ...) through the cheaper, output-
    # identical carry-save circuit of mpc_fi.compare; all parties do it alike.
    install_fast_comparisons(crypten)
    _PATCHES.add("fast-comparisons")
    # CrypTen's object messages (dealer requests, sizes) as checked JSON, never pickle.
    install_object_channel(crypten)
    _PATCHES.add("object-channel")
    # Served sessions: the dealer prepares party 0's next call while it is idle (mpc_fi.prefetch;
    # without a served session the patched provider asks online, as CrypTen does).
    _PATCHES.add("dealer-prefetch", prefetch.install(crypten))
    return crypten
