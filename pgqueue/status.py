"""Counts of jobs per queue and state, for `pgqueue status` and the API."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from .sql import query


@dataclass(frozen=True)
class QueueState:
    """How many jobs of one queue are in one state."""

    queue: str
    state: str
    jobs: int
    oldest_due: datetime | None

    def as_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["oldest_due"] = self.oldest_due.isoformat() if self.oldest_due else None
        return values


def queue_states(connection: psycopg.Connection[Any]) -> list[QueueState]:
    """Jobs per queue and state; `scheduled` means queued with a run_at in the future."""
    rows = connection.execute(query("status_counts")).fetchall()
    return [QueueState(*row) for row in rows]


def dead_letter(connection: psycopg.Connection[Any], limit: int = 20) -> list[tuple[Any, ...]]:
    """The newest dead-lettered jobs: id, task, queue, attempts, finished_at, last error."""
    return connection.execute(query("dead_jobs"), {"limit": limit}).fetchall()


def retry_dead_letter(connection: psycopg.Connection[Any], batch: int = 1000) -> int:
    """Requeue every job that is dead-lettered now, `batch` at a time; how many were requeued.

    `connection` should be in autocommit mode, so each batch commits on its own.
    """
    total, after = 0, 0
    while True:
        row = connection.execute(query("retry_dead_batch"), {"limit": batch, "after": after}).fetchone()
        if row is None or row[1] is None:
            return total
        total += int(row[0])
        after = int(row[1])
