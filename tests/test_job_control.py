"""Job control against real workers: cancelling running jobs of each kind, progress, snooze,
and waiting on a job's handle."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgqueue import (
    App,
    Cancelled,
    Fail,
    InvalidJobError,
    JobFailedError,
    JobFinishedError,
    JobNotFoundError,
    JobProgress,
    JobState,
    Snooze,
    current_job,
)
from pgqueue.context import progress_report
from pgqueue.testing import running_worker, wait_for
from tests.conftest import pgqueue_command, subprocess_environment


def cancelled_within(app: App, job_id: int, seconds: float) -> float:
    """Wait for the job to end cancelled; how long that took after now."""
    asked = time.monotonic()
    wait_for(lambda: app.get_job(job_id).state == JobState.CANCELLED, timeout=seconds, what="cancelled")
    return time.monotonic() - asked


def test_a_running_async_handler_is_cancelled_within_a_second(new_app: Callable[..., App]) -> None:
    app = new_app(poll_interval=0.2)
    started, stopped = threading.Event(), threading.Event()

    @app.task(name="slow_async", max_attempts=5)
    async def slow_async() -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "never"

    handle = slow_async.enqueue(None)
    with running_worker(app):
        assert started.wait(10)
        assert handle.cancel() == "cancelling"
        # within 5 s: the heartbeat comes every 10 s (a third of the 30 s lease), so only
        # the NOTIFY can have brought it (a second or less here, but no timing asserts)
        cancelled_within(app, handle, 5)
        assert stopped.is_set()
    job = app.get_job(handle)
    # cancelled, not failed: no retry although 4 attempts were left, and the history says so
    assert job.state == JobState.CANCELLED and job.attempt == 1 and job.finished_at is not None
    assert job.errors[-1]["kind"] == "cancelled" and job.history[-1]["outcome"] == "cancelled"
    with pytest.raises(JobFailedError, match="cancelled") as failed:
        handle.wait(timeout=1)
    assert failed.value.state == "cancelled"


def test_a_sync_handler_sees_the_flag_and_stops_itself(new_app: Callable[..., App]) -> None:
    app = new_app(poll_interval=0.2)
    started = threading.Event()
    checks: list[bool] = []

    @app.task(name="slow_sync", executor="thread")
    def slow_sync() -> str:
        started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            checks.append(current_job().cancelled)
            current_job().raise_if_cancelled()
            time.sleep(0.01)
        return "never"

    handle = slow_sync.enqueue(None)
    with running_worker(app):
        assert started.wait(10)
        assert app.cancel(handle) == "cancelling"
        cancelled_within(app, handle, 5)
    assert checks[0] is False and checks[-1] is True  # it ran, then saw the flag
    assert app.get_job(handle).errors[-1]["kind"] == "cancelled"


def test_a_process_handler_is_stopped_by_killing_its_child(sample: App, tmp_path: Path) -> None:
    from tests.sample_app import cpu_until_cancelled

    marker = tmp_path / "child.pid"
    handle = cpu_until_cancelled.enqueue(None, marker=str(marker))
    with running_worker(sample):
        wait_for(lambda: marker.exists() and marker.read_text() != "", what="the child to start")
        child = int(marker.read_text())
        assert sample.cancel(handle) == "cancelling"
        cancelled_within(sample, handle, 5)
        wait_for(lambda: not _alive(child), timeout=5, what=f"child {child} to be killed")


def test_a_worker_that_does_not_listen_learns_of_the_cancel_at_its_heartbeat(
    new_app: Callable[..., App],
) -> None:
    # no LISTEN: the request reaches the worker with its heartbeat, every third of a lease
    app = new_app(poll_interval=0.2, listen=False, lease_seconds=1.5)
    started = threading.Event()

    @app.task(name="deaf")
    async def deaf() -> None:
        started.set()
        await asyncio.sleep(60)

    handle = deaf.enqueue(None)
    with running_worker(app):
        assert started.wait(10)
        assert handle.cancel() == "cancelling"
        cancelled_within(app, handle, 5)


def test_cancelling_in_each_state_and_bad_ids(app: App, connection: psycopg.Connection[Any]) -> None:
    @app.task(name="later")
    def later() -> None: ...

    queued = later.enqueue(None)
    assert app.cancel(queued) == "cancelled"  # at once: no worker involved
    assert app.get_job(queued).state == JobState.CANCELLED
    with pytest.raises(JobFinishedError, match="already ended \\(cancelled\\)") as finished:
        app.cancel(queued)
    assert finished.value.state == "cancelled" and finished.value.job_id == queued
    with pytest.raises(JobNotFoundError):
        app.cancel(10**12)
    # the same in SQL
    other = later.enqueue(None)
    assert connection.execute("select pgqueue.cancel(%s)", (other,)).fetchone() == ("cancelled",)
    assert connection.execute("select pgqueue.cancel(%s)", (other,)).fetchone() == ("already cancelled",)
    assert connection.execute("select pgqueue.cancel(%s)", (10**12,)).fetchone() == (None,)


def test_a_running_job_released_after_its_cancel_request_is_cancelled_by_the_leader(
    connection: psycopg.Connection[Any],
) -> None:
    (job_id,) = connection.execute("select pgqueue.enqueue('t')").fetchone() or (0,)
    connection.execute("select * from pgqueue.claim_jobs('w1', array['default'], 1, 30)")
    assert connection.execute("select pgqueue.cancel(%s)", (job_id,)).fetchone() == ("cancelling",)
    # the worker shuts down and hands the job back before it saw the request
    connection.execute("select pgqueue.release_jobs('w1', array[]::bigint[])")
    assert connection.execute("select state from pgqueue.jobs where id = %s", (job_id,)).fetchone() == (
        "queued",
    )
    assert connection.execute("select * from pgqueue.prune_job_control()").fetchone() == (1, 0)
    assert connection.execute("select state from pgqueue.jobs where id = %s", (job_id,)).fetchone() == (
        "cancelled",
    )
    assert connection.execute("select count(*) from pgqueue.cancel_requests").fetchone() == (0,)


def test_a_failure_after_the_cancel_request_ends_cancelled_not_retried(
    connection: psycopg.Connection[Any],
) -> None:
    (job_id,) = connection.execute("select pgqueue.enqueue('t')").fetchone() or (0,)
    connection.execute("select * from pgqueue.claim_jobs('w1', array['default'], 1, 30)")
    connection.execute("select pgqueue.cancel(%s)", (job_id,))
    rows = connection.execute(
        "select id, state from pgqueue.complete_jobs_v2('w1', array[%s]::bigint[], array[1], array['failed'],"
        ' array[null]::jsonb[], array[\'{"kind": "exception", "error": "boom"}\']::jsonb[],'
        " array[null]::float8[], array[null]::timestamptz[], array[null]::timestamptz[])",
        (job_id,),
    ).fetchall()
    assert rows == [(job_id, "cancelled")]


def test_the_command_line_cancels_a_running_job(new_app: Callable[..., App], dsn: str) -> None:
    import subprocess

    app = new_app(poll_interval=0.2)
    started = threading.Event()

    @app.task(name="cli_slow")
    async def cli_slow() -> None:
        started.set()
        await asyncio.sleep(60)

    handle = cli_slow.enqueue(None)
    with running_worker(app):
        assert started.wait(10)
        done = subprocess.run(
            pgqueue_command("--dsn", dsn, "cancel", str(handle)),
            capture_output=True,
            text=True,
            env=subprocess_environment(),
            timeout=60,
        )
        assert done.returncode == 0 and "asked to stop it" in done.stdout
        cancelled_within(app, handle, 5)


def test_progress_is_readable_while_the_job_runs_and_after(
    new_app: Callable[..., App], connection: psycopg.Connection[Any]
) -> None:
    app = new_app(poll_interval=0.2)
    go_on = threading.Event()
    heard: list[JobProgress] = []
    app.hooks.add(JobProgress, heard.append)

    @app.task(name="report", executor="thread")
    def report() -> str:
        job = current_job()
        job.progress(1, 4, message="fetched", stage="fetch")
        assert go_on.wait(10)
        job.progress(3, 4, stage="render")
        return "done"

    handle = report.enqueue(None)
    with running_worker(app):
        wait_for(lambda: handle.progress() is not None, what="the first report")
        assert handle.progress() == {
            "current": 1,
            "total": 4,
            "percent": 25.0,
            "message": "fetched",
            "stage": "fetch",
        }
        assert handle.state() == JobState.RUNNING
        row = connection.execute(
            "select progress ->> 'stage', (progress ->> 'percent')::float from pgqueue.job_progress"
            " where job_id = %s",
            (handle,),
        ).fetchone()
        assert row == ("fetch", 25.0)
        go_on.set()
        assert handle.wait(timeout=10) == "done"
    final = app.get_job(handle).progress
    assert final is not None and final["percent"] == 75.0 and final["stage"] == "render"
    assert [event.progress["current"] for event in heard] == [1, 3]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((5, 0, None, None), "total must be positive"),
        ((-1, 10, None, None), "current must not be negative"),
        ((float("nan"), 10, None, None), "current must be a finite number"),
        (("3", 10, None, None), "current must be a finite number"),
        ((1, 2, "x" * 501, None), "message must be a string of at most 500"),
        ((1, 2, None, 7), "stage must be a string"),
    ],
)
def test_bad_progress_is_a_typed_error(arguments: tuple[Any, ...], message: str) -> None:
    with pytest.raises(InvalidJobError, match=message):
        progress_report(*arguments)


def test_progress_without_a_total_and_past_it(app: App) -> None:
    assert progress_report(7, None, "working", None)["percent"] is None
    assert progress_report(12, 10, None, None)["percent"] == 100.0
    with pytest.raises(LookupError):
        current_job()


def test_a_snoozed_job_comes_back_later_without_spending_an_attempt(new_app: Callable[..., App]) -> None:
    app = new_app(poll_interval=0.1)
    runs: list[int] = []

    @app.task(name="not_yet", max_attempts=1)
    async def not_yet() -> str:
        runs.append(current_job().attempt)
        if len(runs) < 3:
            raise Snooze(0.2)
        return "ready"

    handle = not_yet.enqueue(None)
    with running_worker(app):
        assert handle.wait(timeout=10) == "ready"
    job = app.get_job(handle)
    # three runs with one attempt allowed: a snooze is not an attempt, nor an error
    assert runs == [1, 1, 1] and job.attempt == 1 and job.errors == [] and job.history == []
    with pytest.raises(InvalidJobError):
        Snooze(-1)
    with pytest.raises(InvalidJobError, match="10 years"):
        Snooze(timedelta(days=3660))


def test_wait_returns_the_result_raises_the_final_error_or_times_out(new_app: Callable[..., App]) -> None:
    app = new_app(poll_interval=0.1)

    @app.task(name="fine")
    async def fine(n: int) -> int:
        return n * 2

    @app.task(name="broken")
    async def broken() -> None:
        raise Fail("bad input")

    ok, bad = fine.enqueue(None, n=21), broken.enqueue(None)
    parked = fine.options(delay=3600).enqueue(None, n=1)
    with running_worker(app):
        assert ok.wait(timeout=10) == 42
        with pytest.raises(JobFailedError, match="bad input") as failed:
            app.wait(bad, timeout=10)
        assert failed.value.state == "dead" and failed.value.errors[-1]["kind"] == "fail"
        with pytest.raises(TimeoutError, match=r"did not finish within 0\.3s"):
            parked.wait(timeout=0.3)
        assert asyncio.run(ok.wait_async(timeout=5)) == 42
    with pytest.raises(JobNotFoundError):
        app.wait(10**12, timeout=1)


def test_a_handler_that_raises_cancelled_itself_ends_cancelled(new_app: Callable[..., App]) -> None:
    app = new_app(poll_interval=0.1)

    @app.task(name="gives_up", max_attempts=3)
    async def gives_up() -> None:
        raise Cancelled("the order was withdrawn")

    handle = gives_up.enqueue(None)
    with running_worker(app), pytest.raises(JobFailedError):
        handle.wait(timeout=10)
    assert app.get_job(handle).state == JobState.CANCELLED and app.get_job(handle).attempt == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: only its parent's wait is missing
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def test_a_job_asked_to_stop_before_its_handler_started_never_runs(app: App) -> None:
    from datetime import UTC, datetime

    from pgqueue.attempts import run_attempt
    from pgqueue.context import JobContext
    from pgqueue.executors import Executors
    from pgqueue.models import ClaimedJob

    ran: list[int] = []

    @app.task(name="never_started")
    async def never_started() -> None:
        ran.append(1)

    now = datetime.now(UTC)
    job = ClaimedJob(7, "never_started", {}, "default", 0, 1, 3, None, now, now)
    context = JobContext(7, "never_started", "default", 1, 3, "w1")
    context.request_cancel()  # arrived between the claim and the handler's start

    async def attempt() -> Any:
        return await run_attempt(
            job, context, app.tasks, Executors(1, lambda: None), app.settings, lambda: False
        )

    outcome = asyncio.run(attempt())
    assert outcome.kind == "cancelled" and ran == []


def test_a_job_released_or_snoozed_after_its_cancel_request_ends_cancelled(
    connection: psycopg.Connection[Any],
) -> None:
    for outcome in ("released", "snoozed", "deferred"):
        (job_id,) = connection.execute("select pgqueue.enqueue('t')").fetchone() or (0,)
        connection.execute("select * from pgqueue.claim_jobs('w1', array['default'], 1, 30)")
        connection.execute("select pgqueue.cancel(%s)", (job_id,))
        rows = connection.execute(
            "select id, state from pgqueue.complete_jobs_v2('w1', array[%s]::bigint[], array[1], array[%s],"
            " array[null]::jsonb[], array[null]::jsonb[], array[5]::float8[], array[null]::timestamptz[],"
            " array[null]::timestamptz[])",
            (job_id, outcome),
        ).fetchall()
        assert rows == [(job_id, "cancelled")], outcome


def test_a_request_ends_with_its_job_and_a_redrive_runs_again(
    app: App, connection: psycopg.Connection[Any]
) -> None:
    (job_id,) = connection.execute("select pgqueue.enqueue('t')").fetchone() or (0,)
    connection.execute("select * from pgqueue.claim_jobs('w1', array['default'], 1, 30)")
    connection.execute("select pgqueue.cancel(%s)", (job_id,))
    connection.execute(
        "select * from pgqueue.complete_jobs_v2('w1', array[%s]::bigint[], array[1], array['cancelled'],"
        " array[null]::jsonb[], array[null]::jsonb[], array[null]::float8[], array[null]::timestamptz[],"
        " array[null]::timestamptz[])",
        (job_id,),
    )
    assert connection.execute("select count(*) from pgqueue.cancel_requests").fetchone() == (0,)
    # redriven: it runs again, and no old request cancels it
    assert app.retry(job_id)
    connection.execute("select * from pgqueue.prune_job_control()")
    assert app.get_job(job_id).state == JobState.QUEUED


def test_the_leader_keeps_a_request_whose_job_a_worker_claimed_again(
    connection: psycopg.Connection[Any],
) -> None:
    (job_id,) = connection.execute("select pgqueue.enqueue('t')").fetchone() or (0,)
    connection.execute("select * from pgqueue.claim_jobs('w1', array['default'], 1, 30)")
    connection.execute("select pgqueue.cancel(%s)", (job_id,))
    # rescued to the queue and claimed by another worker before the leader's sweep ran
    connection.execute("select pgqueue.release_jobs('w1', array[]::bigint[])")
    connection.execute("select * from pgqueue.claim_jobs('w2', array['default'], 1, 30)")
    connection.execute("select * from pgqueue.prune_job_control()")
    # kept: w2's heartbeat reports it
    rows = connection.execute(
        "select cancel from pgqueue.heartbeat_v3('w2', array[%s]::bigint[], array[1], 30)", (job_id,)
    ).fetchall()
    assert rows == [(True,)]


def test_progress_from_a_process_pool_child_fails_the_attempt_with_a_clear_error(sample: App) -> None:
    from tests.sample_app import cpu_reports_progress

    handle = cpu_reports_progress.enqueue(None)
    with running_worker(sample), pytest.raises(JobFailedError) as failed:
        handle.wait(timeout=30)
    assert "progress() is not available in a process-pool handler" in failed.value.errors[-1]["error"]
