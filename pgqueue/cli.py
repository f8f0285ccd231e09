"""The `pgqueue` command: migrate, worker, enqueue, status, health, metrics, cancel, retry,
dead, job, retention, prune, demo."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from pydantic import ValidationError

from . import events, logs, monitoring, queues, roles, schedules, upkeep
from .app import App
from .database import redact
from .errors import ConfigurationError, JobFinishedError, PgQueueError
from .models import describe_validation_error
from .settings import Settings

log = logging.getLogger("pgqueue")

EXIT_ERROR = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    logs.configure(logging.DEBUG if arguments.verbose else logging.INFO, _log_format(arguments))
    try:
        result: int = arguments.handler(arguments)
        return result
    except ValidationError as error:  # pgqueue turns its own into PgQueueError; this is a safety net
        _error(describe_validation_error(error, "invalid input"))
        return EXIT_USAGE
    except PgQueueError as error:
        _error(str(error))
        return EXIT_USAGE
    except psycopg.OperationalError as error:
        _error(f"cannot reach the database: {str(error).strip()}")
        return EXIT_ERROR
    except psycopg.Error as error:
        _error(f"database error: {type(error).__name__}: {str(error).strip()}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (job ids, limits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _log_format(arguments: argparse.Namespace) -> str:
    if arguments.log_format:
        return str(arguments.log_format)
    try:
        return Settings().log_format
    except ConfigurationError:
        return "text"  # the command reports the bad setting itself, in the default format


def _port(text: str) -> int:
    """argparse type: a TCP port (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _error(message: str) -> None:
    print(f"pgqueue: error: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgqueue", description="PostgreSQL-native background jobs for Python."
    )
    parser.add_argument("--dsn", help="database (default: $PGQUEUE_DSN, else an embedded Postgres)")
    parser.add_argument("--data-dir", help="embedded Postgres data directory ($PGQUEUE_DATA_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text, or one JSON object per line ($PGQUEUE_LOG_FORMAT; default text)",
    )

    def usage(_: argparse.Namespace) -> int:
        parser.print_help()
        return EXIT_USAGE

    parser.set_defaults(handler=usage)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    command = commands.add_parser("migrate", help="create or upgrade the pgqueue schema")
    command.set_defaults(handler=_migrate)

    command = commands.add_parser("worker", help="run a worker process")
    command.add_argument("app", nargs="?", help="module:attribute of your App ($PGQUEUE_APP)")
    command.add_argument("-q", "--queues", help="comma-separated queues (default: the app's)")
    command.add_argument("-c", "--concurrency", type=int, help="jobs run at once (default 10)")
    command.add_argument(
        "--no-listen",
        action="store_true",
        help="poll only, no LISTEN/NOTIFY (for PgBouncer transaction pooling)",
    )
    command.add_argument("--poll-interval", type=float, help="seconds between polls when idle")
    command.add_argument("--lease-seconds", type=float, help="lease of a running job")
    command.add_argument("--shutdown-grace", type=float, help="seconds to finish jobs on SIGTERM")
    command.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    command.add_argument(
        "--metrics-port", type=_port, help="serve /metrics and /health on this port ($PGQUEUE_METRICS_PORT)"
    )
    command.set_defaults(handler=_worker)

    command = commands.add_parser("enqueue", help="enqueue a job and print its id")
    command.add_argument("task", help="task name")
    command.add_argument("--args", default="{}", help="arguments as a JSON object")
    command.add_argument("--app", help="module:attribute of your App, to check the task name")
    command.add_argument("--queue")
    command.add_argument("--priority", help="integer or LOW/NORMAL/HIGH/CRITICAL")
    command.add_argument("--delay", type=float, help="seconds from now")
    command.add_argument("--run-at", help="ISO 8601 time with a timezone")
    command.add_argument("--max-attempts", type=int)
    command.add_argument("--timeout", type=float, help="seconds")
    command.add_argument("--unique-key", help="no new job while another job of the task holds this key")
    command.add_argument("--unique-for", type=float, help="seconds the key is held, whatever the job's state")
    command.set_defaults(handler=_enqueue)

    monitoring.add_commands(commands, _settings, _port)
    upkeep.add_commands(commands, _settings)
    queues.add_commands(commands, _settings)
    schedules.add_commands(commands, _settings)
    events.add_commands(commands, _settings)
    roles.add_commands(commands, _settings)

    for name, text in (
        ("cancel", "cancel a job: at once when queued, by stopping its handler when running"),
        ("retry", "requeue a dead or cancelled job"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id", type=_positive_int)
        command.set_defaults(handler=_cancel if name == "cancel" else _retry)

    command = commands.add_parser("job", help="show one job as JSON")
    command.add_argument("job_id", type=_positive_int)
    command.set_defaults(handler=_job)

    command = commands.add_parser("dead", help="list the dead letter (newest first)")
    command.add_argument("--limit", type=_positive_int, default=20, help="jobs listed (default 20)")
    command.add_argument(
        "--retry-all", action="store_true", help="requeue every dead job (not only the listed ones)"
    )
    command.set_defaults(handler=_dead)

    command = commands.add_parser("demo", help="run the quick-start demo end to end")
    command.set_defaults(handler=_demo)
    return parser


# -- helpers ----------------------------------------------------------------------


def _settings(arguments: argparse.Namespace, **overrides: Any) -> Settings:
    given: dict[str, Any] = {"dsn": arguments.dsn, "data_dir": arguments.data_dir, **overrides}
    return Settings(**{key: value for key, value in given.items() if value is not None})


def load_app(path: str | None, settings: Settings) -> App:
    """Import `module:attribute` and return the App found there, with `settings` applied."""
    if not path:
        raise ConfigurationError("name your app as module:attribute (or set PGQUEUE_APP)")
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"app must look like module:attribute, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(f"cannot import {module_name!r}: {error}") from None
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
    if not isinstance(target, App):
        raise ConfigurationError(f"{path!r} is not a pgqueue.App (found {type(target).__name__})")
    merged = {**target.settings.model_dump(exclude_unset=True), **settings.model_dump(exclude_unset=True)}
    target.configure(Settings(**merged))
    return target


def _plain_app(arguments: argparse.Namespace) -> App:
    return App(_settings(arguments))


# -- commands ---------------------------------------------------------------------


def _migrate(arguments: argparse.Namespace) -> int:
    app = _plain_app(arguments)
    applied = app.migrate()
    if applied:
        print(f"applied migrations: {', '.join(f'{version:04d}' for version in applied)}")
    else:
        print("schema up to date")
    return 0


def _worker(arguments: argparse.Namespace) -> int:
    from .worker import Worker

    overrides: dict[str, Any] = {
        "concurrency": arguments.concurrency,
        "poll_interval": arguments.poll_interval,
        "lease_seconds": arguments.lease_seconds,
        "shutdown_grace": arguments.shutdown_grace,
        "queues": arguments.queues,
        "metrics_port": arguments.metrics_port,
    }
    if arguments.no_listen:
        overrides["listen"] = False
    settings = _settings(arguments, **overrides)
    app = load_app(arguments.app or settings.app, settings)
    log.info("database: %s", redact(app.dsn))
    worker = Worker(app, burst=arguments.burst)
    worker.run()
    _exit_now_if_threads_linger()
    return 0


def _exit_now_if_threads_linger() -> None:
    # A sync handler that ignored shutdown keeps its thread; the job was released,
    # so don't let interpreter shutdown wait for it.
    if any(thread.name.startswith("pgqueue-job") for thread in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _enqueue(arguments: argparse.Namespace) -> int:
    settings = _settings(arguments)
    app = (
        load_app(arguments.app or settings.app, settings)
        if (arguments.app or settings.app)
        else App(settings)
    )
    try:
        args = json.loads(arguments.args)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"--args is not valid JSON: {error}") from None
    if not isinstance(args, dict):
        raise ConfigurationError("--args must be a JSON object, e.g. '{\"user_id\": 42}'")
    run_at = None
    if arguments.run_at:
        try:
            run_at = datetime.fromisoformat(arguments.run_at)
        except ValueError:
            raise ConfigurationError(f"--run-at is not an ISO 8601 time: {arguments.run_at!r}") from None
    options = {
        "queue": arguments.queue,
        "priority": arguments.priority,
        "delay": arguments.delay,
        "run_at": run_at,
        "max_attempts": arguments.max_attempts,
        "timeout": arguments.timeout,
        "unique_key": arguments.unique_key,
        "unique_for": arguments.unique_for,
    }
    job = app.prepare(arguments.task, args, **options)
    with app.connect() as connection:
        _check(connection)
        job_id = app.insert(connection, job)
    # the id alone on stdout, as for any job; a duplicate says so on stderr
    print(job_id)
    if job_id.duplicate:
        print(f"job {job_id} holds unique key {arguments.unique_key!r}: no new job", file=sys.stderr)
    return 0


def _check(connection: psycopg.Connection[Any]) -> None:
    from .migrate import check_schema

    check_schema(connection)


def _cancel(arguments: argparse.Namespace) -> int:
    app = _plain_app(arguments)
    with app.connect() as connection:
        _check(connection)
        try:
            state = app.cancel(arguments.job_id, connection)
        except JobFinishedError as error:
            _error(str(error))
            return EXIT_ERROR
    if state == "cancelling":
        print(f"job {arguments.job_id} is running: its worker was asked to stop it")
    else:
        print(f"job {arguments.job_id} cancelled")
    return 0


def _retry(arguments: argparse.Namespace) -> int:
    app = _plain_app(arguments)
    with app.connect() as connection:
        _check(connection)
        done = app.retry(arguments.job_id, connection)
        state = app.get_job(arguments.job_id, connection).state
    if not done:
        _error(f"job {arguments.job_id} is {state}, not dead or cancelled: nothing done")
        return EXIT_ERROR
    print(f"job {arguments.job_id} requeued")
    return 0


def _job(arguments: argparse.Namespace) -> int:
    app = _plain_app(arguments)
    with app.connect() as connection:
        _check(connection)
        job = app.get_job(arguments.job_id, connection)
    print(json.dumps(job.__dict__, indent=2, default=str))
    return 0


def _dead(arguments: argparse.Namespace) -> int:
    from .status import dead_letter, retry_dead_letter

    app = _plain_app(arguments)
    with app.connect() as connection:
        _check(connection)
        rows = dead_letter(connection, arguments.limit)
        if not rows:
            print("the dead letter is empty")
            return 0
        for job_id, task, queue, attempts, finished_at, last_error in rows:
            when = finished_at.isoformat(timespec="seconds") if finished_at else ""
            print(f"{job_id:>8}  {task}  queue={queue} attempts={attempts} {when}\n          {last_error}")
        if arguments.retry_all:
            # every dead job, not only the listed page
            print(f"requeued {retry_dead_letter(connection)} job(s)")
    return 0


def _demo(arguments: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(_settings(arguments))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
