"""CrypTen's randomness, replaced by :class:`~mpc_fi.csprng.CSPRNG` streams.

CrypTen 0.4.1 draws every mask from ``torch.Generator`` objects (MT19937, 32 bits of seed):

* ``crypten.generators["prev" | "next" | "local" | "global"]``: the pairwise keys of the
  pseudo-random zero sharings (every ``cryptensor(src=...)``), party-local randomness (the
  trusted-first-party provider's triples), and randomness all parties share;
* the TTP dealer's per-party generators (``TTPServer._setup_generators``, seeded from torch's
  global generator) and each party's copy (``TTPClient._setup_generators``).

:func:`install` replaces all of them, and the two functions every CrypTen sampler goes through
(``crypten.common.rng.generate_random_ring_element`` and ``generate_kbit_random_tensor``, also
where other CrypTen modules imported them by name). The replacements accept only a
:class:`CSPRNG`: a leftover ``torch.Generator`` on any path raises instead of silently masking a
secret with 32 bits of entropy.

Keys (256 bits each, ``os.urandom``): each party draws the key it shares with the next party and
sends it there (the previous party's key arrives the same way), rank 0 draws and broadcasts the
global key, each party draws its local key, and the dealer draws one key per party and sends it
to that party only. Key exchange uses the same channels CrypTen used for its seeds; across hosts
those channels must be encrypted (THREAT_MODEL.md).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import torch

from . import audit
from .csprng import CSPRNG, key_to_tensor, new_key, tensor_to_key
from .errors import InsecureSettingWarning, MpcFiError

_RING = 2 ** 64
#: Names under which CrypTen modules hold the two sampling functions.
_SAMPLER_HOMES = ("crypten.common.rng", "crypten.mpc.primitives.arithmetic",
                  "crypten.mpc.primitives.binary", "crypten.mpc.provider.tfp_provider",
                  "crypten.mpc.provider.ttp_provider")

#: True while this process rehearses a computation (:func:`mpc_fi.prefetch.rehearse`): the
#: samplers return zeros and no stream moves. Nothing computed then is ever sent.
_REHEARSING = False


def set_rehearsing(flag: bool) -> None:
    """Turn the rehearsal mode of the samplers on or off (see :data:`_REHEARSING`)."""
    global _REHEARSING
    _REHEARSING = bool(flag)


PRZS = "przs"  # the pairwise keys (prev/next), one purpose so that both holders agree
LOCAL = "local"
GLOBAL = "global"
DEALER = "dealer"


class InsecureRandomnessError(MpcFiError):
    """A secret was about to be masked by something other than the CSPRNG."""

    exit_code = 1


def _crypten() -> Any:
    """CrypTen, as :func:`mpc_fi._crypten.load_crypten` imported it (it installs this module)."""
    return sys.modules["crypten"]


def _generator_for(generator: Any, device: Any) -> CSPRNG:
    crypten = _crypten()
    if generator is None:
        dev = torch.device("cpu") if device is None else torch.device(device)
        generator = crypten.generators["local"].get(dev)
    if not isinstance(generator, CSPRNG):
        raise InsecureRandomnessError(
            f"CrypTen asked for randomness from {type(generator).__name__}, not the CSPRNG: a "
            "code path bypassed mpc_fi's randomness patch (is crypten imported through "
            "mpc_fi._crypten.load_crypten and initialised with crypten.init()?)")
    return generator


def generate_random_ring_element(size: Any, ring_size: int = _RING, generator: Any = None,
                                 **kwargs: Any) -> torch.Tensor:
    """CrypTen's sampler of uniform ``Z_2**64`` elements, from the CSPRNG."""
    if ring_size != _RING:
        raise InsecureRandomnessError(f"ring size {ring_size} is not supported (only 2**64)")
    device = kwargs.get("device")
    if _REHEARSING:
        return torch.zeros(size, dtype=torch.int64, device=device)
    return _generator_for(generator, device).ring(size, device=device)


def generate_kbit_random_tensor(size: Any, bitlength: int | None = None, generator: Any = None,
                                **kwargs: Any) -> torch.Tensor:
    """CrypTen's sampler of uniform ``bitlength``-bit integers, from the CSPRNG."""
    device = kwargs.get("device")
    if _REHEARSING:
        return torch.zeros(size, dtype=torch.int64, device=device)
    return _generator_for(generator, device).kbits(size, 64 if bitlength is None else bitlength,
                                                   device=device)


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda")] + [torch.device(f"cuda:{i}")
                                             for i in range(torch.cuda.device_count())]
    return devices


def _set_generators(next_key: bytes, prev_key: bytes, local_key: bytes, global_key: bytes) -> None:
    crypten = _crypten()
    for device in _devices():
        # One stream per device, like CrypTen: parties on the same device kind stay in step.
        crypten.generators["prev"][device] = CSPRNG(prev_key, purpose=PRZS, device=device)
        crypten.generators["next"][device] = CSPRNG(next_key, purpose=PRZS, device=device)
        crypten.generators["local"][device] = CSPRNG(local_key, purpose=LOCAL, device=device)
        crypten.generators["global"][device] = CSPRNG(global_key, purpose=GLOBAL, device=device)


def _exchange_keys(next_key: bytes, global_key: bytes) -> tuple[bytes, bytes]:
    """Send ``next_key`` to the next rank, receive the previous rank's; rank 0's global key."""
    comm = _crypten().communicator.get()
    world, rank = comm.get_world_size(), comm.get_rank()
    if world < 2:
        return next_key, global_key
    outgoing = key_to_tensor(next_key)
    incoming = torch.zeros_like(outgoing)
    with audit.opening("keys", "przs"):
        sent = comm.isend(outgoing, (rank + 1) % world)
        got = comm.irecv(incoming, src=(rank - 1) % world)
        sent.wait()
        got.wait()
        shared = comm.broadcast(key_to_tensor(global_key), 0)
    return tensor_to_key(incoming), tensor_to_key(shared)


def setup_prng() -> None:
    """``crypten._setup_prng`` with 256-bit keys and CSPRNG streams (called by crypten.init)."""
    next_key, local_key = new_key(), new_key()
    prev_key, global_key = _exchange_keys(next_key, new_key())
    _set_generators(next_key, prev_key, local_key, global_key)


def manual_seed(next_seed: int, local_seed: int, global_seed: int) -> None:
    """``crypten.manual_seed`` (tests only, warns): keys derived from every bit of the seeds."""
    import hashlib  # noqa: PLC0415

    warnings.warn("crypten.manual_seed fixes the keys of the streams that mask every share: "
                  "anyone who knows the seeds can undo the sharing. Use it in tests only.",
                  InsecureSettingWarning, stacklevel=2)

    def key(seed: int, label: bytes) -> bytes:
        raw = int(seed).to_bytes(32, "big", signed=True)
        return hashlib.sha256(b"mpc-fi/manual-seed/" + label + raw).digest()

    prev_key, global_key = _exchange_keys(key(next_seed, b"next"), key(global_seed, b"global"))
    _set_generators(key(next_seed, b"next"), prev_key, key(local_seed, b"local"), global_key)


# -- the trusted dealer (TTP) -----------------------------------------------------------------
def _client_setup_generators(self: Any) -> None:
    """TTPClient: receive this party's 256-bit key from the dealer (replaces a 64-bit seed)."""
    import torch.distributed as dist  # noqa: PLC0415

    comm = _crypten().communicator.get()
    words = torch.zeros(4, dtype=torch.int64)
    dist.irecv(tensor=words, src=comm.get_ttp_rank(), group=self.ttp_group).wait()
    dist.barrier(group=self.ttp_group)
    key = tensor_to_key(words)
    self.generator = CSPRNG(key, purpose=DEALER)
    self.generator_cuda = CSPRNG(key, purpose=DEALER, device="cuda") \
        if torch.cuda.is_available() else None


def _server_setup_generators(self: Any) -> None:
    """TTPServer: one fresh 256-bit key per party, each sent to that party only."""
    import torch.distributed as dist  # noqa: PLC0415

    world = _crypten().communicator.get().get_world_size()
    keys = [new_key() for _ in range(world)]
    words = [key_to_tensor(k) for k in keys]
    requests = [dist.isend(tensor=words[i], dst=i, group=self.ttp_group) for i in range(world)]
    self.generators = [CSPRNG(k, purpose=DEALER) for k in keys]
    self.generators_cuda = [CSPRNG(k, purpose=DEALER, device="cuda") for k in keys] \
        if torch.cuda.is_available() else [None] * world
    for request in requests:
        request.wait()
    dist.barrier(group=self.ttp_group)
    logging.getLogger("mpc_fi").info(
        "randomness: dealer streams %s", ", ".join(sorted({type(g).__name__ for g in self.generators})))


def install(crypten: Any) -> dict[str, Any]:
    """Replace every CrypTen randomness source (see the module docstring); return the originals."""
    import importlib  # noqa: PLC0415

    ttp_provider = crypten.mpc.provider.ttp_provider
    saved: dict[str, Any] = {}
    for home in _SAMPLER_HOMES:
        module = importlib.import_module(home)
        for name, fn in (("generate_random_ring_element", generate_random_ring_element),
                         ("generate_kbit_random_tensor", generate_kbit_random_tensor)):
            if hasattr(module, name):
                saved[f"{home}.{name}"] = getattr(module, name)
                setattr(module, name, fn)
    client = ttp_provider.TTPClient._TTPClient__TTPClient  # CrypTen's private singleton class
    saved["TTPClient._setup_generators"] = client._setup_generators
    client._setup_generators = _client_setup_generators
    saved["TTPServer._setup_generators"] = ttp_provider.TTPServer._setup_generators
    ttp_provider.TTPServer._setup_generators = _server_setup_generators
    saved["crypten._setup_prng"] = crypten._setup_prng
    crypten._setup_prng = setup_prng
    saved["crypten.manual_seed"] = crypten.manual_seed
    crypten.manual_seed = manual_seed
    # Before crypten.init() nothing may draw: no torch.Generator stays in the table.
    for table in crypten.generators.values():
        table.clear()
    return saved


def generators_in_use() -> dict[str, str]:
    """Type of every generator this party would mask with (for tests: all must be CSPRNG)."""
    crypten = _crypten()
    ttp_provider = crypten.mpc.provider.ttp_provider
    out = {f"crypten.generators[{k}][{d}]": type(g).__name__
           for k, table in crypten.generators.items() for d, g in table.items()}
    try:
        out["TTPClient.generator"] = type(ttp_provider.TTPClient.get().generator).__name__
    except RuntimeError:
        pass
    return out
