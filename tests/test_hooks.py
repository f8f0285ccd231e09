"""Hooks, lease loss and the maintenance leader, through an in-thread worker on a real database."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgqueue import (
    App,
    JobFinished,
    JobRescued,
    JobStarted,
    OutcomesFlushed,
    Settings,
    WorkerStarted,
    WorkerStopped,
)
from pgqueue.testing import running_worker, wait_for, wait_for_states


def test_hooks_see_the_life_of_a_worker_and_its_jobs(new_app: Callable[..., App], dsn: str) -> None:
    app = new_app(poll_interval=0.1)
    events: list[Any] = []
    for kind in (WorkerStarted, WorkerStopped, JobStarted, JobFinished, OutcomesFlushed):
        app.hooks.add(kind, events.append)

    @app.hooks.on(JobFinished)
    def broken(event: JobFinished) -> None:
        raise RuntimeError("a hook that fails must not break the worker")

    @app.task(name="fine")
    async def fine() -> str:
        return "ok"

    @app.task(name="fails", max_attempts=1)
    async def fails() -> None:
        raise ValueError("nope")

    ids = [fine.enqueue(None), fails.enqueue(None)]
    with running_worker(app) as worker:
        wait_for_states(dsn, ids)
        wait_for(lambda: sum(isinstance(e, OutcomesFlushed) for e in events) >= 1, what="a flush")
    kinds = [type(event) for event in events]
    assert kinds[0] is WorkerStarted and kinds[-1] is WorkerStopped
    assert events[0].worker == worker.worker_id and events[-1].jobs_done == 2
    started = {event.job.id: event for event in events if isinstance(event, JobStarted)}
    finished = {event.job.id: event for event in events if isinstance(event, JobFinished)}
    assert set(started) == set(finished) == set(ids)
    assert all(event.waited >= 0 for event in started.values())
    assert finished[ids[0]].outcome.kind == "succeeded" and finished[ids[0]].seconds >= 0
    assert finished[ids[1]].outcome.kind == "failed"
    assert finished[ids[1]].outcome.error is not None and "nope" in finished[ids[1]].outcome.error["error"]
    flushed = [event for event in events if isinstance(event, OutcomesFlushed)]
    assert sum(event.recorded for event in flushed) == 2
    assert sorted(o.job_id for event in flushed for o in event.outcomes) == sorted(ids)
    assert app.get_job(ids[0]).result == "ok"  # the failing hook changed nothing


def test_a_worker_that_loses_a_lease_stops_that_job(
    lease_settings: Settings, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(lease_settings)
    started, cancelled = threading.Event(), threading.Event()

    @app.task(name="long")
    async def long() -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "finished although its lease was gone"

    job_id = long.enqueue(None)
    try:
        with caplog.at_level(logging.WARNING, "pgqueue"), running_worker(app):
            assert started.wait(30)
            # as if a rescue sweep gave the job to another worker while this one stalled
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute("update pgqueue.jobs set worker = 'someone-else' where id = %s", (job_id,))
            assert cancelled.wait(30), "the handler should be stopped once its lease is known lost"
        assert any("lost the lease of job" in record.getMessage() for record in caplog.records)
        job = app.get_job(job_id)
        assert (job.state, job.worker, job.result) == ("running", "someone-else", None)
    finally:
        app.close()


def test_one_maintenance_leader_among_workers_and_a_successor_when_it_stops(
    new_app: Callable[..., App], dsn: str
) -> None:
    def leaders() -> list[tuple[str, str]]:
        with psycopg.connect(dsn, autocommit=True) as connection:
            return [
                (str(d), str(w)) for d, w in connection.execute("select duty, worker from pgqueue.leaders")
            ]

    first, second = new_app(rescue_interval=0.2), new_app(rescue_interval=0.2)
    rescued_by_first: list[JobRescued] = []
    rescued_by_second: list[JobRescued] = []
    first.hooks.add(JobRescued, rescued_by_first.append)
    second.hooks.add(JobRescued, rescued_by_second.append)
    with running_worker(second) as two:
        # it leads before the other starts (a worker elects itself in its first maintenance
        # round, after it has started: started together, either may win)
        wait_for(lambda: leaders() == [("maintenance", two.worker_id)], what="the first worker to lead")
        with running_worker(first) as one:
            # the other keeps asking every 0.2 s, and is refused while the leader lives
            with psycopg.connect(dsn, autocommit=True) as connection:  # a dead worker's job
                connection.execute("select pgqueue.enqueue('orphan', max_attempts => 1)")
                connection.execute(
                    "update pgqueue.jobs set state = 'running', attempt = 1, worker = 'gone',"
                    " lease_expires_at = now() - interval '1 minute'"
                )
            wait_for(lambda: _state(dsn) == "dead", what="the leader's rescue")
            assert leaders() == [("maintenance", two.worker_id)]
            assert not one.maintenance.leadership.leading
        assert [event.state for event in rescued_by_second] == ["dead"] and rescued_by_first == []
        # the stopped worker never led; now stop the leader and watch the lead pass on
    assert leaders() == []  # it stepped down on leaving: no one waits for its lease to run out


def test_a_leader_that_leaves_steps_down_and_another_takes_over(
    new_app: Callable[..., App], dsn: str
) -> None:
    def leader() -> str | None:
        with psycopg.connect(dsn, autocommit=True) as connection:
            row = connection.execute("select worker from pgqueue.leaders").fetchone()
        return str(row[0]) if row else None

    first, second = new_app(rescue_interval=0.2), new_app(rescue_interval=0.2)
    leading = running_worker(first)
    one = leading.__enter__()
    try:
        wait_for(lambda: leader() == one.worker_id, what="the only worker to lead")
        with running_worker(second) as two:
            assert leader() == one.worker_id
            leading.__exit__(None, None, None)
            # it resigned on leaving: the row is gone (or already taken), not left to expire
            assert leader() in (None, two.worker_id)
            wait_for(lambda: leader() == two.worker_id, what="the remaining worker to lead")
    finally:
        leading.__exit__(None, None, None)


def _state(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("select state::text from pgqueue.jobs where task = 'orphan'").fetchone()
    return str(row[0]) if row else ""


@pytest.mark.slow
def test_heartbeats_and_completions_never_deadlock_under_load(
    new_app: Callable[..., App], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # a heartbeat every 0.2 s over jobs whose outcomes are being flushed all the time
    app = new_app(lease_seconds=0.6, rescue_interval=0.6, poll_interval=0.1)

    @app.task(name="quick")
    async def quick(n: int) -> int:
        await asyncio.sleep(0.001 * (n % 7))
        return n

    ids = quick.enqueue_many(None, [{"n": n} for n in range(3000)])
    with caplog.at_level(logging.WARNING, "pgqueue"), running_worker(app, concurrency=100):
        states = wait_for_states(dsn, ids, timeout=120)
    assert set(states.values()) == {"succeeded"}
    problems = [r.getMessage() for r in caplog.records if "deadlock" in r.getMessage().lower()]
    assert problems == []
