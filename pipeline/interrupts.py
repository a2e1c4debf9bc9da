"""Ctrl-C, SIGTERM and SIGHUP as one exception, raised where it can be cleaned up after.

`install()` (the CLI calls it) turns each of these signals into `Interrupted`, which, like
`KeyboardInterrupt`, is no `Exception`: no `except Exception` swallows it. Inside
`deferred()` a signal is only noted and raised when the block ends, so bookkeeping that
must not be cut in half (telling the study a trial's end, closing its MLflow run) finishes
first. The signal is remembered, so `check()` raises it again even if some library caught
the first one. Only the first signal raises: later ones would cut the cleanup it started.
"""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A signal asked this process to stop; its exit status is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_received: int | None = None
_depth = 0


def _handle(signum, frame) -> None:
    global _received
    if _received is not None:  # already stopping: a second signal (the sweep terminating
        return  # its workers after their Ctrl-C) must not cut the cleanup of the first
    _received = signum
    if _depth == 0:
        raise Interrupted(signum)


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to `Interrupted` in this (main) thread."""
    global _received
    _received = None
    for signum in SIGNALS:
        signal.signal(signum, _handle)


def check() -> None:
    """Raise `Interrupted` if a signal has arrived since `install()`."""
    if _received is not None:
        raise Interrupted(_received)


def hold() -> None:
    """Defer signals until the matching `release()`."""
    global _depth
    _depth += 1


def release(raise_after: bool = True) -> None:
    """End a `hold()`; a signal that arrived meanwhile is raised now (with `raise_after`)."""
    global _depth
    _depth -= 1
    if _depth == 0 and raise_after:
        check()


@contextlib.contextmanager
def deferred(raise_after: bool = True):
    """Run the block to its end; a signal that arrives meanwhile is raised after it (or,
    with `raise_after` false, by the caller's next `check()`)."""
    hold()
    try:
        yield
    finally:
        release(raise_after=False)
    if raise_after:
        check()
