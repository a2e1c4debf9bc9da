"""Who a worker is (`host:pid`), whether it is known to be dead, and a beat that says
it is alive.

A trial records the worker that claimed it; a RUNNING trial whose worker died on this
host is failed at once. On another host nothing can be told from here: Optuna's heartbeat
decides there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import threading

PARENT_ENV = "ABLATE_PARENT_PID"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def died_here(worker: str) -> bool:
    """True when `worker` ran on this host and its process is gone. A process killed but
    not yet reaped by its parent (a zombie) is gone too."""
    import psutil

    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to inspect: alive as far as we know
        return False


def end_with_parent() -> None:
    """In a worker the sweep started (`ABLATE_PARENT_PID` set): receive SIGTERM when the
    sweep dies, even by SIGKILL (Linux), and stop at once if it is already gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def every(seconds: float, beat):
    """Call `beat()` now and every `seconds` while the block runs, in a daemon thread."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            beat()
            stop.wait(seconds)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
