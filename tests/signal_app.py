"""Tasks for the shutdown tests (tests/test_signals.py), one per executor, loaded by real workers.

Each task marks its start and its end in $PGQUEUE_TEST_LOG as `start JOB PID` and
`end JOB PID`: the test knows when a job is really running (not merely claimed), in
which process it runs, and whether it ever finished, even after its worker has gone.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pgqueue import App, current_job

app = App()


def mark(event: str) -> None:
    """Append `EVENT JOB PID` to the executions log (one write, so lines never interleave)."""
    with Path(os.environ["PGQUEUE_TEST_LOG"]).open("a") as log:
        log.write(f"{event} {current_job().id} {os.getpid()}\n")


@app.task(name="signals.async_sleep")
async def async_sleep(seconds: float) -> str:
    """Runs on the worker's event loop."""
    mark("start")
    await asyncio.sleep(seconds)
    mark("end")
    return "slept"


@app.task(name="signals.thread_sleep")
def thread_sleep(seconds: float) -> str:
    """Runs in the worker's thread pool, where nothing can interrupt it."""
    mark("start")
    time.sleep(seconds)
    mark("end")
    return "slept"


@app.task(name="signals.process_sleep", executor="process")
def process_sleep(seconds: float) -> str:
    """Runs in a process-pool child, which the worker must stop when it gives the job back."""
    mark("start")
    time.sleep(seconds)
    mark("end")
    return "slept"
