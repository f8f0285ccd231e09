"""Behind a real PgBouncer (Debian's 1.18, which cannot keep prepared statements) in
transaction and session pooling: producers and a worker run through it with no error
in pgqueue's log or PgBouncer's; a bad configuration is a typed error naming the fix."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest

from pgqueue import App, ConfigurationError, PreparedStatementsLost, RetryPolicy, Settings, current_job
from pgqueue.database import watching
from pgqueue.health import check_health
from pgqueue.metrics import DatabaseCollector
from pgqueue.status import overview
from pgqueue.testing import running_worker, wait_for, wait_for_states
from tests.pgbouncer import PgBouncer

pytestmark = pytest.mark.slow


@pytest.fixture(params=["transaction", "session"])
def bouncer(request: pytest.FixtureRequest, server_dsn: str, dsn: str) -> Iterator[PgBouncer]:
    # after the test's database (`dsn`), so closed before it is dropped
    pooler = PgBouncer(server_dsn, request.param)
    try:
        yield pooler
    finally:
        pooler.close()


@pytest.fixture
def transaction_bouncer(server_dsn: str, dsn: str) -> Iterator[PgBouncer]:
    # one server connection: two clients that prepare meet on it at once
    pooler = PgBouncer(server_dsn, "transaction", pool_size=1)
    try:
        yield pooler
    finally:
        pooler.close()


# what the worker says of the jobs' own failures and of the rescue it was asked to make
EXPECTED = ("first attempt fails", "always fails", "lease expired")


def problems(caplog: pytest.LogCaptureFixture, bouncer: PgBouncer) -> list[str]:
    """pgqueue's warnings and errors, and psycopg's about this PgBouncer, but for those the
    test provokes on purpose (a pool another test left retrying a dead port says its own)."""
    said = [
        f"{r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and (r.name == "pgqueue" or f"port {bouncer.port}" in r.getMessage())
    ]
    return [line for line in said if not any(expected in line for expected in EXPECTED)]


def test_producers_enqueue_through_pgbouncer_without_an_error(
    bouncer: PgBouncer, dsn: str, new_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgqueue")
    pooled = bouncer.through(dsn)
    app = new_app(dsn=pooled, pool_size=3)

    @app.task(name="record")
    def record(n: int) -> int:
        return n

    ids: list[int] = []
    lock = threading.Lock()

    def produce(offset: int) -> None:
        # the app's pool, from several threads: each statement many times over psycopg's
        # prepare threshold (5), on server connections the clients share
        for n in range(offset, offset + 25):
            job_id = record.enqueue(None, n=n)
            assert job_id.state() == "queued"
            with lock:
                ids.append(job_id)

    threads = [threading.Thread(target=produce, args=(k * 100,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 100

    async def produce_async() -> list[int]:
        done = [await record.enqueue_async(None, n=n) for n in range(1000, 1020)]
        await app.aclose()
        return done

    ids += asyncio.run(produce_async())
    # the caller's own connections, psycopg's defaults (prepare_threshold=5), in their
    # own transactions: single, bulk (COPY), unique, and the SQL function
    for _ in range(2):
        with psycopg.connect(pooled) as own:
            for n in range(2000, 2010):
                ids.append(record.enqueue(own, n=n))
            ids += record.enqueue_many(own, [{"n": n} for n in range(3000, 3200)])
            first = record.with_options(unique_key="once").enqueue(own, n=1)
            again = record.with_options(unique_key="once").enqueue(own, n=1)
            assert again == first and again.duplicate
            for n in range(4000, 4008):
                # the caller's own statement: not prepared, as any behind this pooler must be
                row = own.execute(
                    "select pgqueue.enqueue('record', jsonb_build_object('n', %s::int))", (n,), prepare=False
                ).fetchone()
                assert row is not None
                ids.append(int(row[0]))
    ids = sorted(set(ids))
    with psycopg.connect(dsn) as direct:
        row = direct.execute("select count(*) from pgqueue.jobs where task = 'record'").fetchone()
    assert row is not None and row[0] == len(ids) + 1  # and the unique job
    assert problems(caplog, bouncer) == []
    assert bouncer.errors() == []


def test_a_worker_drains_retries_rescues_and_keeps_house_through_pgbouncer(
    bouncer: PgBouncer, dsn: str, new_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgqueue")
    pooled = bouncer.through(dsn)
    app = new_app(dsn=pooled, lease_seconds=2.0, rescue_interval=0.5, poll_interval=0.2)
    fast_retry = RetryPolicy.fixed(0.05)

    @app.task(name="work")
    def work(n: int) -> int:
        return n * 2

    @app.task(name="flaky", retry=fast_retry)
    def flaky() -> int:
        job = current_job()
        if job.attempt == 1:
            raise RuntimeError("first attempt fails")
        return job.attempt

    @app.task(name="doomed", max_attempts=2, retry=fast_retry)
    def doomed() -> None:
        raise ValueError("always fails")

    @app.task(name="kept", queue="pruned")
    def kept() -> None:
        return None

    @app.periodic("@every 1s", name="tick")
    @app.task(name="tick")
    def tick() -> None:
        return None

    with psycopg.connect(dsn, autocommit=True) as direct:
        direct.execute("select pgqueue.set_retention('succeeded', interval '0', 'pruned')")
        # a job claimed by a worker that died at once: its lease of 1 s runs out unrenewed
        lost = work.enqueue(direct, n=-1)
        claimed = direct.execute(
            "select id from pgqueue.claim_jobs('ghost', array['default'], 1, 1.0, null)"
        ).fetchall()
        assert claimed == [(int(lost),)]
    ids = work.enqueue_many(None, [{"n": n} for n in range(300)])
    flaky_id = flaky.enqueue(None)
    doomed_id = doomed.enqueue(None)
    pruned = kept.enqueue_many(None, [{}] * 5)
    with running_worker(app, concurrency=8):
        states = wait_for_states(dsn, [*ids, flaky_id, int(lost)], timeout=60)
        assert set(states.values()) == {"succeeded"}
        assert wait_for_states(dsn, [doomed_id], timeout=30) == {int(doomed_id): "dead"}

        def gone() -> bool:
            with psycopg.connect(dsn) as direct:
                row = direct.execute(
                    "select count(*) from pgqueue.jobs where id = any(%s)", (list(pruned),)
                ).fetchone()
            return row is not None and row[0] == 0

        wait_for(gone, timeout=30, what="the leader to prune the 'pruned' queue's successes")

        def ticked() -> bool:
            with psycopg.connect(dsn) as direct:
                row = direct.execute(
                    "select count(*) from pgqueue.jobs where task = 'tick' and state = 'succeeded'"
                ).fetchone()
            return row is not None and row[0] >= 2

        wait_for(ticked, timeout=30, what="two ticks of the periodic job")
    with psycopg.connect(dsn) as direct:
        row = direct.execute("select attempt, result from pgqueue.jobs where id = %s", (flaky_id,)).fetchone()
        assert row == (2, 2)
        row = direct.execute("select attempt from pgqueue.jobs where id = %s", (int(lost),)).fetchone()
        assert row == (2,)  # rescued, then run again
    # the watching connections: no start-up `options` for PgBouncer to refuse
    health = check_health(pooled)
    assert not any("unreachable" in reason for reason in health.reasons), health.reasons
    samples = {s.name: s.value for family in DatabaseCollector(pooled).collect() for s in family.samples}
    assert samples["pgqueue_up"] == 1
    with psycopg.connect(pooled, autocommit=True, prepare_threshold=None) as connection, watching(connection):
        assert overview(connection, 300).finished > 300
    assert problems(caplog, bouncer) == []
    assert bouncer.errors() == []
    # behind a pooler a worker does not trust LISTEN: it polls, and says how to wake sooner
    assert any("PGQUEUE_LISTEN_DSN" in r.getMessage() for r in caplog.records)


def test_migrations_run_through_a_transaction_pooler(empty_dsn: str, server_dsn: str) -> None:
    pooler = PgBouncer(server_dsn, "transaction")
    try:
        app = App(Settings(dsn=pooler.through(empty_dsn)))
        applied = app.migrate()
        assert applied and app.migrate() == []  # a second run finds nothing to do
        app.close()
        assert pooler.errors() == []
    finally:
        pooler.close()


def test_a_direct_listen_dsn_wakes_a_worker_behind_pgbouncer_and_carries_events(
    dsn: str, server_dsn: str, new_app: Callable[..., App]
) -> None:
    pooler = PgBouncer(server_dsn, "transaction")
    try:
        pooled = pooler.through(dsn)
        # a poll of 30 s: only NOTIFY, over the direct connection, can run the job sooner
        app = new_app(dsn=pooled, listen_dsn=dsn, poll_interval=30.0)

        @app.task(name="ping")
        def ping() -> str:
            return "pong"

        with psycopg.connect(dsn, autocommit=True) as owner:
            owner.execute("select pgqueue.enable_events()")
        with running_worker(app), app.subscribe() as stream:
            job_id = ping.enqueue(None)
            assert job_id.wait(timeout=10) == "pong"
            assert stream.wait_for(job_id, "succeeded", timeout=10).event == "succeeded"
        with pytest.raises(ConfigurationError, match="PGQUEUE_LISTEN_DSN"):
            new_app(dsn=pooled).subscribe()
    finally:
        pooler.close()


def test_prepared_statements_forced_on_through_a_transaction_pooler_is_a_typed_error(
    transaction_bouncer: PgBouncer, dsn: str, new_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgqueue")
    pooled = transaction_bouncer.through(dsn)
    app = new_app(dsn=pooled, prepared_statements="on", pool_size=2)

    @app.task(name="record")
    def record(n: int) -> int:
        return n

    # two pool connections take turns on PgBouncer's one server connection: the second to
    # prepare psycopg's statement "_pg3_0" finds the first one's there
    with (
        app.pool().connection() as first,
        app.pool().connection() as second,
        pytest.raises(PreparedStatementsLost, match="PGQUEUE_PREPARED_STATEMENTS=off"),
    ):
        first.autocommit = second.autocommit = True  # neither holds the server connection
        for n in range(12):
            record.enqueue(first if n % 2 else second, n=n)
    warned = [r.getMessage() for r in caplog.records if "PREPARED_STATEMENTS=on behind" in r.getMessage()]
    assert len(warned) == 1, warned  # once, though both connections found the pooler
    # the default (auto) finds the pooler and never prepares
    fine = new_app(dsn=pooled, pool_size=2)
    with fine.pool().connection() as first, fine.pool().connection() as second:
        first.autocommit = second.autocommit = True
        for n in range(12):
            fine.enqueue(first if n % 2 else second, "record", {"n": n})


def test_a_worker_told_to_prepare_behind_a_transaction_pooler_says_how_to_fix_it_and_goes_on(
    transaction_bouncer: PgBouncer, dsn: str, new_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgqueue")
    app = new_app(dsn=transaction_bouncer.through(dsn), prepared_statements="on", poll_interval=0.05)

    @app.task(name="work")
    def work(n: int) -> int:
        return n

    ids = work.enqueue_many(None, [{"n": n} for n in range(200)])
    with running_worker(app, concurrency=4):
        assert set(wait_for_states(dsn, ids, timeout=60).values()) == {"succeeded"}
    assert any("PREPARED_STATEMENTS=on behind" in r.getMessage() for r in caplog.records)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said, "five connections sharing one server connection must have met a statement"
    assert all("PGQUEUE_PREPARED_STATEMENTS=off" in message for message in said), said
