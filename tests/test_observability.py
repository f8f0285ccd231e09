"""Watching the queue: a worker's metrics, the database exporter, health, the history views,
`pgqueue status`, and logs (JSON lines, no secrets), against a real server.

The dashboard and a real Prometheus scraping all of it are in tests/test_dashboard.py.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from pgqueue import App, Fail, RetryPolicy
from pgqueue.health import check_health
from pgqueue.metrics import DatabaseCollector, WorkerMetrics
from pgqueue.testing import running_worker, wait_for_states
from tests.conftest import pgqueue_command, subprocess_environment


def sql(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def worker_seen(dsn: str, worker: str, queues: list[str], ttl: float = 60.0) -> None:
    """A worker's presence, as its maintenance round records it."""
    sql(
        dsn,
        "select pgqueue.worker_seen(%s, 'host-1', 4242, %s, 10, 'test', %s)",
        (worker, queues, ttl),
    )


def dead_letter_one(dsn: str, queue: str = "default") -> int:
    """A job that ran once and failed for good, through the state machine."""
    rows = sql(dsn, "select pgqueue.enqueue('broken', queue => %s, max_attempts => 1)", (queue,))
    job_id = int(rows[0][0])
    assert sql(dsn, "select id from pgqueue.claim_jobs('w-dead', %s, 1, 30)", ([queue],)) == [(job_id,)]
    error = json.dumps({"kind": "exception", "error": "ValueError: broken", "traceback": None})
    sql(
        dsn,
        "select pgqueue.complete_jobs('w-dead', %s, %s, %s, %s::jsonb[], %s::jsonb[],"
        " %s::double precision[])",
        ([job_id], [1], ["failed"], [None], [error], [None]),
    )
    return job_id


# -- a worker's own metrics ------------------------------------------------------------


def test_worker_metrics_count_each_job_by_final_outcome_and_time_its_handler(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app(poll_interval=0.1)

    @app.task(name="ok", queue="fast")
    async def ok(n: int) -> int:
        return n

    @app.task(name="flaky", max_attempts=2, retry=RetryPolicy.fixed(0))
    async def flaky() -> None:
        raise ValueError("always")

    @app.task(name="fatal")
    async def fatal() -> None:
        raise Fail("no point retrying")

    registry = CollectorRegistry()
    metrics = WorkerMetrics(
        "metrics-worker", tasks=[("fast", "ok"), ("default", "flaky"), ("default", "fatal")]
    )
    metrics.attach(app.hooks)
    registry.register(metrics)
    ids = [ok.enqueue(None, n=n) for n in range(5)] + [flaky.enqueue(None), fatal.enqueue(None)]
    with running_worker(app, queues=["fast", "default"], worker_id="metrics-worker"):
        wait_for_states(dsn, ids, ["succeeded", "dead"])

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("pgqueue_jobs_started_total", queue="fast", task="ok") == 5
    assert value("pgqueue_jobs_finished_total", queue="fast", task="ok", outcome="succeeded") == 5
    # two attempts of flaky: the first will run again, the second is its last
    assert value("pgqueue_jobs_finished_total", queue="default", task="flaky", outcome="retried") == 1
    assert value("pgqueue_jobs_finished_total", queue="default", task="flaky", outcome="dead") == 1
    assert value("pgqueue_jobs_finished_total", queue="default", task="fatal", outcome="dead") == 1
    # every handler run is in the run-time histogram, under its own bucket bound
    assert value("pgqueue_job_run_seconds_count", queue="fast", task="ok") == 5
    assert value("pgqueue_job_run_seconds_bucket", queue="fast", task="ok", le="+Inf") == 5
    assert value("pgqueue_job_wait_seconds_count", queue="default", task="flaky") == 2
    # eight attempts of seven jobs, each claimed once and its outcome flushed once
    assert value("pgqueue_claim_batch_jobs_sum") == 8
    assert value("pgqueue_flush_batch_jobs_sum") == 8
    assert value("pgqueue_worker_jobs_in_flight") == 0
    metrics.detach(app.hooks)


def test_a_worker_serves_metrics_and_health_on_its_port(sample: App, dsn: str) -> None:
    # port 0: any free port, which the worker reports
    with running_worker(sample, settings=sample.settings.model_copy(update={"metrics_port": 0})) as worker:
        job_id = sample.enqueue(None, "cpu", {"n": 10})
        wait_for_states(dsn, [job_id])
        assert worker.metrics_port
        exposition = fetch(worker.metrics_port, "/metrics")
        assert 'pgqueue_jobs_finished_total{outcome="succeeded",queue="default",task="cpu"} 1.0' in exposition
        # what has not happened yet is a zero from the start (a rate needs a first sample)
        assert 'pgqueue_jobs_finished_total{outcome="dead",queue="default",task="cpu"} 0.0' in exposition
        assert 'pgqueue_worker_reconnects_total{connection="claim"} 0.0' in exposition
        status, body = fetch_status(worker.metrics_port, "/health")
        assert (status, json.loads(body)["status"]) == (200, "healthy")


def fetch(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


def fetch_status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


# -- the database exporter --------------------------------------------------------------


def test_the_exporter_reads_depth_from_the_database_with_no_worker_running(dsn: str) -> None:
    sql(dsn, "select pgqueue.enqueue('t', queue => 'mail') from generate_series(1, 3)")
    sql(dsn, "select pgqueue.enqueue('t', queue => 'mail', run_at => now() + interval '1 hour')")
    sql(dsn, "select pgqueue.enqueue('t', queue => 'mail', run_at => now() - interval '90 seconds')")
    sql(dsn, "select pgqueue.enqueue('t', queue => 'reports')")
    assert len(sql(dsn, "select id from pgqueue.claim_jobs('w1', array['reports'], 1, 30)")) == 1
    dead_letter_one(dsn, "reports")
    worker_seen(dsn, "w-live", ["mail", "idle"])
    worker_seen(dsn, "w-lost", ["mail"], ttl=-1)  # its last round is long past

    registry = CollectorRegistry()
    registry.register(DatabaseCollector(dsn))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("pgqueue_up") == 1
    assert value("pgqueue_queue_jobs", queue="mail", state="ready") == 4
    assert value("pgqueue_queue_jobs", queue="mail", state="scheduled") == 1
    assert value("pgqueue_queue_jobs", queue="reports", state="running") == 1
    assert value("pgqueue_queue_jobs", queue="reports", state="dead") == 1
    assert value("pgqueue_queue_jobs", queue="reports", state="ready") == 0
    age = value("pgqueue_queue_oldest_ready_age_seconds", queue="mail")
    assert age is not None and 90 <= age < 3600
    assert value("pgqueue_workers", status="live") == 1
    assert value("pgqueue_workers", status="lost") == 1
    # a queue a worker serves, with no job at all: zeros, not a missing series
    assert value("pgqueue_queue_jobs", queue="idle", state="ready") == 0
    # a queue drained since the last scrape drops to zero instead of vanishing
    sql(dsn, "update pgqueue.jobs set state = 'cancelled', finished_at = now() where queue = 'mail'")
    assert value("pgqueue_queue_jobs", queue="mail", state="ready") == 0
    assert value("pgqueue_queue_oldest_ready_age_seconds", queue="mail") == 0


def test_the_exporter_reports_a_database_it_cannot_reach_instead_of_failing_the_scrape() -> None:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector("postgresql://postgres@127.0.0.1:1/nowhere", timeout=2))
    assert registry.get_sample_value("pgqueue_up") == 0


def test_the_exporter_command_serves_metrics_and_health(dsn: str, tmp_path: Any) -> None:
    sql(dsn, "select pgqueue.enqueue('t')")  # ready, and no worker: critical
    port = free_port()
    exporter = subprocess.Popen(
        pgqueue_command("--dsn", dsn, "metrics", "--port", str(port), "--host", "127.0.0.1"),
        env=subprocess_environment(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        exposition = wait_for_page(port, "/metrics", exporter)
        assert 'pgqueue_queue_jobs{queue="default",state="ready"} 1.0' in exposition
        status, body = fetch_status(port, "/health")
        verdict = json.loads(body)
        assert (status, verdict["status"]) == (503, "critical")
        assert verdict["reasons"] == ["queue 'default': 1 ready job(s) and no live worker serves it"]
    finally:
        exporter.terminate()
        _, errors = exporter.communicate(timeout=30)
    assert exporter.returncode == 0, errors
    assert "Traceback" not in errors


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_page(port: int, path: str, process: subprocess.Popen[str]) -> str:
    from pgqueue.testing import wait_for

    pages: list[str] = []

    def served() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            pages.append(fetch(port, path))
        except OSError:
            return False
        return True

    wait_for(served, timeout=30, what=f"{path} on port {port}")
    return pages[-1]


# -- health -------------------------------------------------------------------------------


def health_command(dsn: str, *options: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        pgqueue_command("--dsn", dsn, "health", "--json", *options),
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def test_health_is_critical_degraded_or_healthy_with_its_reasons(dsn: str) -> None:
    assert health_command(dsn) == (0, {"status": "healthy", "reasons": [], "live_workers": 0})
    sql(dsn, "select pgqueue.enqueue('t', run_at => now() - interval '10 minutes')")
    code, verdict = health_command(dsn)
    assert (code, verdict["status"]) == (2, "critical")
    assert verdict["reasons"] == ["queue 'default': 1 ready job(s) and no live worker serves it"]
    # a worker serves the queue now, but the job has waited ten minutes
    worker_seen(dsn, "w1", ["default"])
    code, verdict = health_command(dsn, "--max-ready-age", "300")
    assert (code, verdict["status"], verdict["live_workers"]) == (1, "degraded", 1)
    assert "the oldest ready job has waited" in verdict["reasons"][0]
    assert health_command(dsn, "--max-ready-age", "3600")[0] == 0
    # the dead letter grew just now
    dead_letter_one(dsn, "other")
    code, verdict = health_command(dsn, "--max-ready-age", "3600")
    assert (code, verdict["reasons"]) == (1, ["1 job(s) dead-lettered in the last 900s"])


def test_health_of_a_database_that_is_down_is_critical_and_fast() -> None:
    verdict = check_health("postgresql://postgres:secret-pw@127.0.0.1:1/nowhere", timeout=2)
    assert verdict.status == "critical" and verdict.http_status == 503
    assert verdict.reasons[0].startswith("database unreachable: ")
    assert "secret-pw" not in json.dumps(verdict.as_json())


# -- the history views ------------------------------------------------------------------


def test_history_views_answer_from_recorded_attempts(new_app: Callable[..., App], dsn: str) -> None:
    app = new_app(poll_interval=0.1)

    @app.task(name="report", max_attempts=3, retry=RetryPolicy.fixed(0))
    def report(fail_first: bool) -> str:
        from pgqueue import current_job

        if fail_first and current_job().attempt == 1:
            raise RuntimeError("first try fails")
        return "done"

    ids = [report.enqueue(None, fail_first=n == 0) for n in range(4)]
    with running_worker(app, worker_id="watched-worker"):
        wait_for_states(dsn, ids)
        live = sql(dsn, "select worker, status, host, queues, concurrency from pgqueue.workers")
        assert live == [("watched-worker", "live", live[0][2], ["default"], 10)]
    assert sql(dsn, "select status from pgqueue.workers") == [("stopped",)]

    [stats] = sql(
        dsn, "select task, succeeded, dead, failed_attempts, run_p95_seconds from pgqueue.task_stats"
    )
    assert stats[:4] == ("report", 4, 0, 1) and stats[4] is not None and stats[4] >= 0
    failures = sql(
        dsn, "select job_id, attempt, error from pgqueue.failures_since(now() - interval '1 hour')"
    )
    assert failures == [(ids[0], 1, "RuntimeError: first try fails")]
    assert sql(dsn, "select sum(jobs) from pgqueue.throughput where state = 'succeeded'") == [(4,)]
    attempts = sql(
        dsn,
        "select attempt, worker, outcome from pgqueue.attempts where job_id = %s order by attempt",
        (ids[0],),
    )
    assert attempts == [(1, "watched-worker", "failed"), (2, "watched-worker", "succeeded")]


def test_status_shows_rates_and_live_workers(new_app: Callable[..., App], dsn: str) -> None:
    app = new_app(poll_interval=0.1)

    @app.task(name="quick")
    async def quick() -> None: ...

    ids = [quick.enqueue(None) for _ in range(6)]
    with running_worker(app):
        wait_for_states(dsn, ids)
        done = subprocess.run(
            pgqueue_command("--dsn", dsn, "status", "--json", "--window", "600"),
            env=subprocess_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    seen = json.loads(done.stdout)
    assert (seen["finished"], seen["error_rate"], seen["live_workers"]) == (6, 0.0, 1)
    assert seen["throughput_per_minute"] == pytest.approx(6 * 60 / 600)
    assert seen["mean_run_seconds"] is not None


# -- logs ---------------------------------------------------------------------------------


def test_json_logs_carry_each_jobs_fields_and_never_the_password(dsn: str, sample: App) -> None:
    password = "pw-that-must-not-leak"
    conninfo = psycopg.conninfo.conninfo_to_dict(dsn)
    secret_dsn = psycopg.conninfo.make_conninfo(**{**conninfo, "password": password})  # trust auth ignores it
    job_id = sample.enqueue(None, "cpu", {"n": 3})
    done = subprocess.run(
        pgqueue_command(
            "--dsn", secret_dsn, "--log-format", "json", "-v", "worker", "tests.sample_app:app", "--burst"
        ),
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert password not in done.stderr + done.stdout
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert records and len(records) == len([line for line in done.stderr.splitlines() if line.strip()])
    finished = [record for record in records if record.get("job_id") == job_id and "outcome" in record]
    assert len(finished) == 1
    assert {key: finished[0][key] for key in ("task", "queue", "attempt", "outcome")} == {
        "task": "cpu",
        "queue": "default",
        "attempt": 1,
        "outcome": "succeeded",
    }
    assert finished[0]["seconds"] >= 0 and finished[0]["level"] == "DEBUG"


# -- scale: plans with a million finished jobs ---------------------------------------------


def readme_questions() -> list[str]:
    """The statements of the README's "Watching it" SQL block."""
    from tests.test_readme import HISTORY_SQL, snippet

    code = "\n".join(line for line in snippet(HISTORY_SQL).code.splitlines() if not line.startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


@pytest.mark.slow
def test_watching_reads_indexes_not_a_million_finished_jobs(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "insert into pgqueue.finished_jobs (task, queue, state, attempt, run_at, started_at, finished_at)"
            " select 'old', 'default', 'succeeded', 1, t, t, t + interval '1 second'"
            " from generate_series(1, 1000000) as n,"
            " lateral (select now() - interval '30 days' + n * interval '1 second') as s(t)"
        )
        connection.execute("select pgqueue.enqueue('t') from generate_series(1, 100)")
        connection.execute("vacuum analyze pgqueue.active_jobs, pgqueue.finished_jobs")
        questions = [
            "select * from pgqueue.queue_stats",
            "select * from pgqueue.task_stats",
            "select * from pgqueue.throughput",
            "select * from pgqueue.workers",
            "select * from pgqueue.failures_since(now() - interval '1 hour')",
            "select * from pgqueue.attempts where job_id = 42",
            "select status, count(*) from pgqueue.workers group by status",
            *readme_questions(),
        ]
        # and the statements of pgqueue status, health, the exporter and the dead letter
        from pgqueue.sql import query

        parameters = {"seconds": 300, "limit": 20, "after": 0}
        named = [
            "status_counts",
            "status_recent",
            "dead_jobs",
            "metrics_queue_stats",
            "metrics_workers",
            "health_queues",
            "health_dead_recent",
            "health_live_workers",
        ]
        for question, params in [*((q, None) for q in questions), *((query(n), parameters) for n in named)]:
            rows = connection.execute(f"explain (costs off) {question}", params).fetchall()
            plan = "\n".join(str(row[0]) for row in rows)
            assert "Seq Scan on jobs" not in plan, f"{question}\n{plan}"
        # the redrive of the whole dead letter pages through it by id
        batch = query("retry_dead_batch").split("with batch as materialized (")[1].split(")\nselect")[0]
        rows = connection.execute(
            f"explain (costs off) {batch.replace('for update skip locked', '')}", parameters
        )
        plan = "\n".join(str(row[0]) for row in rows.fetchall())
        assert "jobs_dead" in plan, plan
    # the exporter's scrape reads them too (how long it takes is measured in benchmarks/)
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(dsn))
    assert registry.get_sample_value("pgqueue_queue_jobs", {"queue": "default", "state": "ready"}) == 100


def test_failures_and_the_error_rate_count_attempts_that_failed_lately_not_releases(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app(poll_interval=0.1)

    @app.task(name="retried", max_attempts=5, retry=RetryPolicy.fixed(3600))
    async def retried() -> None:
        raise RuntimeError("down for now")

    @app.task(name="fine")
    async def fine() -> None: ...

    waiting = retried.enqueue(None)  # fails once, then waits an hour: never finished
    ids = [fine.enqueue(None) for _ in range(3)]
    with running_worker(app):
        wait_for_states(dsn, ids)
        wait_for_states(dsn, [waiting], ["queued"])
    # a job handed back unfinished at shutdown is no failure
    sql(dsn, "select pgqueue.enqueue('fine')")
    [(released,)] = sql(dsn, "select id from pgqueue.claim_jobs('w-leaving', array['default'], 1, 30)")
    sql(
        dsn,
        "select pgqueue.complete_jobs('w-leaving', %s, %s, %s, %s::jsonb[], %s::jsonb[],"
        " %s::double precision[])",
        (
            [released],
            [1],
            ["released"],
            [None],
            [json.dumps({"kind": "released", "error": "shutdown"})],
            [None],
        ),
    )
    failures = sql(dsn, "select job_id, kind from pgqueue.failures_since(now() - interval '1 hour')")
    assert failures == [(waiting, "exception")]
    done = subprocess.run(
        pgqueue_command("--dsn", dsn, "status", "--json"),
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    seen = json.loads(done.stdout)
    assert (seen["finished"], seen["error_rate"]) == (3, 0.25)  # 1 failed attempt of 4
