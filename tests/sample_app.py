"""Tasks at module level, importable by worker subprocesses and process pools."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from pgqueue import App, current_job

app = App()


@app.task(name="cpu", executor="process")
def cpu(n: int) -> int:
    return sum(range(n))


@app.task(name="record")
def record(n: int) -> int:
    """Appends `job_id pid` to $PGQUEUE_TEST_LOG, one line per execution."""
    with Path(os.environ["PGQUEUE_TEST_LOG"]).open("a") as log:
        log.write(f"{current_job().id} {os.getpid()}\n")
    return n


@app.task(name="record_async")
async def record_async(n: int) -> int:
    with Path(os.environ["PGQUEUE_TEST_LOG"]).open("a") as log:
        log.write(f"{current_job().id} {os.getpid()}\n")
    return n


@app.task(name="sleep_then_record")
async def sleep_then_record(seconds: float) -> str:
    """Marks its start in the log, sleeps, then marks its end."""
    path = Path(os.environ["PGQUEUE_TEST_LOG"])
    with path.open("a") as log:
        log.write(f"start {current_job().id} {os.getpid()}\n")
    await asyncio.sleep(seconds)
    with path.open("a") as log:
        log.write(f"end {current_job().id} {os.getpid()}\n")
    return "slept"


@app.task(name="blocking_sleep")
def blocking_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@app.task(name="cpu_retry", executor="process", max_attempts=3)
def cpu_retry(marker: str) -> str:
    """Asks for a retry on its first attempt (the exception crosses a process boundary)."""
    from pgqueue import Retry

    if not Path(marker).exists():
        Path(marker).touch()
        raise Retry(delay=0.1, reason="first attempt")
    return "second time lucky"


@app.task(name="cpu_crash", executor="process", max_attempts=1)
def cpu_crash() -> None:
    """Dies like a process killed by the out-of-memory killer."""
    os._exit(9)


@app.task(name="cpu_whoami", executor="process")
def cpu_whoami() -> list[int]:
    """Reports the job it runs for, from inside the child process."""
    return [current_job().id, current_job().attempt]


@app.task(name="cpu_hang", executor="process", timeout=0.5, max_attempts=1)
def cpu_hang(marker: str) -> None:
    """Never finishes on its own; leaves its pid in `marker` to check it was stopped."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)


class LockedError(Exception):
    """Cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class PickyError(Exception):
    """Pickles, but cannot be unpickled: its __init__ wants two arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")


@app.task(name="cpu_unpicklable", executor="process", max_attempts=1)
def cpu_unpicklable(picky: bool) -> None:
    if picky:
        raise PickyError(7, "upstream said no")
    raise LockedError("holding a lock")


@app.task(name="cpu_sleep", executor="process")
def cpu_sleep(seconds: float) -> str:
    """Holds a process-pool child for `seconds`."""
    time.sleep(seconds)
    return "slept"


@app.task(name="timed", queue="limited")
async def timed(seconds: float) -> None:
    """Writes `begin ID TIME` and `end ID TIME` (wall clock) to $PGQUEUE_TEST_LOG around a sleep."""
    path = Path(os.environ["PGQUEUE_TEST_LOG"])
    with path.open("a") as log:
        log.write(f"begin {current_job().id} {time.time()}\n")
    await asyncio.sleep(seconds)
    with path.open("a") as log:
        log.write(f"end {current_job().id} {time.time()}\n")


@app.task(name="cpu_until_cancelled", executor="process", max_attempts=1)
def cpu_until_cancelled(marker: str) -> None:
    """Runs until stopped; leaves its pid in `marker`."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)


@app.task(name="cpu_reports_progress", executor="process", max_attempts=1)
def cpu_reports_progress() -> None:
    """Tries to report progress from a process-pool child, which cannot."""
    current_job().progress(1, 2)
