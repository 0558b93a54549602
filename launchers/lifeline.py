"""No local party outlives the process that launched it.

The local launcher's parties are forked by a fork server, not by the launcher itself, so the
kernel's ``PR_SET_PDEATHSIG`` in a party only fires when the *fork server* dies; and the fork
server, left alone, keeps running as long as any party holds its "alive" pipe. Killing the
launcher (SIGKILL gives it no chance to clean up) therefore left the fork server and every party
running to the end of the run. Two watchers close that gap, each enough on its own:

* the fork server watches its parent, the launching process (:func:`exit_with_parent`, from
  :mod:`launchers._preload`), and leaves when it is gone, which fires every party's
  ``PR_SET_PDEATHSIG``;
* every party watches the launching process itself (:func:`exit_when_gone`, with the pid and
  start time the launcher passes in) and leaves when it is gone.

Both watch the *process*: ``PR_SET_PDEATHSIG`` fires when the parent *thread* exits, which would
kill a fork server started by a worker thread of a long-lived application once that thread ends.
A watcher holds a pidfd (Linux ≥ 5.3) and wakes the moment the process exits; it compares the
process's start time first, so a pid reused by another process is never mistaken for the
launcher. Without pidfds it polls ``/proc`` every half second.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

POLL_S = 0.5  # fallback polling interval where pidfds are missing


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if
    no such process (or it is a zombie, which has exited already)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def this_process() -> tuple[int, int | None]:
    """``(pid, start time)`` of this process: what a child needs to watch it."""
    return os.getpid(), start_time(os.getpid())


def _wait_gone(pid: int, started: int | None) -> None:
    """Return once process ``pid`` (started at ``started``) no longer runs."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        fd = None
    try:
        if start_time(pid) != started:  # gone already; the pid may belong to someone else now
            return
        if fd is not None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll():  # readable once the process exits
                pass
            return
        while start_time(pid) == started:
            time.sleep(POLL_S)
    finally:
        if fd is not None:
            os.close(fd)


def exit_when_gone(pid: int, started: int | None, *, code: int,
                   before_exit: Callable[[], None] | None = None) -> threading.Thread:
    """End this process with ``code`` (``os._exit``, no teardown) once process ``pid`` is gone.

    Runs in a daemon thread; ``before_exit`` (say, a last log line) runs first, and whatever it
    raises is ignored.
    """
    def watch() -> None:
        _wait_gone(pid, started)
        if before_exit is not None:
            try:
                before_exit()
            except BaseException:  # noqa: BLE001 - leaving matters more than the log line
                pass
        os._exit(code)

    thread = threading.Thread(target=watch, name=f"mpc-fi-watch-{pid}", daemon=True)
    thread.start()
    return thread


def exit_with_parent(code: int = 0) -> threading.Thread | None:
    """End this process once its parent process is gone (see the module docstring).

    Does nothing when the parent is gone already (this process was re-parented, pid 1): then
    nothing is left to watch, and the fork server leaves as soon as it has no clients.
    """
    parent = os.getppid()
    if parent <= 1:
        return None
    return exit_when_gone(parent, start_time(parent), code=code)
