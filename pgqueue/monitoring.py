"""The commands that watch the queue: `status`, `health` and the `metrics` exporter."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from .app import App
from .database import connect, redact, watching
from .settings import Settings

log = logging.getLogger("pgqueue")


def add_commands(commands: Any, settings: Callable[..., Settings], port: Callable[[str], int]) -> None:
    """Add the commands to `pgqueue`'s subparsers; `settings(arguments, **overrides)` builds Settings."""

    def with_settings(handler: Callable[[argparse.Namespace, Settings], int]) -> Callable[..., int]:
        return lambda arguments: handler(arguments, settings(arguments, **_overrides(arguments)))

    command = commands.add_parser("status", help="jobs per queue and state, throughput, errors, workers")
    command.add_argument("--json", action="store_true", help="machine-readable output")
    command.add_argument(
        "--window", type=_seconds, default=300.0, help="seconds of recent history for the rates (300)"
    )
    command.set_defaults(handler=with_settings(_status))

    command = commands.add_parser(
        "health", help="healthy, degraded or critical, with reasons (exit 0, 1 or 2)"
    )
    command.add_argument("--json", action="store_true", help="machine-readable output")
    command.add_argument(
        "--max-ready-age", type=_seconds, help="degraded when a ready job waited longer (300 s)"
    )
    command.add_argument(
        "--dead-window", type=_seconds, help="degraded when jobs died within this many seconds (900)"
    )
    command.set_defaults(handler=with_settings(_health))

    command = commands.add_parser(
        "metrics", help="serve the database's queue metrics for Prometheus (one exporter per database)"
    )
    command.add_argument("--port", type=port, required=True, help="port of /metrics and /health")
    command.add_argument("--host", help="address to listen on (default 127.0.0.1; $PGQUEUE_METRICS_HOST)")
    command.set_defaults(handler=with_settings(_metrics))


def _overrides(arguments: argparse.Namespace) -> dict[str, Any]:
    names = {
        "max_ready_age": "health_max_ready_age",
        "dead_window": "health_dead_window",
        "host": "metrics_host",
    }
    return {
        setting: getattr(arguments, option)
        for option, setting in names.items()
        if getattr(arguments, option, None) is not None
    }


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _status(arguments: argparse.Namespace, settings: Settings) -> int:
    from .migrate import check_schema
    from .status import overview

    app = App(settings)
    with connect(app.dsn, settings.prepared_statements) as connection:
        check_schema(connection)
        with watching(connection):
            seen = overview(connection, arguments.window)
    if arguments.json:
        print(json.dumps(seen.as_json(), indent=2))
        return 0
    if seen.queues:
        print(f"{'queue':<20} {'state':<10} {'jobs':>8}  oldest due")
        for state in seen.queues:
            due = state.oldest_due.isoformat(timespec="seconds") if state.oldest_due else ""
            print(f"{state.queue:<20} {state.state:<10} {state.jobs:>8}  {due}")
    else:
        print("no jobs waiting, running or dead")
    minutes = seen.window_seconds / 60
    errors = f"{seen.error_rate:.1%}" if seen.error_rate is not None else "-"
    run = f"{seen.mean_run_seconds:.3f}s" if seen.mean_run_seconds is not None else "-"
    print(
        f"last {minutes:g} min: {seen.finished} job(s) finished, {seen.throughput_per_minute:.1f}/min, "
        f"error rate {errors}, mean run time {run}; live workers: {seen.live_workers}"
    )
    return 0


def _health(arguments: argparse.Namespace, settings: Settings) -> int:
    from .health import check_health

    app = App(settings)
    verdict = check_health(
        app.dsn,
        max_ready_age=settings.health_max_ready_age,
        dead_window=settings.health_dead_window,
        timeout=settings.connect_timeout,
        prepared=settings.prepared_statements,
    )
    if arguments.json:
        print(json.dumps(verdict.as_json(), indent=2))
    else:
        print(verdict.status)
        for reason in verdict.reasons:
            print(f"  - {reason}")
    return verdict.exit_code


def _metrics(arguments: argparse.Namespace, settings: Settings) -> int:
    from prometheus_client import CollectorRegistry

    from .health import checker
    from .metrics import DatabaseCollector, MetricsServer

    app = App(settings)
    dsn = app.dsn
    registry = CollectorRegistry(auto_describe=True)
    collector = DatabaseCollector(
        dsn, timeout=min(5.0, settings.statement_timeout), prepared=settings.prepared_statements
    )
    registry.register(collector)
    server = MetricsServer(
        registry,
        arguments.port,
        settings.metrics_host,
        health=checker(dsn, settings),
    )
    log.info(
        "exporting the metrics of %s on http://%s:%d/metrics (health on /health)",
        redact(dsn),
        settings.metrics_host,
        server.port,
    )
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.close()
    collector.close()
    log.info("metrics exporter stopped")
    return 0
