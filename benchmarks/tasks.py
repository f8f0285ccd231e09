"""The task app the benchmarks run: an async no-op and a latency-recording task.

Workers load it as `benchmarks.tasks:app` (run from the repository root). Both handlers
are as cheap as a handler can be, so the figures measure pgqueue, not the work.
"""

from __future__ import annotations

import os
import time

from pgqueue import App

NOOP_QUEUE = "bench"
LATENCY_QUEUE = "bench-latency"
# The latency task appends "<seq> <time.time() at handler start>" lines here.
LATENCY_FILE_ENV = "PGQUEUE_BENCH_LATENCY_FILE"

app = App()


@app.task(name="bench.noop", queue=NOOP_QUEUE)
async def noop(n: int = 0) -> None:
    """Does nothing: the drain benchmark measures claim, dispatch and completion only."""
    return None


_latency_fd: int | None = None


@app.task(name="bench.latency", queue=LATENCY_QUEUE)
async def record_latency(seq: int) -> None:
    """Record when the handler started, first thing, with one unbuffered O_APPEND write."""
    started = time.time()
    global _latency_fd
    if _latency_fd is None:
        _latency_fd = os.open(os.environ[LATENCY_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_latency_fd, f"{seq} {started!r}\n".encode())
