"""Group commit, end to end: one `complete_jobs` per flush, and no timer between a job and its record.

The worker runs on an event loop whose clock never moves, so no `asyncio.sleep`,
timeout or `call_later` can ever fire: whatever gets done, gets done without a timer.
The server counts the calls of `pgqueue.complete_jobs_v2` (track_functions), so the
number of flushes is the database's word, not the worker's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import psycopg.conninfo
import pytest

from pgqueue import App, Settings
from pgqueue.testing import wait_for, wait_for_states
from pgqueue.worker import Worker


def frozen_clock_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose `time()` never advances: its timers never fire."""
    loop = asyncio.new_event_loop()
    stopped_at = loop.time()
    loop.time = lambda: stopped_at  # type: ignore[method-assign]
    return loop


@contextmanager
def worker_with_a_stopped_clock(app: App) -> Iterator[Worker]:
    worker = Worker(app, install_signal_handlers=False, concurrency=50)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=frozen_clock_loop) as runner:
                runner.run(worker.run_async())
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=run, name="pgqueue-test-worker", daemon=True)
    thread.start()
    try:
        assert worker.started.wait(30), f"the worker did not start: {failure}"
        yield worker
    finally:
        worker.stop(force=True)
        thread.join(30)
    assert not thread.is_alive(), "the worker did not stop"
    if failure:
        raise failure[0]


def complete_jobs_calls(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "select coalesce(sum(calls), 0) from pg_stat_user_functions"
            " where schemaname = 'pgqueue' and funcname = 'complete_jobs_v2'"
        ).fetchone()
    return int(row[0]) if row else 0


def worker_backends(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "select count(*) from pg_stat_activity"
            " where datname = current_database() and application_name like 'pgqueue-%'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def counted_dsn(dsn: str) -> str:
    """This test's database, with the server counting calls of PL/pgSQL functions."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            psycopg.sql.SQL("alter database {} set track_functions = 'pl'").format(
                psycopg.sql.Identifier(str(name))
            )
        )
    return dsn


def test_outcomes_wait_only_for_a_flush_in_flight_and_each_flush_is_one_statement(
    counted_dsn: str,
) -> None:
    dsn = counted_dsn
    app = App(Settings(dsn=dsn))
    first_may_finish = threading.Event()
    finished: list[int] = []

    @app.task(name="gated")
    async def gated() -> str:
        # wait in a thread: on this loop an asyncio.sleep would never return
        await asyncio.get_running_loop().run_in_executor(None, first_may_finish.wait, 60)
        finished.append(0)
        return "first"

    @app.task(name="quick")
    async def quick(n: int) -> int:
        finished.append(n)
        return n

    try:
        with worker_with_a_stopped_clock(app), psycopg.connect(dsn) as blocker:
            # the first job is claimed on a NOTIFY (no poll can fire) and starts running
            first = gated.enqueue(None)
            wait_for_states(dsn, [first], ["running"])
            # hold its row: the flush that records it will wait on this lock
            blocker.execute("select 1 from pgqueue.active_jobs where id = %s for update", (first,))
            first_may_finish.set()
            wait_for(
                lambda: blocked_flushes(dsn) == 1, what="the first outcome's flush to reach the database"
            )
            # twenty more jobs run and finish while that flush is in flight
            others = quick.enqueue_many(None, [{"n": n} for n in range(1, 21)])
            wait_for(lambda: len(finished) == 21, what="all handlers to finish")
            assert set(wait_for_states(dsn, others, ["running"]).values()) == {"running"}
            blocker.rollback()  # the first flush returns; the next one starts at once
            states = wait_for_states(dsn, [first, *others], ["succeeded"])
            assert set(states.values()) == {"succeeded"}
        wait_for(lambda: worker_backends(dsn) == 0, what="the worker's connections to close")
        wait_for(lambda: complete_jobs_calls(dsn) >= 2, what="the server's function statistics")
        # one flush of the first outcome, one of the twenty that waited behind it
        assert complete_jobs_calls(dsn) == 2
    finally:
        app.close()


def blocked_flushes(dsn: str) -> int:
    """complete_jobs statements waiting on a row lock right now."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and application_name = 'pgqueue-complete' and wait_event_type = 'Lock'"
            " and query like '%complete_jobs%'"
        ).fetchone()
    return int(row[0]) if row else 0
