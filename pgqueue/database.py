"""Finds the database: PGQUEUE_DSN when set, else an embedded cluster; checks DSNs early."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .embedded import embedded_dsn
from .errors import ConfigurationError
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
# to 50 ms (measured) for a query that runs in a few.
NO_JIT = "-c jit=off"


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
