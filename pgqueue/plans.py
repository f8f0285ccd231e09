"""Runs sans-I/O plans: generators that yield (statement, params) and receive the rows back.

Every operation that must exist both for `psycopg.Connection` and `AsyncConnection`
is written once as a plan; these two small drivers are the only sync/async twins.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from .pooling import prepare_flag

Rows = list[tuple[Any, ...]] | None
Step = tuple[str, Sequence[Any] | dict[str, Any] | None]
T = TypeVar("T")
Plan = Generator[Step, Rows, T]


class Fetcher(Protocol):
    """What a worker's connection offers (pgqueue.connection.WorkerConnection)."""

    async def fetch(
        self, statement: str, params: dict[str, Any] | Sequence[Any], timeout: float | None = None
    ) -> list[tuple[Any, ...]]: ...


def drive(connection: psycopg.Connection[Any], plan: Plan[T]) -> T:
    """Run `plan` on a sync connection and return what it returns. A statement's error is
    raised inside the plan, at its `yield`: a plan may handle it and go on."""
    prepare = prepare_flag(connection)
    try:
        step = plan.send(None)
        while True:
            try:
                cursor = connection.cursor(row_factory=psycopg.rows.tuple_row)
                cursor.execute(*step, prepare=prepare)
                rows = cursor.fetchall() if cursor.description is not None else None
            except Exception as error:
                step = plan.throw(error)
            else:
                step = plan.send(rows)
    except StopIteration as finished:
        result: T = finished.value
        return result


async def drive_async(connection: psycopg.AsyncConnection[Any], plan: Plan[T]) -> T:
    """Run `plan` on an async connection and return what it returns (errors as `drive`)."""
    prepare = prepare_flag(connection)
    try:
        step = plan.send(None)
        while True:
            try:
                cursor = connection.cursor(row_factory=psycopg.rows.tuple_row)
                await cursor.execute(*step, prepare=prepare)
                rows = await cursor.fetchall() if cursor.description is not None else None
            except Exception as error:
                step = plan.throw(error)
            else:
                step = plan.send(rows)
    except StopIteration as finished:
        result: T = finished.value
        return result


async def drive_worker(connection: Fetcher, plan: Plan[T]) -> T:
    """Run `plan` on a worker's connection, each statement within its timeout (errors as
    `drive`)."""
    try:
        step = plan.send(None)
        while True:
            try:
                rows: Rows = await connection.fetch(step[0], step[1] or ())
            except Exception as error:
                step = plan.throw(error)
            else:
                step = plan.send(rows)
    except StopIteration as finished:
        result: T = finished.value
        return result


def atomic(connection: psycopg.Connection[Any]) -> AbstractContextManager[Any]:
    """A block that is all-or-nothing and never commits the caller's own transaction.

    On an autocommit connection: a transaction of its own. Inside an open transaction:
    a savepoint. On an idle non-autocommit connection psycopg's `transaction()` would
    commit at the end of the block, so nothing is wrapped: the statements open the
    caller's implicit transaction, which the caller commits or rolls back.
    """
    if not connection.autocommit and connection.info.transaction_status == TransactionStatus.IDLE:
        return nullcontext()
    return connection.transaction()


def atomic_async(connection: psycopg.AsyncConnection[Any]) -> AbstractAsyncContextManager[Any]:
    """The async twin of `atomic`."""
    if not connection.autocommit and connection.info.transaction_status == TransactionStatus.IDLE:
        return nullcontext()
    return connection.transaction()
