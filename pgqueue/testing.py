"""Helpers for users' own tests (and ours): throwaway databases and a worker in a thread."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .app import App
from .eager import EagerJob, EagerRunner
from .migrate import migrate
from .worker import Worker


def database_dsn(server_dsn: str, name: str) -> str:
    """`server_dsn` pointed at database `name`."""
    return make_conninfo(server_dsn, dbname=name)


def create_database(server_dsn: str, prefix: str = "pgqueue_test", template: str | None = None) -> str:
    """Create a uniquely named database (a clone of `template` when given); return its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    statement = sql.SQL("create database {}").format(sql.Identifier(name))
    if template:
        statement = sql.SQL("create database {} template {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with psycopg.connect(server_dsn, autocommit=True) as connection:
        connection.execute(statement)
    return name


def drop_database(server_dsn: str, name: str) -> None:
    """Drop a database this process created, disconnecting whoever still uses it."""
    with psycopg.connect(server_dsn, autocommit=True) as connection:
        connection.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", (name,)
        )
        connection.execute(sql.SQL("drop database if exists {}").format(sql.Identifier(name)))


def create_migrated_database(server_dsn: str, prefix: str = "pgqueue_template") -> str:
    """A new database with the pgqueue schema, usable as a template for fast clones."""
    name = create_database(server_dsn, prefix)
    with psycopg.connect(database_dsn(server_dsn, name), autocommit=True) as connection:
        migrate(connection)
    return name


@contextlib.contextmanager
def eager(app: App) -> Iterator[list[EagerJob]]:
    """Within the block, enqueues of `app`'s tasks run their job at once, in the caller, with
    no database and no worker (see pgqueue.eager for what that keeps and leaves out).
    Yields the list of jobs run, which grows as the block enqueues."""
    runner = EagerRunner(app)
    previous, app.eager = app.eager, runner
    try:
        yield runner.ran
    finally:
        app.eager = previous


@contextlib.contextmanager
def running_worker(
    app: App,
    *,
    start_timeout: float = 30.0,
    stop_timeout: float = 60.0,
    force_timeout: float = 30.0,
    **options: Any,
) -> Iterator[Worker]:
    """Run a Worker in a background thread for the duration of the block, then stop it.

    Fails loudly instead of leaking a thread into whatever runs next: AssertionError
    when the worker has not started within `start_timeout` seconds (it is stopped
    first), or has not stopped within `stop_timeout` seconds after the block (it is
    then forced, and given `force_timeout` seconds more). An exception the worker
    itself raised is re-raised here.
    """
    worker = Worker(app, install_signal_handlers=False, **options)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as error:  # surfaced to the test below
            failure.append(error)
            worker.started.set()

    thread = threading.Thread(target=run, name="pgqueue-test-worker", daemon=True)
    thread.start()

    def stop(timeout: float) -> None:
        worker.stop()
        thread.join(timeout)
        if thread.is_alive():
            worker.stop(force=True)
            thread.join(force_timeout)
            if thread.is_alive():
                raise AssertionError(f"worker {worker.worker_id} ignored a forced stop: its thread leaks")
            raise AssertionError(f"worker {worker.worker_id} did not stop within {timeout:g}s")

    if not worker.started.wait(start_timeout):
        stop(stop_timeout)
        raise AssertionError(f"worker {worker.worker_id} did not start within {start_timeout:g}s")
    if failure:
        thread.join(stop_timeout)
        raise failure[0]
    try:
        yield worker
    finally:
        stop(stop_timeout)
    if failure:
        raise failure[0]


def wait_for(
    condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def job_states(dsn: str, ids: Iterable[int]) -> dict[int, str]:
    """Current state of each job id."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "select id, state::text from pgqueue.jobs where id = any(%s)", (list(ids),)
        ).fetchall()
    return {int(job_id): str(state) for job_id, state in rows}


def wait_for_states(
    dsn: str,
    ids: Iterable[int],
    states: Iterable[str] = ("succeeded", "dead", "cancelled"),
    timeout: float = 30.0,
) -> dict[int, str]:
    """Wait until every job in `ids` is in one of `states`; return their states."""
    wanted = set(states)
    id_list = list(ids)
    current: dict[int, str] = {}

    def done() -> bool:
        nonlocal current
        current = job_states(dsn, id_list)
        return len(current) == len(id_list) and all(state in wanted for state in current.values())

    wait_for(done, timeout, interval=0.05, what=f"jobs {id_list[:10]} to reach {sorted(wanted)}")
    return current
