"""The `pgqueue` command: happy paths and every bad input, each with a clear message and exit code."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import psycopg
import pytest

from tests.conftest import pgqueue_command, subprocess_environment

# every test here starts the command as a subprocess, a Python start-up each time
pytestmark = pytest.mark.slow


def pgqueue(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command in the test's own directory (see conftest's isolated_environment)."""
    return subprocess.run(
        pgqueue_command(*arguments),
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_environment(**(env or {})),
    )


def test_migrate_enqueue_status_job_cancel_and_retry(empty_dsn: str) -> None:
    first = pgqueue("--dsn", empty_dsn, "migrate")
    assert first.returncode == 0 and "applied migrations: 0001" in first.stdout
    again = pgqueue("--dsn", empty_dsn, "migrate")
    assert again.returncode == 0 and "up to date" in again.stdout

    enqueued = pgqueue(
        "--dsn",
        empty_dsn,
        "enqueue",
        "record",
        "--args",
        '{"n": 5}',
        "--app",
        "tests.sample_app:app",
        "--priority",
        "high",
        "--queue",
        "reports",
        "--max-attempts",
        "3",
    )
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = int(enqueued.stdout.strip())
    later = pgqueue("--dsn", empty_dsn, "enqueue", "anything.at.all", "--delay", "300")
    assert later.returncode == 0, later.stderr  # no --app: any name goes, with a warning
    assert "which no worker has registered (yet)" in later.stderr

    shown = json.loads(pgqueue("--dsn", empty_dsn, "job", str(job_id)).stdout)
    assert (shown["task"], shown["args"], shown["priority"], shown["queue"], shown["max_attempts"]) == (
        "record",
        {"n": 5},
        10,
        "reports",
        3,
    )
    status = json.loads(pgqueue("--dsn", empty_dsn, "status", "--json").stdout)
    assert {(row["queue"], row["state"], row["jobs"]) for row in status["queues"]} == {
        ("reports", "ready", 1),
        ("default", "scheduled", 1),
    }
    assert (status["oldest_ready"]["queue"], status["finished"], status["live_workers"]) == ("reports", 0, 0)
    table = pgqueue("--dsn", empty_dsn, "status").stdout
    assert "reports" in table and "scheduled" in table and "live workers: 0" in table

    cancelled = pgqueue("--dsn", empty_dsn, "cancel", str(job_id))
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    twice = pgqueue("--dsn", empty_dsn, "cancel", str(job_id))
    assert twice.returncode == 1 and "already ended (cancelled): nothing to cancel" in twice.stderr
    requeued = pgqueue("--dsn", empty_dsn, "retry", str(job_id))
    assert requeued.returncode == 0 and "requeued" in requeued.stdout
    missing = pgqueue("--dsn", empty_dsn, "retry", "999999")
    assert missing.returncode == 2 and "no job with id 999999" in missing.stderr


def kill_jobs(connection: psycopg.Connection[Any], count: int) -> None:
    """`count` dead-lettered jobs, and one cancelled job that must stay as it is (`retry_job`
    would requeue it: only the dead letter is redriven)."""
    connection.execute("select pgqueue.enqueue('broken.task') from generate_series(1, %s)", (count,))
    connection.execute(
        "update pgqueue.jobs set state = 'dead', attempt = 3, finished_at = now(),"
        ' errors = \'[{"error": "ValueError: nope"}]\''
    )
    connection.execute("select pgqueue.enqueue('fine.task')")
    connection.execute("update pgqueue.jobs set state = 'cancelled' where task = 'fine.task'")


def test_dead_letter_listing_and_redrive_of_more_than_one_page(
    dsn: str, connection: psycopg.Connection[Any]
) -> None:
    assert "empty" in pgqueue("--dsn", dsn, "dead").stdout
    kill_jobs(connection, 45)  # more than the listing's page of 20
    listing = pgqueue("--dsn", dsn, "dead")
    assert listing.returncode == 0
    assert listing.stdout.count("broken.task") == 20 and "ValueError: nope" in listing.stdout
    redriven = pgqueue("--dsn", dsn, "dead", "--retry-all")
    assert redriven.returncode == 0, redriven.stderr
    assert "requeued 45 job(s)" in redriven.stdout
    states = connection.execute(
        "select task, state::text, attempt, count(*) from pgqueue.jobs group by 1, 2, 3 order by 1"
    ).fetchall()
    assert states == [("broken.task", "queued", 0, 45), ("fine.task", "cancelled", 0, 1)]
    assert "empty" in pgqueue("--dsn", dsn, "dead").stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["enqueue", "record", "--args", "{not json"], "--args is not valid JSON"),
        (["enqueue", "record", "--args", "[1, 2]"], "must be a JSON object"),
        (["enqueue", "record", "--delay", "-5"], "delay"),
        (["enqueue", "record", "--priority", "urgent"], "priority"),
        (["enqueue", "record", "--priority", "99999"], "priority"),
        (["enqueue", "record", "--queue", "bad queue"], "queue"),
        (["enqueue", "record", "--run-at", "tomorrow"], "ISO 8601"),
        (["enqueue", "record", "--run-at", "2030-01-01T00:00:00"], "timezone-aware"),
        (["enqueue", "no.such.task", "--app", "tests.sample_app:app"], "unknown task 'no.such.task'"),
        (["enqueue", "record", "--args", '{"wrong": 1}', "--app", "tests.sample_app:app"], "bad arguments"),
        (["enqueue", "record", "--app", "no_such_module:app"], "cannot import 'no_such_module'"),
        (["enqueue", "record", "--app", "tests.sample_app:nothing"], "is not a pgqueue.App"),
        (["enqueue", "record", "--app", "tests.sample_app"], "module:attribute"),
        (["worker", "tests.sample_app:app", "--queues", "bad queue"], "invalid queue name"),
        (["worker", "tests.sample_app:app", "--concurrency", "0"], "concurrency"),
        (["worker", "tests.sample_app:app", "--poll-interval", "0"], "poll_interval"),
        (["worker", "tests.sample_app:app", "--lease-seconds", "-1"], "lease_seconds"),
        (["dead", "--limit", "-5"], "at least 1"),
        (["job", "zero"], "whole number"),
        (["retry", "0"], "at least 1"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(dsn: str, arguments: list[str], message: str) -> None:
    result = pgqueue("--dsn", dsn, *arguments)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    with psycopg.connect(dsn) as connection:
        row = connection.execute("select count(*) from pgqueue.jobs").fetchone()
    assert row == (0,)  # nothing half-written


def test_bad_dsn_and_unreachable_database(dsn: str) -> None:
    bad = pgqueue("--dsn", "this is not a dsn", "status")
    assert bad.returncode == 2 and "invalid database DSN" in bad.stderr
    from_env = pgqueue("status", env={"PGQUEUE_DSN": "host=127.0.0.1 port=notaport"})
    assert from_env.returncode == 1 and "cannot reach the database" in from_env.stderr
    unreachable = pgqueue("--dsn", "postgresql://postgres@127.0.0.1:1/x", "status")
    assert unreachable.returncode == 1 and "cannot reach the database" in unreachable.stderr
    assert "Traceback" not in bad.stderr + from_env.stderr + unreachable.stderr


def test_commands_on_an_unmigrated_database_say_to_migrate(empty_dsn: str) -> None:
    for arguments in (["status"], ["enqueue", "t"], ["cancel", "1"], ["dead"]):
        result = pgqueue("--dsn", empty_dsn, *arguments)
        assert result.returncode == 2, arguments
        assert "run `pgqueue migrate`" in result.stderr


def test_settings_come_from_the_environment(dsn: str) -> None:
    result = pgqueue("status", "--json", env={"PGQUEUE_DSN": dsn})
    assert result.returncode == 0 and json.loads(result.stdout)["queues"] == []
    bad = pgqueue("status", env={"PGQUEUE_DSN": dsn, "PGQUEUE_CONCURRENCY": "many"})
    assert bad.returncode == 2 and "concurrency" in bad.stderr
