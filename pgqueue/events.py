"""The lifecycle event stream: LISTEN on pgqueue_events (see migration 0015 for the events).

    app.enable_events()                      # once per database (`pgqueue events on`)
    with app.subscribe() as events:
        job = report.enqueue(None, day="2026-11-29")
        done = events.wait_for(job, "succeeded", "dead", "cancelled", timeout=60)

Each subscription is one connection of its own, LISTENing; events are sent as their
transaction commits, by whichever process wrote them. A subscriber sees what happens
after it subscribed, and nothing while its connection is down: it is for watching and
for tests that wait on events instead of sleeping, not a log (the jobs table is that).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from .errors import ConfigurationError, DatabaseUnavailableError
from .pooling import looks_pooled

CHANNEL = "pgqueue_events"
ENDED = ("succeeded", "dead", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    """One change of a job's life: `event` is enqueued, started, progress, retrying,
    rescued, requeued, succeeded, dead or cancelled."""

    event: str
    job: int
    queue: str | None = None
    task: str | None = None
    attempt: int | None = None
    state: str | None = None
    progress: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        """An attempt failed: another comes (retrying) or none (dead)."""
        return self.event in ("retrying", "dead")

    @classmethod
    def parse(cls, payload: str) -> JobEvent | None:
        try:
            data = json.loads(payload)
            return cls(
                str(data["event"]),
                int(data["job"]),
                data.get("queue"),
                data.get("task"),
                data.get("attempt"),
                data.get("state"),
                data.get("progress"),
            )
        except (ValueError, KeyError, TypeError):
            return None  # not ours: someone else NOTIFYing on the channel


def _pooled() -> ConfigurationError:
    return ConfigurationError(
        "cannot subscribe to events through a connection pooler: a transaction pooler "
        "(PgBouncer) hands LISTEN to a server connection other clients then use; set "
        "PGQUEUE_LISTEN_DSN to a direct connection to the server (or to the pooler in session mode)"
    )


class EventStream:
    """A subscription (sync): iterate for events, or `wait_for` one. Close it when done."""

    def __init__(self, dsn: str, connect_timeout: float = 5.0, *, direct: bool = False) -> None:
        try:
            self._connection = psycopg.connect(
                dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout))
            )
        except psycopg.OperationalError as error:
            raise DatabaseUnavailableError(f"cannot subscribe to events: {error}") from error
        if not direct and looks_pooled(self._connection):
            self._connection.close()
            raise _pooled()
        self._connection.execute(f"listen {CHANNEL}")

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def events(self, timeout: float | None = None) -> Iterator[JobEvent]:
        """Events as they come; ends after `timeout` seconds without one (None: never)."""
        while True:
            got = False
            for notification in self._connection.notifies(timeout=timeout, stop_after=1):
                got = True  # even a payload that is not ours: the wait was not in vain
                event = JobEvent.parse(notification.payload)
                if event is not None:
                    yield event
            if not got and timeout is not None:
                return

    def wait_for(self, job_id: int, *events: str, timeout: float = 30.0) -> JobEvent:
        """The first event of job `job_id` among `events` (default: it ended); TimeoutError."""
        wanted = events or ENDED
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for event in self.events(timeout=left):
                if event.job == job_id and event.event in wanted:
                    return event
                if time.monotonic() >= deadline:
                    break
        raise TimeoutError(f"no {'/'.join(wanted)} event for job {job_id} within {timeout:g}s")


class AsyncEventStream:
    """The async twin of EventStream."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection

    @classmethod
    async def connect(
        cls, dsn: str, connect_timeout: float = 5.0, *, direct: bool = False
    ) -> AsyncEventStream:
        try:
            connection = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout))
            )
        except psycopg.OperationalError as error:
            raise DatabaseUnavailableError(f"cannot subscribe to events: {error}") from error
        if not direct and looks_pooled(connection):
            await connection.close()
            raise _pooled()
        await connection.execute(f"listen {CHANNEL}")
        return cls(connection)

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._connection.close()

    async def events(self, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        while True:
            got = False
            async for notification in self._connection.notifies(timeout=timeout, stop_after=1):
                got = True
                event = JobEvent.parse(notification.payload)
                if event is not None:
                    yield event
            if not got and timeout is not None:
                return

    async def wait_for(self, job_id: int, *events: str, timeout: float = 30.0) -> JobEvent:
        wanted = events or ENDED
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            async for event in self.events(timeout=left):
                if event.job == job_id and event.event in wanted:
                    return event
                if time.monotonic() >= deadline:
                    break
        raise TimeoutError(f"no {'/'.join(wanted)} event for job {job_id} within {timeout:g}s")


def set_events(connection: psycopg.Connection[Any], on: bool) -> bool:
    """Turn the stream on or off for the database (adds or drops its triggers); whether
    that changed anything. Needs the right to create triggers on pgqueue's tables."""
    row = connection.execute(f"select pgqueue.{'enable' if on else 'disable'}_events()").fetchone()
    return bool(row and row[0])


def events_enabled(connection: psycopg.Connection[Any]) -> bool:
    row = connection.execute("select pgqueue.events_enabled()").fetchone()
    return bool(row and row[0])


# -- the `pgqueue events` command ----------------------------------------------------------


def add_commands(commands: Any, settings: Any) -> None:
    """Add `pgqueue events on|off|status|tail` to `pgqueue`'s subparsers."""
    command = commands.add_parser("events", help="the lifecycle event stream: turn it on or off, or watch it")
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("on", help="send an event (NOTIFY pgqueue_events) for every change of every job")
    actions.add_parser("off", help="stop sending events")
    actions.add_parser("status", help="whether events are on")
    tail = actions.add_parser("tail", help="print events as they come, one JSON object per line")
    tail.add_argument("--seconds", type=float, default=None, help="stop after this long without an event")
    command.set_defaults(handler=lambda arguments: _events_command(arguments, settings(arguments)))


def _events_command(arguments: Any, settings: Any) -> int:
    from dataclasses import asdict

    from .app import App

    with App(settings) as app:
        if arguments.action == "tail":
            with app.subscribe() as stream:
                for event in stream.events(timeout=arguments.seconds):
                    print(json.dumps({k: v for k, v in asdict(event).items() if v is not None}), flush=True)
            return 0
        with app.connect() as connection:
            if arguments.action in ("on", "off"):
                set_events(connection, arguments.action == "on")
            enabled = events_enabled(connection)
    print(f"events are {'on' if enabled else 'off'}")
    return 0
