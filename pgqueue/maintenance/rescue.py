"""Rescue: requeue (or dead-letter) the jobs of workers that stopped heartbeating."""

from __future__ import annotations

import logging

from ..connection import WorkerConnection
from ..hooks import Hooks, JobRescued
from ..sql import query

log = logging.getLogger("pgqueue")

# Rows per statement: a sweep after a mass crash is many short transactions, not one long one.
BATCH = 1000


async def rescue_expired(connection: WorkerConnection, worker: str, hooks: Hooks) -> int:
    """Rescue every job whose lease has expired, a batch at a time; how many were rescued."""
    total = 0
    while True:
        rows = await connection.fetch(query("rescue_expired_jobs"), {"now": None, "limit": BATCH})
        for job_id, state in rows:
            log.warning(
                "job %d's lease expired (its worker died or lost the database): %s",
                job_id,
                "requeued" if state == "queued" else "dead-lettered",
            )
            hooks.emit(JobRescued(worker, job_id, str(state)))
        total += len(rows)
        if len(rows) < BATCH:
            return total
