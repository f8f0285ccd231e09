"""Tasks for tests/test_resilience.py, loaded by worker subprocesses as `tests.resilience_app:app`.

A handler here waits for a gate file that the test creates, so the test decides when an
attempt ends (while the database is down, after its job was rescued, ...) instead of
sleeping and hoping the timing worked out. Its result names the process and attempt
that produced it, so a test can tell which attempt's outcome the database kept.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pgqueue import App, current_job

app = App()


def gate_path(gates: str | Path, attempt: int) -> Path:
    """The file that lets attempt `attempt` of a `gated` job with this gates directory finish."""
    return Path(gates) / f"attempt-{attempt}"


def _log(event: str) -> None:
    job = current_job()
    with Path(os.environ["PGQUEUE_TEST_LOG"]).open("a") as log:
        log.write(f"{event} {job.id} {job.attempt} {os.getpid()}\n")


@app.task(name="gated")
async def gated(gates: str) -> dict[str, int]:
    """Logs `start JOB ATTEMPT PID`, waits for its attempt's gate file, logs `end …`.

    Async on purpose: the handler runs on the worker's own event loop, so it keeps
    waiting (and then finishes) however long the worker's database calls hang.
    """
    _log("start")
    gate = gate_path(gates, current_job().attempt)
    while not gate.exists():
        await asyncio.sleep(0.02)
    _log("end")
    return {"pid": os.getpid(), "attempt": current_job().attempt}
