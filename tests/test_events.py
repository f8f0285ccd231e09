"""Lifecycle events: the LISTEN stream (on, off, every kind of event, sync and async) and
the hooks for a drained queue and a refused enqueue."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgqueue import App, EnqueueRefused, JobEvent, QueueFull, QueuesEmpty, Retry, current_job
from pgqueue.events import events_enabled, set_events
from pgqueue.testing import running_worker, wait_for
from tests.conftest import pgqueue_command, subprocess_environment


def test_a_subscriber_sees_every_step_of_each_job(
    new_app: Callable[..., App], connection: psycopg.Connection[Any]
) -> None:
    assert set_events(connection, True) and events_enabled(connection)
    assert not set_events(connection, True)  # already on
    app = new_app(poll_interval=0.1)
    gate = threading.Event()

    @app.task(name="steps", max_attempts=3)
    def steps() -> str:
        job = current_job()
        if job.attempt == 1:
            raise Retry(0, "first try fails")
        job.progress(1, 2, stage="half")
        assert gate.wait(10)
        return "ok"

    @app.task(name="hopeless", max_attempts=1)
    def hopeless() -> None:
        raise ValueError("no")

    # wait on events instead of sleeping: the handler's progress, then its end
    with app.subscribe() as stream:
        first = steps.enqueue(None)
        with running_worker(app):
            progressed = stream.wait_for(first, "progress", timeout=20)
            assert progressed.progress is not None and progressed.progress["stage"] == "half"
            gate.set()
            stream.wait_for(first, "succeeded", timeout=20)
    with app.subscribe() as stream:
        later = steps.enqueue(None)
        dead = hopeless.enqueue(None)
        parked = steps.options(delay=3600).enqueue(None)
        assert app.cancel(parked) == "cancelled"
        with running_worker(app):
            seen: dict[int, list[str]] = {}
            for event in stream.events(timeout=20):
                seen.setdefault(event.job, []).append(event.event)
                if {"succeeded", "dead"} <= {e for job in (later, dead) for e in seen.get(job, [])}:
                    break
    # each job's events in order: its first attempt fails, the second reports progress
    assert seen[later] == ["enqueued", "started", "retrying", "started", "progress", "succeeded"]
    assert seen[dead] == ["enqueued", "started", "dead"]
    assert seen[parked] == ["enqueued", "cancelled"]


def test_snoozes_rescues_and_redrives_are_told_apart(connection: psycopg.Connection[Any], app: App) -> None:
    set_events(connection, True)
    with app.subscribe() as stream:
        (job_id,) = connection.execute("select pgqueue.enqueue('t', max_attempts => 5)").fetchone() or (0,)
        # a 10 ms lease, and the worker vanishes: the rescue requeues the job
        connection.execute("select * from pgqueue.claim_jobs('w1', array['default'], 1, 0.01)")
        time.sleep(0.05)
        connection.execute("select * from pgqueue.rescue_expired_jobs()")
        connection.execute(
            "select * from pgqueue.claim_jobs('w2', array['default'], 1, 30, now() + interval '1 hour')"
        )
        connection.execute(
            "select * from pgqueue.complete_jobs_v2('w2', array[%s]::bigint[], array[2], array['snoozed'],"
            " array[null]::jsonb[], array[null]::jsonb[], array[60]::float8[], array[null]::timestamptz[],"
            " array[null]::timestamptz[])",
            (job_id,),
        )
        connection.execute("select pgqueue.cancel(%s)", (job_id,))
        connection.execute("select pgqueue.retry_job(%s)", (job_id,))
        kinds = [event.event for event in stream.events(timeout=2) if event.job == job_id]
    assert kinds == ["enqueued", "started", "rescued", "started", "requeued", "cancelled", "requeued"]


def test_events_are_off_by_default_and_switched_from_the_command_line(app: App, dsn: str) -> None:
    def events(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pgqueue_command("--dsn", dsn, "events", *arguments),
            capture_output=True,
            text=True,
            env=subprocess_environment(),
            timeout=60,
        )

    @app.task(name="quiet")
    def quiet() -> None: ...

    with app.subscribe() as stream:
        quiet.enqueue(None)
        assert list(stream.events(timeout=0.5)) == []  # off: nothing is sent
    assert events("status").stdout.strip() == "events are off"
    assert events("on").stdout.strip() == "events are on"
    tail = subprocess.Popen(
        pgqueue_command("--dsn", dsn, "events", "tail", "--seconds", "3"),
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_environment(),
    )
    wait_for(lambda: _listening(dsn), what="the tail to LISTEN")
    job = quiet.enqueue(None)
    out, _ = tail.communicate(timeout=60)
    assert f'{{"event": "enqueued", "job": {job}, "queue": "default", "task": "quiet"' in out
    assert events("off").stdout.strip() == "events are off"


def test_the_async_stream_and_a_wait_that_times_out(app: App, connection: psycopg.Connection[Any]) -> None:
    set_events(connection, True)

    @app.task(name="later")
    def later() -> None: ...

    async def scenario() -> tuple[JobEvent, type[BaseException]]:
        async with await app.subscribe_async() as stream:
            job = await later.enqueue_async(None)
            enqueued = await stream.wait_for(job, "enqueued", timeout=10)
            try:
                await stream.wait_for(job, timeout=0.3)
            except TimeoutError as error:
                return enqueued, type(error)
            raise AssertionError("a job nobody runs cannot end")

    enqueued, raised = asyncio.run(scenario())
    assert enqueued.event == "enqueued" and enqueued.state == "queued" and not enqueued.failed
    assert raised is TimeoutError
    with app.subscribe() as stream, pytest.raises(TimeoutError, match="no succeeded event for job 1"):
        stream.wait_for(1, "succeeded", timeout=0.2)


def test_hooks_say_when_queues_drain_and_when_an_enqueue_is_refused(new_app: Callable[..., App]) -> None:
    app = new_app(poll_interval=0.1)
    drained: list[QueuesEmpty] = []
    refused: list[EnqueueRefused] = []
    app.hooks.add(QueuesEmpty, drained.append)
    app.hooks.add(EnqueueRefused, refused.append)

    @app.task(name="small", queue="narrow")
    async def small() -> None: ...

    ids = [small.enqueue(None) for _ in range(3)]
    with running_worker(app):
        for job in ids:
            job.wait(timeout=20)
        wait_for(lambda: bool(drained), what="QueuesEmpty")
    assert drained[0].queues == ("narrow",)
    app.controls.limit("narrow", max_depth=1)
    small.enqueue(None)
    with pytest.raises(QueueFull):
        small.enqueue(None)
    assert [(r.queue, r.depth, r.max_depth) for r in refused] == [("narrow", 1, 1)]


def _listening(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "select count(*) from pg_stat_activity"
            " where datname = current_database() and query like 'listen%%'"
        ).fetchone()
    return bool(row and row[0])


def test_subscribing_to_a_database_that_is_down_is_a_typed_error() -> None:
    from pgqueue import DatabaseUnavailableError, Settings

    app = App(Settings(dsn="postgresql://nobody@127.0.0.1:1/nowhere", connect_timeout=1))
    with pytest.raises(DatabaseUnavailableError, match="cannot subscribe to events"):
        app.subscribe()
