"""The heartbeat: extends the leases of a worker's jobs, and notices the ones it lost.

It has a connection of its own, so a heartbeat never waits behind maintenance or a
flush, and its statement timeout is a third of the lease: a heartbeat stuck longer
than that would let the leases lapse anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

from .connection import DatabaseUnavailable, Link
from .sql import query

log = logging.getLogger("pgqueue")


class Heartbeat:
    """Every third of a lease: extend the leases of `held()` (job id, attempt) pairs, report
    the `running()` ones that are no longer this worker's, and those asked to stop (the
    way a cancel request reaches a worker that does not LISTEN)."""

    def __init__(
        self,
        link: Link,
        worker: str,
        lease_seconds: float,
        statement_timeout: float,
        held: Callable[[], list[tuple[int, int]]],
        running: Callable[[], set[tuple[int, int]]],
        lost: Callable[[set[tuple[int, int]]], None],
        cancel: Callable[[set[int]], None],
    ) -> None:
        self._connection = link.open("heartbeat", min(statement_timeout, max(1.0, lease_seconds / 3)))
        self._worker = worker
        self._lease = lease_seconds
        self._held = held
        self._running = running
        self._lost = lost
        self._cancel = cancel

    def abort(self) -> None:
        """The worker is leaving: end a call in flight at once (see WorkerConnection.abort)."""
        self._connection.abort()

    async def run(self) -> None:
        beat = max(0.05, self._lease / 3)
        try:
            while True:
                await self.beat()
                await asyncio.sleep(beat)
        finally:
            await self._connection.close()

    async def beat(self) -> None:
        held = self._held()
        if not held:
            return
        running_before = self._running()
        try:
            rows = await self._connection.fetch(
                query("heartbeat"),
                {
                    "worker": self._worker,
                    "ids": [job_id for job_id, _ in held],
                    "attempts": [attempt for _, attempt in held],
                    "lease_seconds": self._lease,
                    "now": None,
                },
            )
        except DatabaseUnavailable as error:
            log.warning("heartbeat failed (%s): leases of %d job(s) not extended", error, len(held))
            return
        except psycopg.Error:
            # not a lost connection: log it loudly, but a heartbeat must never stop for good
            log.exception("heartbeat failed")
            return
        still_mine = {(int(row[0]), int(row[1])) for row in rows}
        # Only jobs still running here can have been lost: one that finished meanwhile
        # may have had its outcome stored (its row no longer 'running') before this call.
        lost = (running_before & self._running()) - still_mine
        if lost:
            self._lost(lost)
        cancel = {int(row[0]) for row in rows if row[3]}
        if cancel:
            self._cancel(cancel)
