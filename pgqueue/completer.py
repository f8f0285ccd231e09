"""Records job outcomes in batches by group commit: never on a timer, never one by one.

An outcome is flushed at once when no flush is in flight; outcomes that arrive while
one is in flight wait for it and then go together in the next. So a busy worker
writes hundreds of outcomes per statement, an idle one records each immediately,
and a `kill -9` loses at most the outcomes of one round trip.

Handlers' progress reports travel the same way: the last report of each job waits for
the flush in flight, then goes (before the outcomes) in one `report_progress` call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from .connection import Backoff, DatabaseUnavailable, WorkerConnection, is_data_error
from .logs import outcome_fields
from .outcomes import Outcome
from .sql import query

log = logging.getLogger("pgqueue")


class Completer:
    """Collects outcomes and writes them with one `pgqueue.complete_jobs` call per flush."""

    def __init__(
        self,
        connection: WorkerConnection,
        worker_id: str,
        reconnect_max_delay: float,
        on_recorded: Callable[[list[Outcome], list[tuple[Any, ...]], float], None] | None = None,
    ) -> None:
        self._connection = connection
        self._worker_id = worker_id
        self._reconnect_max_delay = reconnect_max_delay
        self._pending: list[Outcome] = []
        self._in_flight: list[Outcome] = []
        self._flusher: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_recorded = on_recorded
        self._progress: dict[tuple[int, int], dict[str, Any]] = {}
        self.abandon = False

    def add(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._idle.clear()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    def add_progress(self, job_id: int, attempt: int, report: dict[str, Any]) -> None:
        """Store `report` as the job's progress with the next flush (a later one replaces it)."""
        self._progress[job_id, attempt] = report
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    def unrecorded_ids(self) -> list[int]:
        """Jobs whose outcome is known here but not yet in the database (their leases must hold)."""
        return [job_id for job_id, _ in self.unrecorded()]

    def unrecorded(self) -> list[tuple[int, int]]:
        """(job id, attempt) of each outcome not yet in the database."""
        return [(outcome.job_id, outcome.attempt) for outcome in (*self._in_flight, *self._pending)]

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every outcome added so far is recorded; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def finish(self, limit: float, forced: Callable[[], bool]) -> None:
        """At shutdown: wait until every outcome is recorded, for at most `limit` seconds.

        Once `forced()` (a second signal), a few more seconds; then the outcomes left are
        abandoned to the lease rescue, which will run their jobs again.
        """
        deadline = time.monotonic() + limit
        waited = 0
        while not await self.wait_idle(timeout=1.0):
            waited += 1
            if waited % 10 == 1 and not forced():
                log.warning(
                    "waiting to record %d job outcome(s) before exiting (signal again to give up "
                    "and leave them to the lease rescue)",
                    len(self.unrecorded()),
                )
            if forced() or time.monotonic() > deadline:
                if forced() and await self.wait_idle(timeout=5.0):
                    return
                self.abandon = True
                log.error(
                    "leaving %s unrecorded outcome(s) to be rescued after their leases",
                    len(self.unrecorded()),
                )
                return

    async def _flush_loop(self) -> None:
        backoff = Backoff(cap=self._reconnect_max_delay)
        try:
            while (self._pending or self._progress) and not self.abandon:
                if self._progress:
                    await self._write_progress()
                if not self._pending:
                    continue
                self._in_flight, self._pending = self._pending, []
                started = time.monotonic()
                while not self.abandon:
                    try:
                        rows = await self._connection.fetch(
                            query("complete_jobs"), self._params(self._in_flight)
                        )
                    except DatabaseUnavailable as error:
                        delay = backoff.next_delay()
                        log.warning(
                            "could not record %d job outcome(s), database unavailable (%s); "
                            "keeping them and retrying in %.1fs",
                            len(self._in_flight),
                            error,
                            delay,
                        )
                        await asyncio.sleep(delay)
                        continue
                    except psycopg.Error as error:
                        if not is_data_error(error):
                            # e.g. a failover left us on a read-only server, or a deploy is
                            # mid-way: keep the outcomes and try again
                            delay = backoff.next_delay()
                            log.error(
                                "could not record %d job outcome(s) (%s: %s); retrying in %.1fs",
                                len(self._in_flight),
                                type(error).__name__,
                                error,
                                delay,
                            )
                            await asyncio.sleep(delay)
                            continue
                        # The server refused the data itself: retrying the batch whole would
                        # never end, so find the culprit row by row.
                        log.error("could not record a batch of outcomes (%s); recording one by one", error)
                        try:
                            rows = await self._record_one_by_one(self._in_flight)
                        except (DatabaseUnavailable, psycopg.Error):
                            await asyncio.sleep(backoff.next_delay())
                            continue  # rows already recorded match nothing the second time
                    if backoff.failures:
                        log.info("database reachable again: recorded %d job outcome(s)", len(rows))
                        if len(rows) < len(self._in_flight):
                            # an earlier call may have committed with its reply lost: those
                            # outcomes are in, not "lost with the lease"
                            rows = rows + await self._recorded_before(self._in_flight, rows)
                    backoff.reset()
                    self._report(self._in_flight, rows, time.monotonic() - started)
                    break
                self._in_flight = []
        except asyncio.CancelledError:
            # keep what was being written: a later flush (or the lease rescue) deals with it
            self._pending[:0] = self._in_flight
            self._in_flight = []
            raise
        finally:
            self._flusher = None
            if not self._pending or self.abandon:
                self._idle.set()

    async def _write_progress(self) -> None:
        """Progress is a status line: a report that cannot be written is dropped (the next
        one, or the outcome, tells more), never retried ahead of the outcomes."""
        reports, self._progress = self._progress, {}
        try:
            await self._connection.fetch(
                query("report_progress"),
                {
                    "worker": self._worker_id,
                    "ids": [job_id for job_id, _ in reports],
                    "attempts": [attempt for _, attempt in reports],
                    "progress": [json.dumps(report) for report in reports.values()],
                    "now": None,
                },
            )
        except (DatabaseUnavailable, psycopg.Error) as error:
            log.warning("could not store the progress of %d job(s): %s", len(reports), error)

    async def _recorded_before(
        self, batch: list[Outcome], rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """Rows for the outcomes of `batch` (not in `rows`) that a lost reply had recorded."""
        recorded = {row[0] for row in rows}
        missing = [outcome for outcome in batch if outcome.job_id not in recorded]
        try:
            return await self._connection.fetch(
                query("recorded_attempts"),
                {
                    "worker": self._worker_id,
                    "ids": [outcome.job_id for outcome in missing],
                    "attempts": [outcome.attempt for outcome in missing],
                },
            )
        except (DatabaseUnavailable, psycopg.Error):
            return []  # only the warnings below are at stake

    async def _record_one_by_one(self, batch: list[Outcome]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for outcome in batch:
            try:
                rows += await self._connection.fetch(query("complete_jobs"), self._params([outcome]))
                continue
            except psycopg.Error as error:
                if not is_data_error(error):
                    raise
                failure = Outcome(
                    outcome.job_id,
                    outcome.attempt,
                    "fatal",
                    error={
                        "kind": "unrecordable_outcome",
                        "error": f"the {outcome.kind} outcome could not be stored: {error}",
                        "traceback": None,
                    },
                    started_at=outcome.started_at,
                    ended_at=outcome.ended_at,
                    task=outcome.task,
                    queue=outcome.queue,
                    due=outcome.due,
                )
            try:
                rows += await self._connection.fetch(query("complete_jobs"), self._params([failure]))
            except psycopg.Error as error:
                if not is_data_error(error):
                    raise  # a passing server error: the caller backs off and tries again
                log.exception("could not record job %d at all; its lease will expire", outcome.job_id)
        return rows

    def _params(self, batch: list[Outcome]) -> dict[str, Any]:
        return {
            "worker": self._worker_id,
            "ids": [outcome.job_id for outcome in batch],
            "attempts": [outcome.attempt for outcome in batch],
            "outcomes": [outcome.kind for outcome in batch],
            "results": [outcome.result_json for outcome in batch],
            "errors": [
                None if outcome.error is None else json.dumps(outcome.error, default=str) for outcome in batch
            ],
            "retry_in": [outcome.retry_in for outcome in batch],
            "started_at": [outcome.started_at for outcome in batch],
            "ended_at": [outcome.ended_at for outcome in batch],
            "now": None,
        }

    def _report(self, batch: list[Outcome], rows: list[tuple[Any, ...]], seconds: float) -> None:
        dead = {row[0] for row in rows if row[1] == "dead"}
        for outcome in batch:
            if outcome.job_id in dead:
                reason = outcome.error["error"] if outcome.error else outcome.kind
                log.warning(
                    "job %d dead-lettered after attempt %d (%s): %s",
                    outcome.job_id,
                    outcome.attempt,
                    "no retry for this failure" if outcome.kind == "fatal" else "no attempts left",
                    reason,
                    extra=outcome_fields(outcome, "dead"),
                )
        if len(rows) != len(batch):
            recorded = {row[0] for row in rows}
            for outcome in batch:
                if outcome.job_id not in recorded:
                    log.warning(
                        "outcome %r of job %d (attempt %d) was not recorded: its lease was lost "
                        "(the job was rescued, and may run again elsewhere)",
                        outcome.kind,
                        outcome.job_id,
                        outcome.attempt,
                        extra=outcome_fields(outcome, "lease_lost"),
                    )
        if self._on_recorded is not None:
            self._on_recorded(batch, rows, seconds)
