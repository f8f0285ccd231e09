"""Unique jobs: a key held by a queued or running job (or, with a window, for that long)
makes a second enqueue return the holder's id instead of a new job, race-free under
concurrent producers, in bulk, from SQL and from the command line."""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgqueue import App, InvalidJobError, JobId
from pgqueue.testing import wait_for
from tests.conftest import pgqueue_command, subprocess_environment


def count(dsn: str, where: str = "true") -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(f"select count(*) from pgqueue.jobs where {where}").fetchone()
    return int(row[0]) if row else 0


def finish(dsn: str, job_id: int) -> None:
    """Claim and succeed the job, as a worker would."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        queue = connection.execute("select queue from pgqueue.jobs where id = %s", (job_id,)).fetchone()
        assert queue is not None
        claimed = connection.execute(
            "select id, attempt from pgqueue.claim_jobs('w', array[%s], 100, 30)", (queue[0],)
        ).fetchall()
        attempts = dict(claimed)
        assert job_id in attempts
        connection.execute(
            "select pgqueue.complete_jobs('w', array[%s::bigint], array[%s], array['succeeded'],"
            " array['\"done\"'::jsonb], array[null::jsonb], array[null::float8])",
            (job_id, attempts[job_id]),
        )


def test_a_duplicate_gets_the_holders_id_until_the_holder_finishes(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app()

    @app.task(name="report.build")
    def build(day: str) -> None:
        return None

    @app.task(name="report.mail")
    def mail(day: str) -> None:
        return None

    first = build.options(unique_key="2026-11-29").enqueue(None, day="2026-11-29")
    again = build.options(unique_key="2026-11-29").enqueue(None, day="2026-11-29")
    assert isinstance(first, JobId) and not first.duplicate
    assert again == first and again.duplicate
    other_task = mail.options(unique_key="2026-11-29").enqueue(None, day="2026-11-29")  # keys are per task
    assert other_task != first and not other_task.duplicate
    assert count(dsn) == 2

    finish(dsn, first)  # the key is held while the job is queued or running, no longer
    after = build.options(unique_key="2026-11-29").enqueue(None, day="2026-11-29")
    assert after != first and not after.duplicate
    assert count(dsn, "task = 'report.build'") == 2


def test_a_window_holds_the_key_after_the_job_finished_so_its_result_can_be_reused(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app()

    @app.task(name="rates.fetch")
    def fetch(currency: str) -> None:
        return None

    recent = fetch.options(unique_key="EUR", unique_for=3600).enqueue(None, currency="EUR")
    finish(dsn, recent)
    reused = fetch.options(unique_key="EUR", unique_for=3600).enqueue(None, currency="EUR")
    assert reused == recent and reused.duplicate
    assert app.get_job(reused).result == "done"

    short = fetch.options(unique_key="USD", unique_for=0.3).enqueue(None, currency="USD")
    made: list[JobId] = []

    def new_job_once_the_window_ends() -> bool:
        job_id = fetch.options(unique_key="USD", unique_for=0.3).enqueue(None, currency="USD")
        made.append(job_id)
        return not job_id.duplicate

    wait_for(new_job_once_the_window_ends, timeout=10, interval=0.05, what="the window to end")
    assert all(job_id == short for job_id in made[:-1]) and made[-1] != short
    assert count(dsn, "task = 'rates.fetch' and args ->> 'currency' = 'USD'") == 2


@pytest.mark.slow
def test_eight_concurrent_producers_create_one_job_per_key(new_app: Callable[..., App], dsn: str) -> None:
    app = new_app(pool_size=8)

    @app.task(name="sync.account")
    def sync(account: int) -> None:
        return None

    keys = [f"account-{n}" for n in range(25)]
    barrier = threading.Barrier(8)
    answers: list[tuple[str, JobId]] = []
    errors: list[BaseException] = []

    def produce(seed: int) -> None:
        order = keys[:]
        random.Random(seed).shuffle(order)
        try:
            with psycopg.connect(dsn) as connection:
                barrier.wait()
                for key in order:
                    with connection.transaction():  # each in the producer's own transaction
                        job_id = sync.options(unique_key=key).enqueue(
                            connection, account=int(key.split("-")[1])
                        )
                    answers.append((key, job_id))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(answers) == 8 * len(keys)
    for key in keys:
        ids = {job_id for answer_key, job_id in answers if answer_key == key}
        created = [job_id for answer_key, job_id in answers if answer_key == key and not job_id.duplicate]
        assert len(ids) == 1 and len(created) == 1, (key, ids, created)
    assert count(dsn, "task = 'sync.account'") == len(keys)


def test_unique_keys_in_bulk_from_sql_and_on_the_command_line(new_app: Callable[..., App], dsn: str) -> None:
    app = new_app()

    @app.task(name="index.page")
    def index(url: str) -> None:
        return None

    ids = index.enqueue_many(
        None,
        [{"url": "/a"}, {"url": "/b"}],
    )
    keyed = [index.options(unique_key=url).prepare(url=url) for url in ("/a", "/b", "/a")]
    with psycopg.connect(dsn) as connection:
        bulk = app.insert_many(connection, keyed)
    assert bulk[0] == bulk[2] != bulk[1] and [getattr(i, "duplicate", None) for i in bulk] == [
        False,
        False,
        True,
    ]
    assert count(dsn) == len(ids) + 2

    with psycopg.connect(dsn, autocommit=True) as connection:
        sql_first = connection.execute(
            "select id, duplicate from pgqueue.enqueue_unique('index.page', '/c', '{\"url\": \"/c\"}')"
        ).fetchone()
        sql_again = connection.execute(
            "select id, duplicate from pgqueue.enqueue_unique('index.page', '/c', '{\"url\": \"/c\"}',"
            " unique_for => interval '1 hour')"
        ).fetchone()
        assert sql_first is not None and sql_again == (sql_first[0], True)
        assert connection.execute("select pgqueue.enqueue_unique('index.page', '/b')").fetchone()
        for statement, message in (
            ("select pgqueue.enqueue_unique('index.page', '')", "a unique key is 1-500 characters"),
            (
                "select pgqueue.enqueue_unique('index.page', '/d', unique_for => interval '-1 minute')",
                "a unique window must be positive",
            ),
        ):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
                connection.execute(statement)

    def enqueue(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pgqueue_command("--dsn", dsn, "enqueue", "index.page", "--args", '{"url": "/e"}', *arguments),
            env=subprocess_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    made, duplicate = enqueue("--unique-key", "/e"), enqueue("--unique-key", "/e")
    assert made.returncode == duplicate.returncode == 0, (made.stderr, duplicate.stderr)
    assert made.stdout == duplicate.stdout and "holds unique key '/e': no new job" in duplicate.stderr
    bad = enqueue("--unique-for", "60")
    assert bad.returncode == 2 and "unique_for goes with a unique_key" in bad.stderr


def test_a_key_is_taken_with_the_callers_transaction_and_forgotten_once_free(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app()

    @app.task(name="invoice.send")
    def send(invoice: int) -> None:
        return None

    with psycopg.connect(dsn) as connection:
        send.options(unique_key="invoice-7").enqueue(connection, invoice=7)
        connection.rollback()  # the app's write failed: neither the job nor its key exist
    kept = send.options(unique_key="invoice-7").enqueue(None, invoice=7)
    assert not kept.duplicate and count(dsn) == 1
    with pytest.raises(InvalidJobError, match="unique_for goes with a unique_key"):
        send.options(unique_for=60)
    with pytest.raises(InvalidJobError, match="unique_key"):
        send.options(unique_key="")
    with pytest.raises(InvalidJobError, match="unique_key"):
        send.options(unique_key="k" * 501)
    with pytest.raises(InvalidJobError, match="unique_key"):
        send.options(unique_key=7)  # type: ignore[arg-type]

    def keys(connection: psycopg.Connection[Any]) -> list[str]:
        return [str(key) for (key,) in connection.execute("select key from pgqueue.job_keys order by key")]

    held = send.options(unique_key="invoice-8").enqueue(None, invoice=8)
    finish(dsn, kept)
    with psycopg.connect(dsn, autocommit=True) as connection:
        assert keys(connection) == ["invoice-7", "invoice-8"]
        assert connection.execute("select pgqueue.prune_job_keys()").fetchone() == (1,)
        assert keys(connection) == ["invoice-8"]  # its job is still queued
    assert not held.duplicate


def test_the_async_producer_takes_keys_and_meets_a_full_queue_too(
    new_app: Callable[..., App], dsn: str
) -> None:
    from pgqueue import QueueFull

    app = new_app()
    producer_only = new_app()  # knows no task: enqueues by name

    @app.task(name="export.run", queue="exports")
    def run(n: int) -> None:
        return None

    async def produce() -> tuple[JobId, JobId, list[int]]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
            first = await run.options(unique_key="nightly").enqueue_async(connection, n=1)
            again = await run.options(unique_key="nightly").enqueue_async(connection, n=1)
            many = await run.enqueue_many_async(connection, [{"n": 2}])
            await app.controls.limit_async("exports", max_depth=2, connection=connection)
            assert [c.max_depth for c in await app.controls.all_async(connection)] == [2]
            with pytest.raises(QueueFull) as refused:
                await run.enqueue_async(connection, n=3)
            assert (refused.value.depth, refused.value.max_depth) == (2, 2)
            # a duplicate writes nothing, so a full queue does not refuse it: the holder's id
            full_again = await run.options(unique_key="nightly").enqueue_async(connection, n=1)
            assert full_again == first and full_again.duplicate
            by_name = await producer_only.enqueue_async(
                connection, "export.run", {"n": 1}, unique_key="nightly"
            )
            assert by_name == first and by_name.duplicate
            await app.controls.pause_async("exports", connection)
            await app.controls.resume_async("exports", connection)
            return first, again, many

    first, again, many = asyncio.run(produce())
    assert not first.duplicate and again == first and again.duplicate
    assert count(dsn, "queue = 'exports'") == 1 + len(many)
