"""The app's own connection pools, and the connection each producer call runs on: the
caller's own, or one of the pools', with the typed errors a producer gets."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from .database import redact
from .errors import ConfigurationError, DatabaseUnavailableError, QueueFull
from .hooks import EnqueueRefused
from .migrate import schema_required
from .pooling import async_pool_configure, is_lost_prepared_statement, lost_prepared_statement, pool_configure
from .roles import permission_denied

if TYPE_CHECKING:
    from .app import App

Connection = psycopg.Connection[Any]
AsyncConnection = psycopg.AsyncConnection[Any]


class Pools:
    """An app's sync and async pools, each opened on first use (psycopg-pool: it checks a
    connection before handing it out and replaces broken ones), closed with the app."""

    def __init__(self, app: App) -> None:
        self._app = app  # its settings, DSN and hooks, as they are when a pool opens
        self._pool: ConnectionPool | None = None
        self._async_pool: AsyncConnectionPool | None = None
        self._lock = threading.Lock()

    def _options(self) -> dict[str, Any]:
        """What both pools take from the settings, as they are when a pool opens."""
        settings = self._app.settings
        return {
            "conninfo": self._app.dsn,
            "min_size": 1,
            "max_size": settings.pool_size,
            "timeout": settings.connect_timeout,
            "kwargs": {"connect_timeout": max(1, round(settings.connect_timeout))},
        }

    def pool(self) -> ConnectionPool:
        """The app's own sync pool, opened on first use."""
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    name="pgqueue",
                    open=True,
                    check=ConnectionPool.check_connection,
                    configure=pool_configure(self._app.settings.prepared_statements),
                    **self._options(),
                )
            return self._pool

    async def async_pool(self) -> AsyncConnectionPool:
        """The app's own async pool, opened on first use."""
        if self._async_pool is None:
            pool = AsyncConnectionPool(
                name="pgqueue-async",
                open=False,
                check=AsyncConnectionPool.check_connection,
                configure=async_pool_configure(self._app.settings.prepared_statements),
                **self._options(),
            )
            await pool.open()
            self._async_pool = pool
        return self._async_pool

    @contextmanager
    def using(self, connection: Connection | None) -> Iterator[Connection]:
        if connection is not None and not isinstance(connection, psycopg.Connection):
            raise ConfigurationError(
                f"expected a psycopg.Connection (or None for the app's pool), got "
                f"{type(connection).__name__}: use the *_async methods with an AsyncConnection"
            )
        with schema_required(), self._refusals():
            if connection is not None:
                yield connection
            else:
                with self._pool_errors(), self.pool().connection() as conn:
                    yield conn

    @asynccontextmanager
    async def using_async(self, connection: AsyncConnection | None) -> AsyncIterator[AsyncConnection]:
        if connection is not None and not isinstance(connection, psycopg.AsyncConnection):
            raise ConfigurationError(
                f"expected a psycopg.AsyncConnection (or None for the app's pool), got "
                f"{type(connection).__name__}: use the methods without _async with a Connection"
            )
        with schema_required(), self._refusals():
            if connection is not None:
                yield connection
            else:
                with self._pool_errors():
                    async with (await self.async_pool()).connection() as conn:
                        yield conn

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        try:
            yield
        except QueueFull as full:
            self._app.hooks.emit(EnqueueRefused(full.queue, full.depth, full.max_depth))
            raise
        except psycopg.Error as error:
            if is_lost_prepared_statement(error):
                raise lost_prepared_statement(error) from error
            if error.sqlstate == "42501":
                raise permission_denied(error) from error
            raise

    @contextmanager
    def _pool_errors(self) -> Iterator[None]:
        """A pool that cannot hand out a connection in time: the database is down or full."""
        try:
            yield
        except PoolTimeout as error:
            raise DatabaseUnavailableError(
                f"no database connection within {self._app.settings.connect_timeout:g}s "
                f"(PGQUEUE_CONNECT_TIMEOUT) for {redact(self._app.dsn)}: {error}"
            ) from error

    def close(self) -> None:
        """Close the sync pool (the async one needs `aclose`)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def aclose(self) -> None:
        self.close()
        if self._async_pool is not None:
            await self._async_pool.close()
            self._async_pool = None
