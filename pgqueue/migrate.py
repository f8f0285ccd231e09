"""Applies the numbered SQL migrations under an advisory lock, inside the caller's transaction.

The logic lives once, in generators that yield statements and receive their rows
(a sans-I/O core); `migrate` and `migrate_async` only carry the statements to the server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import psycopg

from .connection import CONNECTION_ERRORS, Backoff, DatabaseUnavailable, WorkerConnection
from .errors import (
    MigrationChecksumError,
    MigrationLockTimeoutError,
    SchemaError,
    SchemaNotMigratedError,
    SchemaTooNewError,
)
from .plans import Plan, atomic, atomic_async, drive, drive_async, drive_worker
from .roles import permission_denied
from .sql import Migration, latest_version, migrations

log = logging.getLogger("pgqueue")

# Any fixed 64-bit number works; this one spells "pgqueue" in ASCII.
_MIGRATION_LOCK_KEY = 0x706771756575

_BOOTSTRAP = """
create schema if not exists pgqueue;
create table if not exists pgqueue.migrations (
    version integer primary key,
    name text not null,
    checksum text not null,
    applied_at timestamptz not null default now()
);
-- added after 0001 was released; only when missing, so that migrating an up-to-date
-- database takes no lock at all on this table (workers read it when they start)
do $$ begin
    if not exists (
        select 1 from information_schema.columns
        where table_schema = 'pgqueue' and table_name = 'migrations' and column_name = 'compatible_from'
    ) then
        alter table pgqueue.migrations add column compatible_from integer;
    end if;
end $$
"""

# A migration that waits longer than this for a lock on a pgqueue table gives up, so
# it never stalls the queue behind it (every claim would queue behind its lock request).
MIGRATION_LOCK_TIMEOUT = 5.0


_ROLES_MIGRATION = 18  # creates pgqueue.grant_roles and calls it itself


def _migration_plan(available: Sequence[Migration], lock_timeout: float) -> Plan[list[int]]:
    # The transaction-scoped lock makes concurrent migrators queue up: the second one
    # waits, then finds everything applied. Taking it before "create schema" matters,
    # because two concurrent "create schema if not exists" can still collide.
    yield "select pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,)
    # after the advisory lock (concurrent migrators wait for each other as long as it
    # takes), and restored at the end: it is local to the caller's transaction
    rows = yield "select current_setting('lock_timeout')", ()
    previous_lock_timeout = str(rows[0][0]) if rows else "0"
    yield "select set_config('lock_timeout', %s, true)", (f"{int(lock_timeout * 1000)}ms",)
    yield _BOOTSTRAP, None
    rows = yield "select version, checksum, compatible_from from pgqueue.migrations order by version", ()
    applied = {int(version): str(checksum) for version, checksum, _ in rows or []}
    known = {migration.version: migration for migration in available}
    newest_known = max(known, default=0)
    newer = {int(version): compatible for version, _, compatible in rows or [] if version > newest_known}
    needed = max(
        (version if compatible is None else int(compatible) for version, compatible in newer.items()),
        default=0,
    )
    if needed > newest_known:
        raise SchemaTooNewError(
            f"the database has pgqueue migration {max(newer)} but this pgqueue only knows "
            f"up to {newest_known}: upgrade pgqueue instead of migrating backwards"
        )
    for version, checksum in applied.items():
        migration = known.get(version)
        if migration is not None and migration.checksum != checksum:
            raise MigrationChecksumError(
                f"migration {version:04d}_{migration.name} was applied with checksum "
                f"{checksum[:12]}… but the shipped file now has {migration.checksum[:12]}…: "
                "released migrations must never be edited"
            )
    done: list[int] = []
    for migration in available:
        if migration.version in applied:
            continue
        yield migration.text, None
        yield (
            "insert into pgqueue.migrations (version, name, checksum, compatible_from)"
            " values (%s, %s, %s, %s)",
            (migration.version, migration.name, migration.checksum, migration.compatible_from),
        )
        done.append(migration.version)
    if done and done[-1] > _ROLES_MIGRATION:
        # the roles' rights reach what later migrations made (0018: pgqueue.grant_roles)
        yield "select pgqueue.grant_roles(false)", None
    yield "select set_config('lock_timeout', %s, true)", (previous_lock_timeout,)
    return done


def migrate(connection: psycopg.Connection[Any], lock_timeout: float = MIGRATION_LOCK_TIMEOUT) -> list[int]:
    """Apply pending migrations on `connection` and return the versions applied.

    Runs inside the caller's transaction when one is open (as a savepoint), so the
    schema change commits or rolls back with the caller's own work; otherwise in a
    transaction of its own. Safe to call from many processes at once. A lock on a
    pgqueue table that cannot be had within `lock_timeout` seconds (a long transaction
    holds it) raises MigrationLockTimeoutError instead of stalling every worker.
    """
    with _lock_timeout_error(lock_timeout), atomic(connection):
        return drive(connection, _migration_plan(migrations(), lock_timeout))


async def migrate_async(
    connection: psycopg.AsyncConnection[Any], lock_timeout: float = MIGRATION_LOCK_TIMEOUT
) -> list[int]:
    """The async twin of `migrate`: same plan, same transaction rules."""
    with _lock_timeout_error(lock_timeout):
        async with atomic_async(connection):
            return await drive_async(connection, _migration_plan(migrations(), lock_timeout))


@contextlib.contextmanager
def _lock_timeout_error(lock_timeout: float) -> Iterator[None]:
    try:
        yield
    except psycopg.errors.LockNotAvailable as error:
        raise MigrationLockTimeoutError(
            f"a migration waited more than {lock_timeout:g}s for a lock on the pgqueue tables "
            "(a long transaction holds one) and gave up rather than stall the queue behind it: "
            "retry once that transaction has ended"
        ) from error


# What a statement meets on a database that was never migrated (or migrated by an older
# pgqueue that lacks a function): the schema, a table or a function is missing.
_MISSING_SCHEMA = (
    psycopg.errors.InvalidSchemaName,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
)


@contextlib.contextmanager
def schema_required() -> Iterator[None]:
    """Turn the server's "no such schema/table/function" into SchemaNotMigratedError.

    Producers do not check the schema version before each enqueue (that would cost a
    round trip per job); they learn of a missing schema from the statement itself.
    """
    try:
        yield
    except _MISSING_SCHEMA as error:
        if "pgqueue" not in str(error):
            raise  # a missing object of someone else's (or a wrong argument type): not ours to explain
        raise SchemaNotMigratedError(
            f"the pgqueue schema is missing or out of date in this database ({str(error).splitlines()[0]}): "
            "run `pgqueue migrate` (or pgqueue.migrate(conn))"
        ) from error


def _version_plan() -> Plan[int]:
    try:
        return (yield from _schema_version_plan())
    except psycopg.errors.InsufficientPrivilege as error:
        raise permission_denied(error) from error  # a role granted none of pgqueue's roles


def _schema_version_plan() -> Plan[int]:
    rows = yield "select to_regclass('pgqueue.migrations') is not null", ()
    if not rows or not rows[0][0]:
        raise SchemaNotMigratedError(
            "this database has no pgqueue schema yet: run `pgqueue migrate` (or pgqueue.migrate(conn))"
        )
    rows = yield "select coalesce(max(version), 0) from pgqueue.migrations", ()
    version = int(rows[0][0]) if rows else 0
    expected = latest_version()
    if version > expected:
        # newer migrations may say that code as old as ours keeps working with them
        rows = yield (
            "select max(coalesce(compatible_from, version)) from pgqueue.migrations where version > %s",
            (expected,),
        )
        needed = int(rows[0][0]) if rows and rows[0][0] is not None else version
        if needed > expected:
            raise SchemaTooNewError(
                f"the database schema is at pgqueue migration {version}, newer than this code "
                f"(which knows up to {expected}) and not compatible with it: upgrade pgqueue "
                "before starting workers"
            )
    if version < expected:
        raise SchemaNotMigratedError(
            f"the database schema is at pgqueue migration {version} but this code needs "
            f"{expected}: run `pgqueue migrate`"
        )
    return version


def check_schema(connection: psycopg.Connection[Any]) -> int:
    """Raise unless the database schema is exactly the one this code was written for."""
    return drive(connection, _version_plan())


async def check_schema_async(connection: psycopg.AsyncConnection[Any]) -> int:
    """The async twin of `check_schema`."""
    return await drive_async(connection, _version_plan())


_UNREACHABLE: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, DatabaseUnavailable)


async def wait_for_schema(
    connection: WorkerConnection,
    reconnect_max_delay: float,
    stopping: Callable[[], bool],
    sleep: Callable[[float], Awaitable[None]],
) -> bool:
    """A worker's start: connect (retrying with backoff while the database is unreachable)
    and check the schema version. False if `stopping()` became true first; a schema that
    does not fit raises SchemaError."""
    backoff = Backoff(cap=reconnect_max_delay)
    while not stopping():
        try:
            # each statement within the connection's timeout (a DatabaseUnavailable or a
            # TimeoutError): a link that dies during the check must not hold the worker's
            # start until TCP gives up on it
            await drive_worker(connection, _version_plan())
            return True
        except SchemaError:
            raise
        except _UNREACHABLE as error:
            await connection.discard()
            delay = backoff.next_delay()
            log.warning(
                "database unreachable (%s: %s); retrying in %.1fs",
                type(error).__name__,
                str(error).strip(),
                delay,
            )
            await sleep(delay)
    return False
