"""One worker connection that reconnects by itself, and the backoff it waits with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from .database import KEEPALIVES
from .pooling import (
    PreparedStatements,
    is_lost_prepared_statement,
    lost_prepared_statement,
    settle_async,
)

log = logging.getLogger("pgqueue")

# Errors that mean "the database or the path to it went away", as opposed to a bug
# in a statement: these are retried, everything else propagates.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    TimeoutError,
    OSError,
)


_ANY_DATABASE_ERROR: tuple[type[BaseException], ...] = (psycopg.Error, *CONNECTION_ERRORS)


class DatabaseUnavailable(Exception):
    """The database could not be reached or the connection broke mid-call."""


# SQLSTATEs of a server that is going away or cannot take us now (class 08: connection
# exception; 53: insufficient resources; 57P0x: shutdown, crash, not yet accepting).
_LINK_STATES = ("08", "53", "57P01", "57P02", "57P03", "57P05")
# ...but for 53400, which pgqueue raises itself for a full queue (0012): the statement's fault
QUEUE_FULL = "53400"


def is_link_failure(error: BaseException) -> bool:
    """True when `error` says the link to the database failed, not the statement."""
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        return state is None or (state.startswith(_LINK_STATES) and state != QUEUE_FULL)
    return isinstance(error, CONNECTION_ERRORS)


def is_data_error(error: BaseException) -> bool:
    """True when the server refused the data itself (class 22 data exception, 54 limits)."""
    state = getattr(error, "sqlstate", None)
    return isinstance(state, str) and state.startswith(("22", "54"))


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, first: float = 0.1, cap: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.cap, self.first * 2 ** min(self.failures - 1, 20))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Link:
    """Where a worker's connections go and how they start: one per worker (and one more for
    LISTEN when it has a direct DSN of its own)."""

    dsn: str
    prepared: PreparedStatements = "auto"
    on_connect: Callable[[str, bool], None] | None = None  # (role, reconnect): the Connected hook
    direct: bool = False  # LISTEN here even behind a pooler: the user said it is direct

    def open(self, role: str, timeout: float) -> WorkerConnection:
        return WorkerConnection(self.dsn, role, timeout, self.on_connect, self.prepared)


class WorkerConnection:
    """A dedicated autocommit connection for one role of a worker (claim, complete, ...).

    psycopg-pool is not used here on purpose: a pool stops reconnecting after its
    reconnect_timeout, while a worker must keep trying for as long as it lives, and
    each role wants its own connection so a slow flush never delays a claim.
    """

    def __init__(
        self,
        dsn: str,
        role: str,
        timeout: float,
        on_connect: Callable[[str, bool], None] | None = None,
        prepared: PreparedStatements = "auto",
    ) -> None:
        self.dsn = dsn
        self.role = role
        self.timeout = timeout
        self.prepared: PreparedStatements = prepared
        self.behind_pooler = False  # learnt at each connect
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._on_connect = on_connect  # (role, reconnect): for the Connected hook
        self._connects = 0
        self._in_call = False

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, int(self.timeout)),
                application_name=f"pgqueue-{self.role}",
                # unacknowledged data for longer than a call may take: the kernel drops
                # the link (a silent cut), instead of retransmitting for minutes
                tcp_user_timeout=int(self.timeout * 1000),
                **KEEPALIVES,
            )
            try:
                self.behind_pooler = await settle_async(self._connection, self.prepared)
            except BaseException:
                await self.discard()
                raise
            self._connects += 1
            if self._on_connect is not None:
                self._on_connect(self.role, self._connects > 1)
        return self._connection

    async def fetch(
        self, statement: str, params: dict[str, Any] | Sequence[Any], timeout: float | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows, within `timeout` (default: the connection's).

        Raises DatabaseUnavailable when the link failed (the caller retries later), and
        the server's own error, unchanged, when the statement failed.
        """
        loop = asyncio.get_running_loop()
        timeout = self.timeout if timeout is None else timeout
        deadline = loop.time() + timeout
        try:
            connection = self._connection
            if connection is None or connection.closed:
                async with asyncio.timeout_at(deadline):
                    connection = await self.connect()
            # One timer, no task of its own: this is every claim's and every flush's path.
            watchdog = _Watchdog(connection, deadline)
            self._in_call = True
            try:
                try:
                    return await _execute(connection, statement, params)
                except psycopg.Error as error:
                    if not is_lost_prepared_statement(error):
                        raise
                    # Prepared where a pooler could not keep it: the statement never ran.
                    # Say how to fix the setting, and go on without preparing.
                    log.error("%s", lost_prepared_statement(error))
                    self.prepared = "off"
                    connection.prepare_threshold = None
                    return await _execute(connection, statement, params)
            except asyncio.CancelledError:
                if watchdog.cancelled_the_call():
                    raise TimeoutError(f"no reply within {timeout:g}s") from None
                raise
            except _ANY_DATABASE_ERROR:
                if watchdog.expired:  # the failure is the socket it shut down
                    raise TimeoutError(f"no reply within {timeout:g}s") from None
                raise
            finally:
                self._in_call = False
                watchdog.disarm()
                if watchdog.expired:
                    await self.discard()  # shut down: never to be used again
        except _ANY_DATABASE_ERROR as error:
            if not is_link_failure(error):
                # A fresh session after a server error: settings such as a failover's
                # read-only mode are fixed when a session starts. Data errors are the
                # statement's own fault and keep the connection.
                if not is_data_error(error):
                    await self.discard()
                raise
            await self.discard()
            raise DatabaseUnavailable(f"{type(error).__name__}: {error}".strip()) from error

    def abort(self) -> None:
        """Before the caller's task is cancelled (a worker leaving): end the session of a call
        in flight, so that psycopg's cancellation has no query to cancel and returns at
        once, instead of sending a cancel request over a link that may be dead and waiting
        for the query to end."""
        connection = self._connection
        if self._in_call and connection is not None and not connection.closed:
            connection.pgconn.finish()

    async def discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await asyncio.wait_for(connection.close(), 1)

    async def close(self) -> None:
        await self.discard()


class _Watchdog:
    """Ends a call over its connection at `deadline`, without waiting on the link.

    Cancelling psycopg mid-query makes it send a cancel request and wait for the query to
    end: up to 10 s more over a dead link. At the deadline the watchdog shuts the socket
    down instead, which makes the pending read fail at once; the descriptor itself stays
    open (so no new connection can reuse its number under psycopg's reader) until the
    caller discards the connection. Should psycopg not notice within a second (or there
    be no socket), the session is ended and the call cancelled.
    """

    def __init__(self, connection: psycopg.AsyncConnection[Any], deadline: float) -> None:
        self._connection = connection
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_at(deadline, self._expire)
        self.expired = False
        self._cancelled = False

    def disarm(self) -> None:
        self._handle.cancel()

    def cancelled_the_call(self) -> bool:
        """Whether a CancelledError being raised is the watchdog's, not the caller's."""
        return self._cancelled and self._task is not None and self._task.uncancel() == 0

    def _expire(self) -> None:
        self.expired = True
        if _shut_down(self._connection):
            self._handle = self._loop.call_later(1.0, self._force)
        else:
            self._force()

    def _force(self) -> None:
        self._connection.pgconn.finish()
        if self._task is not None:
            self._cancelled = True
            self._task.cancel()


def _shut_down(connection: psycopg.AsyncConnection[Any]) -> bool:
    """Shut down both directions of the connection's socket; False if it has none."""
    try:
        duplicate = socket.socket(fileno=os.dup(connection.pgconn.socket))
    except (OSError, psycopg.Error):
        return False
    with duplicate, contextlib.suppress(OSError):
        duplicate.shutdown(socket.SHUT_RDWR)
    return True


async def _execute(
    connection: psycopg.AsyncConnection[Any], statement: str, params: dict[str, Any] | Sequence[Any]
) -> list[tuple[Any, ...]]:
    cursor = connection.cursor(row_factory=tuple_row)
    await cursor.execute(statement, params)
    return await cursor.fetchall() if cursor.description is not None else []
