"""SIGTERM and SIGINT (preemption, Ctrl-C): finish the step, save a checkpoint, exit cleanly.

Cluster schedulers announce preemption with SIGTERM and a grace period; a user stops a run with
Ctrl-C. Either way the default behaviour (die mid-step, or a KeyboardInterrupt from wherever the
host happens to be) loses every step since the last checkpoint. Within `StopSignals` the signal
only sets a flag that the training loop reads at each step boundary; the loop then saves and
raises `kdjax.errors.Interrupted` (exit code 128 + the signal number). A second signal of the same
kind gets the previous behaviour back: an impatient second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager that turns SIGTERM/SIGINT into a request read at step boundaries.

    `received` is the first signal's number, or None. Signal handlers can only be installed from
    the main thread; elsewhere (a library caller's worker thread) this does nothing.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        # Only a flag: the handler runs between two bytecodes of the main thread, which may be
        # inside a print or a save, so anything more is done by the loop.
        if self.received is None:
            self.received = signum
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
