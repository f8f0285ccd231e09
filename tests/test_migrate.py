"""Migrations: from zero to the committed schema, idempotent, concurrent, transactional, guarded."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import pytest

from pgqueue import (
    MigrationChecksumError,
    SchemaNotMigratedError,
    SchemaTooNewError,
    check_schema,
    migrate,
    migrate_async,
)
from pgqueue.sql import latest_version, migrations
from tests.schema_snapshot import SNAPSHOT, snapshot

ALL = [migration.version for migration in migrations()]


def has_schema(dsn: str) -> bool:
    with psycopg.connect(dsn) as connection:
        row = connection.execute("select to_regclass('pgqueue.jobs') is not null").fetchone()
        return bool(row and row[0])


def test_migrations_from_zero_equal_the_committed_schema(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as connection:
        assert migrate(connection) == [migration.version for migration in migrations()]
        current = snapshot(connection)
    assert current == SNAPSHOT.read_text(), (
        "the migrations no longer produce sql/schema.txt: regenerate it with "
        "`python -m tests.schema_snapshot` and review the difference"
    )


def test_migrating_twice_changes_nothing(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as connection:
        assert migrate(connection) == ALL
        assert migrate(connection) == []
        rows = connection.execute("select version, name from pgqueue.migrations").fetchall()
        assert rows == [(migration.version, migration.name) for migration in migrations()]
        assert check_schema(connection) == latest_version()


def test_concurrent_migrations_apply_once(empty_dsn: str) -> None:
    barrier = threading.Barrier(6)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(empty_dsn, autocommit=True) as connection:
                barrier.wait()
                results.append(migrate(connection))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(results) == [[], [], [], [], [], ALL]


def test_migration_rolls_back_with_the_callers_transaction(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as connection:
        connection.execute("create table app_table (id int)")
        assert migrate(connection) == ALL
        connection.rollback()
    assert not has_schema(empty_dsn)
    with psycopg.connect(empty_dsn) as connection:
        assert migrate(connection) == ALL
        assert not has_schema(empty_dsn)  # not committed yet: the caller decides
    assert has_schema(empty_dsn)


def test_async_migration_in_the_callers_transaction(empty_dsn: str) -> None:
    async def scenario() -> list[int]:
        async with await psycopg.AsyncConnection.connect(empty_dsn) as connection:
            applied = await migrate_async(connection)
            await connection.rollback()
            assert not has_schema(empty_dsn)
            return applied + await migrate_async(connection)

    assert asyncio.run(scenario()) == ALL + ALL
    assert has_schema(empty_dsn)


def test_an_edited_released_migration_is_refused(connection: psycopg.Connection[Any]) -> None:
    connection.execute("update pgqueue.migrations set checksum = 'edited' where version = 1")
    with pytest.raises(MigrationChecksumError, match="must never be edited"):
        migrate(connection)


def test_a_newer_schema_is_refused(connection: psycopg.Connection[Any]) -> None:
    connection.execute(
        "insert into pgqueue.migrations (version, name, checksum) values (9999, 'future', 'x')"
    )
    with pytest.raises(SchemaTooNewError, match="upgrade pgqueue"):
        migrate(connection)
    with pytest.raises(SchemaTooNewError):
        check_schema(connection)


def test_missing_schema_is_reported(empty_dsn: str) -> None:
    with (
        psycopg.connect(empty_dsn) as connection,
        pytest.raises(SchemaNotMigratedError, match="pgqueue migrate"),
    ):
        check_schema(connection)


def test_the_migration_files_ship_inside_the_package() -> None:
    from importlib import resources

    folder = resources.files("pgqueue").joinpath("_sql", "migrations")
    assert folder.joinpath("0001_initial.sql").is_file()
    assert [migration.version for migration in migrations()] == list(range(1, latest_version() + 1))


def test_a_newer_compatible_schema_keeps_older_code_running(connection: psycopg.Connection[Any]) -> None:
    newest = latest_version()
    # a future migration that says code knowing `newest` still works with it
    connection.execute(
        "insert into pgqueue.migrations (version, name, checksum, compatible_from)"
        " values (%s, 'future_addition', 'x', %s)",
        (newest + 1, newest),
    )
    assert check_schema(connection) == newest + 1
    assert migrate(connection) == []  # nothing to do, and no refusal either
    # one that needs newer code is refused, by the worker's check and by migrate
    connection.execute(
        "insert into pgqueue.migrations (version, name, checksum, compatible_from)"
        " values (%s, 'future_change', 'x', %s)",
        (newest + 2, newest + 2),
    )
    with pytest.raises(SchemaTooNewError, match="not compatible"):
        check_schema(connection)
    with pytest.raises(SchemaTooNewError, match="upgrade pgqueue"):
        migrate(connection)


def test_each_shipped_migration_records_what_code_it_stays_compatible_with(
    connection: psycopg.Connection[Any],
) -> None:
    rows = connection.execute("select version, compatible_from from pgqueue.migrations order by version")
    assert [(int(v), int(c)) for v, c in rows] == [(m.version, m.compatible_from) for m in migrations()]


def test_a_migration_gives_up_on_a_lock_instead_of_stalling_the_queue(dsn: str) -> None:
    from pgqueue import MigrationLockTimeoutError

    with psycopg.connect(dsn, autocommit=True) as connection:
        # a database migrated by a pgqueue from before the compatibility column
        connection.execute("alter table pgqueue.migrations drop column compatible_from")
    with psycopg.connect(dsn) as long_transaction:
        long_transaction.execute("select count(*) from pgqueue.migrations")  # holds a lock until it ends
        with psycopg.connect(dsn) as migrator:
            with pytest.raises(MigrationLockTimeoutError, match=r"waited more than 0\.2s"):
                migrate(migrator, lock_timeout=0.2)
            migrator.rollback()
            # the caller's own lock_timeout is left as it was
            assert migrator.execute("show lock_timeout").fetchone() == ("0",)
    with psycopg.connect(dsn) as migrator:
        assert migrate(migrator) == []  # the lock gone, it goes through
        assert migrator.execute("show lock_timeout").fetchone() == ("0",)


def test_upgrading_moves_finished_jobs_out_of_the_hot_table_and_keeps_every_job(empty_dsn: str) -> None:
    from pgqueue.migrate import _migration_plan
    from pgqueue.plans import drive

    with psycopg.connect(empty_dsn, autocommit=True) as connection:
        # a database of the release before finished jobs moved out, with a job in each state
        before = [migration for migration in migrations() if migration.version < 9]
        with connection.transaction():
            drive(connection, _migration_plan(before, 5.0))
        rows = connection.execute(
            "insert into pgqueue.jobs (task, queue, state, attempt, run_at, worker, lease_expires_at,"
            " started_at, finished_at) values"
            " ('ready', 'q', 'queued', 0, now() - interval '1 minute', null, null, null, null),"
            " ('later', 'q', 'queued', 0, now() + interval '1 hour', null, null, null, null),"
            " ('running', 'q', 'running', 1, now(), 'w', now() + interval '1 hour', now(), null),"
            " ('done', 'q', 'succeeded', 1, now(), 'w', null, now(), now()),"
            " ('dead', 'q', 'dead', 3, now(), 'w', null, now(), now()),"
            " ('cancelled', 'q', 'cancelled', 0, now(), null, null, null, now())"
            " returning task, id"
        ).fetchall()
        ids = {str(task): int(job_id) for task, job_id in rows}

        assert migrate(connection) == [version for version in ALL if version >= 9]

        def tasks_in(table: str) -> set[str]:
            return {str(task) for (task,) in connection.execute(f"select task from pgqueue.{table}")}

        assert tasks_in("active_jobs") == {"ready", "later", "running"}
        assert tasks_in("finished_jobs") == {"done", "dead", "cancelled"}
        # every job is where it was for a query of pgqueue.jobs, with its id and state
        view = connection.execute("select task, id, state::text from pgqueue.jobs").fetchall()
        assert {str(task): int(job_id) for task, job_id, _ in view} == ids
        assert {str(task): str(state) for task, _, state in view}["dead"] == "dead"

        # new jobs go on from the same ids; the claim, a success and a redrive work on the moved rows
        (new_id,) = connection.execute("select pgqueue.enqueue('new', queue => 'q')").fetchone() or (0,)
        assert int(new_id) > max(ids.values())
        claimed = connection.execute(
            "select task from pgqueue.claim_jobs('w2', array['q'], 10, 30)"
        ).fetchall()
        assert sorted(str(task) for (task,) in claimed) == ["new", "ready"]
        completed = connection.execute(
            "select id, state::text from pgqueue.complete_jobs('w', array[%s]::bigint[], array[1],"
            " array['succeeded'], array['{}'::jsonb], array[null::jsonb], array[null::float8])",
            (ids["running"],),
        ).fetchall()
        assert completed == [(ids["running"], "succeeded")]
        assert "running" in tasks_in("finished_jobs")
        assert connection.execute("select pgqueue.retry_job(%s)", (ids["dead"],)).fetchone() == (True,)
        assert "dead" in tasks_in("active_jobs") and "dead" not in tasks_in("finished_jobs")


def test_the_jobs_view_takes_the_writes_of_earlier_releases(dsn: str) -> None:
    """Producers and operators of earlier releases write pgqueue.jobs: an insert (with its
    defaults), a COPY, an update that changes a job's state and a delete all land in the
    table the job's state belongs to."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        (job_id,) = connection.execute(
            "insert into pgqueue.jobs (task, args) values ('old.producer', '{\"n\": 1}') returning id"
        ).fetchone() or (0,)
        row = connection.execute(
            "select state::text, queue, max_attempts from pgqueue.active_jobs where id = %s", (job_id,)
        ).fetchone()
        assert row == ("queued", "default", 10)
        with connection.cursor() as cursor, cursor.copy("copy pgqueue.jobs (task, queue) from stdin") as copy:
            copy.write_row(("old.bulk", "bulk"))
            copy.write_row(("old.bulk", "bulk"))
        assert connection.execute(
            "select count(*) from pgqueue.active_jobs where task = 'old.bulk'"
        ).fetchone() == (2,)

        connection.execute(
            "update pgqueue.jobs set state = 'dead', finished_at = now() where id = %s", (job_id,)
        )
        assert connection.execute(
            "select count(*) from pgqueue.active_jobs where id = %s", (job_id,)
        ).fetchone() == (0,)
        assert connection.execute(
            "select state::text from pgqueue.finished_jobs where id = %s", (job_id,)
        ).fetchone() == ("dead",)
        connection.execute("delete from pgqueue.jobs where task in ('old.producer', 'old.bulk')")
        assert connection.execute("select count(*) from pgqueue.jobs").fetchone() == (0,)
