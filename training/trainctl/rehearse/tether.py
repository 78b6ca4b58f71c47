"""Tie the processes the rehearsal starts to the rehearsal: when it dies, they die.

    python -m trainctl.rehearse.tether FD -- ARGV...

Every process tree the rehearsal starts that could outlive it (an emulated instance's
agent and training, the reference run) is started through this launcher in a session of
its own, so a Ctrl-C in the terminal reaches only the rehearsal, which then stops them
itself. (An SSM command is not: it talks to its instance's agent and ends when that
agent is gone.) That leaves the case where the rehearsal cannot clean up: SIGKILL, a crash, the
OOM killer. The launcher runs ARGV as its child and keeps the read end `FD` of a pipe
whose write end only the rehearsal process holds (`lifeline()`); nothing is ever written
to it, so a read returns only at end of file, which the kernel delivers the moment the
rehearsal process is gone, however it ended. The launcher then SIGKILLs everything below
it (an emulated machine does not get to shut down cleanly) and exits.

Why not prctl(PR_SET_PDEATHSIG) in a preexec_fn: the signal follows the *thread* that
forked the child, not the process, and the rehearsal starts processes from more than one
thread (the reference run from a worker thread that ends before the rehearsal does), so
they would be killed when that thread ends; and preexec_fn is unsafe in a process with
threads. The pipe has
neither problem, and works wherever pipes do.

On Linux the launcher is also a child subreaper (prctl PR_SET_CHILD_SUBREAPER): a
training process whose agent died (it runs in a session of its own) is reparented to the
launcher rather than to init, so it is still found below it and killed with the rest.
Finding the processes below uses /proc, as the rest of the instance emulator does. When
ARGV exits, whatever it left running below the launcher is killed too (on EC2 it would
run until the instance ended; here nothing else would ever end it), and the launcher
exits with ARGV's status, by the same signal if ARGV was killed by one.

This module is imported by every launcher process: keep its imports to the standard
library (no pydantic, no boto3).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_lifeline: tuple[int, int] | None = None
_lifeline_lock = threading.Lock()


def lifeline() -> int:
    """The read end of this process's lifeline pipe (created once, open until exit).

    Both ends are non-inheritable (os.pipe's default): a child gets the read end only by
    being handed it (`pass_fds`), and no child ever holds the write end, so end of file
    on the read end means this process has ended.
    """
    global _lifeline
    with _lifeline_lock:
        if _lifeline is None:
            _lifeline = os.pipe()
        return _lifeline[0]


def tethered(argv: Sequence[str]) -> tuple[list[str], tuple[int]]:
    """`argv` run through the launcher, and the fds to pass (`Popen(..., pass_fds=...)`)."""
    fd = lifeline()
    return [sys.executable, "-m", "trainctl.rehearse.tether", str(fd), "--", *argv], (fd,)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found through /proc (a child in a session of its own,
    like the agent's training process, is still a descendant)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child in children.get(current, []):
            found.append(child)
            frontier.append(child)
    return found


def kill_tree(pid: int, *, include_root: bool = True) -> None:
    """SIGKILL `pid` and everything below it, all at once (collected before the first
    kill, so a child reparented by its parent's death is not missed)."""
    victims = descendants(pid)
    if include_root:
        victims.insert(0, pid)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)


def _become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # best effort: without it, orphans escape


def _reap(seconds: float = 2.0) -> None:
    """Collect the children just killed, reparented orphans included (a parent that does
    not reap leaves zombies); bounded, in case one is stuck in the kernel."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(ChildProcessError):
        while time.monotonic() < deadline:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.01)


def _end(code: int) -> None:
    """Kill everything below, then exit with `code` (negative: by that signal, like ARGV)."""
    kill_tree(os.getpid(), include_root=False)
    _reap()
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m trainctl.rehearse.tether FD -- ARGV...", file=sys.stderr)
        return 2
    fd, command = int(argv[0]), list(argv[2:])
    _become_subreaper()
    # Stopped by the rehearsal (or anyone) with a signal: take the children along.
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, lambda received, _frame: _end(-received))
    child = subprocess.Popen(command)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 1):
                pass
        _end(-signal.SIGKILL)  # the rehearsal is gone: so is this "machine"

    threading.Thread(target=watch, name="tether-lifeline", daemon=True).start()
    code = child.wait()
    _end(code)
    return code  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
