"""Pruning: remove finished jobs past their retention (pgqueue.retention), a batch at a time.

Each batch is one short transaction of at most BATCH rows per (state, queue) policy,
taken oldest first with SKIP LOCKED: it never touches a queued or running job, so
claims and enqueues never wait for it, and vacuum reclaims the space as it goes. A
round stops after ROUNDS batches, so a first prune of a long history spreads over
several maintenance rounds instead of holding the leader's connection.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from ..connection import WorkerConnection
from ..sql import query

log = logging.getLogger("pgqueue")

BATCH = 1000
ROUNDS = 20


async def prune_finished(connection: WorkerConnection) -> int:
    """The leader's duty: prune up to ROUNDS batches; how many jobs were removed."""
    total = 0
    for _ in range(ROUNDS):
        rows = await connection.fetch(query("prune_jobs"), {"limit": BATCH, "dry_run": False, "now": None})
        removed = sum(int(row[2]) for row in rows)
        total += removed
        if not any(int(row[2]) >= BATCH for row in rows):
            break  # every policy is done for now
    if total:
        log.info("pruned %d finished job(s) past their retention", total)
    # unique keys whose job finished (or whose window ended): one bounded batch a round
    await connection.fetch(query("prune_job_keys"), {"limit": BATCH * ROUNDS})
    # cancel requests of jobs no longer running (cancelling those released back to the
    # queue), and the progress of jobs pruned above
    rows = await connection.fetch(query("prune_job_control"), {"limit": BATCH * ROUNDS})
    if rows and rows[0][0]:
        log.info("cancelled %d job(s) that were released to the queue after a cancel request", rows[0][0])
    return total


def prune_now(connection: psycopg.Connection[Any], dry_run: bool = False) -> list[tuple[str, str, int]]:
    """`pgqueue prune`: every batch until nothing is past its retention (autocommit: one
    transaction per batch); with `dry_run`, how many jobs would go, removing none.
    Retention counts back from when it started, so it ends even while jobs finish
    faster than it removes them. Returns (state, queue policy, jobs) per policy that had any."""
    totals: dict[tuple[str, str], int] = {}
    row = connection.execute(query("database_now")).fetchone()
    started = row[0] if row else None
    while True:
        rows = connection.execute(
            query("prune_jobs"), {"limit": BATCH, "dry_run": dry_run, "now": started}
        ).fetchall()
        for state, queue, jobs in rows:
            totals[str(state), str(queue)] = totals.get((str(state), str(queue)), 0) + int(jobs)
        if dry_run or not any(int(row[2]) >= BATCH for row in rows):
            return [(state, queue, jobs) for (state, queue), jobs in sorted(totals.items())]


async def age_priorities(connection: WorkerConnection, after: float) -> int:
    """Promote jobs due for longer than `after` seconds to the top priority of their queue
    (migration 0016): a bounded batch a round."""
    rows = await connection.fetch(query("age_priorities"), {"after": after, "limit": BATCH})
    aged = int(rows[0][0]) if rows else 0
    if aged:
        log.info("promoted %d job(s) waiting longer than %gs to their queue's top priority", aged, after)
    return aged
