"""The commands that keep history in bounds: `pgqueue retention` and `pgqueue prune`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import psycopg

from .app import App
from .errors import ConfigurationError
from .settings import Settings
from .sql import query

FINAL_STATES = ("succeeded", "dead", "cancelled")


def add_commands(commands: Any, settings: Callable[..., Settings]) -> None:
    """Add the commands to `pgqueue`'s subparsers; `settings(arguments)` builds Settings."""

    def with_settings(handler: Callable[[argparse.Namespace, Settings], int]) -> Callable[..., int]:
        return lambda arguments: handler(arguments, settings(arguments))

    command = commands.add_parser(
        "retention", help="show, or set, how long finished jobs are kept (per state, per queue)"
    )
    command.add_argument("state", nargs="?", choices=FINAL_STATES, help="the final state to set")
    command.add_argument(
        "keep",
        nargs="?",
        help="a PostgreSQL interval ('36 hours', '7 days'), 'forever', or with --queue 'default'"
        " (the queue follows the state's default again)",
    )
    command.add_argument("--queue", default="*", help="only this queue (default: every queue, '*')")
    command.set_defaults(handler=with_settings(_retention))

    command = commands.add_parser("prune", help="remove finished jobs past their retention now")
    command.add_argument("--dry-run", action="store_true", help="count them, remove nothing")
    command.set_defaults(handler=with_settings(_prune))


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    from .migrate import check_schema

    connection = App(settings).connect()
    check_schema(connection)
    return connection


def _retention(arguments: argparse.Namespace, settings: Settings) -> int:
    if (arguments.state is None) != (arguments.keep is None):
        raise ConfigurationError("give both a state and how long to keep it, or neither to list")
    with _connect(settings) as connection:
        if arguments.state is not None and arguments.keep.strip().lower() == "default":
            if arguments.queue == "*":
                raise ConfigurationError("'default' removes a queue's own retention: give --queue")
            row = connection.execute(
                query("clear_retention"), {"state": arguments.state, "queue": arguments.queue}
            ).fetchone()
            if not (row and row[0]):
                print(f"queue {arguments.queue} had no retention of its own for {arguments.state} jobs")
        elif arguments.state is not None:
            keep = None if arguments.keep.strip().lower() == "forever" else arguments.keep
            try:
                connection.execute(
                    query("set_retention"),
                    {"state": arguments.state, "keep": keep, "queue": arguments.queue},
                )
            except psycopg.DataError as error:  # not an interval, negative, out of range
                reason = str(error).strip().splitlines()[0]
                raise ConfigurationError(f"cannot keep {arguments.keep!r}: {reason}") from None
        rows = connection.execute(query("retention")).fetchall()
    print(f"{'state':<10} {'queue':<20} keep")
    for state, queue, keep in rows:
        print(f"{state:<10} {queue:<20} {keep if keep is not None else 'forever'}")
    return 0


def _prune(arguments: argparse.Namespace, settings: Settings) -> int:
    from .maintenance.pruning import prune_now

    with _connect(settings) as connection:
        removed = prune_now(connection, dry_run=arguments.dry_run)
    verb = "would remove" if arguments.dry_run else "removed"
    if not removed:
        print(f"{verb} 0 jobs: nothing is past its retention")
    for state, queue, jobs in removed:
        policy = "every queue" if queue == "*" else f"queue {queue}"
        print(f"{verb} {jobs} {state} job(s) ({policy})")
    return 0
