"""Real worker processes: many at once, killed with -9, stopped with signals."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgqueue import App, Settings
from pgqueue.testing import wait_for, wait_for_states
from tests import sample_app
from tests.conftest import REPOSITORY, pgqueue_command

pytestmark = pytest.mark.slow


class Workers:
    """Starts `pgqueue worker` subprocesses and cleans them up."""

    def __init__(self, dsn: str, log: Path) -> None:
        self.dsn = dsn
        self.log = log
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, *arguments: str, lease: float = 2.0) -> subprocess.Popen[str]:
        environment = {
            **os.environ,
            "PGQUEUE_TEST_LOG": str(self.log),
            "PGQUEUE_RESCUE_INTERVAL": "0.5",
            "PGQUEUE_POLL_INTERVAL": "0.5",
        }
        process = subprocess.Popen(
            pgqueue_command(
                "--dsn", self.dsn, "worker", "tests.sample_app:app", "--lease-seconds", str(lease), *arguments
            ),
            cwd=REPOSITORY,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(dsn, tmp_path / "executions.log")
    yield group
    group.stop_all()


@pytest.fixture
def producer(dsn: str) -> Iterator[App]:
    sample_app.app.configure(Settings(dsn=dsn))
    yield sample_app.app
    sample_app.app.close()


def count(dsn: str, where: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute(f"select count(*) from pgqueue.jobs where {where}").fetchone()
        return int(row[0]) if row else 0


def test_four_processes_drain_20000_jobs_each_exactly_once(dsn: str, producer: App, workers: Workers) -> None:
    with psycopg.connect(dsn) as connection:
        ids = sample_app.record_async.enqueue_many(connection, [{"n": n} for n in range(20_000)])
    processes = [workers.start("--concurrency", "50", lease=30) for _ in range(4)]
    wait_for(
        lambda: count(dsn, "state = 'succeeded'") == 20_000,
        timeout=600,
        interval=0.5,
        what="20,000 jobs to succeed",
    )
    workers.stop_all()
    assert [process.returncode for process in processes] == [0, 0, 0, 0]
    executions = collections.Counter(int(line.split()[0]) for line in workers.log_lines())
    assert set(executions) == set(ids)
    assert max(executions.values()) == 1, "a job ran twice although no worker died"
    pids = {line.split()[1] for line in workers.log_lines()}
    assert len(pids) >= 2, "the work should be shared between processes"
    assert count(dsn, "attempt <> 1 or errors <> '[]'") == 0


def test_a_job_of_a_killed_worker_runs_again_elsewhere_after_its_lease(
    dsn: str, producer: App, workers: Workers
) -> None:
    doomed = workers.start("--concurrency", "4")
    job_id = sample_app.sleep_then_record.enqueue(None, seconds=3.0)
    others = sample_app.record.enqueue_many(None, [{"n": n} for n in range(100)])
    wait_for(
        lambda: f"start {job_id} {doomed.pid}" in workers.log_lines(),
        timeout=60,
        what="the job to start on the first worker",
    )
    doomed.kill()  # SIGKILL: no chance to clean up
    doomed.wait()
    survivor = workers.start("--concurrency", "4")
    states = wait_for_states(dsn, [job_id, *others], timeout=120)
    assert set(states.values()) == {"succeeded"}
    lines = workers.log_lines()
    assert f"end {job_id} {survivor.pid}" in lines
    assert f"end {job_id} {doomed.pid}" not in lines
    job = producer.get_job(job_id)
    assert job.attempt == 2
    assert [error["kind"] for error in job.errors] == ["lease_expired"]
    assert str(doomed.pid) in job.errors[0]["error"]


def test_sigterm_lets_running_jobs_finish_then_exits(dsn: str, producer: App, workers: Workers) -> None:
    process = workers.start("--concurrency", "3", "--shutdown-grace", "20")
    ids = sample_app.sleep_then_record.enqueue_many(None, [{"seconds": 1.0} for _ in range(3)])
    wait_for(
        lambda: sum(line.startswith("start") for line in workers.log_lines()) == 3,
        timeout=60,
        what="three jobs to start",
    )
    queued_later = sample_app.record.enqueue(None, n=1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "stopping" in output
    states = wait_for_states(dsn, ids, timeout=5)
    assert set(states.values()) == {"succeeded"}
    # it stopped claiming: the job enqueued after the signal is still waiting
    assert producer.get_job(queued_later).state == "queued"


def test_second_signal_forces_and_releases_running_jobs(dsn: str, producer: App, workers: Workers) -> None:
    process = workers.start("--concurrency", "2", "--shutdown-grace", "60")
    ids = sample_app.sleep_then_record.enqueue_many(None, [{"seconds": 60.0} for _ in range(2)])
    wait_for(
        lambda: sum(line.startswith("start") for line in workers.log_lines()) == 2,
        timeout=60,
        what="two jobs to start",
    )
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert "forced" in output
    jobs = [producer.get_job(job_id) for job_id in ids]
    assert [(job.state, job.attempt) for job in jobs] == [("queued", 0), ("queued", 0)]


def test_worker_waits_for_an_unreachable_database_and_says_so(tmp_path: Path) -> None:
    process = subprocess.Popen(
        pgqueue_command(
            "--dsn", "postgresql://postgres@127.0.0.1:1/nowhere", "worker", "tests.sample_app:app"
        ),
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PGQUEUE_RECONNECT_MAX_DELAY": "0.5"},
    )
    try:
        time.sleep(3)
        assert process.poll() is None, "the worker must keep trying, not exit"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert output.count("database unreachable") >= 3
    assert "Traceback" not in output
    assert process.returncode == 0


def test_worker_exits_with_a_clear_message_on_an_unmigrated_database(empty_dsn: str) -> None:
    result = subprocess.run(
        pgqueue_command("--dsn", empty_dsn, "worker", "tests.sample_app:app"),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "run `pgqueue migrate`" in result.stderr
    assert "Traceback" not in result.stderr
