"""The task registry: each worker records the tasks it serves, so enqueue by name knows them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from .connection import DatabaseUnavailable, WorkerConnection
from .errors import PermissionDeniedError
from .outcomes import describe
from .sql import query

log = logging.getLogger("pgqueue")


async def register_tasks(connection: WorkerConnection, worker: str, tasks: Sequence[Any]) -> None:
    """Record `tasks` (pgqueue.Task) with their options in pgqueue.tasks; the last writer wins.

    A failure is only logged: enqueue by name falls back to defaults meanwhile, and the
    worker's next start tries again. A role without a worker's rights is refused first,
    with the role to grant (PermissionDeniedError), rather than failing every claim.
    """
    try:
        [(allowed, role)] = await connection.fetch(query("worker_rights"), {})
    except (DatabaseUnavailable, psycopg.Error) as error:
        log.warning("could not check this worker's rights (%s)", describe(error))
    else:
        if not allowed:
            raise PermissionDeniedError(
                f"database role {role!r} cannot run jobs (it lacks a worker's rights on the pgqueue "
                f"tables): GRANT pgqueue_worker TO {role}; see `pgqueue roles`"
            )
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
