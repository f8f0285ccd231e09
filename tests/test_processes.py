"""The real `pgqueue worker` command: many at once, killed with -9, process-pool children,
an unreachable database, polling without LISTEN, and schemas that do not fit.

Workers are subprocesses in their own process group (tests/processes.py), running in the
test's temporary directory; the producer side is the sample app (tests/sample_app.py) on
the test's own database. Every wait is on a condition: a job state, a line of the
worker's output or of the executions log, a backend in pg_stat_activity.
"""

from __future__ import annotations

import collections
import os
import re
import signal
from pathlib import Path

import psycopg
import pytest

from pgqueue import App
from pgqueue.testing import job_states, wait_for, wait_for_states
from tests import sample_app
from tests.processes import WorkerProcess, WorkerProcesses, backends, process_gone

pytestmark = pytest.mark.slow

# `pgqueue` logs as "2026-01-31 12:00:00,123 WARNING pgqueue: message"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ pgqueue: ")


def stop(worker: WorkerProcess) -> None:
    """SIGTERM to the group, as a supervisor stops a service; it must exit 0 without a traceback."""
    worker.signal_group(signal.SIGTERM)
    status = worker.wait(30)
    assert status == 0, worker.output()
    assert "Traceback" not in worker.output(), worker.output()


def count(dsn: str, where: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute(f"select count(*) from pgqueue.jobs where {where}").fetchone()
        return int(row[0]) if row else 0


def listeners(dsn: str) -> list[tuple[str, str]]:
    """(application_name, query) of each connection to the test's database that LISTENs."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "select application_name, query from pg_stat_activity where datname = current_database()"
            " and (application_name = 'pgqueue-listen' or query ilike 'listen %')"
        ).fetchall()
    return [(str(name), str(query)) for name, query in rows]


def assert_one_line_error(worker: WorkerProcess, *fragments: str) -> None:
    """Exit status 2 and a single `pgqueue: error:` line saying `fragments`; no traceback."""
    status = worker.wait(30)
    output = worker.output()
    assert status == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("pgqueue: error: ")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], output
    # nothing but log lines besides it: the message does not spill over several lines
    others = [line for line in output.splitlines() if line not in errors and not LOG_LINE.match(line)]
    assert others == [], output


def test_four_processes_drain_20000_jobs_each_exactly_once(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    with psycopg.connect(dsn) as connection:
        ids = sample_app.record_async.enqueue_many(connection, [{"n": n} for n in range(20_000)])
    workers = [worker_processes.start(dsn, "--concurrency", "50") for _ in range(4)]
    wait_for(
        lambda: count(dsn, "state = 'succeeded'") == 20_000,
        timeout=600,
        interval=0.5,
        what="20,000 jobs to succeed",
    )
    for worker in workers:
        stop(worker)
    lines = worker_processes.executions()
    executions = collections.Counter(int(line.split()[0]) for line in lines)
    assert set(executions) == set(ids)
    assert max(executions.values()) == 1, "a job ran twice although no worker died"
    pids = {int(line.split()[1]) for line in lines}
    assert len(pids) >= 2, "the work should be shared between processes"
    assert pids <= {worker.pid for worker in workers}
    assert count(dsn, "attempt <> 1 or errors <> '[]'") == 0


def test_a_job_of_a_killed_worker_runs_again_elsewhere_after_its_lease(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    doomed = worker_processes.start(dsn, "--concurrency", "4", "--lease-seconds", "2")
    job_id = sample_app.sleep_then_record.enqueue(None, seconds=3.0)
    others = sample_app.record.enqueue_many(None, [{"n": n} for n in range(100)])
    wait_for(
        lambda: f"start {job_id} {doomed.pid}" in worker_processes.executions(),
        timeout=60,
        what="the job to start on the first worker",
    )
    doomed.signal_group(signal.SIGKILL)  # no chance to clean up, nor to release the job
    assert doomed.wait() == -signal.SIGKILL
    survivor = worker_processes.start(dsn, "--concurrency", "4", "--lease-seconds", "2")
    states = wait_for_states(dsn, [job_id, *others], timeout=120)
    assert set(states.values()) == {"succeeded"}
    lines = worker_processes.executions()
    assert f"end {job_id} {survivor.pid}" in lines
    assert f"end {job_id} {doomed.pid}" not in lines
    job = sample.get_job(job_id)
    assert job.attempt == 2
    assert [error["kind"] for error in job.errors] == ["lease_expired"]
    assert str(doomed.pid) in job.errors[0]["error"]
    stop(survivor)


def test_a_killed_workers_job_on_its_last_attempt_is_dead_lettered_by_another_workers_rescue(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    doomed = worker_processes.start(dsn, "--lease-seconds", "2")
    job_id = sample_app.sleep_then_record.options(max_attempts=1).enqueue(None, seconds=30.0)
    wait_for(
        lambda: f"start {job_id} {doomed.pid}" in worker_processes.executions(),
        timeout=60,
        what="the job to start on the first worker",
    )
    doomed.signal_group(signal.SIGKILL)
    assert doomed.wait() == -signal.SIGKILL
    rescuer = worker_processes.start(dsn, "--lease-seconds", "2")
    # whatever the rescue decides (dead letter, or a wrong requeue) shows as a recorded error
    wait_for(lambda: bool(sample.get_job(job_id).errors), timeout=60, what="the lost attempt to be recorded")
    rescuer.wait_for_output(f"job {job_id}'s lease expired")
    job = sample.get_job(job_id)
    assert (job.state, job.attempt) == ("dead", 1), job
    assert [error["kind"] for error in job.errors] == ["lease_expired"]
    assert str(doomed.pid) in job.errors[0]["error"]
    assert "dead-lettered" in rescuer.output()
    # its last attempt was spent: nobody ran it again
    assert [line for line in worker_processes.executions() if line.startswith("start")] == [
        f"start {job_id} {doomed.pid}"
    ]
    stop(rescuer)


def test_a_timed_out_process_pool_child_is_gone_and_the_worker_keeps_claiming(
    dsn: str, sample: App, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    worker = worker_processes.start(dsn)
    marker = tmp_path / "hung-child.pid"
    hung = sample_app.cpu_hang.enqueue(None, marker=str(marker))  # times out after 0.5 s
    wait_for_states(dsn, [hung], timeout=30)
    job = sample.get_job(hung)
    assert (job.state, [error["kind"] for error in job.errors]) == ("dead", ["timeout"])
    child = int(marker.read_text())
    # fail fast on a worker that stops itself instead of waiting out the timeout below
    wait_for(
        lambda: process_gone(child) or "stopping" in worker.output(),
        timeout=30,
        what=f"the timed-out job's child process {child} to go",
    )
    assert "stopping" not in worker.output(), f"nobody asked the worker to stop:\n{worker.output()}"
    assert process_gone(child), f"the timed-out job's child {child} is still running"
    # a CPU-bound job enqueued afterwards runs, in a new pool
    later = sample_app.cpu.enqueue(None, n=1000)
    assert wait_for_states(dsn, [later], timeout=30) == {later: "succeeded"}
    assert sample.get_job(later).result == sum(range(1000))
    stop(worker)


def test_a_crashed_or_timed_out_child_fails_only_its_own_job(
    dsn: str, sample: App, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("SKIPPED LOUDLY: needs two process slots, and this machine has one CPU")
    worker = worker_processes.start(dsn, "--concurrency", "2")
    marker = tmp_path / "hung-child.pid"
    # a long CPU-bound job runs beside a child that dies and one that times out
    bystander = sample_app.cpu_sleep.enqueue(None, seconds=4.0)
    crashed = sample_app.cpu_crash.enqueue(None)
    hung = sample_app.cpu_hang.enqueue(None, marker=str(marker))
    assert wait_for_states(dsn, [bystander, crashed, hung], timeout=60) == {
        bystander: "succeeded",
        crashed: "dead",
        hung: "dead",
    }
    survivor = sample.get_job(bystander)
    assert (survivor.attempt, survivor.errors, survivor.result) == (1, [], "slept")
    assert "BrokenProcessPool" in sample.get_job(crashed).errors[0]["error"]
    assert [error["kind"] for error in sample.get_job(hung).errors] == ["timeout"]
    child = int(marker.read_text())
    wait_for(lambda: process_gone(child), timeout=30, what=f"the timed-out job's child {child} to go")
    stop(worker)


def test_reconnect_backoff_grows_to_its_cap_and_never_beyond(worker_processes: WorkerProcesses) -> None:
    cap = 0.5
    worker = worker_processes.start(
        "postgresql://postgres@127.0.0.1:1/nowhere",
        environment={"PGQUEUE_RECONNECT_MAX_DELAY": str(cap)},
    )
    # eight attempts: the backoff doubles from its first delay past the cap by the fourth;
    # this also fails if the worker gave up and exited
    worker.wait_for_output("retrying in", count=8, timeout=60)
    stop(worker)
    delays = [
        float(delay)
        for delay in re.findall(
            r"database unreachable \(.*?\); retrying in (\d+\.\d)s", worker.output(), flags=re.DOTALL
        )
    ]
    assert len(delays) >= 8, worker.output()
    assert max(delays) <= cap, f"a delay went past the {cap}s cap: {delays}"
    # With full jitter a delay falls between half its ceiling and the ceiling, so once the
    # ceiling is the cap, every delay is at least half of it (less the one-decimal rounding).
    assert delays[0] < min(delays[3:]), f"the delays did not grow: {delays}"
    assert min(delays[3:]) >= cap / 2 - 0.05, f"the delays did not grow to near the cap: {delays}"


def test_a_default_worker_holds_a_listen_connection(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    # the counterpart of the --no-listen test below: the same check does see a listener
    worker = worker_processes.start(dsn)
    wait_for(
        lambda: any(name == "pgqueue-listen" for name, _ in listeners(dsn)),
        timeout=30,
        what="the worker's LISTEN connection in pg_stat_activity",
    )
    job_id = sample_app.record_async.enqueue(None, n=1)
    assert wait_for_states(dsn, [job_id], timeout=30) == {job_id: "succeeded"}
    stop(worker)


def test_a_no_listen_worker_drains_jobs_without_any_listen_connection(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    worker = worker_processes.start(dsn, "--no-listen", "--concurrency", "2")
    # three rounds of two half-second jobs: time for many looks at pg_stat_activity
    ids = sample_app.sleep_then_record.enqueue_many(None, [{"seconds": 0.5} for _ in range(6)])
    seen_listeners: list[tuple[str, str]] = []
    seen_claimers: list[tuple[int, str, str]] = []

    def drained() -> bool:
        # look at the database's connections at every step of the drain, not once
        seen_listeners.extend(listeners(dsn))
        seen_claimers.extend(backends(dsn, "pgqueue-claim"))
        states = job_states(dsn, ids)
        return all(state == "succeeded" for state in states.values())

    wait_for(drained, timeout=60, interval=0.05, what="the jobs to succeed")
    assert seen_claimers, "the worker's own connections should show in pg_stat_activity"
    assert seen_listeners == []
    assert "polling only" in worker.output()
    stop(worker)


def test_worker_exits_with_a_clear_message_on_an_unmigrated_database(
    empty_dsn: str, worker_processes: WorkerProcesses
) -> None:
    worker = worker_processes.start(empty_dsn)
    assert_one_line_error(worker, "run `pgqueue migrate`")


def test_worker_exits_with_a_clear_message_on_a_schema_newer_than_its_code(
    dsn: str, connection: psycopg.Connection[tuple[object, ...]], worker_processes: WorkerProcesses
) -> None:
    # what a newer pgqueue's `pgqueue migrate` leaves behind
    connection.execute(
        "insert into pgqueue.migrations (version, name, checksum) values (9999, 'future', 'x')"
    )
    worker = worker_processes.start(dsn)
    assert_one_line_error(worker, "migration 9999", "upgrade pgqueue")
