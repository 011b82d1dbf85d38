"""Ctrl-C and SIGTERM: stop between two optimiser steps, so that the checkpoint saved on the way out is exact.

A step moves the task sampler, the noise generator and the optimiser; a checkpoint taken in the middle of
one would resume from a state no uninterrupted run ever had. So the first SIGINT or SIGTERM during
training only asks the loop to stop after the current step (the loop saves, then raises
`TrainingInterrupted`); a second one stops at once (KeyboardInterrupt, nothing saved). Outside the loop
(loading, caching, export) `terminate_as_interrupt` turns SIGTERM into KeyboardInterrupt, as Ctrl-C is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(RuntimeError):
    """Training ended early (a non-finite loss, an attention collapse with action "stop", a checkpoint that
    does not fit); the message says what happened and what was kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal; the message says what was saved and how to continue."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (docker stop, a job scheduler, kill) raises KeyboardInterrupt as Ctrl-C
    does; the previous handler comes back after it."""

    def handler(signum, frame):
        raise TrainingInterrupted("", signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class StopAfterStep:
    """Context manager for the training loop: `requested` holds the first signal's number, or 0.

    Signal handlers can only be set from the main thread; elsewhere (training in a thread of a frontend)
    this does nothing and the process keeps its own handling.
    """

    def __init__(self) -> None:
        self.requested = 0
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopAfterStep:
        self.requested = 0
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        # os.write, not print: a handler may run in the middle of a buffered write to the same stream
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                    f"(send it again to stop at once, without saving)\n".encode())

    def __exit__(self, *exc) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old.clear()
