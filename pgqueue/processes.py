"""Process-pool children that obey their worker: deaf to its signals, dead with it.

A forked child inherits the worker's asyncio signal handling: a no-op Python handler
and the wake-up descriptor of the worker's event loop. Left so, a SIGTERM sent to the
child (by `terminate()`, or to the whole process group by a terminal or a supervisor)
neither stops it nor goes unnoticed: it lands in the worker's loop as if the worker
itself had been signalled. So each child, before it runs anything, ignores SIGTERM
and SIGINT (the worker decides when its jobs stop, and stops a child with SIGKILL),
drops the inherited wake-up descriptor, and asks Linux to kill it when its worker
dies, so a `kill -9` of the worker never leaves a child finishing a job nobody will
record.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def new_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool whose children are prepared by `_prepare_child`."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, initializer=_prepare_child, initargs=(os.getpid(),)
    )


def submit(
    pool: concurrent.futures.ProcessPoolExecutor, call: Callable[[], Any]
) -> concurrent.futures.Future[Any]:
    """`pool.submit(call)`, with the worker's signals held back while children are forked.

    With the fork start method the pool forks its children inside `submit`. A signal
    that reached a child between the fork and its initializer would still run the
    inherited handler, so the signals stay blocked across the fork; the worker gets
    any that arrived meanwhile as soon as they are unblocked.
    """
    with _signals_blocked():
        return pool.submit(call)


def kill_children(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Stop every child of `pool` now (SIGKILL: they ignore SIGTERM) and shut the pool down."""
    # ProcessPoolExecutor offers no public way to stop a running call; its child
    # processes are reachable through this attribute on every CPython since 3.2 (None
    # once the pool has noticed that a child died).
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _prepare_child(worker_pid: int) -> None:
    """Initializer of each child, run before its first job."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing was inherited
        signal.set_wakeup_fd(-1)
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # blocked across the fork by `submit`
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:
        os._exit(1)  # the worker died before the request above took effect
