"""Finds the database: PGQUEUE_DSN when set, else an embedded cluster; checks DSNs early."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .embedded import embedded_dsn
from .errors import ConfigurationError
from .pooling import PreparedStatements, settle
from .settings import Settings

# Worker connections must notice a silently dead peer (cut cable, lost VM) in seconds,
# not after the kernel's two-hour default.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


# For the watching connections (status, health, the exporter): their queries read a window
# of recent jobs, which the planner may cost high enough to compile with JIT, a fixed 20
# to 50 ms (measured) for a query that runs in a few. Set per transaction: a pooler refuses
# the start-up `options` ("unsupported startup parameter") and would hand a session SET on
# to the next client.
_WATCHING = (
    "select set_config('jit', 'off', true), set_config('statement_timeout', "
    "coalesce(%(timeout)s, current_setting('statement_timeout')), true)"
)


@contextmanager
def watching(connection: psycopg.Connection[Any], timeout: float | None = None) -> Iterator[None]:
    """One transaction without JIT, each statement within `timeout` seconds when given."""
    with connection.transaction():
        milliseconds = None if timeout is None else f"{int(timeout * 1000)}ms"
        connection.execute(_WATCHING, {"timeout": milliseconds}, prepare=False)
        yield


def connect(dsn: str, prepared: PreparedStatements = "auto", **options: Any) -> psycopg.Connection[Any]:
    """An autocommit connection of pgqueue's own (the command line, watching), with prepared
    statements off where a pooler would break them."""
    connection = psycopg.connect(dsn, autocommit=True, **options)
    try:
        settle(connection, prepared)
    except BaseException:
        connection.close()
        raise
    return connection


def validate_dsn(dsn: str) -> str:
    """Return `dsn` if libpq can parse it, else raise ConfigurationError saying why."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as error:
        # libpq's message may quote the part it could not parse, password included: say
        # what kind of problem it is, never the text
        reason = "a bad percent-encoding" if "percent" in str(error) else "a syntax error"
        raise ConfigurationError(
            f"invalid database DSN (it has {reason}; libpq cannot parse it): check PGQUEUE_DSN / --dsn"
        ) from None
    return dsn


def redact(dsn: str) -> str:
    """`dsn` without its password, for messages and logs."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if "password" in parts:
        parts["password"] = "***"
    return make_conninfo("", **parts)


def resolve_dsn(settings: Settings) -> str:
    """The DSN to use: `settings.dsn`, or an embedded cluster in `settings.data_dir`."""
    if settings.dsn:
        return validate_dsn(settings.dsn)
    return embedded_dsn(settings.data_dir)
