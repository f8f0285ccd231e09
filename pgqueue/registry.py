"""The task registry: each worker records the tasks it serves, so enqueue by name knows them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from .connection import DatabaseUnavailable, WorkerConnection
from .outcomes import describe
from .sql import query

log = logging.getLogger("pgqueue")


async def register_tasks(connection: WorkerConnection, worker: str, tasks: Sequence[Any]) -> None:
    """Record `tasks` (pgqueue.Task) with their options in pgqueue.tasks; the last writer wins.

    A failure is only logged: enqueue by name falls back to defaults meanwhile, and the
    worker's next start tries again.
    """
    tasks = sorted(tasks, key=lambda task: task.name)
    if not tasks:
        return
    options = [task.default_options for task in tasks]
    try:
        await connection.fetch(
            query("register_tasks"),
            {
                "worker": worker,
                "names": [task.name for task in tasks],
                "queues": [option.queue for option in options],
                "priorities": [option.priority for option in options],
                "max_attempts": [option.max_attempts for option in options],
                "timeouts": [option.timeout for option in options],
                "backoffs": [option.retry.kind for option in options],
                "bases": [option.retry.base for option in options],
                "maxes": [option.retry.max for option in options],
                "jitters": [option.retry.jitter for option in options],
            },
        )
    except (DatabaseUnavailable, psycopg.Error) as error:
        log.warning("could not register this worker's tasks (%s)", describe(error))
