"""Eager mode for users' unit tests: enqueue runs the job in the caller, no database needed."""

from __future__ import annotations

import asyncio

import pytest

from pgqueue import App, Fail, InvalidJobError, JobFailedError, JobState, Retry, Settings, Snooze, current_job
from pgqueue.testing import eager

# no database at all: a DSN nothing listens on, which any connection attempt would hit
app = App(Settings(dsn="postgresql://nobody@127.0.0.1:1/nowhere", connect_timeout=1))
attempts: list[int] = []


@app.task(name="double")
def double(n: int) -> int:
    current_job().progress(1, 1, stage="done")
    return n * 2


@app.task(name="flaky", max_attempts=3)
async def flaky() -> str:
    attempts.append(current_job().attempt)
    if current_job().attempt < 3:
        raise Retry(3600, "not yet")  # eager mode does not wait for the delay
    return "third time"


@app.task(name="doomed", max_attempts=2)
def doomed() -> None:
    raise ValueError("always")


@app.task(name="refused")
def refused() -> None:
    raise Fail("bad input")


@app.task(name="napper")
def napper() -> str:
    if current_job().attempt == 1 and len(attempts) < 1:
        attempts.append(0)
        raise Snooze(60)
    return "awake"


@app.task(name="sets")
def sets() -> set[int]:
    return {1}


def test_an_enqueue_runs_the_job_at_once_without_a_database() -> None:
    attempts.clear()
    with eager(app) as ran:
        job = double.enqueue(None, n=21)
        retried = flaky.enqueue(None)
        dead = doomed.enqueue(None)
        failed = refused.enqueue(None)
        many = double.enqueue_many(None, [{"n": 1}, {"n": 2}])
    assert job.wait() == 42 and job.state() == JobState.SUCCEEDED
    assert job.progress() == {"current": 1, "total": 1, "percent": 100.0, "message": None, "stage": "done"}
    assert retried.wait() == "third time" and attempts == [1, 2, 3]
    with pytest.raises(JobFailedError, match="ValueError: always") as error:
        dead.wait()
    assert error.value.state == "dead" and len(error.value.errors) == 2
    with pytest.raises(JobFailedError, match="bad input"):
        failed.wait()
    assert [run.task for run in ran] == ["double", "flaky", "doomed", "refused", "double", "double"]
    assert [run.result for run in ran[-2:]] == [2, 4] and len(many) == 2


def test_what_a_worker_would_refuse_is_refused_in_eager_mode_too() -> None:
    attempts.clear()
    with eager(app):
        with pytest.raises(InvalidJobError):
            double.enqueue(None, n={1, 2})  # type: ignore[arg-type]  # not JSON
        with pytest.raises(JobFailedError, match="InvalidResultError"):
            sets.enqueue(None).wait()  # a result that is not JSON
        snoozed = napper.enqueue(None)
    assert snoozed.wait() == "awake" and snoozed.job().attempt == 1  # a snooze is not an attempt


def test_async_enqueues_run_on_the_callers_loop() -> None:
    async def scenario() -> int:
        with eager(app):
            job = await double.enqueue_async(None, n=5)
            # the sync API from inside a running loop works as well
            other = double.enqueue(None, n=6)
        return int(await job.wait_async()) + int(other.wait())

    assert asyncio.run(scenario()) == 22


def test_outside_the_block_enqueue_needs_the_database_again() -> None:
    from pgqueue import DatabaseUnavailableError

    with pytest.raises(DatabaseUnavailableError):
        double.enqueue(None, n=1)
