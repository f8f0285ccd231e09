"""The jobs running in one worker: their asyncio tasks and handler contexts, keyed by
(job id, attempt), and the two ways a running job is stopped from outside: a cancel
request, and a lease the heartbeat found lost. Plus the relay that takes a handler's
progress reports (from any thread) to the completer's next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from .completer import Completer
from .context import JobContext
from .hooks import Hooks, JobProgress
from .tasks import Task

log = logging.getLogger("pgqueue")

Attempt = tuple[int, int]


class RunningJobs(dict[Attempt, "asyncio.Task[None]"]):
    """Each running attempt's task (the dict), and its handler's context."""

    def __init__(self, worker: str, tasks: Mapping[str, Task[..., Any]]) -> None:
        super().__init__()
        self._worker = worker
        self._tasks = tasks
        self.contexts: dict[Attempt, JobContext] = {}

    def cancel_jobs(self, job_ids: set[int]) -> None:
        """Stop these jobs if they run here: cancel an async handler's task (a process
        child is killed with it); a thread cannot be stopped, so its handler sees the flag.
        An attempt whose task has not started yet sees the flag before its handler runs."""
        for key, context in list(self.contexts.items()):
            if key[0] not in job_ids or context.cancelled:
                continue
            context.request_cancel()
            task = self._tasks.get(context.task)
            log.info("job %d (%s) cancelled while running: stopping it", key[0], context.task)
            running = self.get(key)
            if running is not None and context._started and (task is None or task.executor != "thread"):
                running.cancel()

    def leases_lost(self, attempts: set[Attempt]) -> None:
        """The heartbeat found these attempts no longer ours: stop them, their outcome would be void."""
        for (job_id, attempt), task in list(self.items()):
            if (job_id, attempt) in attempts:
                log.warning(
                    "worker %s lost the lease of job %d (attempt %d): stopping it, as another worker "
                    "may run it now",
                    self._worker,
                    job_id,
                    attempt,
                )
                task.cancel()


class ProgressRelay:
    """What a handler's `progress()` calls, on any thread: the report goes to the
    completer's next flush, and to the JobProgress hooks, on the worker's loop. One per
    worker (nothing is built per job)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, completer: Completer, hooks: Hooks, worker: str
    ) -> None:
        self._loop = loop
        self._completer = completer
        self._hooks = hooks
        self._worker = worker

    def __call__(self, job_id: int, attempt: int, report: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the worker has ended
            self._loop.call_soon_threadsafe(self._store, job_id, attempt, report)

    def _store(self, job_id: int, attempt: int, report: dict[str, Any]) -> None:
        self._completer.add_progress(job_id, attempt, report)
        if self._hooks.wants(JobProgress):
            self._hooks.emit(JobProgress(self._worker, job_id, attempt, report))


async def wait_all_or(tasks: list[asyncio.Task[None]], force: asyncio.Future[Any], timeout: float) -> None:
    """Wait for all `tasks`, until `timeout`, or until `force` completes."""
    everything = asyncio.ensure_future(asyncio.wait(tasks))
    try:
        await asyncio.wait([everything, force], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        everything.cancel()
