"""Periodic jobs: schedules declared in code or added at run time, stored in
`pgqueue.schedules`, and fired by whichever worker sees a tick due first.

    @app.periodic("*/5 * * * *", timezone="Europe/Paris")
    @app.task
    def sync_prices() -> None: ...

Every worker looks for due schedules in each maintenance round, and sleeps until the
next tick when it comes sooner. There is no leader: the tick is enqueued by
`pgqueue.fire_schedule`, a compare-and-set on the schedule's next run (see migration
0014), so only one worker's call enqueues it. The same from SQL
(`pgqueue.pause_schedule`, `resume_schedule`, `remove_schedule`, the table
`pgqueue.schedules`) and from `pgqueue cron list|pause|resume|remove`.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from .connection import is_link_failure
from .errors import ConfigurationError
from .models import NAME_PATTERN, validate_task_name
from .outcomes import describe
from .payloads import encode_json
from .periodic import MISSED, InvalidScheduleError, Missed, Timetable
from .plans import Plan, drive, drive_async
from .producer import MAX_ARGS_BYTES
from .settings import Settings
from .sql import query

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgqueue")

SCHEDULE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
# How many due schedules one pass looks at; the rest wait for the next pass.
PASS_LIMIT = 100
MIN_SLEEP = 0.01


@dataclass(frozen=True)
class Schedule:
    """A periodic job: `task` with `args`, at each tick of `cron` in `timezone`."""

    name: str
    task: str
    cron: str
    timezone: str = "UTC"
    args: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout_seconds: float | None = None
    missed: Missed = "latest"
    max_catch_up: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SCHEDULE_NAME.fullmatch(self.name):
            raise InvalidScheduleError(
                f"schedule names are 1-200 letters, digits, '_', '.', ':' or '-'; got {self.name!r}"
            )
        try:
            validate_task_name(self.task)
        except ConfigurationError as error:
            raise InvalidScheduleError(str(error)) from None
        except ValueError as error:
            raise InvalidScheduleError(f"schedule {self.name!r}: {error}") from None
        Timetable(self.cron, self.timezone)  # raises InvalidScheduleError
        if self.missed not in MISSED:
            raise InvalidScheduleError(f"missed must be one of {', '.join(MISSED)}; got {self.missed!r}")
        if not _integer(self.max_catch_up, 1, 10_000):
            raise InvalidScheduleError(
                f"max_catch_up must be an integer from 1 to 10000, got {self.max_catch_up!r}"
            )
        if self.queue is not None and (
            not isinstance(self.queue, str) or not NAME_PATTERN.fullmatch(self.queue)
        ):
            raise InvalidScheduleError(f"invalid queue name {self.queue!r}")
        if self.priority is not None and not _integer(self.priority, -32768, 32767):
            raise InvalidScheduleError(
                f"priority must be an integer from -32768 to 32767, got {self.priority!r}"
            )
        if self.max_attempts is not None and not _integer(self.max_attempts, 1, 2**31 - 1):
            raise InvalidScheduleError(
                f"max_attempts must be an integer of at least 1, got {self.max_attempts!r}"
            )
        if self.timeout_seconds is not None and not (
            isinstance(self.timeout_seconds, int | float) and 0 < self.timeout_seconds <= 315_360_000
        ):
            raise InvalidScheduleError(
                f"timeout must be positive, at most 10 years, got {self.timeout_seconds!r}"
            )
        if not isinstance(self.args, dict):
            raise InvalidScheduleError(
                f"args must be a dict of keyword arguments, got {type(self.args).__name__}"
            )
        try:
            encode_json(self.args, MAX_ARGS_BYTES)
        except (TypeError, ValueError) as error:
            raise InvalidScheduleError(f"args cannot be stored: {error}") from None

    def params(self, source: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "cron": self.cron,
            "timezone": self.timezone,
            "args": encode_json(self.args, MAX_ARGS_BYTES),
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "timeout_seconds": self.timeout_seconds,
            "missed": self.missed,
            "max_catch_up": self.max_catch_up,
            "source": source,
        }


def _integer(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class ScheduleState:
    """A stored schedule and where it stands."""

    name: str
    task: str
    cron: str
    timezone: str
    paused: bool
    missed: str
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_job_id: int | None
    source: str


@dataclass(frozen=True)
class Fired:
    """One tick a pass enqueued: the schedule, the tick, and its job."""

    schedule: str
    tick: datetime
    job_id: int
    duplicate: bool


# -- plans: one source for sync and async callers, and for the worker ---------------------


def declare_plan(schedules: list[Schedule], source: str) -> Plan[None]:
    for schedule in schedules:
        yield query("declare_schedule"), schedule.params(source)


def _switch_plan(name: str, action: str) -> Plan[bool]:
    rows = yield query(f"{action}_schedule"), {"name": name}
    return bool(rows and rows[0][0])


def list_plan() -> Plan[list[ScheduleState]]:
    rows = yield query("list_schedules"), None
    return [ScheduleState(*row) for row in rows or []]


def fire_plan(now: datetime | None = None) -> Plan[tuple[list[Fired], float | None]]:
    """Enqueue every due tick (per each schedule's missed-tick policy) and plan the next;
    returns what was fired and the seconds until the next tick of any schedule (None:
    there is none). `now` injects the clock (tests); by default the database's."""
    rows = yield query("due_schedules"), {"now": now, "limit": PASS_LIMIT}
    fired: list[Fired] = []
    for name, cron, timezone, missed, max_catch_up, next_run_at, database_now in rows or []:
        try:
            timetable = Timetable(cron, timezone)
        except InvalidScheduleError as error:
            # added from SQL with a bad expression: pause it rather than try on every pass
            log.error("schedule %r paused: %s", name, error)
            yield query("pause_schedule"), {"name": name}
            continue
        ticks = [] if next_run_at is None else timetable.due(next_run_at, database_now, missed, max_catch_up)
        following = timetable.next_after(database_now)
        # the tick's key outlives its job by two periods: long enough that a schedule
        # removed and added back cannot fire that tick again
        window = max(2 * (timetable.next_after(following) - following), timedelta(minutes=1))
        step = {"name": name, "expected": next_run_at, "ticks": ticks, "next": following, "window": window}
        try:
            result = yield query("fire_schedule"), step
        except psycopg.Error as error:
            if is_link_failure(error):
                raise
            # e.g. its queue is full, or its options do not fit the task: say so, move the
            # schedule on past these ticks, and let the other schedules fire
            log.error(
                "schedule %r: could not enqueue tick(s) %s (%s); skipped, next at %s",
                name,
                ", ".join(tick.isoformat() for tick in ticks) or "-",
                describe(error),
                following.isoformat(),
            )
            yield query("fire_schedule"), {**step, "ticks": []}
            continue
        fired += [Fired(name, tick, int(job_id), bool(duplicate)) for tick, job_id, duplicate in result or []]
        if len(ticks) > 1:
            log.info("schedule %r: caught up %d missed tick(s) (missed=%r)", name, len(ticks), missed)
    rows = yield query("next_schedule_in"), {"now": now}
    seconds = rows[0][0] if rows else None
    # never less than a few milliseconds: a tick that is due now is fired by the next pass
    return fired, (None if seconds is None else max(MIN_SLEEP, float(seconds)))


def fire_due_schedules(connection: psycopg.Connection[Any], now: datetime | None = None) -> list[Fired]:
    """Run one firing pass on `connection` (autocommit) as a worker does; for tests and
    for driving schedules without a worker."""
    fired, _ = drive(connection, fire_plan(now))
    return fired


# -- the app's side ---------------------------------------------------------------------


class Schedules:
    """`app.schedules`: add, pause, resume, remove and list schedules at run time (sync and async)."""

    def __init__(self, app: App) -> None:
        self._app = app

    def add(
        self,
        name: str,
        task: str,
        cron: str,
        *,
        timezone: str = "UTC",
        args: dict[str, Any] | None = None,
        missed: Missed = "latest",
        max_catch_up: int = 100,
        queue: str | None = None,
        priority: int | None = None,
        connection: psycopg.Connection[Any] | None = None,
    ) -> None:
        """Add (or replace) a schedule; InvalidScheduleError for a bad expression or option."""
        schedule = Schedule(
            name, task, cron, timezone, args or {}, queue, priority, None, None, missed, max_catch_up
        )
        with self._app._using(connection) as conn:
            drive(conn, declare_plan([schedule], "runtime"))

    async def add_async(
        self,
        name: str,
        task: str,
        cron: str,
        *,
        timezone: str = "UTC",
        args: dict[str, Any] | None = None,
        missed: Missed = "latest",
        max_catch_up: int = 100,
        queue: str | None = None,
        priority: int | None = None,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> None:
        schedule = Schedule(
            name, task, cron, timezone, args or {}, queue, priority, None, None, missed, max_catch_up
        )
        async with self._app._using_async(connection) as conn:
            await drive_async(conn, declare_plan([schedule], "runtime"))

    def pause(self, name: str, connection: psycopg.Connection[Any] | None = None) -> None:
        """No more ticks until resumed; UnknownScheduleError when there is no such schedule."""
        self._switch(name, "pause", connection)

    def resume(self, name: str, connection: psycopg.Connection[Any] | None = None) -> None:
        """Ticks again from now on (ticks missed while paused are not run)."""
        self._switch(name, "resume", connection)

    def remove(self, name: str, connection: psycopg.Connection[Any] | None = None) -> None:
        """Delete the schedule (its jobs stay). A schedule in code comes back at the next
        worker start: remove it from the code too."""
        self._switch(name, "remove", connection)

    def all(self, connection: psycopg.Connection[Any] | None = None) -> list[ScheduleState]:
        with self._app._using(connection) as conn:
            return drive(conn, list_plan())

    async def all_async(self, connection: psycopg.AsyncConnection[Any] | None = None) -> list[ScheduleState]:
        async with self._app._using_async(connection) as conn:
            return await drive_async(conn, list_plan())

    def _switch(self, name: str, action: str, connection: psycopg.Connection[Any] | None) -> None:
        with self._app._using(connection) as conn:
            if not drive(conn, _switch_plan(name, action)):
                raise UnknownScheduleError(f"no schedule named {name!r}")


class UnknownScheduleError(ConfigurationError, LookupError):
    """No schedule has that name."""


def periodic(
    app: App,
    cron: str,
    *,
    name: str | None,
    timezone: str,
    args: dict[str, Any] | None,
    missed: Missed,
    max_catch_up: int,
) -> Callable[[Any], Any]:
    """`App.periodic`'s decorator: declare a schedule of a task (registering a plain
    function as a task first). Checked at once: a bad expression fails the import."""
    from .tasks import Task

    # everything but the task checked now, before the decorated function is registered
    Schedule(
        name or "unnamed",
        "unnamed",
        cron,
        timezone,
        dict(args or {}),
        missed=missed,
        max_catch_up=max_catch_up,
    )

    def declare(target: Any) -> Any:
        task = target if isinstance(target, Task) else app.task(target)
        schedule = Schedule(
            name or task.name,
            task.name,
            cron,
            timezone,
            dict(args or {}),
            missed=missed,
            max_catch_up=max_catch_up,
        )
        if schedule.name in app.periodic_schedules:
            raise InvalidScheduleError(f"a schedule named {schedule.name!r} is already declared")
        app.periodic_schedules[schedule.name] = schedule
        return task

    return declare


# -- the `pgqueue cron` command -----------------------------------------------------------


def add_commands(commands: Any, settings: Callable[..., Settings]) -> None:
    """Add `pgqueue cron list|pause|resume|remove` to `pgqueue`'s subparsers."""
    command = commands.add_parser("cron", help="list, pause, resume or remove periodic jobs")
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every schedule, with its last and next run")
    for action_name, text in (
        ("pause", "no more ticks until resumed"),
        ("resume", "tick again from now on (missed ticks are not run)"),
        ("remove", "delete the schedule (its jobs stay)"),
    ):
        action = actions.add_parser(action_name, help=text)
        action.add_argument("name")
    command.set_defaults(handler=lambda arguments: _cron_command(arguments, settings(arguments)))


def _cron_command(arguments: argparse.Namespace, settings: Settings) -> int:
    from .app import App

    with App(settings) as app, app.connect() as connection:
        if arguments.action != "list":
            app.schedules._switch(arguments.name, arguments.action, connection)
            print(f"schedule {arguments.name} {arguments.action}d")
            return 0
        schedules = app.schedules.all(connection)
    print(f"{'schedule':<24} {'cron':<16} {'time zone':<16} {'state':<7} {'last run':<26} next run")
    for s in schedules:
        print(
            f"{s.name:<24} {s.cron:<16} {s.timezone:<16} {'paused' if s.paused else 'active':<7} "
            f"{_when(s.last_run_at):<26} {_when(s.next_run_at) if not s.paused else '-'}"
        )
    if not schedules:
        print("(no schedules: declare one with @app.periodic, or app.schedules.add)")
    return 0


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.isoformat(timespec="seconds")
