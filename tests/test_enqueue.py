"""Enqueue: transactional on the caller's connection, pooled, bulk (COPY), from SQL; bad input."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgqueue import (
    App,
    ConfigurationError,
    InvalidJobError,
    JobState,
    Priority,
    Retry,
    RetryPolicy,
    UnknownTaskError,
)

_apps: list[App] = []


@pytest.fixture(autouse=True)
def _close_apps() -> Iterator[None]:
    """Every app a test made with `make_app` is closed after it, whatever happened."""
    yield
    while _apps:
        _apps.pop().close()


def make_app(settings: Any) -> tuple[App, Any]:
    app = App(settings)
    _apps.append(app)

    @app.task(name="emails.send_welcome", queue="emails", max_attempts=5, timeout=30)
    async def send_welcome(user_id: int) -> dict[str, int]:
        return {"user_id": user_id}

    return app, send_welcome


def count_jobs(dsn: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute("select count(*) from pgqueue.jobs").fetchone()
        assert row
        return int(row[0])


def test_job_commits_with_the_callers_transaction(settings: Any, dsn: str) -> None:
    app, send_welcome = make_app(settings)
    with psycopg.connect(dsn) as connection:
        connection.execute("create table users (id int primary key)")
        connection.execute("insert into users values (42)")
        job_id = send_welcome.enqueue(connection, user_id=42)
        # not visible to anyone else before the commit
        assert count_jobs(dsn) == 0
    # leaving the block commits
    job = app.get_job(job_id)
    assert job.state is JobState.QUEUED
    assert job.args == {"user_id": 42}
    assert job.queue == "emails" and job.max_attempts == 5 and job.timeout_seconds == 30
    app.close()


def test_job_vanishes_when_the_caller_rolls_back(settings: Any, dsn: str) -> None:
    _, send_welcome = make_app(settings)
    with psycopg.connect(dsn) as connection:
        send_welcome.enqueue(connection, user_id=1)
        connection.rollback()
    assert count_jobs(dsn) == 0
    with pytest.raises(ZeroDivisionError), psycopg.connect(dsn) as connection:
        send_welcome.enqueue(connection, user_id=2)
        raise ZeroDivisionError  # an exception in the block rolls back
    assert count_jobs(dsn) == 0


def test_async_enqueue_commits_and_rolls_back_with_the_caller(settings: Any, dsn: str) -> None:
    app, send_welcome = make_app(settings)

    async def scenario() -> int:
        async with await psycopg.AsyncConnection.connect(dsn) as connection:
            await send_welcome.enqueue_async(connection, user_id=7)
            await connection.rollback()
            kept = await send_welcome.enqueue_async(connection, user_id=8)
            await connection.commit()
        return kept

    kept = asyncio.run(scenario())
    assert count_jobs(dsn) == 1
    assert app.get_job(kept).args == {"user_id": 8}


def test_enqueue_with_the_apps_own_pool_commits_at_once(settings: Any, dsn: str) -> None:
    app, send_welcome = make_app(settings)
    job_id = send_welcome.enqueue(None, user_id=3)
    assert count_jobs(dsn) == 1
    by_name = app.enqueue(None, "emails.send_welcome", {"user_id": 4}, priority="high")
    assert app.get_job(by_name).priority == Priority.HIGH

    async def scenario() -> int:
        try:
            return await send_welcome.enqueue_async(None, user_id=5)
        finally:
            await app.aclose()

    assert asyncio.run(scenario()) > job_id
    assert count_jobs(dsn) == 3


def test_options_priority_delay_run_at_and_retry_policy(settings: Any, dsn: str) -> None:
    app, send_welcome = make_app(settings)
    with psycopg.connect(dsn, autocommit=True) as connection:
        (now,) = connection.execute("select now()").fetchone() or (None,)
        delayed = send_welcome.options(delay=60, priority=Priority.CRITICAL).enqueue(connection, user_id=1)
        at = datetime(2030, 1, 1, tzinfo=UTC)
        scheduled = send_welcome.options(run_at=at, priority=-5).enqueue(connection, user_id=2)
        custom = send_welcome.options(
            retry=RetryPolicy.linear(step=2, max=10), max_attempts=2, timeout=timedelta(seconds=3)
        ).enqueue(connection, user_id=3)
        row = connection.execute(
            "select backoff::text, backoff_base_seconds, backoff_max_seconds, max_attempts,"
            " timeout_seconds from pgqueue.jobs where id = %s",
            (custom,),
        ).fetchone()
    job = app.get_job(delayed)
    assert job.priority == 20
    assert now is not None
    assert timedelta(seconds=59) < job.run_at - now < timedelta(seconds=61)
    assert app.get_job(scheduled).run_at == at
    assert app.get_job(scheduled).priority == -5
    assert row == ("linear", 2.0, 10.0, 2, 3.0)


def test_positional_arguments_are_stored_by_name(settings: Any, dsn: str) -> None:
    app, send_welcome = make_app(settings)
    job_id = send_welcome.enqueue(None, 99)
    assert app.get_job(job_id).args == {"user_id": 99}
    app.close()


def test_bulk_enqueue_uses_copy_and_returns_ids_in_order(settings: Any, dsn: str) -> None:
    app, send_welcome = make_app(settings)
    with psycopg.connect(dsn) as connection:
        ids = send_welcome.enqueue_many(connection, [{"user_id": n} for n in range(5000)])
        connection.rollback()
    assert count_jobs(dsn) == 0  # bulk enqueue is transactional too
    with psycopg.connect(dsn) as connection:
        ids = send_welcome.enqueue_many(connection, [{"user_id": n} for n in range(5000)])
    assert len(ids) == len(set(ids)) == 5000
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "select id, (args->>'user_id')::int, queue, state::text, max_attempts"
            " from pgqueue.jobs order by id"
        ).fetchall()
    assert [row[0] for row in rows] == ids
    assert [row[1] for row in rows] == list(range(5000))
    assert {row[2:] for row in rows} == {("emails", "queued", 5)}
    assert send_welcome.enqueue_many(None, []) == []
    app.close()


def test_bulk_enqueue_async(settings: Any, dsn: str) -> None:
    _, send_welcome = make_app(settings)

    async def scenario() -> list[int]:
        async with await psycopg.AsyncConnection.connect(dsn) as connection:
            return await send_welcome.enqueue_many_async(connection, [{"user_id": n} for n in range(300)])

    assert len(asyncio.run(scenario())) == 300
    assert count_jobs(dsn) == 300


def test_sql_enqueue_function_for_psql_and_triggers(connection: psycopg.Connection[Any]) -> None:
    (job_id,) = connection.execute(
        "select pgqueue.enqueue('reports.build', '{\"a\": 1}'::jsonb, queue => 'reports',"
        " priority => 10, delay => interval '5 minutes', max_attempts => 3)"
    ).fetchone() or (None,)
    row = connection.execute(
        "select task, args, queue, priority, max_attempts, run_at > now() + interval '4 minutes'"
        " from pgqueue.jobs where id = %s",
        (job_id,),
    ).fetchone()
    assert row == ("reports.build", {"a": 1}, "reports", 10, 3, True)
    # a trigger on an application table can enqueue in the same transaction
    connection.execute("create table orders (id int primary key)")
    connection.execute(
        "create function enqueue_order() returns trigger language plpgsql as $$"
        " begin perform pgqueue.enqueue('orders.confirm', jsonb_build_object('order', new.id));"
        " return new; end $$"
    )
    connection.execute(
        "create trigger orders_enqueue after insert on orders for each row execute function enqueue_order()"
    )
    connection.execute("insert into orders values (1), (2)")
    tasks = connection.execute(
        "select args->>'order' from pgqueue.jobs where task = 'orders.confirm' order by id"
    ).fetchall()
    assert tasks == [("1",), ("2",)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("'t', delay => interval '-1 second'", "delay must not be negative"),
        ("'t', delay => interval '11 years'", "delay is capped at 10 years"),
        ("'t', priority => 100000", "priority must be between"),
        ("'t', '[1, 2]'::jsonb", "args must be a JSON object"),
        ("'t', '\"text\"'::jsonb", "got a JSON string"),
        ("'t', queue => 'bad queue; drop table x'", "queue names"),
        ("'bad task name'", "task names"),
        ("'t', run_at => 'infinity'", "run_at must be a real time"),
        ("'t', run_at => now() + interval '11 years'", "run_at is capped"),
        ("'t', run_at => now(), delay => interval '1 minute'", "not both"),
        ("'t', max_attempts => 0", "max_attempts must be at least 1"),
        ("'t', timeout_seconds => 0", "timeout_seconds must be more than 0"),
        ("'t', backoff_base_seconds => -1", "backoff_base_seconds and backoff_max_seconds"),
        ("'t', backoff_jitter => 2", "backoff_jitter must be between 0 and 1"),
    ],
)
def test_sql_enqueue_answers_every_bad_argument_with_one_clear_message(
    connection: psycopg.Connection[Any], call: str, message: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message) as raised:
        connection.execute(f"select pgqueue.enqueue({call})")
    assert str(raised.value).startswith("pgqueue.enqueue: ")  # never a raw constraint name
    row = connection.execute("select count(*) from pgqueue.jobs").fetchone()
    assert row == (0,)


def notifications_until_sentinel(dsn: str, listener: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """Notifications received before a sentinel sent afterwards: Postgres delivers them in
    commit order, so whatever the earlier commits sent has arrived once the sentinel has."""
    with psycopg.connect(dsn, autocommit=True) as sender:
        sender.execute("select pg_notify('pgqueue_jobs', 'sentinel')")
    received = []
    for notification in listener.notifies(timeout=30):
        if notification.payload == "sentinel":
            return received
        received.append((notification.channel, notification.payload))
    raise AssertionError(f"the sentinel notification never arrived (got {received})")


def test_one_notify_per_transaction_not_per_row(settings: Any, dsn: str) -> None:
    _, send_welcome = make_app(settings)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("listen pgqueue_jobs")
        with psycopg.connect(dsn) as connection:
            for n in range(50):
                send_welcome.enqueue(connection, user_id=n)
            send_welcome.enqueue_many(connection, [{"user_id": n} for n in range(50)])
        assert notifications_until_sentinel(dsn, listener) == [("pgqueue_jobs", "emails")]
        # a delayed job wakes nobody: it is not due yet
        with psycopg.connect(dsn) as connection:
            send_welcome.options(delay=60).enqueue(connection, user_id=1)
        assert notifications_until_sentinel(dsn, listener) == []


def test_unknown_task_name_is_refused_when_the_registry_is_known(settings: Any) -> None:
    app, _ = make_app(settings)
    with pytest.raises(UnknownTaskError, match=r"unknown task 'emails\.send_welcom'"):
        app.enqueue(None, "emails.send_welcom", {"user_id": 1})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"user_id": {1, 2}}, "JSON-serialisable"),
        ({"user_id": object()}, "JSON-serialisable"),
        ({"user_id": math.nan}, "JSON-serialisable"),
        ({"user_id": 1, "extra": 2}, "bad arguments"),
        ({}, "bad arguments"),
        ({"user_id": "x" * 1_100_000}, "limit"),
        ({"user_id": "nul\x00byte"}, "NUL character"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    settings: Any, dsn: str, arguments: dict[str, Any], message: str
) -> None:
    _, send_welcome = make_app(settings)
    with pytest.raises(InvalidJobError, match=message), psycopg.connect(dsn) as connection:
        send_welcome.enqueue(connection, **arguments)
    assert count_jobs(dsn) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": -1}, "delay"),
        ({"delay": timedelta(seconds=-5)}, "delay"),
        ({"delay": math.inf}, "delay"),
        ({"priority": 40000}, "priority"),
        ({"priority": "urgent"}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"timeout": 0}, "timeout"),
        ({"queue": "has space"}, "queue"),
        ({"queue": ""}, "queue"),
        ({"run_at": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_bad_options_get_a_typed_error(settings: Any, options: dict[str, Any], message: str) -> None:
    _, send_welcome = make_app(settings)
    with pytest.raises(InvalidJobError, match=message):
        send_welcome.options(**options)


def test_both_delay_and_run_at_is_an_error(settings: Any) -> None:
    _, send_welcome = make_app(settings)
    with pytest.raises(InvalidJobError, match="not both"):
        send_welcome.options(delay=5, run_at=datetime(2030, 1, 1, tzinfo=UTC))


def test_bad_task_registration(settings: Any) -> None:
    app = App(settings)
    with pytest.raises(InvalidJobError, match="task names"):
        app.task(name="has space")(lambda: None)

    @app.task(name="once")
    def once() -> None: ...

    with pytest.raises(ConfigurationError, match="already registered"):
        app.task(name="once")(lambda: None)
    with pytest.raises(ConfigurationError, match="async def"):
        app.task(name="sync_as_async", executor="async")(lambda: None)

    async def coroutine() -> None: ...

    with pytest.raises(ConfigurationError, match="plain def"):
        app.task(name="async_in_a_thread", executor="thread")(coroutine)
    with pytest.raises(ConfigurationError, match="module level"):
        app.task(name="local_in_a_process", executor="process")(lambda: None)


def test_a_bad_retry_request_is_a_typed_error() -> None:
    with pytest.raises(InvalidJobError, match="non-negative"):
        Retry(delay=-1)
    with pytest.raises(InvalidJobError, match="capped"):
        Retry(delay=timedelta(days=365 * 11))


def test_producers_on_an_unmigrated_database_get_a_typed_error(empty_dsn: str) -> None:
    from pgqueue import SchemaNotMigratedError, Settings

    app, send_welcome = make_app(Settings(dsn=empty_dsn))

    async def enqueue_async() -> None:
        async with await psycopg.AsyncConnection.connect(empty_dsn) as connection:
            await send_welcome.enqueue_async(connection, user_id=1)

    attempts = {
        "the app's pool": lambda: send_welcome.enqueue(None, user_id=1),
        "bulk": lambda: send_welcome.enqueue_many(None, [{"user_id": 1}, {"user_id": 2}]),
        "by name": lambda: app.enqueue(None, "emails.send_welcome", {"user_id": 1}),
        "async": lambda: asyncio.run(enqueue_async()),
        "job lookup": lambda: app.get_job(1),
    }
    try:
        for what, attempt in attempts.items():
            try:
                attempt()
            except SchemaNotMigratedError as error:
                assert "run `pgqueue migrate`" in str(error), what
            else:
                raise AssertionError(f"{what}: enqueued on a database without the pgqueue schema")
        with psycopg.connect(empty_dsn) as connection:  # the caller's own transaction
            with pytest.raises(SchemaNotMigratedError):
                send_welcome.enqueue(connection, user_id=1)
            connection.rollback()
            assert connection.execute("select 1").fetchone() == (1,)  # still usable after rollback
    finally:
        app.close()


def test_a_producer_gives_up_on_a_database_that_is_down_with_a_typed_error() -> None:
    from pgqueue import DatabaseUnavailableError, Settings

    app, send_welcome = make_app(Settings(dsn="postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout=1))
    with pytest.raises(DatabaseUnavailableError, match="no database connection within 1s"):
        send_welcome.enqueue(None, user_id=1)

    async def enqueue_async() -> None:
        try:
            await send_welcome.enqueue_async(None, user_id=1)
        finally:
            await app.aclose()

    with pytest.raises(DatabaseUnavailableError, match="PGQUEUE_CONNECT_TIMEOUT"):
        asyncio.run(enqueue_async())


def test_the_wrong_kind_of_connection_is_a_typed_error(settings: Any, dsn: str) -> None:
    _, send_welcome = make_app(settings)

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as async_connection:
            with pytest.raises(ConfigurationError, match="use the \\*_async methods"):
                send_welcome.enqueue(async_connection, user_id=1)  # type: ignore[arg-type]
        with (
            psycopg.connect(dsn) as connection,
            pytest.raises(ConfigurationError, match="without _async"),
        ):
            await send_welcome.enqueue_async(connection, user_id=1)  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert count_jobs(dsn) == 0


def test_enqueue_by_name_applies_the_options_its_workers_registered(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pgqueue import Settings
    from pgqueue.testing import running_worker

    worker_app = App(Settings(dsn=dsn))

    @worker_app.task(
        name="reports.build",
        queue="reports",
        priority=10,
        max_attempts=4,
        timeout=60,
        retry=RetryPolicy.fixed(5),
    )
    async def build(day: str) -> None: ...

    producer = App(Settings(dsn=dsn))  # knows no task: a web app that only enqueues
    try:
        with running_worker(worker_app, queues=["elsewhere"]):  # registers, runs nothing here
            pass
        with psycopg.connect(dsn, autocommit=True) as connection:
            from_sql = connection.execute("select pgqueue.enqueue('reports.build', '{\"day\": \"mon\"}')")
            (sql_id,) = from_sql.fetchone() or (None,)
        from_python = producer.enqueue(None, "reports.build", {"day": "tue"})
        overridden = producer.enqueue(None, "reports.build", {"day": "wed"}, priority="low", max_attempts=1)
        with caplog.at_level(logging.WARNING, "pgqueue"):
            typo = producer.enqueue(None, "reports.biuld", {"day": "thu"})
        assert any("no worker has registered (yet)" in r.getMessage() for r in caplog.records)
        with psycopg.connect(dsn, autocommit=True) as connection:
            rows = connection.execute(
                "select id, queue, priority, max_attempts, timeout_seconds, backoff::text,"
                " backoff_base_seconds from pgqueue.jobs order by id"
            ).fetchall()
        registered = ("reports", 10, 4, 60.0, "fixed", 5.0)
        assert [row[1:] for row in rows] == [
            registered,  # SQL
            registered,  # a producer-only App
            ("reports", -10, 1, 60.0, "fixed", 5.0),  # what the caller said wins
            ("default", 0, 10, None, "exponential", 1.0),  # unknown: defaults, and a warning
        ]
        assert [row[0] for row in rows] == [sql_id, from_python, overridden, typo]
    finally:
        producer.close()
        worker_app.close()


def test_a_task_in_a_script_run_directly_gets_the_name_a_worker_knows(tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.conftest import subprocess_environment

    (tmp_path / "nightly.py").write_text(
        "import pgqueue\n"
        "app = pgqueue.App(dsn='postgresql://unused@127.0.0.1:1/x')\n"
        "@app.task\n"
        "def rebuild() -> None: ...\n"
        "print(rebuild.name)\n"
    )
    for command, warned in (
        ([sys.executable, "nightly.py"], True),
        ([sys.executable, "-m", "nightly"], False),
    ):
        result = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=subprocess_environment()
        )
        assert result.returncode == 0, result.stderr
        # not "__main__.rebuild", which no worker importing the module would know
        assert result.stdout.strip() == "nightly.rebuild"
        assert ("give it name=" in result.stderr) is warned, result.stderr
