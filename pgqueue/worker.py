"""The worker: wake, claim a batch sized to free slots, run, record outcomes in batches.

One asyncio loop per process. Async handlers run on the loop, sync ones in a thread
pool, CPU-bound ones in a process pool. Four connections, one per role: claim,
complete (group commit), maintenance (heartbeat and rescue), and LISTEN. Every one
of them reconnects with backoff for as long as the worker lives: a database restart
or a network cut pauses the worker, it never ends it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import contextlib
import contextvars
import functools
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from . import processes
from .app import App
from .completer import Completer, Outcome
from .connection import CONNECTION_ERRORS, Backoff, DatabaseUnavailable, WorkerConnection
from .context import JobContext, _current
from .errors import ConfigurationError, SchemaError
from .migrate import check_schema_async
from .models import NAME_PATTERN
from .outcomes import Fail, Retry
from .producer import JSON_ENCODER, JSON_NUL
from .settings import Settings
from .sql import query
from .tasks import Task, run_in_process

log = logging.getLogger("pgqueue")

CHANNEL = "pgqueue_jobs"
# A result is read back by whoever asks for it; beyond this it belongs in a table of its own.
MAX_RESULT_BYTES = 10_000_000


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds the lease of."""

    id: int
    task: str
    args: dict[str, Any]
    queue: str
    priority: int
    attempt: int
    max_attempts: int
    timeout_seconds: float | None
    run_at: datetime
    created_at: datetime


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
        self._running: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._lingering = 0  # executor threads still busy with timed-out jobs
        self._claim_uncertain = False  # a claim's reply was lost: some jobs may be ours unknowingly
        self._stopping = False
        self._forced = False
        self._releasing = False
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._force_event: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self.started = threading.Event()

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
        dsn = self.app.dsn
        timeout = self.settings.statement_timeout
        self._claimer = WorkerConnection(dsn, "claim", timeout)
        # a heartbeat stuck for longer than a third of the lease would let the leases lapse
        self._maintainer = WorkerConnection(
            dsn, "maintenance", min(timeout, max(1.0, self.settings.lease_seconds / 3))
        )
        completer_connection = WorkerConnection(dsn, "complete", timeout)
        self._completer = Completer(
            completer_connection,
            self.worker_id,
            self.settings.reconnect_max_delay,
            on_recorded=self._recorded,
        )
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="pgqueue-job"
        )
        self._thread_gate = asyncio.Semaphore(self.concurrency)
        self._process_count = min(self.concurrency, os.cpu_count() or 1)
        self._process_gate = asyncio.Semaphore(self._process_count)
        background: list[asyncio.Task[None]] = []
        try:
            if not await self._wait_for_schema():
                return
            log.info(
                "worker %s started: queues %s, concurrency %d, %s",
                self.worker_id,
                ",".join(self.queues),
                self.concurrency,
                "LISTEN/NOTIFY with polling fallback" if self.listen else "polling only",
            )
            if self.listen:
                background.append(asyncio.create_task(self._listen_loop(), name="pgqueue-listen"))
            background.append(asyncio.create_task(self._maintenance_loop(), name="pgqueue-maintenance"))
            for task in background:
                task.add_done_callback(_report_crash)
            self.started.set()
            await self._claim_loop()
            await self._shutdown()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for connection in (self._claimer, self._maintainer, completer_connection):
                await connection.close()
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._terminate_processes()
            if signals_installed:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    self._loop.remove_signal_handler(signum)
            log.info("worker %s stopped after %d job(s)", self.worker_id, self.jobs_done)

    def _install_signals(self) -> bool:
        if not self.install_signal_handlers or threading.current_thread() is not threading.main_thread():
            return False
        assert self._loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._request_stop)
        return True

    async def _wait_for_schema(self) -> bool:
        """Connect (retrying while the database is unreachable) and check the schema version."""
        backoff = Backoff(cap=self.settings.reconnect_max_delay)
        while not self._stopping:
            try:
                connection = await self._claimer.connect()
                await check_schema_async(connection)
                return True
            except SchemaError:
                raise
            except CONNECTION_ERRORS as error:
                await self._claimer.discard()
                delay = backoff.next_delay()
                log.warning(
                    "database unreachable (%s: %s); retrying in %.1fs",
                    type(error).__name__,
                    str(error).strip(),
                    delay,
                )
                await self._sleep(delay)
        return False

    async def _claim_loop(self) -> None:
        assert self._wake and self._slot_freed
        backoff = Backoff(cap=self.settings.reconnect_max_delay)
        params: dict[str, Any] = {
            "worker": self.worker_id,
            "queues": self.queues,
            "lease_seconds": self.settings.lease_seconds,
            "now": None,
        }
        while not self._stopping:
            # Threads still busy with timed-out jobs hold their slots, and outcomes the
            # database has not taken yet hold theirs: no claiming what cannot start or be kept.
            backlog = max(0, len(self._completer.unrecorded_ids()) - self.concurrency)
            free = self.concurrency - len(self._running) - self._lingering - backlog
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_any(self._slot_freed, timeout=self.settings.poll_interval)
                continue
            self._wake.clear()
            params["limit"] = free
            try:
                if self._claim_uncertain:
                    await self._release_orphans()
                    self._claim_uncertain = False
                rows = await self._claimer.fetch(query("claim_jobs"), params)
            except (DatabaseUnavailable, psycopg.Error) as error:
                # The claim may have committed with its reply lost: those jobs are ours but
                # not running here, so hand them back before claiming again.
                self._claim_uncertain = self._claim_uncertain or isinstance(error, DatabaseUnavailable)
                delay = backoff.next_delay()
                log.warning("could not claim jobs (%s); retrying in %.1fs", _describe(error), delay)
                await self._sleep(delay)
                continue
            if backoff.failures:
                log.info("database reachable again; claiming jobs")
            backoff.reset()
            for row in rows:
                self._start(ClaimedJob(*row))
            if len(rows) == free:
                continue
            if not rows and self.burst and not self._running and await self._queues_drained():
                log.info("worker %s: queues empty, burst mode ends", self.worker_id)
                return
            # Idle: NOTIFY wakes us for new jobs; the poll catches scheduled ones and
            # anything a pooler's lost notification would hide.
            await self._wait_any(self._wake, timeout=self.settings.poll_interval)

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

    async def _wait_any(self, event: asyncio.Event, timeout: float | None = None) -> None:
        assert self._stop_event
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop_event.wait())]
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
        task = asyncio.create_task(self._execute(job), name=f"pgqueue-job-{job.id}")
        # keyed by attempt too: after a lost lease this worker may claim the same job again
        # while its old attempt is still winding down
        self._running[job.id, job.attempt] = task

    async def _execute(self, job: ClaimedJob) -> None:
        outcome: Outcome
        context = JobContext(job.id, job.task, job.queue, job.attempt, job.max_attempts, self.worker_id)
        token = _current.set(context)
        started = time.monotonic()
        try:
            outcome = await self._attempt(job)
        finally:
            _current.reset(token)
            self._running.pop((job.id, job.attempt), None)
            assert self._slot_freed
            self._slot_freed.set()
        log.debug("job %d %s: %s in %.3fs", job.id, job.task, outcome.kind, time.monotonic() - started)
        self.jobs_done += 1
        self._completer.add(outcome)

    async def _attempt(self, job: ClaimedJob) -> Outcome:
        task = self.app.tasks.get(job.task)
        if task is None:
            return self._failure(
                job,
                "fatal",
                "unknown_task",
                f"UnknownTaskError: task {job.task!r} is not registered in this worker's app "
                f"(it registers {sorted(self.app.tasks)})",
            )
        try:
            args, kwargs = task.call_arguments(job.args)
        except TypeError as error:
            return self._failure(
                job,
                "fatal",
                "bad_arguments",
                f"InvalidJobError: stored arguments do not fit task {job.task!r}: {error}",
            )
        timeout = job.timeout_seconds
        try:
            result = await self._call(task, job, args, kwargs)
        except Retry as request:
            return self._failure(job, "retry", "retry", f"Retry: {request.reason}", retry_in=request.delay)
        except Fail as failure:
            return self._failure(job, "fatal", "fail", _describe(failure), traceback.format_exc())
        except _TimedOut:
            return self._failure(
                job,
                "failed",
                "timeout",
                f"TimeoutError: job ran longer than its timeout of {timeout:g}s and was stopped",
            )
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling() == 0 and not self._releasing:
                # the handler's own await was cancelled (not this job): a failed attempt
                return self._failure(job, "failed", "exception", "CancelledError", traceback.format_exc())
            if self._releasing:
                return Outcome(
                    job.id,
                    job.attempt,
                    "released",
                    error={
                        "kind": "released",
                        "error": "worker shut down before the job finished; requeued",
                        "traceback": None,
                    },
                )
            raise
        except BaseException as error:
            # SystemExit or KeyboardInterrupt from a handler fails its attempt, not the worker
            return self._failure(job, "failed", "exception", _describe(error), traceback.format_exc())
        try:
            result_json = JSON_ENCODER.encode(result)
            if "\\u0000" in result_json and JSON_NUL.search(result_json):
                raise ValueError("it contains a NUL character (\\u0000), which jsonb cannot store")
            if len(result_json) > MAX_RESULT_BYTES:
                raise ValueError(
                    f"it is {len(result_json)} bytes of JSON, over the {MAX_RESULT_BYTES} limit: "
                    "store large results elsewhere and return their key"
                )
        except (TypeError, ValueError) as error:
            return self._failure(
                job,
                "fatal",
                "bad_result",
                f"InvalidResultError: the handler's return value cannot be stored: {error}",
            )
        return Outcome(job.id, job.attempt, "succeeded", result_json=result_json)

    async def _call(
        self, task: Task[..., Any], job: ClaimedJob, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        timeout = job.timeout_seconds
        if task.executor == "async":
            if timeout is None:
                return await task.function(*args, **kwargs)
            try:
                async with asyncio.timeout(timeout) as deadline:
                    return await task.function(*args, **kwargs)
            except TimeoutError:
                if deadline.expired():  # ours, not one the handler raised itself
                    raise _TimedOut from None
                raise
        loop = asyncio.get_running_loop()
        process = task.executor == "process"
        gate = self._process_gate if process else self._thread_gate
        if process:
            context = JobContext(job.id, job.task, job.queue, job.attempt, job.max_attempts, self.worker_id)
            call = functools.partial(
                run_in_process, task.function.__module__, task.function.__qualname__, job.args, context
            )
        else:
            call = functools.partial(contextvars.copy_context().run, task.function, *args, **kwargs)
        # Wait for a free thread or process first, so the timeout counts running time only.
        await gate.acquire()
        try:
            future = self._submit(call, process)
        except BaseException:
            gate.release()
            raise
        future.add_done_callback(lambda _: _call_soon(loop, gate.release))
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await asyncio.wrap_future(future)
        except (TimeoutError, asyncio.CancelledError) as error:
            if not future.done():
                if process:
                    # a child process can be stopped: do it, and the next job gets a new pool
                    self._terminate_processes()
                else:
                    # Python cannot stop a thread; its slot stays taken until it returns
                    self._lingering += 1
                    future.add_done_callback(lambda _: _call_soon(loop, self._lingering_done))
            if isinstance(error, TimeoutError) and deadline.expired():
                raise _TimedOut from None
            raise
        except concurrent.futures.process.BrokenProcessPool:
            # a child died (killed, out of memory): the next job gets a fresh pool
            self._terminate_processes()
            raise

    def _submit(self, call: Callable[[], Any], process: bool) -> concurrent.futures.Future[Any]:
        if not process:
            assert self._threads
            return self._threads.submit(call)
        for _ in range(2):
            if self._processes is None:
                self._processes = processes.new_pool(self._process_count)
            try:
                return processes.submit(self._processes, call)
            except concurrent.futures.process.BrokenProcessPool:
                self._terminate_processes()  # broke while idle: once more with a new pool
        raise concurrent.futures.process.BrokenProcessPool("could not start a process pool")

    def _lingering_done(self) -> None:
        self._lingering -= 1
        assert self._slot_freed
        self._slot_freed.set()

    def _failure(
        self,
        job: ClaimedJob,
        kind: Any,
        error_kind: str,
        message: str,
        trace: str | None = None,
        retry_in: float | None = None,
    ) -> Outcome:
        if kind != "retry":
            log.warning(
                "job %d %s attempt %d/%d failed: %s", job.id, job.task, job.attempt, job.max_attempts, message
            )
        # jsonb cannot hold U+0000, which an exception message may well contain
        message = message.replace("\x00", "\\x00")
        trace = trace.replace("\x00", "\\x00") if trace else trace
        return Outcome(
            job.id,
            job.attempt,
            kind,
            error={"kind": error_kind, "error": message, "traceback": trace},
            retry_in=retry_in,
        )

    def _recorded(self, outcomes: list[Outcome], rows: list[tuple[Any, ...]]) -> None:
        # outcomes stored: slots held back by a backlog of unrecorded outcomes are free again
        assert self._slot_freed
        self._slot_freed.set()

    # -- background loops -------------------------------------------------------------

    async def _listen_loop(self) -> None:
        assert self._wake
        backoff = Backoff(cap=self.settings.reconnect_max_delay)
        served = set(self.queues)
        listener = WorkerConnection(self.app.dsn, "listen", self.settings.statement_timeout)
        # A silent network cut leaves a LISTEN socket open but deaf; probing the link
        # whenever it has been quiet this long notices, and we reconnect.
        probe_every = max(1.0, min(5.0, self.settings.statement_timeout))
        try:
            while True:
                try:
                    await listener.fetch(f"listen {CHANNEL}", {})
                    connection = await listener.connect()
                    if backoff.failures:
                        log.info("LISTEN connection back")
                    backoff.reset()
                    self._wake.set()  # notifications sent while we were away are lost: look now
                    while True:
                        async for notification in connection.notifies(timeout=probe_every):
                            if notification.payload in served:
                                self._wake.set()
                        await listener.fetch("select 1", {})
                except Exception as error:  # the listener must outlive anything the server says
                    await listener.discard()
                    delay = backoff.next_delay()
                    log.warning(
                        "LISTEN connection lost (%s); polling every %.1fs meanwhile, reconnecting in %.1fs",
                        _describe(error),
                        self.settings.poll_interval,
                        delay,
                    )
                    await asyncio.sleep(delay)
        finally:
            await listener.close()

    async def _maintenance_loop(self) -> None:
        """Heartbeat the leases of running jobs; now and then rescue other workers' expired jobs."""
        lease = self.settings.lease_seconds
        beat = max(0.05, lease / 3)
        rescue_every = min(self.settings.rescue_interval, lease)
        next_rescue = time.monotonic()
        while True:
            held = self._held_ids()
            if held:
                try:
                    await self._maintainer.fetch(
                        query("heartbeat"),
                        {"worker": self.worker_id, "ids": held, "lease_seconds": lease, "now": None},
                    )
                except DatabaseUnavailable as error:
                    log.warning("heartbeat failed (%s): leases of %d job(s) not extended", error, len(held))
                except psycopg.Error:
                    # not a lost connection: log it loudly, but a heartbeat must never stop for good
                    log.exception("heartbeat failed")
            if time.monotonic() >= next_rescue and not self._stopping:
                next_rescue = time.monotonic() + rescue_every
                try:
                    rescued = await self._maintainer.fetch(query("rescue_expired_jobs"), {"now": None})
                except DatabaseUnavailable:
                    rescued = []
                except psycopg.Error:
                    log.exception("rescue sweep failed")
                    rescued = []
                for job_id, state in rescued:
                    log.warning(
                        "job %d's lease expired (its worker died or lost the database): %s",
                        job_id,
                        "requeued" if state == "queued" else "dead-lettered",
                    )
            await asyncio.sleep(beat)

    # -- shutdown -------------------------------------------------------------------

    async def _shutdown(self) -> None:
        assert self._force_event
        tasks = list(self._running.values())
        if tasks and not self._forced:
            force = asyncio.ensure_future(self._force_event.wait())
            await _wait_all_or(tasks, force, self.settings.shutdown_grace)
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
        self._terminate_processes()
        if self._claim_uncertain:
            with contextlib.suppress(DatabaseUnavailable, psycopg.Error):
                await self._release_orphans()
        # Record every outcome before leaving. Past the lease, or a few seconds after a
        # forced stop, an outcome could not be recorded anyway: its job is rescued.
        deadline = time.monotonic() + self.settings.lease_seconds
        waited = 0
        while not await self._completer.wait_idle(timeout=1.0):
            waited += 1
            if waited % 10 == 1 and not self._forced:
                log.warning(
                    "waiting to record %d job outcome(s) before exiting (signal again to give up "
                    "and leave them to the lease rescue)",
                    len(self._completer.unrecorded_ids()),
                )
            if self._forced or time.monotonic() > deadline:
                if self._forced and await self._completer.wait_idle(timeout=5.0):
                    break
                self._completer.abandon = True
                log.error(
                    "leaving %s unrecorded outcome(s) to be rescued after their leases",
                    len(self._completer.unrecorded_ids()),
                )
                break

    def _terminate_processes(self) -> None:
        """Stop the process pool's children; the next CPU-bound job starts a new pool."""
        pool, self._processes = self._processes, None
        if pool is not None:
            processes.kill_children(pool)


async def _wait_all_or(tasks: list[asyncio.Task[None]], force: asyncio.Future[Any], timeout: float) -> None:
    """Wait for all `tasks`, until `timeout`, or until `force` completes."""
    everything = asyncio.ensure_future(asyncio.wait(tasks))
    try:
        await asyncio.wait([everything, force], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        everything.cancel()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """From an executor thread: run `callback` on the loop, unless the worker has ended."""
    with contextlib.suppress(RuntimeError):  # the loop closed while the thread finished
        loop.call_soon_threadsafe(callback)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=task.exception())


class _TimedOut(Exception):
    """The handler outran its timeout."""


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
