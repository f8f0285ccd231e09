"""Eager mode, for users' unit tests: an enqueue runs its job at once, in the caller,
with no database and no worker.

    def test_welcome():
        with pgqueue.testing.eager(app) as ran:
            job = send_welcome.enqueue(None, user_id=42)
        assert job.wait() == {"sent": True}
        assert [j.task for j in ran] == ["emails.send_welcome"]

What it keeps of the real thing: the arguments and the result go through JSON (what
cannot be stored fails the same way), the handler sees `current_job()`, progress and
`raise_if_cancelled()`, and `Retry` / `Snooze` / `Fail` / an exception steer the job as
a worker would, except that delays are not waited for: a retried job runs again at
once, up to its `max_attempts`. What it leaves out: the database (no transaction, no
unique keys, no queue limits), timeouts, and process pools (a process task runs in the
caller too). For those, run a real worker on a throwaway database
(`pgqueue.testing.running_worker`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .context import JobContext, _current
from .errors import JobFailedError, UnknownTaskError
from .models import ClaimedJob, JobId, JobState
from .outcomes import outcome_of

if TYPE_CHECKING:
    from .app import App
    from .producer import PreparedJob
    from .tasks import Task

_ids = itertools.count(1)
# a handler that snoozes this often in a row is left queued (it would never end)
MAX_SNOOZES = 100


@dataclass
class EagerJob:
    """What an eager enqueue did: every attempt ran, and how the job ended."""

    id: int
    task: str
    args: dict[str, Any]
    state: JobState = JobState.QUEUED
    attempt: int = 0
    result: Any = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None


class EagerHandle(JobId):
    """The id an eager enqueue returns; `wait()`, `state()`, `progress()` read the run."""

    ran: EagerJob

    def job(self) -> Any:
        return self.ran

    def state(self) -> JobState:
        return self.ran.state

    def progress(self) -> dict[str, Any] | None:
        return self.ran.progress

    def wait(self, timeout: float | None = None) -> Any:
        if self.ran.state == JobState.QUEUED:
            raise TimeoutError(f"job {self.ran.id} snoozed {MAX_SNOOZES} times in a row and never ended")
        if self.ran.state == JobState.SUCCEEDED:
            return self.ran.result
        last = self.ran.errors[-1]["error"] if self.ran.errors else "no error recorded"
        message = f"job {self.ran.id} ({self.ran.task}) ended {self.ran.state}: {last}"
        raise JobFailedError(message, self.ran.id, self.ran.state, self.ran.errors)

    async def wait_async(self, timeout: float | None = None) -> Any:
        return self.wait(timeout)


class EagerRunner:
    """Runs an app's jobs as they are enqueued (see the module's docstring)."""

    def __init__(self, app: App) -> None:
        self._app = app
        self.ran: list[EagerJob] = []

    def run(self, prepared: PreparedJob) -> EagerHandle:
        """For a sync enqueue: run the job in this thread (a loop of its own for async tasks)."""
        return asyncio.run(self.run_async(prepared)) if _no_loop() else _in_thread(self.run_async, prepared)

    async def run_async(self, prepared: PreparedJob) -> EagerHandle:
        task = self._app.tasks.get(prepared.task)
        if task is None:
            raise UnknownTaskError(f"eager mode runs the app's own tasks; {prepared.task!r} is not one")
        args = json.loads(prepared.args_json)
        ran = EagerJob(next(_ids), prepared.task, args)
        self.ran.append(ran)
        max_attempts = prepared.options.max_attempts
        snoozes = 0
        while ran.state == JobState.QUEUED and snoozes <= MAX_SNOOZES:
            ran.attempt += 1
            claimed = ClaimedJob(
                ran.id,
                task.name,
                args,
                prepared.options.queue,
                prepared.options.priority,
                ran.attempt,
                max_attempts,
                None,
                datetime.now(UTC),
                datetime.now(UTC),
            )
            context = JobContext(
                ran.id,
                task.name,
                claimed.queue,
                ran.attempt,
                max_attempts,
                "eager",
                _report=lambda job_id, attempt, report: setattr(ran, "progress", report),
            )
            outcome = await outcome_of(claimed, _handler_call(task, context, args), releasing=lambda: False)
            if outcome.error is not None and outcome.kind != "snoozed":
                ran.errors.append({**outcome.error, "attempt": ran.attempt, "worker": "eager"})
            if outcome.kind == "succeeded":
                ran.state = JobState.SUCCEEDED
                ran.result = json.loads(outcome.result_json or "null")
            elif outcome.kind == "cancelled":
                ran.state = JobState.CANCELLED
            elif outcome.kind == "snoozed":
                ran.attempt -= 1  # not an attempt, as in the database
                snoozes += 1
            elif outcome.kind == "fatal" or ran.attempt >= max_attempts:
                ran.state = JobState.DEAD
        handle = EagerHandle(ran.id)
        handle.ran = ran
        return handle


def _handler_call(
    task: Task[..., Any], context: JobContext, args: dict[str, Any]
) -> Callable[[], Awaitable[Any]]:
    call_args, call_kwargs = task.call_arguments(args)

    async def call() -> Any:
        token = _current.set(context)
        try:
            result = task.function(*call_args, **call_kwargs)
            return await result if isinstance(result, Awaitable) else result
        finally:
            _current.reset(token)

    return call


def _no_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def _in_thread(run: Callable[[PreparedJob], Awaitable[EagerHandle]], prepared: PreparedJob) -> EagerHandle:
    """A sync enqueue from inside a running loop (an async test calling the sync API)."""
    done: list[EagerHandle | BaseException] = []

    def target() -> None:
        try:
            done.append(asyncio.run(run(prepared)))  # type: ignore[arg-type]
        except BaseException as error:
            done.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if isinstance(done[0], BaseException):
        raise done[0]
    return done[0]
