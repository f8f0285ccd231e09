"""Periodic jobs: ticks fire exactly once across workers (an injected clock, then real
worker processes and a restart), the missed-tick policies, and every bad input."""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgqueue import App, InvalidScheduleError, UnknownScheduleError
from pgqueue.schedules import fire_due_schedules
from pgqueue.testing import wait_for
from tests.conftest import pgqueue_command, subprocess_environment
from tests.processes import WorkerProcesses

PERIODIC = "tests.periodic_app:app"
T0 = datetime(2030, 1, 7, 12, 0, tzinfo=UTC)  # a Monday, noon


def cron_jobs(connection: psycopg.Connection[Any], schedule: str) -> list[str]:
    """The tick keys of the schedule's jobs, in tick order."""
    rows = connection.execute(
        "select key from pgqueue.job_keys where key like %s order by key", (f"cron:{schedule}:%",)
    ).fetchall()
    return [str(key).removeprefix(f"cron:{schedule}:") for (key,) in rows]


def jobs_of(connection: psycopg.Connection[Any], task: str) -> int:
    row = connection.execute("select count(*) from pgqueue.jobs where task = %s", (task,)).fetchone()
    return int(row[0]) if row else 0


def test_each_tick_fires_once_with_four_workers_racing_on_an_injected_clock(
    app: App, dsn: str, connection: psycopg.Connection[Any]
) -> None:
    app.schedules.add("minutely", "report", "* * * * *")
    fire_due_schedules(connection, now=T0)  # the first pass plans: next tick T0 + 1 min
    assert fire_due_schedules(connection, now=T0) == []
    ticks, racers = 120, 4
    barrier = threading.Barrier(racers)
    fired: list[list[Any]] = [[] for _ in range(racers)]
    failures: list[BaseException] = []

    def race(index: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                for minute in range(1, ticks + 1):
                    barrier.wait(timeout=30)  # all four see the tick due at the same moment
                    fired[index] += fire_due_schedules(own, now=T0 + timedelta(minutes=minute, seconds=1))
        except BaseException as error:
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=race, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    everything = [f for each in fired for f in each]
    # every tick once, none twice, none skipped; and the work was shared, not one winner
    assert sorted(f.tick for f in everything) == [T0 + timedelta(minutes=m) for m in range(1, ticks + 1)]
    assert not any(f.duplicate for f in everything)
    assert jobs_of(connection, "report") == ticks
    assert len(cron_jobs(connection, "minutely")) == ticks
    assert sum(1 for each in fired if each) >= 2


@pytest.mark.parametrize(
    ("missed", "expected"),
    [("latest", ["12:30"]), ("all", ["12:05", "12:10", "12:15", "12:20", "12:25", "12:30"]), ("skip", [])],
)
def test_ticks_missed_while_no_worker_ran_follow_the_policy(
    app: App, connection: psycopg.Connection[Any], missed: Any, expected: list[str]
) -> None:
    app.schedules.add("gap", "report", "*/5 * * * *", missed=missed)
    fire_due_schedules(connection, now=T0)
    # nobody fired anything for half an hour (every worker down); a pass at 12:33, so
    # even the latest tick is three minutes late
    fired = fire_due_schedules(connection, now=T0 + timedelta(minutes=33))
    assert [f.tick.strftime("%H:%M") for f in fired] == expected
    # then on time again, whatever the policy
    again = fire_due_schedules(connection, now=T0 + timedelta(minutes=35, seconds=5))
    assert [f.tick.strftime("%H:%M") for f in again] == ["12:35"]


def test_all_catches_up_at_most_max_catch_up_ticks(app: App, connection: psycopg.Connection[Any]) -> None:
    app.schedules.add("capped", "report", "* * * * *", missed="all", max_catch_up=5)
    fire_due_schedules(connection, now=T0)
    fired = fire_due_schedules(connection, now=T0 + timedelta(hours=3))
    assert [f.tick.strftime("%H:%M") for f in fired] == ["14:56", "14:57", "14:58", "14:59", "15:00"]


def test_a_time_zone_and_daylight_saving(app: App, connection: psycopg.Connection[Any]) -> None:
    # 02:30 every day in Paris: on the day clocks go forward (29 March 2026) 02:30 does
    # not exist, and cron runs it at 03:00 local
    app.schedules.add("paris", "report", "30 2 * * *", timezone="Europe/Paris")
    before = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)
    fire_due_schedules(connection, now=before)
    fired = [
        f.tick for day in (1, 2, 3) for f in fire_due_schedules(connection, now=before + timedelta(days=day))
    ]
    assert [tick.isoformat() for tick in fired] == [
        "2026-03-28T01:30:00+00:00",  # 02:30 CET
        "2026-03-29T01:00:00+00:00",  # 03:00 CEST: the skipped hour
        "2026-03-30T00:30:00+00:00",  # 02:30 CEST
    ]


def test_pause_resume_remove_and_list(app: App, connection: psycopg.Connection[Any]) -> None:
    app.schedules.add("nightly", "report", "@daily", args={"kind": "full"})
    fire_due_schedules(connection, now=T0)
    app.schedules.pause("nightly")
    assert fire_due_schedules(connection, now=T0 + timedelta(days=3)) == []
    (state,) = app.schedules.all()
    assert state.paused and state.cron == "@daily" and state.source == "runtime"
    app.schedules.resume("nightly")
    # resumed: planned afresh, the paused days are not run
    assert fire_due_schedules(connection, now=T0 + timedelta(days=3)) == []
    fired = fire_due_schedules(connection, now=T0 + timedelta(days=4))
    assert len(fired) == 1
    args = connection.execute("select args from pgqueue.jobs where id = %s", (fired[0].job_id,)).fetchone()
    assert args == ({"kind": "full"},)
    # the same from SQL
    assert connection.execute("select pgqueue.pause_schedule('nightly')").fetchone() == (True,)
    assert connection.execute("select pgqueue.resume_schedule('nightly')").fetchone() == (True,)
    assert connection.execute("select pgqueue.remove_schedule('nightly')").fetchone() == (True,)
    assert connection.execute("select pgqueue.remove_schedule('nightly')").fetchone() == (None,)
    assert app.schedules.all() == []
    with pytest.raises(UnknownScheduleError, match="no schedule named 'nightly'"):
        app.schedules.pause("nightly")


def test_a_schedule_added_in_sql_with_a_bad_expression_is_paused_not_retried(
    connection: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    connection.execute("select pgqueue.declare_schedule('broken', 'report', '99 * * * *')")
    assert fire_due_schedules(connection, now=T0) == []
    assert "schedule 'broken' paused: bad cron expression" in caplog.text
    assert connection.execute("select paused from pgqueue.schedules").fetchone() == (True,)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"cron": "61 * * * *"}, "bad cron expression '61 \\* \\* \\* \\*': Bad minute"),
        ({"cron": "* * *"}, "5 fields"),
        ({"cron": "@every 0s"}, "must be positive"),
        ({"cron": "@every soon"}, "write '@every <n>s'"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"missed": "some"}, "missed must be one of latest, skip, all"),
        ({"max_catch_up": 0}, "max_catch_up must be an integer from 1 to 10000"),
        ({"name": "no spaces"}, "schedule names are"),
        ({"args": {"when": datetime.now()}}, "args cannot be stored"),
    ],
)
def test_bad_schedules_are_typed_errors_at_declaration(
    new_app: Callable[..., App], arguments: dict[str, Any], message: str
) -> None:
    app = new_app()
    options = {"cron": "* * * * *", **arguments}
    with pytest.raises(InvalidScheduleError, match=message):

        @app.periodic(**options)
        @app.task(name="job")
        def job(**kwargs: Any) -> None: ...

    with pytest.raises(InvalidScheduleError, match=message):
        app.schedules.add(options.pop("name", "x"), "report", options.pop("cron"), **options)


def test_the_cron_command_lists_pauses_and_removes(app: App, dsn: str) -> None:
    app.schedules.add("hourly-report", "report", "@hourly", timezone="Europe/Paris")

    def cron(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pgqueue_command("--dsn", dsn, "cron", *arguments),
            capture_output=True,
            text=True,
            env=subprocess_environment(),
            timeout=60,
        )

    listed = cron("list")
    assert listed.returncode == 0 and "hourly-report" in listed.stdout and "Europe/Paris" in listed.stdout
    assert cron("pause", "hourly-report").stdout.strip() == "schedule hourly-report paused"
    assert "paused" in cron("list").stdout
    missing = cron("pause", "nope")
    assert missing.returncode != 0 and "no schedule named 'nope'" in missing.stderr
    assert cron("remove", "hourly-report").returncode == 0
    assert "(no schedules" in cron("list").stdout


@pytest.mark.slow
def test_four_worker_processes_fire_each_tick_once_and_a_restart_runs_the_latest_missed(
    dsn: str, connection: psycopg.Connection[Any], worker_processes: WorkerProcesses
) -> None:
    workers = [worker_processes.start(dsn, "--concurrency", "2", app=PERIODIC) for _ in range(4)]
    wait_for(lambda: len(cron_jobs(connection, "every-second")) >= 6, timeout=60, what="six ticks")
    for worker in workers:
        worker.signal_group(15)
    for worker in workers:
        assert worker.wait() == 0
    before = cron_jobs(connection, "every-second")
    time.sleep(4)  # every worker down: about four ticks go by
    restarted = worker_processes.start(dsn, app=PERIODIC)
    wait_for(lambda: len(cron_jobs(connection, "every-second")) >= len(before) + 3, timeout=60, what="ticks")
    restarted.signal_group(15)
    assert restarted.wait() == 0
    ticks = [
        datetime.fromisoformat(key.replace("Z", "+00:00")) for key in cron_jobs(connection, "every-second")
    ]
    assert len(set(ticks)) == len(ticks) == jobs_of(connection, "tick")  # one job per tick
    # consecutive seconds while the four ran; then one jump over the ticks missed while
    # none ran (missed="latest": only the latest of them), and consecutive again
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ticks)]
    jumps = [gap for gap in gaps if gap != 1.0]
    assert len(jumps) == 1 and jumps[0] >= 3, gaps
    assert "declared 1 periodic schedule(s)" in workers[0].output()


def test_the_hour_daylight_saving_repeats_fires_each_tick_once_and_plans_ahead() -> None:
    from pgqueue.periodic import Timetable

    # New York, 3 November 2024: 01:00-02:00 happens twice (EDT, then EST)
    table = Timetable("30 1 * * *", "America/New_York")
    repeated = datetime(2024, 11, 3, 6, 10, tzinfo=UTC)  # 01:10 EST, the hour's second pass
    assert table.next_after(repeated) == datetime(2024, 11, 4, 6, 30, tzinfo=UTC)  # never the past
    assert table.last_at_or_before(repeated) == datetime(2024, 11, 3, 5, 30, tzinfo=UTC)  # 01:30 EDT
    assert table.due(datetime(2024, 11, 3, 5, 30, tzinfo=UTC), repeated, "all", 10) == [
        datetime(2024, 11, 3, 5, 30, tzinfo=UTC)
    ]


def test_a_schedule_that_cannot_enqueue_is_skipped_and_the_others_still_fire(
    app: App, connection: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    app.schedules.add("blocked", "report", "* * * * *", queue="full")
    app.schedules.add("fine", "report", "* * * * *")
    connection.execute("select pgqueue.enqueue('report', queue => 'full')")
    app.controls.limit("full", max_depth=1)
    fire_due_schedules(connection, now=T0)
    fired = fire_due_schedules(connection, now=T0 + timedelta(minutes=1, seconds=1))
    assert [f.schedule for f in fired] == ["fine"]
    assert "schedule 'blocked': could not enqueue tick(s) 2030-01-07T12:01:00+00:00" in caplog.text
    assert "skipped, next at 2030-01-07T12:02:00+00:00" in caplog.text
    # moved on: the next pass fires both again when there is room
    app.controls.limit("full", max_depth=None)
    fired = fire_due_schedules(connection, now=T0 + timedelta(minutes=2, seconds=1))
    assert sorted(f.schedule for f in fired) == ["blocked", "fine"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": 40000}, "priority must be an integer from -32768 to 32767"),
        ({"max_catch_up": "5"}, "max_catch_up must be an integer"),
        ({"max_catch_up": 5.5}, "max_catch_up must be an integer"),
        ({"cron": "@every 99999999999d"}, "at most 10 years"),
        ({"cron": "0 * * * * *"}, "5 fields"),
        ({"cron": 5}, "a cron expression is a string"),
        ({"task": "not a task name"}, "task names are"),
        ({"args": {"blob": "x" * 2_000_000}}, "args cannot be stored"),
    ],
)
def test_options_a_schedule_cannot_store_are_refused_when_declared(
    app: App, options: dict[str, Any], message: str
) -> None:
    arguments = {"cron": "* * * * *", "task": "report", **options}
    with pytest.raises(InvalidScheduleError, match=message):
        app.schedules.add("odd", arguments.pop("task"), arguments.pop("cron"), **arguments)
