"""Connection poolers (PgBouncer, pgcat, Odyssey, RDS Proxy) between pgqueue and PostgreSQL.

A pooler in transaction mode hands each transaction to whichever server connection is
free, so nothing may outlive a transaction: not a prepared statement, not a LISTEN,
not a session setting. pgqueue keeps none across transactions (its locks are
transaction-level and its leader is a lease row); what remains is psycopg's habit of
preparing a statement after its fifth run, which such a pooler breaks ("prepared
statement "_pg3_0" already exists" on the next client that gets the same server
connection). PgBouncer before 1.21 cannot keep them at all; later ones only with
`max_prepared_statements` set.

Detection: a pooler answers the connection's start-up itself and makes up the
cancellation key, so the process id libpq was given is not the server's
`pg_backend_pid()`. A plain TCP proxy passes the real one on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import psycopg

from .errors import PreparedStatementsLost

log = logging.getLogger("pgqueue")

PreparedStatements = Literal["auto", "on", "off"]

# PIDs on Linux stop at 2**22 (pid_max's ceiling); PgBouncer's made-up key is 32 random bits
_PID_MAX = 4_194_304

# duplicate_prepared_statement, invalid_sql_statement_name, and the protocol violation of
# a Bind to another client's statement of another shape: with psycopg's own names
_LOST_STATES = ("42P05", "26000", "08P01")


FIX = (
    "set PGQUEUE_PREPARED_STATEMENTS=off (or auto, the default, which turns them off behind a "
    "pooler it detects), open your own connections with prepare_threshold=None, or set "
    "PgBouncer's max_prepared_statements (1.21 and later)"
)

SERVER_PID = "select pg_backend_pid()"


def is_lost_prepared_statement(error: BaseException) -> bool:
    """True for psycopg's prepared statement gone missing or met twice on the server."""
    return (
        isinstance(error, psycopg.Error)
        and getattr(error, "sqlstate", None) in _LOST_STATES
        and "_pg3_" in str(error)
    )


def lost_prepared_statement(error: BaseException) -> PreparedStatementsLost:
    """The typed error naming the fix, for `error` (see is_lost_prepared_statement)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PreparedStatementsLost(
        f"{first}: a connection pooler in transaction mode (PgBouncer) is between pgqueue and "
        f"PostgreSQL and does not keep prepared statements; {FIX}"
    )


def looks_pooled(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Without a round trip, for the callers' own connections: a process id no server has
    (a pooler's made-up key). Misses one pooler in a thousand, whose random key looks like
    a PID; the connections pgqueue opens itself ask the server (`settle`)."""
    pid = connection.info.backend_pid
    return not 0 < pid <= _PID_MAX


def prepare_flag(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool | None:
    """`prepare=` for pgqueue's statements: on a connection pgqueue settled itself, as
    settled; on a caller's own, never behind a pooler, else as the caller configured it."""
    if connection in _settled:
        return None
    return False if looks_pooled(connection) else None


# connections whose prepare_threshold `settle` chose (the app's pools, the command line's)
_settled: weakref.WeakSet[psycopg.Connection[Any] | psycopg.AsyncConnection[Any]] = weakref.WeakSet()


def settle(connection: psycopg.Connection[Any], mode: PreparedStatements) -> bool:
    """Ask the server whether a pooler stands between, and turn prepared statements off on
    `connection` where they would break; leaves the connection idle. True: pooled."""
    row = connection.execute(SERVER_PID, prepare=False).fetchone()
    if not connection.autocommit:
        connection.rollback()  # a pool wants its new connections idle
    return _settled_by(connection, mode, row)


async def settle_async(connection: psycopg.AsyncConnection[Any], mode: PreparedStatements) -> bool:
    """The async twin of `settle`."""
    cursor = await connection.execute(SERVER_PID, prepare=False)
    row = await cursor.fetchone()
    if not connection.autocommit:
        await connection.rollback()
    return _settled_by(connection, mode, row)


# DSNs already warned of: prepared statements kept on behind a pooler, by the setting
_warned: set[str] = set()


def _settled_by(
    connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    mode: PreparedStatements,
    server_pid: tuple[Any, ...] | None,
) -> bool:
    """What the server's answer (its pg_backend_pid()) says, for either twin of `settle`."""
    behind = server_pid is not None and connection.info.backend_pid != int(server_pid[0])
    if mode == "on" and behind and connection.info.dsn not in _warned:
        _warned.add(connection.info.dsn)
        log.warning(
            "PGQUEUE_PREPARED_STATEMENTS=on behind a connection pooler: safe only where it keeps "
            "prepared statements (PgBouncer 1.21+ with max_prepared_statements); an older one "
            "may run another client's statement of the same name. Unset it (auto) otherwise"
        )
    if not prepares(mode, behind):
        connection.prepare_threshold = None
    _settled.add(connection)
    return behind


def prepares(mode: PreparedStatements, behind_pooler: bool) -> bool:
    """Whether statements may be prepared on a connection, given the setting."""
    return mode == "on" or (mode == "auto" and not behind_pooler)


def pool_configure(mode: PreparedStatements) -> Callable[[psycopg.Connection[Any]], None]:
    """psycopg-pool's `configure` callback for the app's pool."""

    def configure(connection: psycopg.Connection[Any]) -> None:
        settle(connection, mode)

    return configure


def async_pool_configure(
    mode: PreparedStatements,
) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    """The async twin of `pool_configure`."""

    async def configure(connection: psycopg.AsyncConnection[Any]) -> None:
        await settle_async(connection, mode)

    return configure
