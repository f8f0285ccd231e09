"""The maintenance loop every worker runs: say it is alive, lead if nobody does, do the duties."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

from ..connection import DatabaseUnavailable, Link
from ..hooks import Hooks
from ..schedules import Schedule
from ..sql import query
from .cron import Cron
from .leader import Leadership
from .presence import Presence, prune_sessions
from .pruning import age_priorities, prune_finished
from .rescue import rescue_expired

log = logging.getLogger("pgqueue")

DUTY = "maintenance"


class Maintenance:
    """Every `interval` seconds: renew or take the lead, and if leading, run the duties;
    then, leader or not, fire the periodic jobs that are due (waking for their ticks).

    The lead lasts three intervals, so a leader that died is replaced within that
    time, and a slow round does not lose it.
    """

    def __init__(
        self,
        link: Link,
        worker: str,
        hooks: Hooks,
        *,
        queues: list[str],
        concurrency: int,
        schedules: list[Schedule],
        priority_aging: float | None,
        interval: float,
        statement_timeout: float,
        on_capped: Callable[[], None] | None = None,
    ) -> None:
        self._connection = link.open("maintenance", statement_timeout)
        self._interval = interval
        self._worker = worker
        self._hooks = hooks
        self.cron = Cron(self._connection, schedules)
        self._queues = queues
        self._on_capped = on_capped
        # whether a queue of this worker has a limit that can cap its claims (the claim
        # loop then claims again when one of its jobs ends, not only on NOTIFY)
        self.capped = False
        self._priority_aging = priority_aging
        self.leadership = Leadership(self._connection, DUTY, worker, term=3 * interval)
        # lost when not seen for three rounds, a round's calls given their full time
        self.presence = Presence(
            self._connection, worker, queues, concurrency, ttl=3 * interval + 2 * statement_timeout
        )

    def abort(self) -> None:
        """The worker is leaving: end a call in flight at once (see WorkerConnection.abort)."""
        self._connection.abort()

    async def run(self) -> None:
        try:
            while True:
                await self.round()
                # sooner when a periodic job's tick comes first
                tick = self.cron.next_tick_in
                await asyncio.sleep(self._interval if tick is None else min(self._interval, tick + 0.001))
        finally:
            await self.stop()

    async def round(self) -> None:
        """One pass: the lead, then each duty; a failure is logged, never fatal."""
        try:
            await self.presence.seen()
            rows = await self._connection.fetch(query("capped_queues"), {"queues": self._queues})
            capped, self.capped = self.capped, bool(rows and rows[0][0])
            if self.capped and not capped and self._on_capped is not None:
                self._on_capped()  # a claim loop waiting for NOTIFY only: look again now
        except DatabaseUnavailable:
            pass  # the lead below will fail the same way and say so
        except psycopg.Error:
            # e.g. a role without rights on pgqueue.worker_sessions: the rescue must go on
            log.exception("could not record this worker's presence")
        try:
            if await self.leadership.renew():
                await rescue_expired(self._connection, self._worker, self._hooks)
                await prune_sessions(self._connection)
                await prune_finished(self._connection)
                if self._priority_aging is not None:
                    await age_priorities(self._connection, self._priority_aging)
        except DatabaseUnavailable:
            self.leadership.leading = False  # the lease may run out meanwhile: ask again
        except psycopg.Error:
            log.exception("maintenance round failed")
        except Exception:
            log.exception("maintenance round failed (a bug); trying again next round")
        await self.cron.round()  # every worker's duty, leader or not

    async def stop(self) -> None:
        """Step down so another worker leads at once, say this worker stopped, close the connection."""
        try:
            await self.leadership.resign()
            await self.presence.stopped()
        except (DatabaseUnavailable, psycopg.Error):
            pass  # the lease runs out by itself, and the worker's row says "lost" in a while
        finally:
            await self._connection.close()
