"""How an attempt ends: the exceptions a handler raises to steer its job, and the outcome
the worker records for a handler's return value or exception."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from .context import Cancelled
from .errors import InvalidJobError
from .logs import job_fields
from .models import MAX_DELAY_SECONDS, ClaimedJob
from .payloads import encode_json
from .settings import Settings

log = logging.getLogger("pgqueue")

OutcomeKind = Literal["succeeded", "failed", "retry", "fatal", "released", "deferred", "cancelled", "snoozed"]
# A result is read back by whoever asks for it; beyond this it belongs in a table of its own.
MAX_RESULT_BYTES = 10_000_000


class Retry(Exception):
    """Raise in a handler to retry the job after `delay` seconds (counts as an attempt).

    `raise Retry(delay=30)` or `raise Retry(timedelta(minutes=5), "rate limited")`.
    When no attempts are left the job is dead-lettered like any other failure.
    """

    def __init__(self, delay: float | timedelta = 0.0, reason: str = "retry requested") -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not 0 <= seconds < float("inf"):
            raise InvalidJobError(f"Retry delay must be a non-negative number of seconds, got {delay!r}")
        if seconds > MAX_DELAY_SECONDS:
            raise InvalidJobError(
                f"Retry delay is capped at {MAX_DELAY_SECONDS} seconds (10 years), got {seconds}"
            )
        super().__init__(reason)
        self.delay = seconds
        self.reason = reason

    def __reduce__(self) -> tuple[type[Retry], tuple[float, str]]:
        # process-pool handlers raise it in a child: it must survive pickling intact
        return (Retry, (self.delay, self.reason))


class Snooze(Exception):
    """Raise in a handler to postpone its job by `delay` seconds without spending an attempt
    and without recording an error ("not yet": a resource is busy, a file has not arrived).

    `raise Snooze(60)` or `raise Snooze(timedelta(minutes=5))`. A job may snooze for as long
    as it likes: bound it yourself when that matters.
    """

    def __init__(self, delay: float | timedelta) -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not 0 <= seconds <= MAX_DELAY_SECONDS:
            raise InvalidJobError(
                f"Snooze delay must be 0 to {MAX_DELAY_SECONDS} seconds (10 years), got {delay!r}"
            )
        super().__init__(f"snoozed for {seconds:g}s")
        self.delay = seconds

    def __reduce__(self) -> tuple[type[Snooze], tuple[float]]:
        return (Snooze, (self.delay,))


class Fail(Exception):
    """Raise in a handler to fail the job permanently: no more retries, straight to the dead letter."""


class TimedOut(Exception):
    """The handler outran its timeout and was stopped (or, for a thread, abandoned)."""


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as `pgqueue.complete_jobs` records it."""

    job_id: int
    attempt: int
    kind: OutcomeKind
    result_json: str | None = None
    error: dict[str, Any] | None = None
    retry_in: float | None = None
    # when the handler began and ended, in seconds since the epoch (time.time(): cheaper
    # to take and to send than datetimes); None when it never started
    started_at: float | None = None
    ended_at: float | None = None
    # the job's task, queue and due time, for logs, hooks and metrics (not recorded: the
    # row has them)
    task: str = ""
    queue: str = ""
    due: datetime | None = None


def _never() -> bool:
    return False


async def outcome_of(
    job: ClaimedJob,
    call: Callable[[], Awaitable[Any]],
    releasing: Callable[[], bool],
    cancel_requested: Callable[[], bool] = _never,
) -> Outcome:
    """Run `call` (the handler, with its timeout) and turn what it returns or raises into an Outcome.

    `releasing()` tells whether the worker is handing running jobs back at shutdown,
    which is the one cancellation that is not the attempt's fault. Once
    `cancel_requested()`, whatever failure ends the attempt (the handler's cancellation,
    its own `Cancelled`, a killed child) ends the job `cancelled`; a handler that
    returns a value all the same has done its work, and succeeds.
    """
    try:
        result = await call()
    except BaseException as error:
        outcome = _failed(job, error, releasing)
        if outcome is None:  # a cancellation from outside: ours to end only if asked for
            if not cancel_requested() or releasing():
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return cancelled(job)
        if outcome.kind in ("failed", "retry", "fatal") and cancel_requested():
            return cancelled(job)
        return outcome
    try:
        result_json = encode_json(result, MAX_RESULT_BYTES)
    except (TypeError, ValueError) as error:
        return failure(
            job,
            "fatal",
            "bad_result",
            f"InvalidResultError: the handler's return value cannot be stored: {error}",
        )
    return Outcome(job.id, job.attempt, "succeeded", result_json=result_json)


def cancelled(job: ClaimedJob) -> Outcome:
    return Outcome(
        job.id,
        job.attempt,
        "cancelled",
        error={"kind": "cancelled", "error": "Cancelled: stopped while running", "traceback": None},
    )


def _failed(job: ClaimedJob, error: BaseException, releasing: Callable[[], bool]) -> Outcome | None:
    """The outcome of a handler that raised `error` (called while it is being handled, so
    its traceback is at hand); None for a cancellation that came from outside the job."""
    if isinstance(error, Snooze):
        return Outcome(job.id, job.attempt, "snoozed", retry_in=error.delay)
    if isinstance(error, Cancelled):
        return cancelled(job)
    if isinstance(error, Retry):
        return failure(job, "retry", "retry", f"Retry: {error.reason}", retry_in=error.delay)
    if isinstance(error, Fail):
        return failure(job, "fatal", "fail", describe(error), traceback.format_exc())
    if isinstance(error, TimedOut):
        return failure(
            job,
            "failed",
            "timeout",
            f"TimeoutError: job ran longer than its timeout of {job.timeout_seconds:g}s and was stopped",
        )
    if isinstance(error, asyncio.CancelledError):
        current = asyncio.current_task()
        if current is not None and current.cancelling() == 0 and not releasing():
            # the handler's own await was cancelled (not this job): a failed attempt
            return failure(job, "failed", "exception", "CancelledError", traceback.format_exc())
        if releasing():
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
        return None
    # SystemExit or KeyboardInterrupt from a handler fails its attempt, not the worker
    return failure(job, "failed", "exception", describe(error), traceback.format_exc())


def failure(
    job: ClaimedJob,
    kind: OutcomeKind,
    error_kind: str,
    message: str,
    trace: str | None = None,
    retry_in: float | None = None,
) -> Outcome:
    """A failed attempt of `job`, logged (but for a requested retry)."""
    if kind != "retry":
        log.warning(
            "job %d %s (queue %s) attempt %d/%d failed: %s",
            job.id,
            job.task,
            job.queue,
            job.attempt,
            job.max_attempts,
            message,
            extra=job_fields(job, outcome=kind),
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


def describe(error: BaseException) -> str:
    """`Type: message`, or just `Type` when the message is empty."""
    text = str(error)
    if isinstance(getattr(error, "type_name", None), str):
        return text  # a process child's exception that travelled as tasks.ChildError: its own type

    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def hand_back(job: ClaimedJob, settings: Settings, kind: str, message: str) -> Outcome:
    """A job this worker cannot run (its task is unknown here, its arguments do not fit)
    goes back for one that can (a rolling deploy, a queue shared by two apps): the attempt
    does not count. Handed back this way for longer than `unknown_task_timeout`, it is
    dead-lettered by `complete_jobs`."""
    log.warning(
        "job %d %s (queue %s) handed back (in %gs, for a worker that can run it; dead-lettered if none "
        "has after %gs): %s",
        job.id,
        job.task,
        job.queue,
        settings.handback_delay,
        settings.unknown_task_timeout,
        message,
        extra=job_fields(job, outcome="handed_back"),
    )
    error = {
        "kind": kind,
        "error": message,
        "traceback": None,
        "give_up_after": settings.unknown_task_timeout,
    }
    return Outcome(job.id, job.attempt, "deferred", error=error, retry_in=settings.handback_delay)
