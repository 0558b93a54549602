"""Small federations on disk for the launcher tests (trained once per session, a few seconds).

``make_federation(workdir, ...)`` writes ``federation.yaml`` (owners' weights, the querier's
``queries.npy``) and returns its path with the plaintext twin's labels for those queries.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_federation(workdir: str | Path, *, num_owners: int = 2, queries: int = 24,
                    mode: str = "output", batch_size: int = 256, network: dict | None = None,
                    seed: int = 0, arch: str = "mlp") -> tuple[Path, np.ndarray]:
    """Train ``num_owners`` demo owners and write a federation file; return (path, twin labels)."""
    import demos as demo  # noqa: PLC0415
    from mpc_fi.plugins import PROTOCOLS, lookup  # noqa: PLC0415

    workdir = Path(workdir)
    setup = demo.prepare(workdir, num_owners=num_owners, seed=seed, mode=mode, arch=arch,
                         batch_size=batch_size)
    x = setup.x_test[:queries]
    np.save(workdir / "queries.npy", x)
    data = setup.federation.to_dict()
    data["querier"]["data"] = str(workdir / "queries.npy")
    for owner in data["owners"]:
        for key in [k for k, v in owner["model"].items() if v is None]:
            del owner["model"][key]
        if owner.get("host") is None:
            owner.pop("host", None)
    data["querier"] = {k: v for k, v in data["querier"].items() if v is not None}
    data["network"] = {k: v for k, v in {**data["network"], **(network or {})}.items()
                       if v is not None}
    path = workdir / "federation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    twin = lookup(PROTOCOLS, setup.federation.protocol.name, key="protocol")(
        num_classes=10, num_owners=num_owners, reveal="label",
        precision_bits=setup.federation.precision_bits)
    labels = twin.plaintext(demo.owner_logits(setup.models, x)).labels
    return path, np.asarray(labels)


def with_network(path: Path, target: Path, **network: Any) -> Path:
    """Copy of the federation file at ``target`` with ``network`` keys replaced."""
    data = yaml.safe_load(Path(path).read_text())
    data["network"] = {**data.get("network", {}), **network}
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def with_identities(path: Path, target: Path, key_dir: Path) -> Path:
    """Copy of the federation file at ``target`` naming a fresh key pair for every party
    (``mpc-fi keygen`` files in ``key_dir``: NAME.key beside NAME.key_secret)."""
    from mpc_fi import keys  # noqa: PLC0415
    from mpc_fi.config import FederationConfig  # noqa: PLC0415

    names = FederationConfig.load(path).party_names
    for name in names:
        keys.generate(key_dir, name)
    data = yaml.safe_load(Path(path).read_text())
    data["identities"] = {name: str(key_dir / f"{name}.key") for name in names}
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def wait_for_line(path: Path, pattern: str, timeout_s: float, step_s: float = 0.002) -> bool:
    """Poll a party log until a line matches ``pattern`` (regex)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if any(rx.search(line) for line in Path(path).read_text(errors="replace").splitlines()):
                return True
        except OSError:
            pass
        time.sleep(step_s)
    return False


def log_time(path: Path, pattern: str) -> float | None:
    """Seconds since midnight of the first log line matching ``pattern`` (None if none)."""
    rx = re.compile(pattern)
    for line in Path(path).read_text(errors="replace").splitlines():
        if rx.search(line):
            h, m, rest = line[:12].split(":")
            return int(h) * 3600 + int(m) * 60 + float(rest)
    return None


def clock() -> float:
    """Now, in the log lines' clock: seconds since local midnight."""
    t = time.localtime()
    return t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec + time.time() % 1


def logged_pids(run_dir: Path) -> dict[str, int]:
    """Party name -> pid, from each log's 'starting (pid N' line."""
    out = {}
    for log in Path(run_dir).glob("party-*.log"):
        m = re.search(r"starting \(pid (\d+)", log.read_text(errors="replace"))
        if m:
            out[log.stem.split("-", 2)[2]] = int(m.group(1))
    return out


def alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """Every live process of session ``sid`` (orphans keep their session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _decode_address(hexaddr: str) -> tuple[str, int]:
    """``/proc/net/tcp{,6}``'s ``0100007F:985F`` -> ``("127.0.0.1", 39007)``."""
    addr, port = hexaddr.split(":")
    raw = bytes.fromhex(addr)
    # The kernel prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def listening(*, port: int | None = None, pids: list[int] | None = None) -> list[tuple[str, int]]:
    """TCP listening sockets ``(address, port)`` of this network namespace, those on ``port``
    or those held by ``pids`` only."""
    inodes = set().union(*(_socket_inodes(p) for p in pids)) if pids is not None else None
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address = _decode_address(fields[1])
            if port is not None and address[1] != port:
                continue
            if inodes is not None and fields[9] not in inodes:
                continue
            out.append(address)
    return out
