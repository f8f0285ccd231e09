"""The worker's lifecycle and claim loop: wake, claim a batch sized to free slots, hand it on.

One asyncio loop per process. Each concern has a room of its own: `attempts` takes
a claimed job to its outcome; `executors` runs handlers (async, thread, process)
with their timeouts; `outcomes` turns what a handler returned or raised into what
is recorded; `completer` records outcomes (and progress) by group commit; `running`
holds the running jobs and stops them on a cancel request or a lost lease; `listener`
wakes the loop on NOTIFY and passes cancel requests on; `leases` heartbeats; and
`maintenance` runs the once-per-database duties under a leader, and every worker's
periodic jobs. `hooks` tells whoever listens. Every connection reconnects
with backoff for as long as the worker lives: a database restart or a network cut
pauses the worker, it never ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg

from .app import App
from .attempts import run_attempt
from .completer import Completer
from .connection import Backoff, DatabaseUnavailable, Link
from .context import JobContext, _current
from .database import validate_dsn
from .errors import ConfigurationError
from .executors import Executors
from .hooks import (
    Connected,
    JobFinished,
    JobsClaimed,
    JobStarted,
    OutcomesFlushed,
    QueuesEmpty,
    WorkerStarted,
    WorkerStopped,
)
from .leases import Heartbeat
from .listener import Listener
from .logs import log_job_finished, log_job_started
from .maintenance import Maintenance
from .metrics.worker import serve_worker_metrics
from .migrate import wait_for_schema
from .models import NAME_PATTERN, ClaimedJob
from .outcomes import Outcome, describe
from .registry import register_tasks
from .running import ProgressRelay, RunningJobs, wait_all_or
from .settings import Settings
from .sql import query

log = logging.getLogger("pgqueue")

__all__ = ["ClaimedJob", "Worker"]


class Worker:
    """Runs the tasks of `app` from the given queues until stopped.

    `worker.run()` blocks (and handles SIGTERM/SIGINT); `await worker.run_async()`
    runs inside an existing loop. With `burst=True` it stops once its queues are
    empty and nothing is running.
    """

    def __init__(
        self,
        app: App,
        *,
        queues: list[str] | None = None,
        concurrency: int | None = None,
        listen: bool | None = None,
        burst: bool = False,
        settings: Settings | None = None,
        worker_id: str | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        self.app = app
        self.settings = settings or app.settings
        self.queues = list(queues or self.settings.queues or app.queues())
        for queue in self.queues:
            if not NAME_PATTERN.fullmatch(queue):
                raise ConfigurationError(f"invalid queue name {queue!r}: letters, digits, '_', '.', ':', '-'")
        self.concurrency = concurrency or self.settings.concurrency
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        self.listen = self.settings.listen if listen is None else listen
        self.burst = burst
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.install_signal_handlers = install_signal_handlers
        self.jobs_done = 0
        self._running = RunningJobs(self.worker_id, app.tasks)
        self._found_jobs = False  # the last claim returned jobs (for QueuesEmpty)
        self._claim_uncertain = False  # a claim's reply was lost: some jobs may be ours unknowingly
        self._stopping = False
        self._forced = False
        self._releasing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._force_event: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self.started = threading.Event()
        self.metrics_port: int | None = None  # where /metrics is served, once started
        self._parts: list[Heartbeat | Listener | Maintenance] = []  # the background loops' owners

    # -- control ------------------------------------------------------------------

    def run(self) -> None:
        """Run until stopped by a signal, by `stop()`, or (burst) until the queues are empty."""
        asyncio.run(self.run_async())

    def stop(self, force: bool = False) -> None:
        """Ask the worker to stop (thread-safe). `force` skips the grace period."""
        loop = self._loop
        if loop is None:
            self._stopping = True
            return
        loop.call_soon_threadsafe(self._request_stop, force)

    def _request_stop(self, force: bool = False) -> None:
        assert self._stop_event and self._force_event and self._wake
        if self._stopping and not force:
            force = True  # a second request forces
        if not self._stopping:
            log.info(
                "worker %s stopping: no new jobs; %d running job(s) get %.0fs to finish "
                "(signal again to force)",
                self.worker_id,
                len(self._running),
                self.settings.shutdown_grace,
            )
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        if force and not self._forced:
            log.warning(
                "worker %s forced to stop: releasing %d running job(s)", self.worker_id, len(self._running)
            )
            self._forced = True
            self._force_event.set()

    # -- main ---------------------------------------------------------------------

    async def run_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._force_event = asyncio.Event()
        self._slot_freed = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        signals_installed = self._install_signals()
        settings = self.settings
        dsn = self.app.dsn
        link = Link(dsn, settings.prepared_statements, self._connected)
        self._claimer = link.open("claim", settings.statement_timeout)
        completer_connection = link.open("complete", settings.statement_timeout)
        self._completer = Completer(
            completer_connection, self.worker_id, settings.reconnect_max_delay, on_recorded=self._recorded
        )
        self._executors = Executors(self.concurrency, on_slot_freed=self._slot_freed.set)
        self._progress = ProgressRelay(self._loop, self._completer, self.app.hooks, self.worker_id)
        background: list[asyncio.Task[None]] = []
        stop_metrics: Callable[[], None] | None = None
        try:
            if not await wait_for_schema(
                self._claimer, self.settings.reconnect_max_delay, lambda: self._stopping, self._sleep
            ):
                return
            await register_tasks(self._claimer, self.worker_id, list(self.app.tasks.values()))
            log.info(
                "worker %s started: queues %s, concurrency %d, %s",
                self.worker_id,
                ",".join(self.queues),
                self.concurrency,
                "LISTEN/NOTIFY with polling fallback" if self.listen else "polling only",
            )
            for name, job in self._background_jobs(link):
                task = asyncio.create_task(job, name=f"pgqueue-{name}")
                task.add_done_callback(_report_crash)
                background.append(task)
            if settings.metrics_port is not None:
                slots = lambda: (len(self._running), self.concurrency)  # noqa: E731 - read at scrape
                self.metrics_port, stop_metrics = serve_worker_metrics(
                    self.worker_id, self.app, settings, slots
                )
            self.started.set()
            self.app.hooks.emit(WorkerStarted(self.worker_id, tuple(self.queues), self.concurrency))
            await self._claim_loop()
            await self._shutdown()
        finally:
            for part in self._parts:
                part.abort()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for connection in (self._claimer, completer_connection):
                await connection.close()
            self._executors.shutdown()
            if signals_installed:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    self._loop.remove_signal_handler(signum)
            log.info("worker %s stopped after %d job(s)", self.worker_id, self.jobs_done)
            self.app.hooks.emit(WorkerStopped(self.worker_id, self.jobs_done))
            if stop_metrics is not None:
                stop_metrics()

    def _background_jobs(self, link: Link) -> list[tuple[str, Any]]:
        """The loops that run beside the claim loop, each on a connection of its own."""
        settings, jobs = self.settings, []
        assert self._wake
        if self.listen:
            direct = validate_dsn(settings.listen_dsn) if settings.listen_dsn else None
            listener = Listener(
                replace(link, dsn=direct, direct=True) if direct else link,
                self.queues,
                self._wake,
                statement_timeout=settings.statement_timeout,
                poll_interval=settings.poll_interval,
                reconnect_max_delay=settings.reconnect_max_delay,
                on_cancel=self._running.cancel_jobs,
                running=lambda: [job_id for job_id, _ in self._running],
            )
            jobs.append(("listen", listener.run()))
            self._parts.append(listener)
        heartbeat = Heartbeat(
            link,
            self.worker_id,
            settings.lease_seconds,
            settings.statement_timeout,
            held=lambda: [*self._running, *self._completer.unrecorded()],
            running=lambda: set(self._running),
            lost=self._running.leases_lost,
            cancel=self._running.cancel_jobs,
        )
        jobs.append(("heartbeat", heartbeat.run()))
        self._parts.append(heartbeat)
        self.maintenance = Maintenance(
            link,
            self.worker_id,
            self.app.hooks,
            queues=self.queues,
            concurrency=self.concurrency,
            schedules=list(self.app.periodic_schedules.values()),
            priority_aging=settings.priority_aging,
            interval=min(settings.rescue_interval, settings.lease_seconds),
            statement_timeout=settings.statement_timeout,
            on_capped=self._wake.set,
        )
        jobs.append(("maintenance", self.maintenance.run()))
        self._parts.append(self.maintenance)
        return jobs

    def _install_signals(self) -> bool:
        if not self.install_signal_handlers or threading.current_thread() is not threading.main_thread():
            return False
        assert self._loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._request_stop)
        return True

    async def _claim_loop(self) -> None:
        assert self._wake and self._slot_freed
        backoff = Backoff(cap=self.settings.reconnect_max_delay)
        hooks = self.app.hooks
        params: dict[str, Any] = {
            "worker": self.worker_id,
            "queues": self.queues,
            "lease_seconds": self.settings.lease_seconds,
            "now": None,
        }
        while not self._stopping:
            backlog = max(0, len(self._completer.unrecorded_ids()) - self.concurrency)  # held slots
            free = self.concurrency - len(self._running) - self._executors.lingering - backlog
            self._slot_freed.clear()
            if free <= 0:
                await self._wait_any(self._slot_freed, timeout=self.settings.poll_interval)
                continue
            self._wake.clear()
            params["limit"] = free
            try:
                if self._claim_uncertain:
                    await self._release_orphans()
                    self._claim_uncertain = False
                asked = time.monotonic()
                rows = await self._claimer.fetch(query("claim_jobs"), params)
                claimed = [ClaimedJob(*row) for row in rows]
                if hooks.wants(JobsClaimed):
                    hooks.emit(JobsClaimed(self.worker_id, claimed, time.monotonic() - asked))
            except (DatabaseUnavailable, psycopg.Error) as error:
                # The claim may have committed with its reply lost: those jobs are ours but
                # not running here, so hand them back before claiming again.
                self._claim_uncertain = self._claim_uncertain or isinstance(error, DatabaseUnavailable)
                delay = backoff.next_delay()
                log.warning("could not claim jobs (%s); retrying in %.1fs", describe(error), delay)
                await self._sleep(delay)
                continue
            if backoff.failures:
                log.info("database reachable again; claiming jobs")
            backoff.reset()
            for job in claimed:
                self._start(job)
            if rows:
                self._found_jobs = True
            if len(rows) == free:
                continue
            if not rows and self._found_jobs:
                self._found_jobs = False
                hooks.emit(QueuesEmpty(self.worker_id, tuple(self.queues)))
            if not rows and self.burst and not self._running and await self._queues_drained():
                log.info("worker %s: queues empty, burst mode ends", self.worker_id)
                return
            # Idle: NOTIFY wakes us for new jobs; the poll catches scheduled ones and what a
            # pooler's lost notification hides. A limit may have capped the claim: then a
            # job of ours ending or its outcome stored, even during the claim, is worth another.
            ended = self._slot_freed if self.maintenance.capped else self._wake
            await self._wait_any(self._wake, ended, timeout=self.settings.poll_interval)

    def _held_ids(self) -> list[int]:
        """Jobs this worker answers for: running here, or finished with the outcome not yet stored."""
        return [job_id for job_id, _ in self._running] + self._completer.unrecorded_ids()

    async def _release_orphans(self) -> None:
        held = self._held_ids()
        rows = await self._claimer.fetch(
            query("release_orphans"), {"worker": self.worker_id, "held": held, "now": None}
        )
        if rows:
            log.warning("handed back %d job(s) claimed by a call whose reply was lost", len(rows))

    async def _queues_drained(self) -> bool:
        """Burst mode: nothing queued in our queues, not even for later, once outcomes are in."""
        if not await self._completer.wait_idle(self.settings.poll_interval):
            return False  # a failure may requeue its job: ask again once it is recorded
        try:
            rows = await self._claimer.fetch(query("next_due_in"), {"queues": self.queues})
        except (DatabaseUnavailable, psycopg.Error):
            return False
        return not rows or rows[0][0] is None

    async def _wait_any(self, *events: asyncio.Event, timeout: float | None = None) -> None:
        assert self._stop_event
        waiters = [asyncio.ensure_future(event.wait()) for event in {*events, self._stop_event}]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _sleep(self, seconds: float) -> None:
        assert self._stop_event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    # -- running jobs ---------------------------------------------------------------

    def _start(self, job: ClaimedJob) -> None:
        # from the claim on: a cancel request before the handler starts is not lost
        context = JobContext(
            job.id, job.task, job.queue, job.attempt, job.max_attempts, self.worker_id, self._progress
        )
        task = asyncio.create_task(self._execute(job, context), name=f"pgqueue-job-{job.id}")
        # keyed by attempt too: after a lost lease this worker may claim the same job again
        # while its old attempt is still winding down
        self._running[job.id, job.attempt] = task
        self._running.contexts[job.id, job.attempt] = context

    async def _execute(self, job: ClaimedJob, context: JobContext) -> None:
        hooks = self.app.hooks
        token = _current.set(context)
        started = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            log_job_started(job)
        if hooks.wants(JobStarted):
            waited = (datetime.now(UTC) - job.run_at).total_seconds()
            hooks.emit(JobStarted(self.worker_id, job, max(0.0, waited)))
        try:
            # from here on a cancellation of this task reaches the handler's outcome
            context._started = True
            outcome = await run_attempt(
                job, context, self.app.tasks, self._executors, self.settings, lambda: self._releasing
            )
        finally:
            _current.reset(token)
            self._running.pop((job.id, job.attempt), None)
            self._running.contexts.pop((job.id, job.attempt), None)
            assert self._slot_freed
            self._slot_freed.set()
        seconds = time.monotonic() - started
        if log.isEnabledFor(logging.DEBUG):
            log_job_finished(job, outcome.kind, seconds)
        self.jobs_done += 1
        self._completer.add(outcome)
        if hooks.wants(JobFinished):
            hooks.emit(JobFinished(self.worker_id, job, outcome, seconds))

    def _recorded(self, outcomes: list[Outcome], rows: list[tuple[Any, ...]], seconds: float) -> None:
        # outcomes stored: slots held back by a backlog of unrecorded outcomes are free again
        assert self._slot_freed
        self._slot_freed.set()
        if self.app.hooks.wants(OutcomesFlushed):
            states = {row[0]: row[1] for row in rows if row[1] is not None}
            self.app.hooks.emit(OutcomesFlushed(self.worker_id, outcomes, len(rows), seconds, states))

    def _connected(self, role: str, reconnect: bool) -> None:
        self.app.hooks.emit(Connected(self.worker_id, role, reconnect))

    # -- shutdown -------------------------------------------------------------------

    async def _shutdown(self) -> None:
        assert self._force_event
        tasks = list(self._running.values())
        if tasks and not self._forced:
            force = asyncio.ensure_future(self._force_event.wait())
            await wait_all_or(tasks, force, self.settings.shutdown_grace)
            force.cancel()
        leftover = list(self._running.values())
        if leftover:
            log.warning("releasing %d job(s) that did not finish in time", len(leftover))
            self._releasing = True
            for task in leftover:
                task.cancel()
            # a handler that swallows its cancellation must not hold the exit hostage
            await asyncio.wait(leftover, timeout=5.0)
        # Every outcome is decided now: CPU-bound children still running belong to jobs
        # released or timed out, which must not go on running beside their next attempt.
        self._executors.kill_processes()
        if self._claim_uncertain:
            with contextlib.suppress(DatabaseUnavailable, psycopg.Error):
                await self._release_orphans()
        # Past the lease, or a few seconds after a forced stop, an outcome could not be
        # recorded anyway: its job is rescued.
        await self._completer.finish(self.settings.lease_seconds, forced=lambda: self._forced)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=task.exception())
