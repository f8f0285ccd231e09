"""Reading and steering one job by id: its state, cancel, redrive, and waiting for its end.

Written once as plans (see pgqueue.plans) for the App's sync and async methods.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal

from .errors import JobFailedError, JobFinishedError, JobNotFoundError
from .models import Job, JobState
from .plans import Plan
from .sql import query


def get_job_plan(job_id: int, *, status_only: bool = False) -> Plan[Job]:
    """The job by id; `status_only`: without its arguments, worker and history (a
    producer's role reads no more: pgqueue.job_status)."""
    rows = yield query("job_status" if status_only else "get_job"), {"id": job_id}
    if not rows:
        raise JobNotFoundError(f"no job with id {job_id}")
    return Job.from_row(rows[0])


CancelState = Literal["cancelled", "cancelling"]


def cancel_plan(job_id: int) -> Plan[CancelState]:
    rows = yield query("cancel"), {"id": job_id}
    state = rows[0][0] if rows else None
    if state is None:
        raise JobNotFoundError(f"no job with id {job_id}")
    if state in ("cancelled", "cancelling"):
        return state  # type: ignore[no-any-return]
    ended = str(state).removeprefix("already ")
    raise JobFinishedError(f"job {job_id} already ended ({ended}): nothing to cancel", job_id, ended)


def wait_pauses(deadline: float | None) -> Iterator[float]:
    """Pauses between looks at a job: 10 ms at first, up to half a second; none past `deadline`."""
    pause = 0.01
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            yield 0.0  # one last look
            return
        yield pause if left is None else min(pause, left)
        pause = min(pause * 1.5, 0.5)


def ended(job: Job) -> Any:
    if job.state == JobState.SUCCEEDED:
        return job.result
    last = job.errors[-1]["error"] if job.errors else "no error recorded"
    message = f"job {job.id} ({job.task}) ended {job.state}: {last}"
    raise JobFailedError(message, job.id, job.state, job.errors)


def retry_plan(job_id: int) -> Plan[bool]:
    rows = yield query("retry_job"), {"id": job_id}
    if rows and rows[0][0]:
        return True
    exists = yield query("job_state"), {"id": job_id}
    if not exists:
        raise JobNotFoundError(f"no job with id {job_id}")
    return False
