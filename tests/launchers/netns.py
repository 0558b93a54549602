"""Test-only: several "hosts" on one machine, as Linux network namespaces.

Two topologies, both a star around a switch namespace, so nothing touches the root namespace's
network and every address (``10.231.<net>.<k+1>``) exists only inside namespaces made here:

* ``bridge``: each party namespace has a veth pair whose other end sits on a Linux bridge in the
  switch namespace. Links can be cut (``ip link set ... down``) and, on kernels with ``sch_netem``,
  shaped with ``tc qdisc ... netem``.
* ``emulated``: each party namespace has a TUN device whose file descriptor is held by
  :mod:`linkemu` (a small userspace switch). It adds a one-way delay and serialises each
  party's egress at a given rate, like ``netem delay RTT/2 rate R`` on every host's link. It
  exists because some kernels (this project's CI VMs) ship without ``sch_netem``.

Everything is removed in :meth:`Topology.close` (namespaces, hence their links; processes started
inside them; the emulator), also after a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None when they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    name = f"mpcfi-probe-{os.getpid()}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"'ip netns add' failed: {res.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def netem_available() -> bool:
    """Whether this kernel has sch_netem (probed inside a throw-away namespace)."""
    name = f"mpcfi-netem-{os.getpid()}"
    if _ip("netns", "add", name, check=False).returncode != 0:
        return False
    try:
        _ip("-n", name, "link", "set", "lo", "up", check=False)
        res = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo",
                              "root", "netem", "delay", "1ms"], capture_output=True, text=True)
        return res.returncode == 0
    finally:
        _ip("netns", "del", name, check=False)


def shaper_unavailable_reason() -> str | None:
    """Why links cannot be shaped: neither ``tc netem`` nor the TUN emulator (None: one can)."""
    if netem_available():
        return None
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return (f"no sch_netem in this kernel and /dev/net/tun cannot be opened ({exc.strerror}) "
                "for the userspace link emulator")
    return None


@dataclass(frozen=True)
class Profile:
    """A link profile: round-trip time added between any two hosts, and each host's rate."""

    name: str
    rtt_ms: float
    rate_mbit: float | None  # None: unlimited


class Topology:
    """``n`` party namespaces around one switch namespace.

    ``ns(k)`` is party k's namespace, ``address(k)`` its address, ``exec_argv(k, argv)`` the
    command line running ``argv`` inside it.
    """

    def __init__(self, n: int, *, kind: str = "bridge", profile: Profile | None = None,
                 net: int = 0, mtu: int = 1500) -> None:
        if kind not in ("bridge", "emulated"):
            raise ValueError(kind)
        self.n, self.kind, self.profile, self.net, self.mtu = n, kind, profile, net, mtu
        self.tag = f"mpcfi{os.getpid()}x{int(time.time() * 1000) % 100000}"
        self.switch = f"{self.tag}-sw"
        self.procs: list[subprocess.Popen] = []
        self.emulator: subprocess.Popen | None = None
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- names -------------------------------------------------------------------------
    def ns(self, k: int) -> str:
        return f"{self.tag}-p{k}"

    def address(self, k: int) -> str:
        return f"10.231.{self.net}.{k + 1}"

    def link(self, k: int) -> tuple[str, str]:
        """(namespace, interface) of the switch side of party k's link (to cut it)."""
        return (self.switch, f"s{k}") if self.kind == "bridge" else (self.ns(k), "eth0")

    def exec_argv(self, k: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(k), *argv]

    # -- set-up ------------------------------------------------------------------------
    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch)
        for k in range(self.n):
            self._add_ns(self.ns(k))
        if self.kind == "bridge":
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for k in range(self.n):
                _ip("-n", self.switch, "link", "add", f"s{k}", "type", "veth", "peer", "name",
                    "eth0", "netns", self.ns(k))
                _ip("-n", self.switch, "link", "set", f"s{k}", "master", "br0", "up")
                self._configure(k)
            if self.profile is not None:
                self._netem()
        else:
            self._emulated()

    def _configure(self, k: int) -> None:
        ns = self.ns(k)
        _ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "mtu", str(self.mtu), "up")

    def _netem(self) -> None:
        prof = self.profile
        for k in range(self.n):
            args = ["delay", f"{prof.rtt_ms / 2:g}ms"]
            if prof.rate_mbit:
                args += ["rate", f"{prof.rate_mbit:g}mbit"]
            subprocess.run(["ip", "netns", "exec", self.ns(k), "tc", "qdisc", "replace", "dev",
                            "eth0", "root", "netem", *args], check=True, capture_output=True)

    def _emulated(self) -> None:
        prof = self.profile or Profile("native", 0.0, None)
        ready = Path(f"/tmp/{self.tag}.ready")
        argv = [sys.executable, str(HERE / "linkemu.py"), "--count", str(self.n),
                "--prefix", "eth", "--delay-ms", f"{prof.rtt_ms / 2}",
                "--ready", str(ready), "--realtime"]
        if prof.rate_mbit:
            argv += ["--rate-mbit", f"{prof.rate_mbit}"]
        # The emulator creates its TUN devices in the switch namespace and holds their fds.
        self.emulator = subprocess.Popen(["ip", "netns", "exec", self.switch, *argv],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.emulator.poll() is not None or time.monotonic() > deadline:
                err = self.emulator.stderr.read().decode() if self.emulator.poll() is not None else ""
                raise RuntimeError(f"link emulator did not start: {err}")
            time.sleep(0.05)
        ready.unlink()
        for k in range(self.n):
            _ip("-n", self.switch, "link", "set", f"eth{k}", "netns", self.ns(k))
            if k:
                _ip("-n", self.ns(k), "link", "set", f"eth{k}", "name", "eth0")
            self._configure(k)

    # -- processes ---------------------------------------------------------------------
    def popen(self, k: int, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.exec_argv(k, argv), **kwargs)
        self.procs.append(proc)
        return proc

    def pids(self, k: int) -> list[int]:
        res = _ip("netns", "pids", self.ns(k), check=False)
        return [int(p) for p in res.stdout.split()]

    def set_link(self, k: int, up: bool) -> None:
        ns, dev = self.link(k)
        _ip("-n", ns, "link", "set", dev, "up" if up else "down")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for name in self._made:
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        if self.emulator is not None and self.emulator.poll() is None:
            self.emulator.kill()
            self.emulator.wait(10)
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
