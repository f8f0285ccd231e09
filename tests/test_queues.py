"""Queue controls across every worker: a global limit of running jobs, a rate limit, pause
and resume; and clear, typed errors for a queue that does not exist or a limit that cannot be.
Limits are checked against what the handlers themselves wrote down, not pgqueue's records.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgqueue import App, ConfigurationError, JobsClaimed, QueueFull, UnknownQueueError
from pgqueue.health import check_health
from pgqueue.testing import running_worker, wait_for_states
from tests import sample_app
from tests.conftest import pgqueue_command, subprocess_environment
from tests.processes import WorkerProcesses
from tests.test_processes import stop


def handler_times(worker_processes: WorkerProcesses) -> dict[int, tuple[float, float]]:
    """Each `timed` job's (begin, end), as its handler wrote them."""
    begins: dict[int, float] = {}
    ends: dict[int, float] = {}
    for line in worker_processes.executions():
        kind, job_id, at = line.split()
        (begins if kind == "begin" else ends)[int(job_id)] = float(at)
    assert set(begins) == set(ends)
    return {job_id: (begins[job_id], ends[job_id]) for job_id in begins}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(begin, 1) for begin, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:  # an end at the same instant as a begin comes first
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_a_global_limit_holds_across_four_worker_processes(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    ids = sample_app.timed.enqueue_many(None, [{"seconds": 0.05}] * 60)
    sample.controls.limit("limited", max_running=3)
    workers = [worker_processes.start(dsn, "--concurrency", "10") for _ in range(4)]
    states = wait_for_states(dsn, ids, ["succeeded"], timeout=120)
    assert set(states.values()) == {"succeeded"}
    for worker in workers:
        stop(worker)
    times = handler_times(worker_processes)
    assert sorted(times) == sorted(ids)
    # 40 free slots wanted them all at once; never more than 3 ran, and 3 did
    assert most_at_once(list(times.values())) == 3


@pytest.mark.slow
def test_a_rate_limit_holds_across_worker_processes(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    ids = sample_app.timed.enqueue_many(None, [{"seconds": 0}] * 30)
    sample.controls.limit("limited", rate_per_second=10, burst=2)
    workers = [worker_processes.start(dsn, "--concurrency", "20") for _ in range(2)]
    wait_for_states(dsn, ids, ["succeeded"], timeout=120)
    for worker in workers:
        stop(worker)
    begins = sorted(begin for begin, _ in handler_times(worker_processes).values())
    assert len(begins) == 30
    # in any second, at most the burst plus a second's rate started (claims come before the
    # handlers begin, so a handler's clock can only spread them further apart)...
    for first, at in enumerate(begins):
        within = sum(1 for later in begins[first:] if later < at + 1.0)
        assert within <= 2 + 10, f"{within} jobs began within 1 s of {at}"
    # ...and 30 jobs at 10/s after a burst of 2 take at least 2.8 s to start
    assert begins[-1] - begins[0] >= 2.8 - 0.1


def test_pausing_a_queue_stops_claims_until_it_is_resumed_and_resuming_wakes_the_worker(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app(poll_interval=30.0)  # nothing but a NOTIFY can wake it in time
    claims: list[JobsClaimed] = []
    app.hooks.add(JobsClaimed, claims.append)

    @app.task(name="mail.send", queue="mail")
    def send(n: int) -> int:
        return n

    @app.task(name="other")
    def other() -> None:
        return None

    first = send.enqueue(None, n=0)
    app.controls.pause("mail")
    assert [(c.queue, c.paused) for c in app.controls.all()] == [("mail", True)]
    paused = [send.enqueue(None, n=n) for n in range(1, 6)]
    with running_worker(app):
        # the other queue runs; each job of it woke the worker, which claimed nothing of mail
        for _ in range(3):
            wait_for_states(dsn, [other.enqueue(None)], ["succeeded"])
        assert all(job.queue != "mail" for claim in claims for job in claim.jobs)
        states = wait_for_states(dsn, [first, *paused], ["queued"])
        assert set(states.values()) == {"queued"}
        app.controls.resume("mail")
        wait_for_states(dsn, [first, *paused], ["succeeded"], timeout=10)
    assert app.controls.all() == []  # resumed and unlimited: no controls left


def test_a_paused_queue_waits_without_making_the_queue_unhealthy(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app()
    app.enqueue(None, "reports.build", {}, queue="reports")
    assert any("'reports'" in reason for reason in check_health(dsn).reasons)  # nobody serves it
    app.controls.pause("reports")
    assert not any("'reports'" in reason for reason in check_health(dsn).reasons)


def test_queue_controls_refuse_unknown_queues_and_impossible_limits(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app()
    with pytest.raises(UnknownQueueError, match="no queue named 'nowhere'"):
        app.controls.pause("nowhere")
    app.enqueue(None, "some.task", {}, queue="known")
    with pytest.raises(ConfigurationError, match="max_running"):
        app.controls.limit("known", max_running=0)
    with pytest.raises(ConfigurationError, match="rate_per_second"):
        app.controls.limit("known", rate_per_second=-1)
    with pytest.raises(ConfigurationError, match="burst goes with a rate"):
        app.controls.limit("known", burst=5)
    with pytest.raises(ConfigurationError, match="not a queue name"):
        app.controls.pause("bad name")
    with psycopg.connect(dsn, autocommit=True) as connection:
        for statement, message in (
            ("select pgqueue.limit_queue('known', -3, null)", "max_running must be at least 1"),
            ("select pgqueue.limit_queue('known', null, 0)", "rate_per_second must be more than 0"),
            ("select pgqueue.resume_queue('nowhere')", "no queue named 'nowhere'"),
        ):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
                connection.execute(statement)
    assert app.controls.all() == []

    def pgqueue(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pgqueue_command("--dsn", dsn, "queue", *arguments),
            env=subprocess_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    unknown = pgqueue("pause", "nowhere")
    assert unknown.returncode == 2 and "no queue named 'nowhere'" in unknown.stderr
    zero = pgqueue("limit", "known", "--max-running", "0")
    assert zero.returncode == 2 and "max_running" in zero.stderr
    limited = pgqueue("limit", "known", "--max-running", "4", "--rate", "2.5")
    assert limited.returncode == 0, limited.stderr
    assert limited.stdout.splitlines()[1].split() == ["known", "no", "4", "2.5", "3", "0", "-", "-"]
    lifted = pgqueue("limit", "known", "--max-running", "none")
    assert lifted.returncode == 0 and "no queue has controls" in lifted.stdout
    down = subprocess.run(
        pgqueue_command("--dsn", "postgresql://postgres@127.0.0.1:1/nowhere", "queue", "pause", "known"),
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and "cannot reach the database" in down.stderr


def test_a_limit_counts_running_jobs_of_every_worker_and_the_claim_stays_in_priority_order(
    connection: psycopg.Connection[Any],
) -> None:
    def claim(worker: str, limit: int) -> list[tuple[str, int]]:
        rows = connection.execute(
            "select queue, priority from pgqueue.claim_jobs(%s, array['q', 'r'], %s, 30)", (worker, limit)
        ).fetchall()
        return [(str(queue), int(priority)) for queue, priority in rows]

    for queue in ("q", "r"):
        for priority in (0, 5):
            connection.execute(
                "select pgqueue.enqueue('t', queue => %s, priority => %s) from generate_series(1, 3)",
                (queue, priority),
            )
    connection.execute("select pgqueue.limit_queue('q', 2, null)")
    # priority first across both queues, q capped at 2
    assert sorted(claim("w1", 5)) == [("q", 5), ("q", 5), ("r", 5), ("r", 5), ("r", 5)]
    assert claim("w2", 5) == [("r", 0), ("r", 0), ("r", 0)]  # q has 2 running, on w1
    held = connection.execute(
        "select array_agg(id), array_agg(attempt) from pgqueue.active_jobs"
        " where worker = 'w1' and queue = 'q'"
    ).fetchone()
    assert held is not None
    connection.execute(
        "select pgqueue.complete_jobs('w1', %s, %s, array['succeeded', 'succeeded'],"
        " array['null', 'null']::jsonb[], array[null, null]::jsonb[], array[null, null]::float8[])",
        held,
    )
    assert sorted(claim("w2", 5)) == [("q", 0), ("q", 5)]  # two finished: two more may start


def test_an_enqueue_past_a_queues_maximum_depth_is_refused_with_queue_full(
    new_app: Callable[..., App], dsn: str
) -> None:
    app = new_app()

    @app.task(name="thumbnails.make", queue="thumbnails")
    def make(n: int) -> int:
        return n

    first = make.enqueue(None, n=0)
    app.controls.limit("thumbnails", max_depth=3)
    make.enqueue_many(None, [{"n": 1}, {"n": 2}])  # 3 waiting: full, not past it
    with pytest.raises(QueueFull, match="queue 'thumbnails' is full: 3 job") as refused:
        make.enqueue(None, n=3)
    assert (refused.value.queue, refused.value.depth, refused.value.max_depth) == ("thumbnails", 3, 3)
    with pytest.raises(QueueFull):  # a batch goes whole or not at all
        make.enqueue_many(None, [{"n": 4}])
    with psycopg.connect(dsn, autocommit=True) as connection:
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="is full"):
            connection.execute(
                "select pgqueue.enqueue('thumbnails.make', '{\"n\": 5}', queue => 'thumbnails')"
            )
        waiting = connection.execute(
            "select count(*) from pgqueue.active_jobs where queue = 'thumbnails'"
        ).fetchone()
        assert waiting == (3,)
        # a job already accepted is never refused: a retry goes back however full the queue
        claimed = connection.execute(
            "select id, attempt from pgqueue.claim_jobs('w', array['thumbnails'], 1, 30)"
        ).fetchone()
        assert claimed is not None and claimed[0] == first
        make.enqueue(None, n=6)  # room again: the claimed one no longer waits
        retried = connection.execute(
            "select state::text from pgqueue.complete_jobs('w', array[%s::bigint], array[%s],"
            " array['failed'], array[null::jsonb], array['{\"error\": \"x\"}'::jsonb], array[null::float8])",
            claimed,
        ).fetchall()
        assert retried == [("queued",)]
    app.controls.limit("thumbnails", max_depth=None)
    make.enqueue(None, n=7)  # lifted
    with pytest.raises(ConfigurationError, match="max_depth"):
        app.controls.limit("thumbnails", max_depth=0)


@pytest.mark.slow
def test_a_limit_near_the_workers_slots_holds_while_claims_overlap(
    dsn: str, sample: App, worker_processes: WorkerProcesses
) -> None:
    # 3 workers x 4 slots = 12 against a limit of 10: the limit can bind, so claims count
    # exactly (and overlap only while it cannot, see the test below)
    ids = sample_app.timed.enqueue_many(None, [{"seconds": 0.05}] * 200)
    sample.controls.limit("limited", max_running=10)
    workers = [worker_processes.start(dsn, "--concurrency", "4") for _ in range(3)]
    states = wait_for_states(dsn, ids, ["succeeded"], timeout=120)
    assert set(states.values()) == {"succeeded"}
    for worker in workers:
        stop(worker)
    peak = most_at_once(list(handler_times(worker_processes).values()))
    assert 4 < peak <= 10  # more than one worker's worth ran at once, never past the limit


def test_claims_overlap_while_a_limit_cannot_bind_and_take_turns_when_it_can(
    connection: psycopg.Connection[Any], dsn: str
) -> None:
    connection.execute("select pgqueue.enqueue('t', queue => 'capped') from generate_series(1, 20)")
    for worker in ("w1", "w2"):
        connection.execute(
            "select pgqueue.worker_seen(%s, 'host', 1, array['capped'], 5, 'test', 60)", (worker,)
        )

    def blocked_while_w1_claims(max_running: int) -> bool:
        """Does w2's claim wait for w1's claim transaction (still open) to end?"""
        connection.execute("select pgqueue.limit_queue('capped', %s, null)", (max_running,))
        with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
            first.execute("select * from pgqueue.claim_jobs('w1', array['capped'], 5, 30)")
            second.execute("set lock_timeout = '300ms'")
            try:
                second.execute("select * from pgqueue.claim_jobs('w2', array['capped'], 5, 30)")
            except psycopg.errors.LockNotAvailable:
                return True
            finally:
                second.rollback()
                first.rollback()
        return False

    # 2 live workers x 5 slots + 0 running <= 100: the limit cannot bind, claims overlap
    assert not blocked_while_w1_claims(100)
    # and a pause does not wait for a claim in flight either (it takes effect at the next)
    with psycopg.connect(dsn) as first, psycopg.connect(dsn, autocommit=True) as admin:
        first.execute("select * from pgqueue.claim_jobs('w1', array['capped'], 5, 30)")
        admin.execute("set lock_timeout = '300ms'")
        admin.execute("select pgqueue.pause_queue('capped')")
        admin.execute("select pgqueue.resume_queue('capped')")
        first.rollback()
    # 10 slots against a limit of 8: w2 must see what w1 takes, so it waits
    assert blocked_while_w1_claims(8)


def test_a_cap_per_worker_changed_at_run_time(new_app: Callable[..., App]) -> None:
    import threading
    import time

    app = new_app(poll_interval=0.1)
    lock = threading.Lock()
    running: dict[str, int] = {}
    peaks: dict[str, int] = {}
    release = threading.Event()

    @app.task(name="capped_job", queue="per_worker")
    def capped_job() -> None:
        from pgqueue import current_job

        worker = current_job().worker
        with lock:
            running[worker] = running.get(worker, 0) + 1
            peaks[worker] = max(peaks.get(worker, 0), running[worker])
        release.wait(0.2)
        time.sleep(0.02)
        with lock:
            running[worker] -= 1

    ids = capped_job.enqueue_many(None, [{}] * 40)
    app.controls.limit("per_worker", max_per_worker=2)
    with running_worker(app, concurrency=8), running_worker(app, concurrency=8):
        wait_for_states(app.dsn, ids[:20], ["succeeded"], timeout=60)
        assert len(peaks) == 2 and max(peaks.values()) == 2  # each worker, never more than 2
        app.controls.limit("per_worker", max_per_worker=5)  # raised while they run
        peaks.clear()
        wait_for_states(app.dsn, ids, ["succeeded"], timeout=60)
    assert max(peaks.values()) > 2 and max(peaks.values()) <= 5
    with pytest.raises(ConfigurationError, match="max_per_worker"):
        app.controls.limit("per_worker", max_per_worker=0)
    with (
        psycopg.connect(app.dsn, autocommit=True) as connection,
        pytest.raises(psycopg.errors.InvalidParameterValue, match="max_per_worker must be at least 1"),
    ):
        connection.execute("select pgqueue.limit_queue('per_worker', null, null, null, null, -2)")


def test_a_capped_worker_claims_again_as_its_jobs_end_not_at_its_next_poll(
    new_app: Callable[..., App], dsn: str
) -> None:
    # a 30 s poll, and no new job to NOTIFY about: only the end of a job can wake the claim
    app = new_app(poll_interval=30.0)

    @app.task(name="quick", queue="one_at_a_time")
    async def quick() -> None:
        return None

    ids = quick.enqueue_many(None, [{}] * 20)
    app.controls.limit("one_at_a_time", max_per_worker=1)
    with running_worker(app, concurrency=4):
        states = wait_for_states(dsn, ids, ["succeeded"], timeout=20)
    assert set(states.values()) == {"succeeded"}
