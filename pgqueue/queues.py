"""Queue controls shared by every worker: pause and resume, a limit of jobs running at once
across all workers, and a rate limit (jobs started per second across all workers).

They live in `pgqueue.queues` and the claim statement enforces them (0010), so they hold
for workers on every machine and reach each one at its next claim, without a restart.
The same from SQL: `pgqueue.pause_queue`, `resume_queue`, `limit_queue`, and the view
`pgqueue.queue_controls`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigurationError, UnknownQueueError
from .models import NAME_PATTERN
from .plans import Plan, drive, drive_async
from .settings import Settings
from .sql import query

if TYPE_CHECKING:
    from .app import App


@dataclass(frozen=True)
class QueueControl:
    """A queue's controls, and how many of its jobs run now."""

    queue: str
    paused: bool
    max_running: int | None
    rate_per_second: float | None
    burst: int | None
    running: int
    max_depth: int | None = None
    max_per_worker: int | None = None


class QueueLimits(BaseModel):
    """Limits of a queue; None lifts a limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue: str
    max_running: int | None = Field(default=None, ge=1)
    rate_per_second: float | None = Field(default=None, gt=0, le=1_000_000, allow_inf_nan=False)
    burst: int | None = Field(default=None, ge=1)
    max_depth: int | None = Field(default=None, ge=1)
    max_per_worker: int | None = Field(default=None, ge=1)

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"not a queue name: {value!r}")
        return value

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> QueueLimits:
        if self.burst is not None and self.rate_per_second is None:
            raise ValueError("burst goes with a rate: give rate_per_second too")
        return self


def _checked(**fields: Any) -> QueueLimits:
    try:
        return QueueLimits(**fields)
    except ValidationError as error:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'limits'}: {e['msg']}" for e in error.errors())
        raise ConfigurationError(f"invalid queue control: {reasons}") from None


@contextlib.contextmanager
def _typed_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.InvalidParameterValue as error:
        message = (error.diag.message_primary or str(error)).strip()
        if "no queue named" in message:
            raise UnknownQueueError(message) from None
        raise ConfigurationError(message) from None


def _pause_plan(queue: str, paused: bool) -> Plan[None]:
    yield query("pause_queue" if paused else "resume_queue"), {"queue": queue}


def _limit_plan(limits: QueueLimits) -> Plan[None]:
    yield query("limit_queue"), limits.model_dump()


def _list_plan() -> Plan[list[QueueControl]]:
    rows = yield query("queue_controls"), None
    return [
        QueueControl(str(q), bool(p), m, float(r) if r is not None else None, b, int(n), d, w)
        for q, p, m, r, b, n, d, w in rows or []
    ]


class QueueControls:
    """`app.controls`: pause, resume and limit queues for every worker (sync and async)."""

    def __init__(self, app: App) -> None:
        self._app = app

    def pause(self, queue: str, connection: psycopg.Connection[Any] | None = None) -> None:
        """Stop every worker claiming jobs of `queue` (jobs running now finish); UnknownQueueError
        for a name no job, task or live worker has."""
        self._run(_pause_plan(_checked(queue=queue).queue, True), connection)

    def resume(self, queue: str, connection: psycopg.Connection[Any] | None = None) -> None:
        """Let workers claim from `queue` again, and wake the idle ones."""
        self._run(_pause_plan(_checked(queue=queue).queue, False), connection)

    def limit(
        self,
        queue: str,
        *,
        max_running: int | None = None,
        rate_per_second: float | None = None,
        burst: int | None = None,
        max_depth: int | None = None,
        max_per_worker: int | None = None,
        connection: psycopg.Connection[Any] | None = None,
    ) -> None:
        """At most `max_running` jobs of `queue` running at once, and `rate_per_second` started
        per second (bursts up to `burst`, default one second's worth), across all workers;
        at most `max_depth` waiting (an enqueue past it raises QueueFull); at most
        `max_per_worker` running in each worker. None lifts that limit; each worker applies
        the new limits at its next claim."""
        limits = _checked(
            queue=queue,
            max_running=max_running,
            rate_per_second=rate_per_second,
            burst=burst,
            max_depth=max_depth,
            max_per_worker=max_per_worker,
        )
        self._run(_limit_plan(limits), connection)

    def all(self, connection: psycopg.Connection[Any] | None = None) -> list[QueueControl]:
        """The queues with controls."""
        with _typed_errors(), self._app._using(connection) as conn:
            return drive(conn, _list_plan())

    async def pause_async(self, queue: str, connection: psycopg.AsyncConnection[Any] | None = None) -> None:
        await self._run_async(_pause_plan(_checked(queue=queue).queue, True), connection)

    async def resume_async(self, queue: str, connection: psycopg.AsyncConnection[Any] | None = None) -> None:
        await self._run_async(_pause_plan(_checked(queue=queue).queue, False), connection)

    async def limit_async(
        self,
        queue: str,
        *,
        max_running: int | None = None,
        rate_per_second: float | None = None,
        burst: int | None = None,
        max_depth: int | None = None,
        max_per_worker: int | None = None,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> None:
        limits = _checked(
            queue=queue,
            max_running=max_running,
            rate_per_second=rate_per_second,
            burst=burst,
            max_depth=max_depth,
            max_per_worker=max_per_worker,
        )
        await self._run_async(_limit_plan(limits), connection)

    async def all_async(self, connection: psycopg.AsyncConnection[Any] | None = None) -> list[QueueControl]:
        async with self._app._using_async(connection) as conn:
            return await drive_async(conn, _list_plan())

    def _run(self, plan: Plan[None], connection: psycopg.Connection[Any] | None) -> None:
        with _typed_errors(), self._app._using(connection) as conn:
            drive(conn, plan)

    async def _run_async(self, plan: Plan[None], connection: psycopg.AsyncConnection[Any] | None) -> None:
        with _typed_errors():
            async with self._app._using_async(connection) as conn:
                await drive_async(conn, plan)


# -- the `pgqueue queue` command ---------------------------------------------------------------


def add_commands(commands: Any, settings: Callable[..., Settings]) -> None:
    """Add `pgqueue queue pause|resume|limit|list` to `pgqueue`'s subparsers."""
    command = commands.add_parser("queue", help="pause, resume or limit a queue for every worker")
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("pause", "stop every worker claiming the queue's jobs"),
        ("resume", "let workers claim the queue's jobs again"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("queue")
    action = actions.add_parser(
        "limit", help="limit the queue's running jobs and start rate, across all workers"
    )
    action.add_argument("queue")
    action.add_argument("--max-running", type=_optional(int), default=None, help="N, or 'none' (the default)")
    action.add_argument("--rate", type=_optional(float), default=None, help="jobs per second, or 'none'")
    action.add_argument(
        "--burst", type=int, default=None, help="jobs at once within the rate (default: 1 s worth)"
    )
    action.add_argument(
        "--max-depth",
        type=_optional(int),
        default=None,
        help="jobs waiting at most (past it, enqueue: QueueFull)",
    )
    action.add_argument(
        "--max-per-worker",
        type=_optional(int),
        default=None,
        help="jobs running at most in each worker, or 'none'",
    )
    actions.add_parser("list", help="the queues with controls")
    command.set_defaults(handler=lambda arguments: _queue_command(arguments, settings(arguments)))


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _queue_command(arguments: argparse.Namespace, settings: Settings) -> int:
    from .app import App

    with App(settings) as app, app.connect() as connection:
        if arguments.action == "pause":
            app.controls.pause(arguments.queue, connection)
        elif arguments.action == "resume":
            app.controls.resume(arguments.queue, connection)
        elif arguments.action == "limit":
            app.controls.limit(
                arguments.queue,
                max_running=arguments.max_running,
                rate_per_second=arguments.rate,
                burst=arguments.burst,
                max_depth=arguments.max_depth,
                max_per_worker=arguments.max_per_worker,
                connection=connection,
            )
        controls = app.controls.all(connection)
    print(
        f"{'queue':<20} {'paused':<7} {'max running':<12} {'rate/s':<10} {'burst':<6} "
        f"{'running':<8} {'max depth':<10} max per worker"
    )
    for control in controls:
        print(
            f"{control.queue:<20} {'yes' if control.paused else 'no':<7} "
            f"{_shown(control.max_running):<12} {_shown(control.rate_per_second):<10} "
            f"{_shown(control.burst):<6} {control.running:<8} {_shown(control.max_depth):<10} "
            f"{_shown(control.max_per_worker)}"
        )
    if not controls:
        print("(no queue has controls: every queue runs unpaused and unlimited)")
    return 0


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
