"""Lifecycle hooks: what metrics, events and users' own code plug into.

    @app.hooks.on(pgqueue.JobFinished)
    def count(event: pgqueue.JobFinished) -> None:
        finished[event.outcome.kind] += 1

Handlers are plain functions called on the worker's event loop, in the order they
were added: keep them quick (count, log, put on a queue) and hand slow work to
something else. A handler that raises is logged and never breaks the worker or the
handlers after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .models import ClaimedJob
from .outcomes import Outcome

log = logging.getLogger("pgqueue")


@dataclass(frozen=True)
class WorkerStarted:
    """A worker passed its schema check and starts claiming."""

    worker: str
    queues: tuple[str, ...]
    concurrency: int


@dataclass(frozen=True)
class WorkerStopped:
    """A worker finished its shutdown."""

    worker: str
    jobs_done: int


@dataclass(frozen=True)
class JobStarted:
    """A claimed job's handler is about to run; `waited` is seconds from its due time to now."""

    worker: str
    job: ClaimedJob
    waited: float


@dataclass(frozen=True)
class JobFinished:
    """A handler returned or raised (or its job was released); the outcome is not stored yet."""

    worker: str
    job: ClaimedJob
    outcome: Outcome
    seconds: float


@dataclass(frozen=True)
class JobProgress:
    """A handler reported progress; it is stored with the worker's next flush."""

    worker: str
    job_id: int
    attempt: int
    progress: Mapping[str, Any]


@dataclass(frozen=True)
class OutcomesFlushed:
    """One `complete_jobs` call returned: `recorded` of `outcomes` were stored (the rest had
    lost their lease), in `seconds`."""

    worker: str
    outcomes: Sequence[Outcome]
    recorded: int
    seconds: float
    # the state each recorded job is in now ("succeeded", "queued" for a retry or a
    # hand-back, "dead"), by job id; a job missing here had lost its lease
    states: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobRescued:
    """A job whose lease expired was requeued (`state` "queued") or dead-lettered ("dead")."""

    worker: str
    job_id: int
    state: str


@dataclass(frozen=True)
class JobsClaimed:
    """One claim call returned these `jobs` (none too) in `seconds`."""

    worker: str
    jobs: Sequence[ClaimedJob]
    seconds: float


@dataclass(frozen=True)
class QueuesEmpty:
    """A worker's claim found nothing due in its queues after it had found jobs: its
    backlog is drained (jobs may still be running, or scheduled for later)."""

    worker: str
    queues: tuple[str, ...]


@dataclass(frozen=True)
class EnqueueRefused:
    """A producer's enqueue was refused because the queue is full (QueueFull was raised)."""

    queue: str
    depth: int
    max_depth: int


@dataclass(frozen=True)
class Connected:
    """One of the worker's connections (`role`: claim, complete, heartbeat, maintenance,
    listen) was opened; `reconnect` when it replaces one that was lost."""

    worker: str
    role: str
    reconnect: bool


Event = (
    WorkerStarted
    | WorkerStopped
    | JobStarted
    | JobFinished
    | JobProgress
    | OutcomesFlushed
    | JobRescued
    | JobsClaimed
    | QueuesEmpty
    | EnqueueRefused
    | Connected
)
E = TypeVar(
    "E",
    WorkerStarted,
    WorkerStopped,
    JobStarted,
    JobFinished,
    JobProgress,
    OutcomesFlushed,
    JobRescued,
    JobsClaimed,
    QueuesEmpty,
    EnqueueRefused,
    Connected,
)


class Hooks:
    """The handlers of each kind of event."""

    def __init__(self) -> None:
        self._handlers: dict[type[Any], list[Callable[[Any], None]]] = {}

    def on(self, event: type[E]) -> Callable[[Callable[[E], None]], Callable[[E], None]]:
        """Decorator: call the function with every event of this type."""

        def register(handler: Callable[[E], None]) -> Callable[[E], None]:
            self.add(event, handler)
            return handler

        return register

    def add(self, event: type[E], handler: Callable[[E], None]) -> None:
        self._handlers.setdefault(event, []).append(handler)

    def remove(self, event: type[E], handler: Callable[[E], None]) -> None:
        self._handlers.get(event, []).remove(handler)

    def wants(self, event: type[Any]) -> bool:
        """Whether anyone listens: lets the hot path skip building an event nobody reads."""
        return bool(self._handlers.get(event))

    def emit(self, event: Event) -> None:
        for handler in self._handlers.get(type(event), ()):
            try:
                handler(event)
            except Exception:
                log.exception("a %s hook (%r) failed", type(event).__name__, handler)
