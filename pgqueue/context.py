"""What a running handler can learn about its own job."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class JobContext:
    """The job a handler is running for."""

    id: int
    task: str
    queue: str
    attempt: int
    max_attempts: int
    worker: str


_current: ContextVar[JobContext | None] = ContextVar("pgqueue_job", default=None)


def current_job() -> JobContext:
    """The job the calling handler runs for; raises LookupError outside a handler."""
    job = _current.get()
    if job is None:
        raise LookupError("current_job() is only available inside a pgqueue task handler")
    return job
