"""Shutdown of the real `pgqueue worker` command, through real signals to its process group.

A terminal's Ctrl-C and a supervisor's stop (systemd, Docker, Kubernetes) signal every
process of the worker's group, its process-pool children included, so that is what
these tests do (`WorkerProcess.signal_group`). What they check is what a user sees: jobs
shorter than the grace period finish, longer ones go back to the queue without using up
an attempt and never finish behind the queue's back, nothing new is claimed, and the
command exits 0 without a traceback. One test signals the worker alone instead: the
out-of-memory killer's SIGKILL, which must not leave a process-pool child finishing its job.
The tasks (tests/signal_app.py) mark their start and end in the executions log, so the
tests wait on conditions, never on luck.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psycopg
import pytest

from pgqueue import App
from pgqueue.tasks import Task
from pgqueue.testing import wait_for, wait_for_states
from tests import signal_app
from tests.processes import WorkerProcess, WorkerProcesses, process_gone

pytestmark = pytest.mark.slow

APP = "tests.signal_app:app"
TASKS: dict[str, Task[..., Any]] = {
    "async": signal_app.async_sleep,
    "thread": signal_app.thread_sleep,
    "process": signal_app.process_sleep,
}

TWO_CHILDREN = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2, reason="two process-pool jobs at once need a pool of two (two CPUs)"
)


def enqueue(producer: App, task: Task[..., Any], **arguments: Any) -> int:
    """Enqueue a signal_app job through the sample app (a producer needs no handler for a task)."""
    return producer.insert(None, task.prepare(**arguments))


def marks(workers: WorkerProcesses, event: str) -> dict[int, int]:
    """Job id → pid of each `event` ("start" or "end") line of the executions log."""
    found: dict[int, int] = {}
    for line in workers.executions():
        name, job_id, pid = line.split()
        if name == event:
            found[int(job_id)] = int(pid)
    return found


def wait_until_running(workers: WorkerProcesses, ids: list[int]) -> dict[int, int]:
    """Wait until every job in `ids` has started (in its handler, not merely claimed); their pids."""
    wait_for(
        lambda: set(ids) <= set(marks(workers, "start")), timeout=30, what=f"jobs {ids} to start running"
    )
    return marks(workers, "start")


def assert_released(producer: App, job_id: int) -> None:
    """Back in the queue, as if never tried: the interrupted attempt does not count."""
    job = producer.get_job(job_id)
    assert (job.state, job.attempt) == ("queued", 0), f"job {job_id} was not handed back: {job}"
    assert job.errors and job.errors[-1]["kind"] == "released", job.errors


def assert_clean_exit(worker: WorkerProcess, timeout: float = 30.0) -> None:
    status = worker.wait(timeout)
    output = worker.output()
    assert status == 0, output
    assert "Traceback" not in output, output


def check_grace_period(
    dsn: str,
    producer: App,
    workers: WorkerProcesses,
    worker: WorkerProcess,
    short: int,
    long: int,
    grace: float,
    signum: int,
) -> None:
    """Signal the group while `short` (shorter than `grace`) and `long` run; check the outcome."""
    wait_until_running(workers, [short, long])
    signalled = time.monotonic()
    worker.signal_group(signum)
    # the worker's own account proves both jobs were running when the signal came
    worker.wait_for_output("stopping: no new jobs")
    assert "no new jobs; 2 running job(s)" in worker.output(), worker.output()
    wait_for_states(dsn, [long], ("queued", "succeeded", "dead"), timeout=30)
    # a lower bound only (the release happens no sooner than `grace` after the signal,
    # which came after `signalled`), so a slow machine cannot make it fail
    released_after = time.monotonic() - signalled
    assert released_after >= grace, (
        f"the long job was released {released_after:.2f}s after the signal, "
        f"before the {grace:g}s grace period ended:\n{worker.output()}"
    )
    assert_clean_exit(worker)
    assert producer.get_job(short).state == "succeeded", worker.output()
    assert short in marks(workers, "end")
    assert_released(producer, long)


@pytest.mark.parametrize(
    ("executor", "signum"),
    [
        pytest.param("async", signal.SIGTERM, id="async-SIGTERM"),
        pytest.param("async", signal.SIGINT, id="async-SIGINT"),
        pytest.param("thread", signal.SIGTERM, id="thread-SIGTERM"),
        pytest.param("thread", signal.SIGINT, id="thread-SIGINT"),
        pytest.param("process", signal.SIGTERM, id="process-SIGTERM", marks=TWO_CHILDREN),
        pytest.param("process", signal.SIGINT, id="process-SIGINT", marks=TWO_CHILDREN),
    ],
)
def test_a_signal_lets_short_jobs_finish_and_releases_a_long_one_after_the_grace_period(
    dsn: str, sample: App, worker_processes: WorkerProcesses, executor: str, signum: int
) -> None:
    grace = 3.0
    worker = worker_processes.start(dsn, "--shutdown-grace", str(grace), app=APP)
    task = TASKS[executor]
    # the short job has half the grace period left when the signal comes; the long one
    # would succeed (and fail the test) if it were not released
    short = enqueue(sample, task, seconds=1.5)
    long = enqueue(sample, task, seconds=8.0)
    check_grace_period(dsn, sample, worker_processes, worker, short, long, grace, signum)
    assert long not in marks(worker_processes, "end")


def test_async_jobs_keep_their_grace_period_beside_an_idle_process_pool(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    # one CPU-bound job leaves the pool's children idle but alive, in the worker's group
    grace = 3.0
    worker = worker_processes.start(dsn, "--shutdown-grace", str(grace), app=APP)
    warm_up = enqueue(sample, signal_app.process_sleep, seconds=0.0)
    wait_for_states(dsn, [warm_up], timeout=30)
    assert worker.children(), "the process pool should still be there, idle"
    short = enqueue(sample, signal_app.async_sleep, seconds=1.5)
    long = enqueue(sample, signal_app.async_sleep, seconds=8.0)
    check_grace_period(dsn, sample, worker_processes, worker, short, long, grace, signal.SIGTERM)


def test_sigterm_stops_claiming_although_slots_are_free(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    worker = worker_processes.start(dsn, "--concurrency", "10", "--shutdown-grace", "20", app=APP)
    running = [enqueue(sample, signal_app.async_sleep, seconds=4.0) for _ in range(2)]
    wait_until_running(worker_processes, running)
    worker.signal_group(signal.SIGTERM)
    worker.wait_for_output("stopping: no new jobs")
    assert "no new jobs; 2 running job(s)" in worker.output(), worker.output()
    # 8 of 10 slots are free and the enqueue's NOTIFY would wake a worker still claiming
    late = [enqueue(sample, signal_app.async_sleep, seconds=0.0) for _ in range(3)]
    assert_clean_exit(worker)
    assert [sample.get_job(job_id).state for job_id in running] == ["succeeded", "succeeded"]
    late_jobs = [sample.get_job(job_id) for job_id in late]
    assert [(job.state, job.attempt, job.worker) for job in late_jobs] == [("queued", 0, None)] * 3
    # never claimed at all (a claim handed back at exit would leave a `released` error
    # and move run_at to the moment of the release)
    assert [(job.errors, job.run_at) for job in late_jobs] == [([], job.created_at) for job in late_jobs]
    assert not set(late) & set(marks(worker_processes, "start")), "a job enqueued after SIGTERM ran"
    # the late jobs were there while the worker still ran its two jobs: it could have claimed them
    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            "select (select max(created_at) from pgqueue.jobs where id = any(%s))"
            " < (select min(finished_at) from pgqueue.jobs where id = any(%s))",
            (late, running),
        ).fetchone()
    assert row is not None and row[0], "the late jobs came after the running ones had finished"


def test_a_second_signal_skips_the_grace_period(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    worker = worker_processes.start(dsn, "--shutdown-grace", "60", app=APP)
    ids = [enqueue(sample, signal_app.async_sleep, seconds=60.0) for _ in range(2)]
    wait_until_running(worker_processes, ids)
    worker.signal_group(signal.SIGTERM)
    worker.wait_for_output("stopping: no new jobs")
    worker.signal_group(signal.SIGINT)  # the impatient second Ctrl-C
    # well before the 60 s of grace the jobs would otherwise get
    assert_clean_exit(worker, timeout=30)
    assert "forced to stop" in worker.output()
    for job_id in ids:
        assert_released(sample, job_id)
    assert not set(ids) & set(marks(worker_processes, "end"))


def test_a_sync_handler_past_the_grace_period_does_not_hold_the_command(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    grace = 2.0
    worker = worker_processes.start(dsn, "--shutdown-grace", str(grace), app=APP)
    # nothing can interrupt this thread for a minute: the command must leave it behind
    stuck = enqueue(sample, signal_app.thread_sleep, seconds=60.0)
    wait_until_running(worker_processes, [stuck])
    signalled = time.monotonic()
    worker.signal_group(signal.SIGTERM)
    assert_clean_exit(worker, timeout=30)
    exited_after = time.monotonic() - signalled
    assert exited_after >= grace, f"exited {exited_after:.2f}s after SIGTERM, before the grace period"
    assert "releasing 1 job(s) that did not finish in time" in worker.output()
    assert_released(sample, stuck)


def test_a_job_released_at_shutdown_is_not_finished_later_by_its_process_pool_child(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    worker = worker_processes.start(dsn, "--shutdown-grace", "1", app=APP)
    # long enough to outlast the grace period, short enough that a surviving child
    # finishes (and writes its end mark) well within the waits below
    long = enqueue(sample, signal_app.process_sleep, seconds=5.0)
    child = wait_until_running(worker_processes, [long])[long]
    assert child != worker.pid, "the job should run in a process-pool child"
    worker.signal_group(signal.SIGTERM)
    assert_clean_exit(worker)
    wait_for(lambda: process_gone(child), timeout=30, what=f"the job's child process {child} to go")
    assert long not in marks(worker_processes, "end"), "the released job was finished by its old child"
    assert_released(sample, long)


def test_a_process_pool_job_of_a_worker_killed_alone_is_not_finished_by_its_orphaned_child(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    # the out-of-memory killer picks one process, not a group
    worker = worker_processes.start(dsn, app=APP)
    job_id = enqueue(sample, signal_app.process_sleep, seconds=4.0)
    child = wait_until_running(worker_processes, [job_id])[job_id]
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait(30) == -signal.SIGKILL
    # fail as soon as the orphan finishes the job, rather than when the wait runs out
    wait_for(
        lambda: process_gone(child) or job_id in marks(worker_processes, "end"),
        timeout=30,
        what=f"the orphaned child process {child} to go",
    )
    assert job_id not in marks(worker_processes, "end"), "the dead worker's child went on with its job"
    assert process_gone(child)


def test_a_worker_stopped_past_its_lease_stops_the_job_it_lost_when_it_resumes(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    # a long GC pause, a stopped container, a laptop lid: SIGSTOP for longer than the lease
    paused = worker_processes.start(dsn, "--lease-seconds", "2", app=APP)
    job_id = enqueue(sample, signal_app.async_sleep, seconds=30.0)
    first = wait_until_running(worker_processes, [job_id])[job_id]
    assert first == paused.pid
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        rescuer = worker_processes.start(dsn, "--lease-seconds", "30", app=APP)
        # the rescuer's sweep requeues the job once the paused worker's lease expires; it
        # runs attempt 2, which the test lets finish only after the paused worker is back
        wait_for(
            lambda: starts(worker_processes, job_id) == [paused.pid, rescuer.pid],
            timeout=60,
            what="the rescued job to start again on the other worker",
        )
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    paused.wait_for_output(f"lost the lease of job {job_id}", timeout=30)
    # the paused worker stopped its attempt instead of finishing it beside the new one
    assert job_id not in marks(worker_processes, "end")
    job = sample.get_job(job_id)
    assert (job.state, job.attempt) == ("running", 2)
    assert job.worker is not None and job.worker.split(":")[1] == str(rescuer.pid)
    assert [error["kind"] for error in job.errors] == ["lease_expired"]
    assert paused.alive(), "losing a lease stops the job, not the worker"


def starts(workers: WorkerProcesses, job_id: int) -> list[int]:
    """Pids that started `job_id`, in order."""
    return [
        int(pid)
        for event, job, pid in (line.split() for line in workers.executions())
        if event == "start" and int(job) == job_id
    ]
