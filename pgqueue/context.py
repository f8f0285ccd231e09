"""What a running handler can learn about its own job, and tell about it.

@app.task
def export(report_id: int) -> str:
    job = pgqueue.current_job()
    for n, page in enumerate(pages, 1):
        job.raise_if_cancelled()  # a sync handler stops itself when asked
        render(page)
        job.progress(n, len(pages), stage="render")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from .errors import InvalidJobError

# A progress report is a small status line, not a result: cap what a handler may send.
MAX_PROGRESS_TEXT = 500


class Cancelled(Exception):
    """Raised by `JobContext.raise_if_cancelled()` once the job was asked to stop; a handler
    may raise it itself too. The job ends `cancelled`, not failed."""


class JobContext:
    """The job a handler is running for: `id`, `task`, `queue`, `attempt`, `max_attempts`
    and `worker`, read-only by convention.

    A plain class with slots, not a dataclass: one is built for every job a worker
    claims, and a frozen dataclass's per-field `object.__setattr__` cost measurable drain
    throughput (about 1 µs a job).
    """

    __slots__ = ("_cancel", "_report", "_started", "attempt", "id", "max_attempts", "queue", "task", "worker")

    def __init__(
        self,
        id: int,
        task: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        worker: str,
        _report: Callable[[int, int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.id = id
        self.task = task
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.worker = worker
        # hands a progress report (job id, attempt, report) to the worker, from any
        # thread; None in a process child
        self._report = _report
        # set by the worker: a cancel request arrived; the attempt's task runs by now
        self._cancel = False
        self._started = False

    def __repr__(self) -> str:
        return (
            f"JobContext(id={self.id}, task={self.task!r}, queue={self.queue!r}, attempt={self.attempt}, "
            f"max_attempts={self.max_attempts}, worker={self.worker!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobContext):
            return NotImplemented
        return (self.id, self.attempt, self.worker) == (other.id, other.attempt, other.worker)

    def __hash__(self) -> int:
        return hash((self.id, self.attempt, self.worker))

    @property
    def cancelled(self) -> bool:
        """Whether someone asked for this job to stop (`pgqueue cancel`, `app.cancel`)."""
        return self._cancel

    def cancel_requested(self) -> bool:
        """`cancelled`, as a method to pass around."""
        return self._cancel

    def request_cancel(self) -> None:
        """The worker's side: a cancel request for this job arrived."""
        self._cancel = True

    def raise_if_cancelled(self) -> None:
        """Raise `Cancelled` when the job was asked to stop: the check a sync handler makes
        between steps (an async handler is cancelled where it awaits, a process child killed)."""
        if self._cancel:
            raise Cancelled(f"job {self.id} was cancelled while running")

    def progress(
        self,
        current: float | None = None,
        total: float | None = None,
        *,
        message: str | None = None,
        stage: str | None = None,
    ) -> None:
        """Report how far the job got. Callers read the last report by job id
        (`app.get_job(id).progress`, `pgqueue.job_progress` in SQL); reports made faster
        than the database takes them are coalesced, keeping the last."""
        report = progress_report(current, total, message, stage)
        if self._report is None:
            raise RuntimeError(
                "progress() is not available in a process-pool handler: report from an async "
                "or thread handler, or split the work into jobs"
            )
        self._report(self.id, self.attempt, report)

    def __reduce__(self) -> tuple[Any, ...]:
        # sent to a process child: the flags and the callback stay in the worker
        return (JobContext, (self.id, self.task, self.queue, self.attempt, self.max_attempts, self.worker))


def progress_report(
    current: float | None, total: float | None, message: str | None, stage: str | None
) -> dict[str, Any]:
    """The stored form of a progress report; InvalidJobError for values that make no sense."""
    for name, number in (("current", current), ("total", total)):
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number)
        ):
            raise InvalidJobError(f"progress {name} must be a finite number, got {number!r}")
        if number is not None and number < 0:
            raise InvalidJobError(f"progress {name} must not be negative, got {number!r}")
    if total == 0:
        raise InvalidJobError("progress total must be positive (or None when unknown)")
    for name, text in (("message", message), ("stage", stage)):
        if text is not None and (not isinstance(text, str) or len(text) > MAX_PROGRESS_TEXT):
            raise InvalidJobError(
                f"progress {name} must be a string of at most {MAX_PROGRESS_TEXT} characters"
            )
    # jsonb cannot hold U+0000
    message = message.replace("\x00", "\\x00") if message else message
    stage = stage.replace("\x00", "\\x00") if stage else stage
    report: dict[str, Any] = {"current": current, "total": total, "message": message, "stage": stage}
    report["percent"] = (
        round(min(100.0, 100.0 * current / total), 2) if current is not None and total is not None else None
    )
    return report


_current: ContextVar[JobContext | None] = ContextVar("pgqueue_job", default=None)


def current_job() -> JobContext:
    """The job the calling handler runs for; raises LookupError outside a handler."""
    job = _current.get()
    if job is None:
        raise LookupError("current_job() is only available inside a pgqueue task handler")
    return job
