"""The worker in-process: handlers of every kind, retries, dead letter, timeout, shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
import psycopg.conninfo
import pytest

from pgqueue import App, Fail, JobState, Retry, RetryPolicy, Settings, current_job
from pgqueue.testing import running_worker, wait_for, wait_for_states
from tests.processes import claim_session_quiet, listening, process_gone


def listeners(dsn: str) -> int:
    """Connections to this test's database that LISTEN for jobs."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and (application_name = 'pgqueue-listen' or query ilike 'listen%')"
        ).fetchone()
    return int(row[0]) if row else 0


def failed_claims(caplog: pytest.LogCaptureFixture) -> int:
    return sum("could not claim jobs" in record.getMessage() for record in caplog.records)


def worker_threads() -> int:
    return sum(thread.name == "pgqueue-test-worker" for thread in threading.enumerate())


@pytest.mark.slow
def test_runs_async_sync_and_process_handlers_and_stores_results(app: App, dsn: str) -> None:
    seen_threads: list[str] = []

    @app.task(name="double")
    async def double(n: int) -> int:
        return n * 2

    @app.task(name="blocking")
    def blocking(text: str) -> str:
        seen_threads.append(threading.current_thread().name)
        time.sleep(0.01)
        return text.upper()

    from tests import sample_app

    # a process-pool task must be importable by the child, so it lives at module level
    app.tasks["cpu"] = sample_app.cpu
    ids = [
        double.enqueue(None, n=21),
        blocking.enqueue(None, text="hi"),
        app.enqueue(None, "cpu", {"n": 1000}),
    ]
    with running_worker(app):
        wait_for_states(dsn, ids)
    jobs = [app.get_job(job_id) for job_id in ids]
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 3
    assert [job.result for job in jobs] == [42, "HI", 499500]
    assert all(job.attempt == 1 and job.errors == [] for job in jobs)
    assert seen_threads and seen_threads[0].startswith("pgqueue-job")


@pytest.mark.slow
def test_failures_retry_with_backoff_then_dead_letter_then_requeue(
    app: App, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "pgqueue")
    calls: list[int] = []
    fixed = {"succeed": False}

    @app.task(name="flaky", max_attempts=3, retry=RetryPolicy.fixed(0.05))
    def flaky(order: int) -> str:
        calls.append(current_job().attempt)
        if not fixed["succeed"]:
            raise ValueError(f"order {order} failed")
        return "ok"

    job_id = flaky.enqueue(None, order=7)
    with running_worker(app):
        wait_for_states(dsn, [job_id], ["dead"])
        job = app.get_job(job_id)
        assert calls == [1, 2, 3]
        assert job.state is JobState.DEAD and job.attempt == 3
        assert [error["attempt"] for error in job.errors] == [1, 2, 3]
        assert all("ValueError: order 7 failed" in error["error"] for error in job.errors)
        assert all("Traceback" in error["traceback"] for error in job.errors)
        # the log says when and why it was dead-lettered
        dead_lettered = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
        assert dead_lettered == [
            f"job {job_id} dead-lettered after attempt 3 (no attempts left): ValueError: order 7 failed"
        ]
        # redrive from the dead letter: attempts start over, history stays
        fixed["succeed"] = True
        assert app.retry(job_id) is True
        wait_for_states(dsn, [job_id], ["succeeded"])
    job = app.get_job(job_id)
    assert job.result == "ok" and job.attempt == 1
    # the three failures, then the redrive, which started a new count
    assert [error["kind"] for error in job.errors] == ["exception"] * 3 + ["redriven"]
    assert app.retry(job_id) is False  # a succeeded job is not requeued


def test_retry_requested_by_the_handler_and_permanent_failure(app: App, dsn: str) -> None:
    @app.task(name="rate_limited", max_attempts=5)
    async def rate_limited() -> str:
        if current_job().attempt == 1:
            raise Retry(delay=0.2, reason="rate limited")
        return "done"

    @app.task(name="declined", max_attempts=5)
    async def declined() -> None:
        raise Fail("card declined")

    retried, failed = rate_limited.enqueue(None), declined.enqueue(None)
    with psycopg.connect(dsn, autocommit=True) as connection, running_worker(app):
        wait_for_states(dsn, [retried, failed])
        row = connection.execute(
            "select (errors->0->>'at')::timestamptz, started_at from pgqueue.jobs where id = %s",
            (retried,),
        ).fetchone()
    assert row is not None
    first_failure, second_start = row
    assert (second_start - first_failure).total_seconds() >= 0.2
    assert app.get_job(retried).result == "done"
    dead = app.get_job(failed)
    assert dead.state is JobState.DEAD and dead.attempt == 1  # no retries for Fail
    assert dead.errors[0]["kind"] == "fail" and "card declined" in dead.errors[0]["error"]


def test_a_job_no_worker_can_run_is_handed_back_then_dead_lettered_after_the_time_limit(
    new_app: Callable[..., App], dsn: str
) -> None:
    # a limit of zero: dead at the second hand-back (the first one starts the clock)
    app = new_app(poll_interval=0.1, handback_delay=0.1, unknown_task_timeout=0)

    @app.task(name="known")
    async def known() -> None: ...

    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("select pgqueue.enqueue('nobody.registered')").fetchone()
        assert row
        bad_args = connection.execute("select pgqueue.enqueue('known', '{\"unexpected\": 1}')").fetchone()
        assert bad_args
    with running_worker(app):
        wait_for_states(dsn, [row[0], bad_args[0]])
    unknown, unfit = app.get_job(row[0]), app.get_job(bad_args[0])
    assert unknown.state is JobState.DEAD and unfit.state is JobState.DEAD
    # two hand-backs each, neither using up an attempt, sharing one error entry
    assert [(error["kind"], error["count"]) for error in unknown.errors] == [("unknown_task", 2)]
    assert unknown.attempt == 0 and unfit.attempt == 0
    assert "task 'nobody.registered' is not registered" in unknown.errors[0]["error"]
    assert "do not fit task 'known'" in unfit.errors[0]["error"]
    assert [(error["kind"], error["count"]) for error in unfit.errors] == [("bad_arguments", 2)]
    assert unfit.errors[0]["first_at"] < unfit.errors[0]["at"]


@pytest.mark.slow
def test_a_rolling_deploy_loses_no_job(new_app: Callable[..., App], dsn: str) -> None:
    """Old workers meet the new task (and the new signature) on a shared queue: every job succeeds."""
    settings = {"poll_interval": 0.1, "handback_delay": 0.2}
    old, new = new_app(**settings), new_app(**settings)
    ran: list[tuple[str, str]] = []

    @old.task(name="report")
    async def old_report(day: str) -> None:
        ran.append(("old", day))

    @new.task(name="report")
    async def new_report(day: str, fmt: str = "pdf") -> None:
        ran.append(("new", day))

    @new.task(name="invoice")
    async def invoice(customer: int) -> None:
        ran.append(("new", f"invoice {customer}"))

    ids = [
        *new_report.enqueue_many(None, [{"day": f"d{n}", "fmt": "csv"} for n in range(5)]),
        *invoice.enqueue_many(None, [{"customer": n} for n in range(5)]),
        *old_report.enqueue_many(None, [{"day": f"old{n}"} for n in range(5)]),
    ]
    with running_worker(old):
        # only the old workers are up: what they cannot run, they hand back
        wait_for_states(dsn, ids[10:], ["succeeded"])
        wait_for(lambda: handed_back(dsn) >= 10, what="the new jobs to be handed back")
        with running_worker(new):
            states = wait_for_states(dsn, ids, timeout=60)
    assert set(states.values()) == {"succeeded"}
    assert sorted(day for who, day in ran if who == "old") == [f"old{n}" for n in range(5)]
    new_jobs = [old.get_job(job_id) for job_id in ids[:10]]
    assert all(job.attempt == 1 for job in new_jobs)  # the hand-backs used no attempt


def handed_back(dsn: str) -> int:
    """Jobs with at least one hand-back in their history."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "select count(*) from pgqueue.jobs"
            ' where errors @> \'[{"kind": "unknown_task"}]\' or errors @> \'[{"kind": "bad_arguments"}]\''
        ).fetchone()
    return int(row[0]) if row else 0


def test_timeout_stops_the_handler_and_counts_as_a_failed_attempt(app: App, dsn: str) -> None:
    cancelled: list[int] = []

    @app.task(name="hangs", timeout=0.3, max_attempts=2, retry=RetryPolicy.fixed(0))
    async def hangs() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(current_job().attempt)  # the handler itself was stopped
            raise

    @app.task(name="quick_enough", timeout=5)
    async def quick_enough() -> str:
        await asyncio.sleep(0.01)
        return "fine"

    slow, fast = hangs.enqueue(None), quick_enough.enqueue(None)
    with running_worker(app):
        wait_for_states(dsn, [slow, fast])
    job = app.get_job(slow)
    assert job.state is JobState.DEAD and job.attempt == 2
    assert [error["kind"] for error in job.errors] == ["timeout", "timeout"]
    assert "longer than its timeout of 0.3s" in job.errors[0]["error"]
    assert cancelled == [1, 2]
    assert app.get_job(fast).result == "fine"


def test_a_per_job_timeout_overrides_the_tasks(app: App, dsn: str) -> None:
    @app.task(name="sleepy", timeout=10, max_attempts=1)
    async def sleepy() -> None:
        await asyncio.sleep(2)

    job_id = sleepy.options(timeout=0.2).enqueue(None)
    with running_worker(app):
        wait_for_states(dsn, [job_id])
    assert app.get_job(job_id).errors[0]["kind"] == "timeout"


def test_result_that_is_not_json_is_a_permanent_failure(app: App, dsn: str) -> None:
    @app.task(name="returns_set")
    async def returns_set() -> set[int]:
        return {1}

    job_id = returns_set.enqueue(None)
    with running_worker(app):
        wait_for_states(dsn, [job_id])
    job = app.get_job(job_id)
    assert job.state is JobState.DEAD and "not JSON serializable" in job.errors[0]["error"]


def test_priority_order_and_queue_selection(app: App, dsn: str) -> None:
    order: list[str] = []

    @app.task(name="record", queue="main")
    async def record(label: str) -> None:
        order.append(label)

    @app.task(name="elsewhere", queue="other")
    async def elsewhere() -> None:
        order.append("other")

    with psycopg.connect(dsn) as connection:
        record.options(priority="low").enqueue(connection, label="low")
        record.enqueue(connection, label="normal")
        record.options(priority="critical").enqueue(connection, label="critical")
        record.options(priority="high").enqueue(connection, label="high")
        other = elsewhere.enqueue(connection)
    with running_worker(app, concurrency=1, queues=["main"]):
        wait_for(lambda: len(order) == 4, what="four jobs")
    assert order == ["critical", "high", "normal", "low"]
    assert app.get_job(other).state is JobState.QUEUED  # not a queue this worker serves


@pytest.mark.slow
def test_delayed_job_waits_for_its_time(app: App, dsn: str) -> None:
    @app.task(name="later")
    async def later() -> None: ...

    with running_worker(app):
        # both enqueued while the worker runs: one it may take at once, one it must hold back
        job_id = later.options(delay=1.5).enqueue(None)
        soon = later.enqueue(None)
        wait_for_states(dsn, [job_id, soon], ["succeeded"])
    job, first = app.get_job(job_id), app.get_job(soon)
    assert (job.run_at - job.created_at).total_seconds() == pytest.approx(1.5, abs=0.01)
    assert job.started_at is not None and job.started_at >= job.run_at
    # the worker was there before the due time: the delay, not a late start, held the job
    assert first.started_at is not None and first.started_at < job.run_at


def test_idle_worker_wakes_on_notify_without_waiting_for_a_poll(dsn: str) -> None:
    # polling every 600 s: only NOTIFY can start the job within the test's timeout
    app = App(Settings(dsn=dsn, poll_interval=600))
    started: list[int] = []

    @app.task(name="wake")
    async def wake(n: int) -> None:
        started.append(n)

    try:
        with running_worker(app):
            wait_for(lambda: len(listening(dsn)) == 1, what="the worker to LISTEN")
            # the listener wakes the claim loop once when it connects: let that pass first,
            # until the claim loop has used up every wake-up and sleeps on its 600 s poll
            wake.enqueue(None, n=1)
            wait_for(lambda: started == [1], timeout=30, what="the first job")
            wait_for(lambda: claim_session_quiet(dsn, 1.0), what="a quiet claim session")
            wake.enqueue(None, n=2)
            wait_for(lambda: started == [1, 2], timeout=30, what="a NOTIFY to wake the idle worker")
    finally:
        app.close()


def test_poll_only_mode_still_runs_jobs(dsn: str) -> None:
    app = App(Settings(dsn=dsn, poll_interval=0.1))

    @app.task(name="polled")
    async def polled() -> None: ...

    try:
        with running_worker(app, listen=False):
            job_id = polled.enqueue(None)
            wait_for_states(dsn, [job_id], ["succeeded"])
            assert listeners(dsn) == 0, "a poll-only worker must not hold a LISTEN connection"
    finally:
        app.close()


def test_graceful_shutdown_finishes_running_jobs(app: App, dsn: str) -> None:
    started: list[int] = []

    @app.task(name="slow_but_fine")
    async def slow_but_fine(n: int) -> int:
        started.append(n)
        await asyncio.sleep(0.5)
        return n

    ids = slow_but_fine.enqueue_many(None, [{"n": n} for n in range(3)])
    with running_worker(app, concurrency=3):
        wait_for(lambda: len(started) == 3, what="three jobs to start")
    # leaving the block stopped the worker: within the grace period jobs finished
    assert {app.get_job(job_id).state for job_id in ids} == {JobState.SUCCEEDED}


def test_shutdown_releases_jobs_that_overrun_the_grace_period(new_app: Callable[..., App]) -> None:
    app = new_app(shutdown_grace=0.3)
    started = threading.Event()
    stopped: list[str] = []

    @app.task(name="too_slow", max_attempts=3)
    async def too_slow() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.append("cancelled")
            raise

    job_id = too_slow.enqueue(None)
    with running_worker(app):
        assert started.wait(10)
    assert stopped == ["cancelled"]  # released means stopped here, not left running
    job = app.get_job(job_id)
    # handed back, not failed: the attempt does not count, the note says why
    assert job.state is JobState.QUEUED and job.attempt == 0 and job.worker is None
    assert job.errors[-1]["kind"] == "released"


def test_worker_refuses_an_unmigrated_database(empty_dsn: str) -> None:
    from pgqueue import SchemaNotMigratedError

    app = App(Settings(dsn=empty_dsn))
    with pytest.raises(SchemaNotMigratedError, match="pgqueue migrate"), running_worker(app):
        pass


def test_worker_refuses_a_newer_schema(app: App, dsn: str) -> None:
    from pgqueue import SchemaTooNewError

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "insert into pgqueue.migrations (version, name, checksum) values (9999, 'future', 'x')"
        )
    with pytest.raises(SchemaTooNewError, match="newer than this code"), running_worker(app):
        pass


@pytest.mark.slow
def test_heartbeat_keeps_a_long_job_from_being_rescued(lease_settings: Settings, dsn: str) -> None:
    # lease 2 s, job 3 s: without heartbeats another sweep would requeue it mid-run
    app = App(lease_settings)

    @app.task(name="long")
    async def long() -> str:
        await asyncio.sleep(3)
        return "finished once"

    job_id = long.enqueue(None)
    try:
        with running_worker(app):
            wait_for_states(dsn, [job_id], ["succeeded"])
        job = app.get_job(job_id)
        assert job.attempt == 1 and job.errors == []
    finally:
        app.close()


def test_context_is_visible_in_sync_handlers(app: App, dsn: str) -> None:
    seen: list[Any] = []

    @app.task(name="who_am_i")
    def who_am_i() -> int:
        seen.append(current_job())
        return current_job().id

    job_id = who_am_i.enqueue(None)
    with running_worker(app):
        wait_for_states(dsn, [job_id])
    assert app.get_job(job_id).result == job_id
    assert seen[0].task == "who_am_i" and seen[0].attempt == 1


def test_nul_characters_in_results_and_errors_never_block_the_completer(app: App, dsn: str) -> None:
    @app.task(name="nul_result", max_attempts=1)
    async def nul_result() -> str:
        return "a\x00b"

    @app.task(name="nul_error", max_attempts=1)
    async def nul_error() -> None:
        raise ValueError("bad\x00byte")

    @app.task(name="fine")
    async def fine() -> str:
        return "ok"

    ids = [nul_result.enqueue(None), nul_error.enqueue(None), fine.enqueue(None)]
    with running_worker(app):
        wait_for_states(dsn, ids)
    bad_result, bad_error, ok = (app.get_job(job_id) for job_id in ids)
    assert bad_result.state is JobState.DEAD and "NUL character" in bad_result.errors[0]["error"]
    assert bad_error.state is JobState.DEAD and "bad\\x00byte" in bad_error.errors[0]["error"]
    assert ok.result == "ok"


def test_handler_raising_system_exit_fails_its_attempt_not_the_worker(app: App, dsn: str) -> None:
    import sys

    @app.task(name="exits", max_attempts=1)
    def exits() -> None:
        sys.exit(3)

    @app.task(name="after")
    async def after() -> str:
        return "still alive"

    first = exits.enqueue(None)
    with running_worker(app):
        wait_for_states(dsn, [first])
        second = after.enqueue(None)
        wait_for_states(dsn, [second])
    assert app.get_job(first).errors[0]["error"].startswith("SystemExit")
    assert app.get_job(second).result == "still alive"


@pytest.mark.slow
def test_sync_timeouts_count_running_time_not_time_spent_waiting_for_a_thread(
    dsn: str, new_app: Callable[..., App]
) -> None:
    app = new_app(poll_interval=0.1)
    starts: list[int] = []

    @app.task(name="stuck", timeout=0.3, max_attempts=2, retry=RetryPolicy.fixed(0))
    def stuck() -> None:
        starts.append(current_job().id)
        time.sleep(1.0)  # a thread cannot be stopped: it keeps its slot until it returns

    ids = stuck.enqueue_many(None, [{}, {}])
    with running_worker(app, concurrency=1):
        wait_for_states(dsn, ids, timeout=60)
    jobs = [app.get_job(job_id) for job_id in ids]
    # every attempt that was charged really ran: none timed out while queued for a thread
    assert sum(job.attempt for job in jobs) == len(starts) == 4
    assert all(error["kind"] == "timeout" for job in jobs for error in job.errors)


@pytest.mark.slow
def test_retry_and_crashes_in_process_pool_handlers(sample: App, dsn: str, tmp_path: Any) -> None:
    app = sample
    with running_worker(app, concurrency=2):
        retried_id = app.enqueue(None, "cpu_retry", {"marker": str(tmp_path / "marker")})
        wait_for_states(dsn, [retried_id], timeout=60)
        crashed_id = app.enqueue(None, "cpu_crash", {})
        wait_for_states(dsn, [crashed_id], timeout=60)
        after_crash = app.enqueue(None, "cpu", {"n": 100})
        wait_for_states(dsn, [after_crash], timeout=60)
    retried, crashed = app.get_job(retried_id), app.get_job(crashed_id)
    assert retried.result == "second time lucky" and retried.attempt == 2
    assert retried.errors[0]["kind"] == "retry"
    assert crashed.state is JobState.DEAD and "BrokenProcessPool" in crashed.errors[0]["error"]
    assert app.get_job(after_crash).result == 4950  # a fresh pool took over


@pytest.mark.slow
def test_an_exception_that_cannot_cross_back_from_a_child_is_still_the_jobs_failure(
    sample: App, dsn: str
) -> None:
    app = sample
    with running_worker(app, concurrency=2):
        locked = app.enqueue(None, "cpu_unpicklable", {"picky": False})
        picky = app.enqueue(None, "cpu_unpicklable", {"picky": True})
        wait_for_states(dsn, [locked, picky], timeout=60)
        after = app.enqueue(None, "cpu", {"n": 10})  # the pool still works
        wait_for_states(dsn, [after], timeout=60)
    errors = [app.get_job(job_id).errors[0] for job_id in (locked, picky)]
    assert errors[0]["error"] == "tests.sample_app.LockedError: holding a lock"
    assert errors[1]["error"] == "tests.sample_app.PickyError: code 7: upstream said no"
    assert all("Traceback" in (error["traceback"] or "") for error in errors)
    assert app.get_job(after).result == 45


def test_a_read_only_database_pauses_the_worker_instead_of_ending_it(
    app: App, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="writes")
    async def writes() -> str:
        return "done"

    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    job_id = writes.enqueue(None)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'alter database "{database}" set default_transaction_read_only = on')
        try:
            with caplog.at_level(logging.WARNING, "pgqueue"), running_worker(app):
                # claims fail: the server is read-only, as after a failover
                wait_for(lambda: failed_claims(caplog) >= 3, what="three failed claims")
                assert app.get_job(job_id).state is JobState.QUEUED
                assert worker_threads() == 1, "the worker must keep trying, not end"
                admin.execute(f'alter database "{database}" reset default_transaction_read_only')
                wait_for_states(dsn, [job_id], timeout=30)
        finally:
            admin.execute(f'alter database "{database}" reset default_transaction_read_only')
    assert app.get_job(job_id).result == "done"


@pytest.mark.slow
def test_process_handlers_know_their_job_and_a_hung_child_is_stopped(
    sample: App, dsn: str, tmp_path: Any
) -> None:
    app = sample
    marker = tmp_path / "pid"
    with running_worker(app, concurrency=2):
        whoami = app.enqueue(None, "cpu_whoami", {})
        wait_for_states(dsn, [whoami], timeout=60)
        hung = app.enqueue(None, "cpu_hang", {"marker": str(marker)})
        wait_for_states(dsn, [hung], timeout=60)
        after = app.enqueue(None, "cpu", {"n": 10})
        wait_for_states(dsn, [after], timeout=60)
    assert app.get_job(whoami).result == [whoami, 1]
    job = app.get_job(hung)
    assert job.state is JobState.DEAD and job.errors[0]["kind"] == "timeout"
    child = int(marker.read_text())
    wait_for(lambda: process_gone(child), timeout=10, what="the timed-out child process to be terminated")
    assert app.get_job(after).result == 45


def test_a_cancellation_inside_the_handler_fails_the_attempt(app: App, dsn: str) -> None:
    @app.task(name="awaits_cancelled", max_attempts=1)
    async def awaits_cancelled() -> None:
        other = asyncio.ensure_future(asyncio.sleep(10))
        asyncio.get_running_loop().call_soon(other.cancel)
        await other  # raises CancelledError although nobody cancelled this job

    job_id = awaits_cancelled.enqueue(None)
    with running_worker(app):
        wait_for_states(dsn, [job_id], timeout=30)
    job = app.get_job(job_id)
    assert job.state is JobState.DEAD and job.errors[0]["error"] == "CancelledError"


def test_the_test_helper_fails_loudly_when_its_worker_never_starts() -> None:
    app = App(Settings(dsn="postgresql://postgres@127.0.0.1:1/nowhere", reconnect_max_delay=0.2))
    try:
        with (
            pytest.raises(AssertionError, match=r"did not start within 0\.5s"),
            running_worker(app, start_timeout=0.5),
        ):
            pass
    finally:
        app.close()
    assert worker_threads() == 0  # stopped before the error, not leaked


def test_the_test_helper_fails_loudly_when_its_worker_does_not_stop_in_time(app: App, dsn: str) -> None:
    started = threading.Event()

    @app.task(name="outlasts_the_helper")
    async def outlasts_the_helper() -> None:
        started.set()
        await asyncio.sleep(30)  # longer than the helper waits, shorter than nothing

    job_id = outlasts_the_helper.enqueue(None)
    with (
        pytest.raises(AssertionError, match=r"did not stop within 0\.5s"),
        running_worker(app, stop_timeout=0.5),
    ):
        assert started.wait(10)
    assert worker_threads() == 0  # forced, then joined: nothing leaks into the next test
    assert app.get_job(job_id).state is JobState.QUEUED  # the forced stop handed the job back


@pytest.mark.slow
def test_times_tell_the_truth_and_every_attempt_is_kept(sample: App, dsn: str) -> None:
    """A process job waiting for a free CPU is not charged for the wait; every attempt is history."""
    import os

    app = sample
    slots = min(2, os.cpu_count() or 1)  # the pool has one child per CPU, at most the concurrency
    with running_worker(app, concurrency=slots * 3):
        # more CPU-bound jobs than children: the last ones wait for a free child
        ids = [app.enqueue(None, "cpu_sleep", {"seconds": 0.5}) for _ in range(slots * 2)]
        wait_for_states(dsn, ids, timeout=60)
    jobs = sorted((app.get_job(job_id) for job_id in ids), key=lambda job: job.started_at or job.run_at)
    for job in jobs:
        assert job.history == [] and job.attempt == 1  # a success is the row's own times
        assert job.started_at is not None and job.finished_at is not None
        # each ran about half a second, however long it waited for its child
        assert 0.45 <= (job.finished_at - job.started_at).total_seconds() < 5, job
    # the jobs that waited started once a child was free, not when they were claimed
    assert jobs[-1].started_at is not None and jobs[0].started_at is not None
    assert (jobs[-1].started_at - jobs[0].started_at).total_seconds() >= 0.45
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "select task, count(*), min(seconds) >= 0.45 from pgqueue.attempts group by task"
        ).fetchall()
    assert rows == [("cpu_sleep", slots * 2, True)]


def test_failed_and_retried_attempts_are_in_the_history_too(app: App, dsn: str) -> None:
    @app.task(name="second_time_lucky", max_attempts=3, retry=RetryPolicy.fixed(0))
    async def second_time_lucky() -> str:
        if current_job().attempt == 1:
            raise ValueError("first attempt fails")
        return "ok"

    job_id = second_time_lucky.enqueue(None)
    with running_worker(app):
        wait_for_states(dsn, [job_id], ["succeeded"])
    job = app.get_job(job_id)
    assert [(entry["attempt"], entry["outcome"]) for entry in job.history] == [(1, "failed")]
    assert job.history[0]["worker"] == job.worker and job.history[0]["seconds"] >= 0
    with psycopg.connect(dsn) as connection:
        attempts = connection.execute(
            "select attempt, outcome, worker, started_at from pgqueue.attempts where job_id = %s"
            " order by attempt",
            (job_id,),
        ).fetchall()
    assert [row[:3] for row in attempts] == [(1, "failed", job.worker), (2, "succeeded", job.worker)]
    # the job's started_at is its last attempt's start, after the first attempt's
    assert attempts[1][3] == job.started_at
    assert job.started_at > datetime.fromisoformat(job.history[0]["started_at"])
