"""The three roles of migration 0018, logged in as for real: each can do its work, and
is refused the rest by the server itself."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgqueue import App, PermissionDeniedError, QueueFull, RetryPolicy, Worker, current_job
from pgqueue.health import check_health
from pgqueue.metrics import DatabaseCollector
from pgqueue.migrate import _migration_plan
from pgqueue.plans import drive
from pgqueue.sql import Migration, migrations
from pgqueue.status import overview
from pgqueue.testing import running_worker, wait_for_states
from tests.conftest import pgqueue_command, subprocess_environment


@pytest.fixture
def login_as(server_dsn: str, dsn: str) -> Iterator[Callable[[str], str]]:
    """Makes a login role that holds one of pgqueue's roles; returns this test's DSN as it.
    Login roles belong to the cluster: each is dropped after the test."""
    made: list[str] = []

    def make(granted: str) -> str:
        name = f"pgqueue_test_{granted.removeprefix('pgqueue_')}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("create role {} login").format(sql.Identifier(name)))
            made.append(name)
            if granted:
                admin.execute(sql.SQL("grant {} to {}").format(sql.Identifier(granted), sql.Identifier(name)))
        return make_conninfo(dsn, user=name)

    yield make
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        for name in made:
            admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", (name,)
            )
            admin.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(name)))


def refused(dsn: str, statement: str) -> None:
    """`statement`, run as the role of `dsn`, is refused for want of a right."""
    with (
        psycopg.connect(dsn, autocommit=True) as connection,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        connection.execute(statement)


# what none of the roles may do to the schema
ALTERATIONS = (
    "alter table pgqueue.active_jobs add column sneaky integer",
    "create table pgqueue.sneaky (id integer)",
    "drop view pgqueue.job_status",
    "create or replace function pgqueue.enqueue_sneaky() returns integer language sql as 'select 1'",
    "truncate pgqueue.finished_jobs",
)


def test_a_producer_enqueues_and_follows_its_jobs_and_nothing_else(
    login_as: Callable[[str], str], dsn: str, new_app: Callable[..., App]
) -> None:
    producer_dsn = login_as("pgqueue_producer")
    producer = new_app(dsn=producer_dsn)

    @producer.task(name="double")
    def double(n: int) -> int:
        return n * 2

    job = double.enqueue(None, n=21)
    with psycopg.connect(producer_dsn) as own:
        bulk = double.enqueue_many(own, [{"n": n} for n in range(50)])
        first = double.with_options(unique_key="k").enqueue(own, n=1)
        assert double.with_options(unique_key="k").enqueue(own, n=1).duplicate
        row = own.execute("select pgqueue.enqueue('double', '{\"n\": 5}')").fetchone()
        assert row is not None
    assert job.state() == "queued"

    runner = new_app()  # the owner runs them
    runner.task(name="double")(lambda n: n * 2)
    with running_worker(runner):
        assert job.wait(timeout=30) == 42  # result read through pgqueue.job_status
        wait_for_states(dsn, [*bulk, first, row[0]])
    assert producer.get_status(job).result == 42

    with pytest.raises(PermissionDeniedError, match="pgqueue_worker"):
        producer.get_job(job)  # the whole row holds the arguments
    with pytest.raises(PermissionDeniedError):
        producer.cancel(bulk[0])
    for statement in (
        "select args from pgqueue.jobs",
        "select args from pgqueue.active_jobs",
        "select args from pgqueue.finished_jobs",
        "select * from pgqueue.jobs",
        f"update pgqueue.active_jobs set priority = 9 where id = {int(job)}",
        f"delete from pgqueue.finished_jobs where id = {int(job)}",
        f"update pgqueue.jobs set state = 'dead' where id = {int(job)}",
        "select * from pgqueue.claim_jobs('thief', array['default'], 10, 30, null)",
        "insert into pgqueue.active_jobs (task, state, worker) values ('forged', 'running', 'w')",
        "insert into pgqueue.active_jobs (task, result) values ('forged', '1')",
        "select key from pgqueue.job_keys",
        "update pgqueue.job_keys set job_id = 1",
        f"select pgqueue.cancel({int(bulk[1])})",
        f"select pgqueue.retry_job({int(job)})",
        "select pgqueue.pause_queue('default')",
        *ALTERATIONS,
    ):
        refused(producer_dsn, statement)
    with psycopg.connect(producer_dsn) as own:
        columns = [
            column.name for column in own.execute("select * from pgqueue.job_status").description or []
        ]
    assert "args" not in columns and {"state", "result", "progress"} <= set(columns)

    worker = Worker(new_app(dsn=producer_dsn), install_signal_handlers=False)
    worker.app.task(name="double")(lambda n: n * 2)
    with pytest.raises(PermissionDeniedError, match="GRANT pgqueue_worker TO"):
        worker.run()


def test_a_worker_role_runs_jobs_and_keeps_house_but_cannot_alter_the_schema(
    login_as: Callable[[str], str], dsn: str, new_app: Callable[..., App]
) -> None:
    worker_dsn = login_as("pgqueue_worker")
    app = new_app(dsn=worker_dsn, lease_seconds=2.0, rescue_interval=0.5)

    @app.task(name="flaky", retry=RetryPolicy.fixed(0.05), max_attempts=2)
    def flaky(n: int) -> int:
        if n % 2:
            raise ValueError("odd")
        return n

    ids = flaky.enqueue_many(None, [{"n": n} for n in range(20)])
    with running_worker(app, concurrency=4):
        states = wait_for_states(dsn, ids)
    assert sorted(states.values()) == ["dead"] * 10 + ["succeeded"] * 10
    assert app.retry(ids[1])  # a redrive, as the worker role
    for statement in (
        *ALTERATIONS,
        "delete from pgqueue.migrations",
        "insert into pgqueue.migrations (version, name, checksum) values (99999, 'x', 'x')",
        "update pgqueue.retention set keep = null",
    ):
        refused(worker_dsn, statement)


def test_an_observer_reads_everything_and_writes_nothing(
    login_as: Callable[[str], str], dsn: str, new_app: Callable[..., App]
) -> None:
    observer_dsn = login_as("pgqueue_observer")
    owner = new_app()
    owner.enqueue(None, "anything", {"n": 1})
    with psycopg.connect(observer_dsn, autocommit=True) as connection:
        seen = overview(connection, 300)
        assert [(state.queue, state.jobs) for state in seen.queues] == [("default", 1)]
        connection.execute("select * from pgqueue.jobs").fetchall()
        connection.execute("select * from pgqueue.task_stats").fetchall()
    health = check_health(observer_dsn)  # read to the end: no live worker serves 'default'
    assert health.reasons == ["queue 'default': 1 ready job(s) and no live worker serves it"]
    up = {
        sample.name: sample.value
        for family in DatabaseCollector(observer_dsn).collect()
        for sample in family.samples
    }
    assert up["pgqueue_up"] == 1
    with pytest.raises(PermissionDeniedError, match="pgqueue_producer"):
        new_app(dsn=observer_dsn).enqueue(None, "anything", {"n": 2})
    for statement in (
        "insert into pgqueue.active_jobs (task) values ('sneaky')",
        "update pgqueue.active_jobs set priority = 9",
        "delete from pgqueue.active_jobs",
        "select pgqueue.enqueue('sneaky')",
        "select * from pgqueue.claim_jobs('thief', array['default'], 10, 30, null)",
        "select pgqueue.set_retention('succeeded', interval '1 day', '*')",
        *ALTERATIONS,
    ):
        refused(observer_dsn, statement)


def test_a_role_without_grants_gets_a_typed_error_naming_the_roles(
    login_as: Callable[[str], str], new_app: Callable[..., App]
) -> None:
    nobody = new_app(dsn=login_as(""))
    with pytest.raises(PermissionDeniedError, match="pgqueue_producer"):
        nobody.enqueue(None, "anything", {})
    worker = Worker(nobody, install_signal_handlers=False)
    nobody.task(name="anything")(lambda: None)
    with pytest.raises(PermissionDeniedError, match="pgqueue_worker"):
        worker.run()  # at its start, not a warning per claim


def test_the_roles_command_lists_the_roles_and_who_holds_them(
    login_as: Callable[[str], str], dsn: str
) -> None:
    producer_dsn = login_as("pgqueue_producer")
    login = str(psycopg.conninfo.conninfo_to_dict(producer_dsn)["user"])
    done = subprocess.run(
        pgqueue_command("roles"),
        env=subprocess_environment(PGQUEUE_DSN=dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    producer = lines.index(next(line for line in lines if line.startswith("pgqueue_producer")))
    assert login in lines[producer + 1]
    assert any(line.startswith("pgqueue_observer") for line in lines)


def test_a_producer_gives_way_on_a_key_taken_meanwhile_but_removes_no_other_job(
    login_as: Callable[[str], str], dsn: str
) -> None:
    producer_dsn = login_as("pgqueue_producer")
    take = "select * from pgqueue.take_job_key('t', 'k', %s)"
    with psycopg.connect(producer_dsn) as own:  # one transaction after another
        holder = one_id(own, "select pgqueue.enqueue('t')")
        assert own.execute(take, (holder,)).fetchone() == (holder, False)
        own.commit()
        # a producer that lost the race for the key: its own new job gives way
        mine = one_id(own, "select pgqueue.enqueue('t')")
        assert own.execute(take, (mine,)).fetchone() == (holder, True)
        own.commit()
        # another transaction's job passed off as its own: refused, and nothing removed
        # (nor a key taken for a job that does not exist)
        other = one_id(own, "select pgqueue.enqueue('t')")
        own.commit()
        for job_id in (other, 10**9):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="this transaction enqueued"):
                own.execute("select * from pgqueue.take_job_key('t', 'k3', %s)", (job_id,))
            own.rollback()
    with psycopg.connect(dsn) as direct:
        assert {row[0] for row in direct.execute("select id from pgqueue.jobs")} == {holder, other}
    refused(login_as("pgqueue_observer"), "select * from pgqueue.take_job_key('t', 'k2', 1)")


def one_id(connection: psycopg.Connection[tuple[int]], statement: str) -> int:
    row = connection.execute(statement).fetchone()
    assert row is not None
    return int(row[0])


def test_a_producer_meets_a_full_queue_and_enqueues_by_name_with_its_rights(
    login_as: Callable[[str], str], new_app: Callable[..., App]
) -> None:
    owner = new_app()
    owner.enqueue(None, "anything", {}, queue="narrow")  # a queue by its first job
    owner.controls.limit("narrow", max_depth=2)
    producer = new_app(dsn=login_as("pgqueue_producer"))
    producer.enqueue(None, "anything", {}, queue="narrow", unique_key="one")
    with pytest.raises(QueueFull) as full:
        producer.enqueue(None, "anything", {}, queue="narrow")
    assert (full.value.depth, full.value.max_depth) == (2, 2)
    # bulk, with a key: the second job finds the first one holding it
    keyed = producer.task(name="keyed")(lambda n: n)
    first, second = keyed.with_options(unique_key="bulk").enqueue_many(None, [{"n": 1}, {"n": 2}])
    assert first == second


def test_a_later_migration_reaches_the_roles_without_a_grant_of_its_own(
    login_as: Callable[[str], str], dsn: str
) -> None:
    later = Migration(9999, "later", "-- compatible-with: 1\ncreate table pgqueue.later_table (id integer)")
    with psycopg.connect(dsn) as owner:
        assert drive(owner, _migration_plan([*migrations(), later], 5.0)) == [9999]
        owner.commit()
    with psycopg.connect(login_as("pgqueue_observer")) as observer:
        assert observer.execute("select count(*) from pgqueue.later_table").fetchone() == (0,)
    with psycopg.connect(login_as("pgqueue_worker"), autocommit=True) as worker:
        worker.execute("insert into pgqueue.later_table values (1)")


def test_a_forged_cancel_notification_stops_no_job(
    login_as: Callable[[str], str], dsn: str, new_app: Callable[..., App]
) -> None:
    """NOTIFY needs no right: a cancel counts only when its request is stored."""
    app = new_app()
    release = threading.Event()

    @app.task(name="held")
    def held(n: int) -> int:
        context = current_job()
        deadline = time.monotonic() + 30
        while not (n == 1 and release.is_set()) and time.monotonic() < deadline:
            context.raise_if_cancelled()
            time.sleep(0.01)
        return n

    with running_worker(app, concurrency=2):
        forged, real = held.enqueue(None, n=1), held.enqueue(None, n=2)
        wait_for_states(dsn, [forged, real], ["running"])
        with psycopg.connect(login_as("pgqueue_observer"), autocommit=True) as observer:
            observer.execute("select pg_notify('pgqueue_cancel', %s)", (str(int(forged)),))
        # requested after the forged one, on the same channel: once it has stopped its job,
        # the worker has seen the forged one too
        assert app.cancel(real) == "cancelling"
        wait_for_states(dsn, [real], ["cancelled"], timeout=10)
        release.set()
        states = wait_for_states(dsn, [forged, real])
    assert states == {int(forged): "succeeded", int(real): "cancelled"}


def test_a_role_that_enqueued_before_0018_keeps_unique_keys(empty_dsn: str, server_dsn: str) -> None:
    """Upgrading: take_job_key is no longer everybody's, but a role that already had
    INSERT on the jobs (its own grants) keeps calling it."""
    name = f"pgqueue_test_legacy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_dsn) as owner:
        drive(owner, _migration_plan([m for m in migrations() if m.version <= 17], 5.0))
        owner.execute(sql.SQL("create role {} login").format(sql.Identifier(name)))
        owner.execute(
            sql.SQL(
                "grant usage on schema pgqueue to {0}; grant select, insert, delete on all tables in schema "
                "pgqueue to {0}; grant usage on all sequences in schema pgqueue to {0}"
            ).format(sql.Identifier(name))
        )
        drive(owner, _migration_plan(migrations(), 5.0))
        owner.commit()
    try:
        with psycopg.connect(make_conninfo(empty_dsn, user=name)) as legacy:
            row = legacy.execute("select * from pgqueue.enqueue_unique('t', 'k')").fetchone()
            assert row is not None and row[1] is False
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", (name,)
            )
        with psycopg.connect(empty_dsn, autocommit=True) as owner:
            owner.execute(sql.SQL("drop owned by {}").format(sql.Identifier(name)))
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("drop role {}").format(sql.Identifier(name)))
