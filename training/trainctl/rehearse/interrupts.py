"""Stopping a rehearsal early: the request (from a signal) and the exception that unwinds.

`trainctl rehearse` turns SIGINT, SIGTERM and SIGHUP into an `Interrupted` raised in the
main thread (`command.signals_unwind`) and records them in a `StopRequest`, which the
rehearsal checks at safe points (`StopRequest.check`), so that a run stops even when the
exception raised from the signal handler was swallowed where Python ignores exceptions.
"""

from __future__ import annotations

import signal
import threading


class Interrupted(KeyboardInterrupt):
    """The rehearsal was told to stop by a signal: unwind as Ctrl-C does.

    A KeyboardInterrupt, so that no `except Exception` on the way swallows it and every
    `finally` runs: the instances' processes are killed, moto stops, the scratch
    directories are removed.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Set once, by the first stop signal; checked by the rehearsal between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, signum: int) -> None:
        self.signum = signum
        self._event.set()

    def check(self) -> None:
        """Raise `Interrupted` if a stop was requested."""
        if self.signum is not None and self._event.is_set():
            raise Interrupted(self.signum)
