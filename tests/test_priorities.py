"""Priorities without starvation: the maintenance leader ages jobs that waited too long."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgqueue import App, ConfigurationError, Settings
from pgqueue.testing import running_worker, wait_for


def test_a_low_priority_job_runs_under_sustained_high_priority_load(
    new_app: Callable[..., App], connection: psycopg.Connection[Any]
) -> None:
    app = new_app(poll_interval=0.1, rescue_interval=0.2, priority_aging=1.0)

    @app.task(name="urgent", priority="HIGH")
    def urgent() -> None:
        time.sleep(0.01)

    @app.task(name="chore", priority="LOW")
    def chore() -> None: ...

    low = chore.enqueue(None)
    # far more urgent work than one slot can do while the test runs: without aging the
    # chore would wait for all of it
    urgent.enqueue_many(None, [{} for _ in range(3000)])
    with running_worker(app, concurrency=1):
        wait_for(lambda: app.get_job(low).state == "succeeded", timeout=30, what="the low-priority job")
        left = connection.execute(
            "select count(*) from pgqueue.jobs where task = 'urgent' and state = 'queued'"
        ).fetchone()
    assert left is not None and left[0] > 1000, "the chore only ran once the urgent backlog was gone"
    # promoted: it shows the priority it ran at
    assert app.get_job(low).priority == 10


def test_without_aging_the_highest_priority_always_goes_first(connection: psycopg.Connection[Any]) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    for priority in (-10, 10):
        connection.execute("select pgqueue.enqueue('t', priority => %s, run_at => %s)", (priority, long_ago))
    # the aging leaves fresh jobs alone, and promotes old ones to the top level only
    assert connection.execute("select pgqueue.age_priorities(interval '2 hours')").fetchone() == (0,)
    assert connection.execute("select pgqueue.age_priorities(interval '30 minutes')").fetchone() == (1,)
    rows = connection.execute("select priority from pgqueue.jobs order by id").fetchall()
    assert rows == [(10,), (10,)]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="must be positive"):
        connection.execute("select pgqueue.age_priorities(interval '-1 second')")


def test_aging_is_a_setting_that_can_be_turned_off(dsn: str) -> None:
    assert Settings(dsn=dsn).priority_aging == 300.0
    assert Settings(dsn=dsn, priority_aging="off").priority_aging is None
    with pytest.raises(ConfigurationError, match="priority_aging"):
        Settings(dsn=dsn, priority_aging=-5)
