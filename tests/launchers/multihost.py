"""Test-only: run a federation with one real ``mpc-fi party`` process per namespace "host".

Used by ``test_netns.py`` and by ``measure_links.py`` (the LAN/WAN cost table).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedkit import wait_for_line  # noqa: F401 - re-exported for the tests
from mpc_fi import records
from netns import Topology

MPC_FI = str(Path(sys.executable).with_name("mpc-fi"))
PORT = 29500  # every namespace has its own port space: a fixed port is safe here


@dataclass
class HostRun:
    """One multi-host run: per-party processes, outputs and result files."""

    topology: Topology
    federation: Path
    run_dir: Path
    names: list[str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    outputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    wall_s: float = 0.0

    def log(self, name: str) -> Path:
        rank = self.names.index(name)
        return self.run_dir / name / f"party-{rank}-{name}.log"

    def wait(self, timeout_s: float) -> dict[str, int]:
        """Wait for every party; kill any still running after ``timeout_s`` (rc -9 then)."""
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name, proc in self.procs.items():
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            self.outputs[name] = (out, err)
            codes[name] = proc.returncode
        self.wall_s = time.monotonic() - self._t0
        return codes

    def result(self, name: str) -> dict[str, Any] | None:
        path = self.run_dir / name / f"result-{self.names.index(name)}.npz"
        if not path.exists():
            return None
        return records.load(path)


def federation_for(topology: Topology, source: Path, target: Path, *,
                   timeout_s: float = 60.0, transport: str = "auto",
                   prefetch: bool = True) -> Path:
    """Copy of ``source`` whose parties meet at rank 0's namespace address.

    ``transport`` ``curve``: every party gets a key pair (``keys/`` beside ``target``) named
    under ``identities``; otherwise the plaintext network is acknowledged (test namespaces)."""
    data = yaml.safe_load(Path(source).read_text())
    data["network"] = {"address": topology.address(0), "port": PORT, "timeout_s": timeout_s,
                       "prefetch": prefetch}
    if transport == "curve":
        from mpc_fi import keys  # noqa: PLC0415
        from mpc_fi.config import FederationConfig  # noqa: PLC0415

        folder = target.parent / f"{target.stem}-keys"
        names = FederationConfig.load(source).party_names
        for name in names:
            keys.generate(folder, name, force=True)
        data["identities"] = {n: str(folder / f"{n}.key") for n in names}
    else:
        data["network"].update(acknowledge_plaintext_network=True, transport=transport)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def start_parties(topology: Topology, federation: Path, run_dir: Path, names: list[str],
                  only: list[str] | None = None, timeout_s: float = 300.0) -> HostRun:
    """``mpc-fi party --federation F --party NAME`` for each party, party k in namespace k."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    run = HostRun(topology, federation, run_dir, names)
    run._t0 = time.monotonic()
    for k, name in enumerate(names):
        if only is not None and name not in only:
            continue
        argv = [MPC_FI, "party", "--federation", str(federation), "--party", name,
                "--run-dir", str(run_dir / name), "--timeout", str(timeout_s)]
        run.procs[name] = topology.popen(k, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    return run


def party_names(federation: Path) -> list[str]:
    from mpc_fi.config import FederationConfig  # noqa: PLC0415

    return list(FederationConfig.load(federation).party_names)


def querier_labels(stdout: str) -> list[int] | None:
    for line in stdout.splitlines():
        if line.startswith("labels:"):
            return [int(v) for v in line.split()[1:]]
    return None
