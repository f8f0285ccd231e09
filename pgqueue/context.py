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
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidJobError

# A progress report is a small status line, not a result: cap what a handler may send.
MAX_PROGRESS_TEXT = 500


class Cancelled(Exception):
    """Raised by `JobContext.raise_if_cancelled()` once the job was asked to stop; a handler
    may raise it itself too. The job ends `cancelled`, not failed."""


@dataclass(frozen=True)
class JobContext:
    """The job a handler is running for."""

    id: int
    task: str
    queue: str
    attempt: int
    max_attempts: int
    worker: str
    # hands a progress report (job id, attempt, report) to the worker, from any thread;
    # None in a process child
    _report: Callable[[int, int, dict[str, Any]], None] | None = field(
        default=None, repr=False, compare=False
    )
    # "cancel" is set by the worker when a cancel request for this job arrives (a dict, not
    # a threading.Event: this is built for every job, and a flag read across threads is all
    # a handler needs)
    _flags: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """Whether someone asked for this job to stop (`pgqueue cancel`, `app.cancel`)."""
        return "cancel" in self._flags

    def cancel_requested(self) -> bool:
        """`cancelled`, as a method to pass around."""
        return "cancel" in self._flags

    def request_cancel(self) -> None:
        """The worker's side: a cancel request for this job arrived."""
        self._flags["cancel"] = True

    def raise_if_cancelled(self) -> None:
        """Raise `Cancelled` when the job was asked to stop: the check a sync handler makes
        between steps (an async handler is cancelled where it awaits, a process child killed)."""
        if "cancel" in self._flags:
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
