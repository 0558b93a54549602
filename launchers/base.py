"""The launcher interface: start the parties, wait with a timeout, terminate, results by rank."""

from __future__ import annotations

import contextlib
import json
import zipfile
import shutil
import signal
import tempfile
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from mpc_fi import records
from mpc_fi.config import FederationConfig
from mpc_fi.errors import InsecureSettingWarning, MpcFiError, Terminated
from mpc_fi.memory import check_limit


class Launcher(ABC):
    """Starts the parties of ``federation`` this launcher is responsible for, and collects their
    results by rank: every party (:class:`~launchers.local.LocalLauncher`), or the one party of
    this host (:class:`~launchers.host.HostLauncher`, which returns ``{its rank: result}``).

    ``run_dir`` receives one log per party (``party-<rank>-<name>.log``, every line tagged with
    rank, role and name) and the result files; a fresh temporary folder by default. A reused
    folder is cleared of the previous run's files for these parties when they start (its logs
    are kept once, as ``party-<rank>-<name>.log.1``). A folder this launcher created itself
    (no ``run_dir`` given) is removed after a successful :meth:`run` unless ``keep_run_dir``;
    a failed run keeps it, and the error raised names it (``exc.run_dir`` too).
    ``progress(done, total)`` is called as the querier finishes batches (where the launcher can
    see it: the local launcher).
    ``memory_limit_mb`` bounds each party's working memory for a batch (:mod:`mpc_fi.memory`:
    larger batches are split, a query that cannot fit is refused); None: a share of the memory
    available on the host.
    """

    def __init__(self, federation: FederationConfig, *, run_dir: str | Path | None = None,
                 stop_grace_s: float = 10.0, memory_limit_mb: float | None = None,
                 keep_run_dir: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.federation = federation
        self.memory_limit_mb = check_limit(memory_limit_mb)
        #: True when this launcher made the run folder (a temporary one) and may remove it
        self.created_run_dir = not run_dir
        self.keep_run_dir = keep_run_dir
        self.progress = progress
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="mpc-fi-run-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop_grace_s = stop_grace_s
        warn_insecure(federation)

    @abstractmethod
    def start(self, *, query: np.ndarray | None = None) -> None:
        """Start the parties; ``query`` goes to the querier's process only."""

    @abstractmethod
    def wait(self, timeout_s: float | None = None) -> dict[int, dict[str, Any]]:
        """Block until every party finished; stop them all and raise if one fails or time runs out."""

    @abstractmethod
    def terminate(self) -> None:
        """Stop every party still running (idempotent)."""

    def run(self, *, query: np.ndarray | None = None, timeout_s: float | None = None
            ) -> dict[int, dict[str, Any]]:
        """Start, wait, and stop every party whatever happens (an error, Ctrl-C, SIGTERM: see
        :func:`sigterm_raises`)."""
        with sigterm_raises(self):
            try:
                self.start(query=query)
            except BaseException as exc:
                self.terminate()
                if isinstance(exc, MpcFiError):
                    raise name_run_dir(exc, self.run_dir) from None
                raise
        return self.finish(timeout_s)

    def finish(self, timeout_s: float | None = None) -> dict[int, dict[str, Any]]:
        """Wait for the started parties (a run, or a served session after its stop), stop them
        whatever happens, and remove the run folder after a success."""
        self._closing = True  # a served session ends: no party rejoins any more
        with sigterm_raises(self):
            try:
                results = self.wait(timeout_s)
            except MpcFiError as exc:
                raise name_run_dir(exc, self.run_dir)
            finally:
                self.terminate()
        self.remove_run_dir()
        return results

    @property
    def run_dir_removed(self) -> bool:
        return self.created_run_dir and not self.keep_run_dir and not self.run_dir.exists()

    def remove_run_dir(self) -> None:
        """After a success: remove the run folder if this launcher created it and nobody asked
        to keep it (a folder the caller named is never removed)."""
        if self.created_run_dir and not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    #: Set once the parties are being stopped (a served session's parties then stop rejoining).
    _closing = False
    #: True while :meth:`terminate` runs: a SIGTERM then waits for it (see :func:`sigterm_raises`).
    _stopping = False
    _sigterm_pending = False

    @contextlib.contextmanager
    def terminating(self) -> Iterator[None]:
        """Wrap the body of :meth:`terminate`: a SIGTERM arriving meanwhile does not cut it short;
        :class:`~mpc_fi.errors.Terminated` is raised once every party is stopped."""
        outer = self._stopping
        self._stopping = True
        try:
            yield
        finally:
            self._stopping = outer
        if not outer and self._sigterm_pending:
            self._sigterm_pending = False
            raise Terminated()

    def log_path(self, rank: int) -> Path:
        return self.run_dir / f"party-{rank}-{self.federation.party_names[rank]}.log"

    def log_tail(self, rank: int, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(rank).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


    def last_step(self, rank: int) -> str | None:
        """The last progress line party ``rank`` logged (its phase when it stopped)."""
        try:
            lines = self.log_path(rank).read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            _, sep, msg = line.partition("] INFO ")
            if sep and not msg.startswith(("starting", "exit")):
                return msg
        return None


@contextlib.contextmanager
def sigterm_raises(launcher: Launcher) -> Iterator[None]:
    """While the parties run, SIGTERM to this process raises :class:`~mpc_fi.errors.Terminated`.

    Left to its default action, SIGTERM would end this process at once, leaving the parties to
    notice on their own (:mod:`launchers.lifeline`); raised as an exception, it lets the
    launcher's ``finally`` stop every party first, and a CLI report it. Only in the main thread
    (the one that runs Python's signal handlers) and only while SIGTERM has its default action:
    a handler the application installed stays in charge. Nested uses are no-ops.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if launcher._stopping:  # let terminate() finish; it raises Terminated then
            launcher._sigterm_pending = True
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def name_run_dir(exc: MpcFiError, run_dir: Path) -> MpcFiError:
    """``exc`` with the run folder (kept, with every party's log) named in its message and in
    ``exc.run_dir``."""
    if getattr(exc, "run_dir", None) is None:
        exc.run_dir = str(run_dir)
        note = f"(party logs kept in {run_dir})"
        exc.args = (f"{exc.args[0]}\n{note}" if exc.args else note, *exc.args[1:])
    return exc


def warn_insecure(federation: FederationConfig) -> None:
    """Loud warnings for settings that weaken security (also written to every party log)."""
    for message in insecure_settings(federation):
        warnings.warn(message, InsecureSettingWarning, stacklevel=3)


def insecure_settings(federation: FederationConfig) -> list[str]:
    out = []
    if federation.dealer == "insecure-party-dealer":
        out.append(
            f"dealer 'insecure-party-dealer': party {federation.party_names[0]} generates every "
            "Beaver triple and could recover any value opened during the protocol, including other "
            "owners' predictions and (in full mode) the query. Use dealer: ttp outside development.")
    transport = federation.transport()
    if not federation.network.is_loopback() and transport != "curve":
        out.append(f"parties talk to {federation.network.address} over plaintext TCP "
                   f"({transport}): shares are readable on the wire and no party proves who it "
                   "is unless the parties run inside a VPN (WireGuard; see docs/multihost.md). "
                   "Name every party's public key under identities (mpc-fi keygen) instead.")
    return out


def write_atomic(path: Path, obj: Any) -> None:
    """A party's result or error record for its launcher (:mod:`mpc_fi.records`, never pickle)."""
    records.save(path, obj)


def read_record(path: Path) -> Any:
    """A record :func:`write_atomic` wrote; ``ValueError`` if it is missing or not a record."""
    try:
        return records.load(path)
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ValueError(f"no readable record at {path}: {exc}") from None


def wait_until(predicate, timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()
