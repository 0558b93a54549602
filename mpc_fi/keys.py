"""Party identities: CURVE key pairs, the files that hold them, and their fingerprints.

Every party (owner, querier, dealer) has a long-term Curve25519 key pair made by
``mpc-fi keygen``. The federation file names each party's *public* key (``identities``); each
party keeps its *secret* key to itself. The parties' channels (:mod:`mpc_fi.channel`, ZeroMQ's
CurveZMQ handshake) prove both ends hold the secret key of the public key the federation names
for them, so a process without the right key cannot take a seat.

Files are ZeroMQ's certificate format, written and read by ``zmq.auth`` (the same files
``curve_keygen`` and CZMQ's ``zcert`` use): ``NAME.key`` holds the public key (share it),
``NAME.key_secret`` holds both keys (keep it; ``keygen`` writes it readable by its owner only,
and :func:`load_secret` refuses a file that others can read, as ``ssh`` does).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .errors import ConfigError

#: Z85 text of a 32-byte Curve25519 key.
KEY_TEXT_LENGTH = 40


def _zmq():  # noqa: ANN202 - the module; imported here so that a plain import stays light
    import zmq  # noqa: PLC0415
    import zmq.auth  # noqa: PLC0415

    if not zmq.has("curve"):
        raise ConfigError("this pyzmq has no CURVE support; install pyzmq from its wheels "
                          "(they bundle libzmq with libsodium)", key="identities")
    return zmq


def generate(directory: str | os.PathLike[str], name: str, *, force: bool = False
             ) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600) in ``directory``.

    Refuses to overwrite an existing key unless ``force``: a lost secret key cannot be made
    again, and every federation file that names the old public key would stop accepting it.
    """
    zmq = _zmq()
    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise ConfigError(f"a key name must be a plain file name, got {name!r}", key="name")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [p for p in (public, secret) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists: a key pair is never overwritten silently (move "
                          "it away, or pass --force to replace it)", key="name")
    for path in existing:
        path.unlink()
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        written = zmq.auth.create_certificates(str(folder), name,
                                               metadata={"party": name, "made-by": "mpc-fi"})
    finally:
        os.umask(old)
    os.chmod(written[0], 0o644)
    os.chmod(written[1], 0o600)
    return Path(written[0]), Path(written[1])


def _check_text(text: str, where: str) -> str:
    zmq = _zmq()
    if len(text) != KEY_TEXT_LENGTH:
        raise ConfigError(f"a CURVE public key is {KEY_TEXT_LENGTH} characters of Z85 text (or "
                          f"the path of a .key file made by mpc-fi keygen), got {text!r}", key=where)
    try:
        raw = zmq.utils.z85.decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError):
        raise ConfigError(f"{text!r} is not Z85 text", key=where) from None
    if len(raw) != 32:
        raise ConfigError(f"{text!r} does not decode to a 32-byte key", key=where)
    return text


def read_public(value: str, *, base: str | os.PathLike[str] | None = None,
                where: str = "identities") -> str:
    """A public key as Z85 text, from the text itself or a ``.key`` file (relative to ``base``)."""
    if not isinstance(value, str) or not value:
        raise ConfigError("must be a public key (Z85 text) or the path of a .key file",
                          key=where)
    if len(value) == KEY_TEXT_LENGTH and not value.endswith((".key", ".pub")) \
            and not (Path(base or ".") / value).exists():
        return _check_text(value, where)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not path.is_file():
        raise ConfigError(f"{value!r} is neither a public key ({KEY_TEXT_LENGTH} characters of Z85 "
                          f"text) nor a key file: no file at {path} (make one with: mpc-fi "
                          "keygen NAME)", key=where)
    public, _secret = _load(path, where)
    return _check_text(public.decode("ascii"), where)


def load_secret(path: str | os.PathLike[str], *, where: str = "key") -> tuple[str, str]:
    """``(public, secret)`` Z85 text from a ``.key_secret`` file that only its owner can read."""
    file = Path(os.path.expanduser(str(path)))
    if not file.is_file():
        raise ConfigError(f"no secret key file at {file} (make one with: mpc-fi keygen NAME)",
                          key=where)
    mode = stat.S_IMODE(file.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"permissions {mode:04o} for {file} are too open: a secret key must be "
                          f"readable by its owner only (chmod 600 {file})", key=where)
    zmq = _zmq()
    public, secret = _load(file, where)
    if secret is None:
        raise ConfigError(f"{file} holds a public key only; pass the .key_secret file", key=where)
    pub = _check_text(public.decode("ascii"), where)
    sec = secret.decode("ascii")
    if zmq.curve_public(sec.encode("ascii")).decode("ascii") != pub:
        raise ConfigError(f"{file}: its public key does not belong to its secret key", key=where)
    return pub, sec


def _load(path: Path, where: str) -> tuple[bytes, bytes | None]:
    """``(public, secret or None)`` from a ZeroMQ certificate file."""
    zmq = _zmq()
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not a key file of mpc-fi keygen / ZeroMQ: {exc}",
                          key=where) from None


def fingerprint(public: str) -> str:
    """A short, stable name for a public key: the first 16 bytes of its SHA-256, in hex."""
    return hashlib.sha256(public.encode("ascii")).hexdigest()[:32]


def ephemeral_pair() -> tuple[str, str]:
    """A fresh ``(public, secret)`` pair held in memory only (the local launcher's parties)."""
    zmq = _zmq()
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")
