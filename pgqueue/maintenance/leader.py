"""Leader election with a lease row: works through a transaction pooler, survives a crash."""

from __future__ import annotations

import logging

from ..connection import WorkerConnection
from ..sql import query

log = logging.getLogger("pgqueue")

GOODBYE_TIMEOUT = 2.0  # seconds a leaving worker gives each farewell call


class Leadership:
    """Asks for (and renews) the lead of one duty; remembers whether it holds it."""

    def __init__(self, connection: WorkerConnection, duty: str, worker: str, term: float) -> None:
        self._connection = connection
        self.duty = duty
        self.worker = worker
        self.term = term
        self.leading = False

    async def renew(self) -> bool:
        """Take or keep the lead for another term; whether this worker now leads."""
        rows = await self._connection.fetch(
            query("lead"), {"duty": self.duty, "worker": self.worker, "seconds": self.term, "now": None}
        )
        leading = bool(rows and rows[0][0])
        if leading != self.leading:
            log.info(
                "worker %s %s the %s leader", self.worker, "is now" if leading else "is no longer", self.duty
            )
        self.leading = leading
        return leading

    async def resign(self) -> None:
        if self.leading:
            # a goodbye: not worth waiting for over a dead link (the lease runs out anyway)
            await self._connection.fetch(
                query("resign"), {"duty": self.duty, "worker": self.worker}, timeout=GOODBYE_TIMEOUT
            )
            self.leading = False
