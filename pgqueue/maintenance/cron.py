"""Periodic jobs, every worker's duty (no leader): store the app's schedules once, then
enqueue each tick that is due. Ticks are claimed by compare-and-set in SQL, so workers
racing for one tick enqueue it once (see pgqueue.schedules and migration 0014)."""

from __future__ import annotations

import logging

import psycopg

from ..connection import DatabaseUnavailable, WorkerConnection
from ..outcomes import describe
from ..plans import drive_worker
from ..schedules import Schedule, declare_plan, fire_plan

log = logging.getLogger("pgqueue")


class Cron:
    """Declares `schedules` (until that succeeds once), then fires due ticks each round."""

    def __init__(self, connection: WorkerConnection, schedules: list[Schedule]) -> None:
        self._connection = connection
        self._undeclared = list(schedules)
        # seconds from the last pass to the next tick of any schedule; None: no schedule
        self.next_tick_in: float | None = None

    async def round(self) -> None:
        if self._undeclared:
            try:
                await drive_worker(self._connection, declare_plan(self._undeclared, "code"))
                log.info("declared %d periodic schedule(s)", len(self._undeclared))
                self._undeclared = []
            except (DatabaseUnavailable, psycopg.Error) as error:
                # fire the schedules already stored all the same; declare again next round
                log.warning("could not store this app's periodic schedules (%s)", describe(error))
        try:
            fired, self.next_tick_in = await drive_worker(self._connection, fire_plan())
        except DatabaseUnavailable:
            self.next_tick_in = None
            return
        except psycopg.Error as error:
            self.next_tick_in = None
            log.error("periodic schedules: %s; trying again next round", describe(error))
            return
        except Exception:
            # a bug must not end the maintenance loop, and with it the rescue of jobs
            self.next_tick_in = None
            log.exception("periodic schedules failed; trying again next round")
            return
        for tick in fired:
            log.info(
                "schedule %s: tick %s enqueued as job %d%s",
                tick.schedule,
                tick.tick.isoformat(),
                tick.job_id,
                " (its key was taken: not again)" if tick.duplicate else "",
            )
