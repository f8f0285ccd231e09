"""The App: a registry of tasks, the producer API, and the connection the app owns."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, overload

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import control, producer
from . import schedules as scheduling
from .database import connect, resolve_dsn, validate_dsn
from .eager import EagerRunner
from .errors import ConfigurationError, UnknownTaskError
from .events import AsyncEventStream, EventStream
from .hooks import Hooks
from .migrate import migrate, migrate_async
from .models import Job, JobId, JobOptions, JobState, RetryPolicy, validate_options, validate_task_name
from .periodic import Missed
from .plans import drive, drive_async
from .pools import Pools
from .queues import QueueControls
from .settings import Settings
from .tasks import Executor, Task

log = logging.getLogger("pgqueue")

P = ParamSpec("P")
R = TypeVar("R")

Connection = psycopg.Connection[Any]
AsyncConnection = psycopg.AsyncConnection[Any]


class App:
    """Holds the tasks a worker can run and the settings producers and workers share.

    >>> app = App()
    >>> @app.task(queue="emails", max_attempts=5, timeout=30)
    ... async def send_welcome(user_id: int) -> None: ...
    """

    def __init__(self, settings: Settings | None = None, *, dsn: str | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        if dsn is not None:
            self.settings = self.settings.model_copy(update={"dsn": dsn})
        self.tasks: dict[str, Task[..., Any]] = {}
        # schedules declared with @app.periodic, stored by each worker at its start
        self.periodic_schedules: dict[str, scheduling.Schedule] = {}
        # set by pgqueue.testing.eager: enqueues run their job at once, in the caller
        self.eager: EagerRunner | None = None
        self.hooks = Hooks()  # what its workers tell: see pgqueue.hooks
        self._dsn: str | None = None
        self._pools = Pools(self)

    def configure(self, settings: Settings) -> None:
        """Switch to other settings (e.g. CLI flags); closes the pools of the old database."""
        self.close()
        self.settings = settings
        self._dsn = None

    # -- tasks ---------------------------------------------------------------------

    @overload
    def task(self, function: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        function: None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int | str = 0,
        max_attempts: int = 10,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        executor: Executor | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        function: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int | str = 0,
        max_attempts: int = 10,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        executor: Executor | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task. Options become the defaults of its jobs.

        executor: "async" for coroutine functions (the default for them), "thread" for
        plain functions (their default), "process" for CPU-bound work.
        """

        def register(target: Callable[P, R]) -> Task[P, R]:
            options = validate_options(
                {
                    "queue": queue,
                    "priority": priority,
                    "max_attempts": max_attempts,
                    "timeout": timeout,
                    "retry": retry or RetryPolicy(),
                }
            )
            task_name = validate_task_name(name or f"{_module_name(target)}.{target.__qualname__}")
            if task_name in self.tasks:
                raise ConfigurationError(f"a task named {task_name!r} is already registered")
            chosen = executor or ("async" if inspect.iscoroutinefunction(target) else "thread")
            if chosen == "async" and not inspect.iscoroutinefunction(target):
                raise ConfigurationError(f"task {task_name!r}: executor 'async' needs an async def function")
            if chosen in ("thread", "process") and inspect.iscoroutinefunction(target):
                raise ConfigurationError(
                    f"task {task_name!r}: executor {chosen!r} needs a plain def function"
                )
            if chosen == "process" and "<locals>" in target.__qualname__:
                # the child process finds the function again by import path
                raise ConfigurationError(
                    f"task {task_name!r}: executor 'process' needs a function defined at module "
                    "level, so the process pool can import it"
                )
            created: Task[P, R] = Task(self, task_name, target, options, chosen)
            self.tasks[task_name] = created
            return created

        return register(function) if function is not None else register

    def periodic(
        self,
        cron: str,
        *,
        name: str | None = None,
        timezone: str = "UTC",
        args: dict[str, Any] | None = None,
        missed: Missed = "latest",
        max_catch_up: int = 100,
    ) -> Callable[[Any], Any]:
        """Decorator: run a task at each tick of `cron` (5-field cron, @daily..., or
        '@every 30s') in `timezone`, with `args`. Stored in the database by each worker at
        its start; each tick runs once however many workers run. `missed` says what a
        worker does with ticks nobody fired (every worker was down): "latest" runs the
        latest once, "skip" runs none more than a minute late, "all" runs each (at most
        `max_catch_up`). InvalidScheduleError at once for a bad expression."""
        return scheduling.periodic(
            self, cron, name=name, timezone=timezone, args=args, missed=missed, max_catch_up=max_catch_up
        )

    @property
    def schedules(self) -> scheduling.Schedules:
        """Add, pause, resume, remove and list schedules at run time (see pgqueue.schedules)."""
        return scheduling.Schedules(self)

    @property
    def controls(self) -> QueueControls:
        """Pause, resume and limit queues for every worker (see pgqueue.queues)."""
        return QueueControls(self)

    def queues(self) -> list[str]:
        """The queues this app's tasks enqueue to by default."""
        return sorted({task.default_options.queue for task in self.tasks.values()}) or ["default"]

    # -- enqueue by name -----------------------------------------------------------

    def prepare(self, task: str, args: dict[str, Any] | None, **options: Any) -> producer.PreparedJob:
        """Validate a job given by task name (checked against the registry when it is known)."""
        registered = self.tasks.get(task)
        if registered is not None:
            return registered.with_options(**options).prepare_kwargs(args or {})
        if self.tasks:
            raise UnknownTaskError(f"unknown task {task!r}: this app registers {sorted(self.tasks)}")
        # a producer-only app: what the caller left out comes from the task's registration
        merged = JobOptions().merged(**options)
        prepared = producer.prepare(task, args or {}, merged)
        given = frozenset(name for name, value in options.items() if value is not None)
        return producer.PreparedJob(prepared.task, prepared.args_json, prepared.options, given)

    def enqueue(
        self, connection: Connection | None, task: str, args: dict[str, Any] | None = None, **options: Any
    ) -> JobId:
        """Enqueue a job by task name; `connection=None` uses the app's own pool."""
        job = self.prepare(task, args, **options)
        return self.insert(connection, job)

    async def enqueue_async(
        self,
        connection: AsyncConnection | None,
        task: str,
        args: dict[str, Any] | None = None,
        **options: Any,
    ) -> JobId:
        """The async twin of `enqueue`."""
        job = self.prepare(task, args, **options)
        return await self.insert_async(connection, job)

    def insert(self, connection: Connection | None, job: producer.PreparedJob) -> JobId:
        if self.eager is not None:
            return self.eager.run(job)
        with self._using(connection) as conn:
            job_id = producer.insert(conn, job)
        return JobId(job_id, job_id.duplicate, self)

    async def insert_async(self, connection: AsyncConnection | None, job: producer.PreparedJob) -> JobId:
        if self.eager is not None:
            return await self.eager.run_async(job)
        async with self._using_async(connection) as conn:
            job_id = await producer.insert_async(conn, job)
        return JobId(job_id, job_id.duplicate, self)

    def insert_many(self, connection: Connection | None, jobs: list[producer.PreparedJob]) -> list[int]:
        if self.eager is not None:
            return [self.eager.run(job) for job in jobs]
        with self._using(connection) as conn:
            return producer.insert_many(conn, jobs)

    async def insert_many_async(
        self, connection: AsyncConnection | None, jobs: list[producer.PreparedJob]
    ) -> list[int]:
        if self.eager is not None:
            return [await self.eager.run_async(job) for job in jobs]
        async with self._using_async(connection) as conn:
            return await producer.insert_many_async(conn, jobs)

    # -- job control ---------------------------------------------------------------

    def get_job(self, job_id: int, connection: Connection | None = None) -> Job:
        """The job with this id; raises JobNotFoundError."""
        with self._using(connection) as conn:
            return drive(conn, control.get_job_plan(job_id))

    async def get_job_async(self, job_id: int, connection: AsyncConnection | None = None) -> Job:
        async with self._using_async(connection) as conn:
            return await drive_async(conn, control.get_job_plan(job_id))

    def get_status(self, job_id: int, connection: Connection | None = None) -> Job:
        """The job without its arguments, worker and history (empty in the Job): what the
        pgqueue_producer role may read. State, result, errors and progress are there."""
        with self._using(connection) as conn:
            return drive(conn, control.get_job_plan(job_id, status_only=True))

    async def get_status_async(self, job_id: int, connection: AsyncConnection | None = None) -> Job:
        async with self._using_async(connection) as conn:
            return await drive_async(conn, control.get_job_plan(job_id, status_only=True))

    def cancel(self, job_id: int, connection: Connection | None = None) -> control.CancelState:
        """Cancel a job: "cancelled" when it was queued (it will not run), "cancelling" when
        it runs (its worker stops it within a second when it LISTENs, else at its next
        heartbeat, and records it cancelled). JobFinishedError when it already ended,
        JobNotFoundError when there is no such job."""
        with self._using(connection) as conn:
            return drive(conn, control.cancel_plan(job_id))

    async def cancel_async(
        self, job_id: int, connection: AsyncConnection | None = None
    ) -> control.CancelState:
        async with self._using_async(connection) as conn:
            return await drive_async(conn, control.cancel_plan(job_id))

    def wait(self, job_id: int, timeout: float | None = None) -> Any:
        """Wait for the job to end: its result when it succeeded; JobFailedError (with its
        errors) when it was dead-lettered or cancelled; TimeoutError after `timeout` seconds.
        It polls the job's row (a primary-key read), more slowly the longer it waits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for pause in control.wait_pauses(deadline):
            job = self.get_status(job_id)
            if job.state not in (JobState.QUEUED, JobState.RUNNING):
                return control.ended(job)
            time.sleep(pause)
        raise TimeoutError(f"job {job_id} did not finish within {timeout:g}s")

    async def wait_async(self, job_id: int, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        for pause in control.wait_pauses(deadline):
            job = await self.get_status_async(job_id)
            if job.state not in (JobState.QUEUED, JobState.RUNNING):
                return control.ended(job)
            await asyncio.sleep(pause)
        raise TimeoutError(f"job {job_id} did not finish within {timeout:g}s")

    def retry(self, job_id: int, connection: Connection | None = None) -> bool:
        """Requeue a dead-lettered or cancelled job; False if it is in another state."""
        with self._using(connection) as conn:
            return drive(conn, control.retry_plan(job_id))

    async def retry_async(self, job_id: int, connection: AsyncConnection | None = None) -> bool:
        async with self._using_async(connection) as conn:
            return await drive_async(conn, control.retry_plan(job_id))

    def migrate(self, connection: Connection | None = None) -> list[int]:
        """Apply pending migrations (inside `connection`'s transaction when given)."""
        if connection is not None:
            return migrate(connection)
        with self.connect() as conn:
            return migrate(conn)

    async def migrate_async(self, connection: AsyncConnection | None = None) -> list[int]:
        if connection is not None:
            return await migrate_async(connection)
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return await migrate_async(conn)

    def subscribe(self) -> EventStream:
        """Listen to lifecycle events (once they are on: `pgqueue events on`); see pgqueue.events.
        Through a transaction pooler this needs PGQUEUE_LISTEN_DSN, a direct connection."""
        listen_dsn = self.settings.listen_dsn and validate_dsn(self.settings.listen_dsn)
        return EventStream(listen_dsn or self.dsn, self.settings.connect_timeout, direct=bool(listen_dsn))

    async def subscribe_async(self) -> AsyncEventStream:
        listen_dsn = self.settings.listen_dsn and validate_dsn(self.settings.listen_dsn)
        return await AsyncEventStream.connect(
            listen_dsn or self.dsn, self.settings.connect_timeout, direct=bool(listen_dsn)
        )

    # -- connections ---------------------------------------------------------------

    def connect(self) -> Connection:
        """A connection of its own (autocommit), with prepared statements off where a pooler
        would break them: what the command line uses."""
        return connect(self.dsn, self.settings.prepared_statements)

    @property
    def dsn(self) -> str:
        """The database this app talks to (starts the embedded one if none is configured)."""
        if self._dsn is None:
            self._dsn = resolve_dsn(self.settings)
        return self._dsn

    def pool(self) -> ConnectionPool:
        """The app's own sync pool, opened on first use."""
        return self._pools.pool()

    async def async_pool(self) -> AsyncConnectionPool:
        """The app's own async pool, opened on first use."""
        return await self._pools.async_pool()

    def _using(self, connection: Connection | None) -> AbstractContextManager[Connection]:
        return self._pools.using(connection)

    def _using_async(
        self, connection: AsyncConnection | None
    ) -> AbstractAsyncContextManager[AsyncConnection]:
        return self._pools.using_async(connection)

    def close(self) -> None:
        """Close the app's sync pool (the async one needs `aclose`)."""
        self._pools.close()

    async def aclose(self) -> None:
        await self._pools.aclose()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _module_name(target: Callable[..., Any]) -> str:
    """The module a worker will import `target` from: for a script run as `__main__`, its
    own name (`python -m reports.jobs` → reports.jobs; `python jobs.py` → jobs), so that
    the job's task name is one a worker that imports the module also knows."""
    module = target.__module__
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if path:
        name = Path(path).stem
        log.warning(
            "task %r is defined in a script run directly: named %s.%s, as a worker importing "
            "module %r knows it; give it name=... to be explicit",
            target.__qualname__,
            name,
            target.__qualname__,
            name,
        )
        return name
    raise ConfigurationError(
        f"task {target.__qualname__!r} is defined in an interactive session (module __main__): "
        "no worker can import it; give it name=... and define it in a module"
    )
