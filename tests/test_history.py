"""History at scale: claims that never read the future, heartbeats that are HOT updates,
and retention pruning that removes what it should, in bounded batches, without ever
making a claim or an enqueue wait. Against a real server; how fast it all stays as
history grows is measured in benchmarks/ (the history phase), never asserted here.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.conftest import pgqueue_command, subprocess_environment

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def execute(connection: psycopg.Connection[Any], statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    cursor = connection.execute(statement, params)
    return cursor.fetchall() if cursor.description else []


def claim(connection: psycopg.Connection[Any], queues: list[str], limit: int) -> list[int]:
    rows = execute(
        connection, "select id from pgqueue.claim_jobs('w1', %s, %s, 30, %s)", (queues, limit, NOW)
    )
    return [int(row[0]) for row in rows]


def enqueue(connection: psycopg.Connection[Any], queue: str, priority: int, run_at: datetime) -> int:
    rows = execute(
        connection,
        "select pgqueue.enqueue('t', queue => %s, priority => %s, run_at => %s)",
        (queue, priority, run_at),
    )
    return int(rows[0][0])


# -- claims -------------------------------------------------------------------------------


def test_claims_keep_priority_order_and_never_take_a_job_before_it_is_due(
    connection: psycopg.Connection[Any],
) -> None:
    later = NOW + timedelta(hours=1)
    future_high = enqueue(connection, "a", 10, later)  # the top level holds only the future
    due = {
        (queue, priority): enqueue(connection, queue, priority, NOW - timedelta(seconds=100 + priority))
        for queue in ("a", "b")
        for priority in (5, 0, -5)
    }
    first = claim(connection, ["a", "b"], 3)
    # level 5 of both queues (older first), then the oldest of level 0
    assert first == [due["a", 5], due["b", 5], due["a", 0]]
    assert claim(connection, ["a", "b"], 10) == [due["b", 0], due["a", -5], due["b", -5]]
    assert claim(connection, ["a", "b"], 10) == []
    state = execute(connection, "select state::text from pgqueue.jobs where id = %s", (future_high,))
    assert state == [("queued",)]


def test_a_queue_named_twice_is_claimed_from_once_in_priority_order(
    connection: psycopg.Connection[Any],
) -> None:
    high = [enqueue(connection, "a", 10, NOW - timedelta(seconds=10)) for _ in range(5)]
    enqueue(connection, "a", 5, NOW - timedelta(seconds=20))
    assert claim(connection, ["a", "a"], 4) == high[:4]


def test_a_due_job_beneath_many_levels_of_later_jobs_is_claimed(
    connection: psycopg.Connection[Any],
) -> None:
    # 200 priority levels above the due job, each holding one job for tomorrow: each is
    # one probe of the claim (its earliest job is not due), never a claim statement of its
    # own (which cost 20-30 ms of planning for 100 such levels; see benchmarks/README.md)
    execute(
        connection,
        "insert into pgqueue.active_jobs (task, queue, priority, run_at)"
        " select 't', 'work', n, %s + interval '1 day' from generate_series(1, 200) n",
        (NOW,),
    )
    due = enqueue(connection, "work", 0, NOW - timedelta(seconds=1))
    assert claim(connection, ["work"], 10) == [due]
    assert claim(connection, ["work"], 10) == []


def claim_buffers(connection: psycopg.Connection[Any]) -> int:
    """Shared buffers one claim of 10 jobs touches (rolled back), once its plans are cached."""
    counts = []
    for _ in range(3):  # the first call also reads the catalog to plan
        with connection.transaction(force_rollback=True):
            rows = execute(
                connection,
                "explain (analyze, buffers, format json)"
                " select * from pgqueue.claim_jobs('w1', array['work'], 10, 30, %s)",
                (NOW,),
            )
        plan = rows[0][0][0]["Plan"]
        counts.append(int(plan["Shared Hit Blocks"]) + int(plan.get("Shared Read Blocks", 0)))
    return min(counts[1:])


def schedule_later(connection: psycopg.Connection[Any], count: int, offset: int) -> None:
    """`count` jobs at priorities 10 to 12, all due after NOW: in the claim index, in
    front of every due job."""
    execute(
        connection,
        "insert into pgqueue.active_jobs (task, queue, priority, run_at)"
        " select 't', 'work', 10 + n %% 3, %s + n * interval '1 second'"
        " from generate_series(%s::integer, %s::integer) n",
        (NOW, offset + 1, offset + count),
    )
    execute(connection, "vacuum analyze pgqueue.active_jobs")


def test_jobs_scheduled_for_later_do_not_make_a_claim_read_more(connection: psycopg.Connection[Any]) -> None:
    execute(
        connection,
        "insert into pgqueue.active_jobs (task, queue, priority, run_at)"
        " select 't', 'work', 0, %s - n * interval '1 second' from generate_series(1, 1000) n",
        (NOW,),
    )
    execute(connection, "vacuum analyze pgqueue.active_jobs")
    no_future = claim_buffers(connection)
    schedule_later(connection, 20_000, 0)
    some_future = claim_buffers(connection)
    schedule_later(connection, 20_000, 20_000)
    more_future = claim_buffers(connection)
    # a few index probes per priority level (three of them here), whatever the number of
    # jobs in them: a claim that walked past the scheduled jobs read 170 buffers more for
    # the first 20,000, and as many again for the next
    assert some_future <= no_future + 3 * 25, (no_future, some_future)
    assert more_future <= some_future + 10, (some_future, more_future)


# -- heartbeats ------------------------------------------------------------------------------


def test_heartbeats_are_hot_updates(connection: psycopg.Connection[Any]) -> None:
    execute(connection, "select pgqueue.enqueue('t') from generate_series(1, 200)")
    execute(connection, "vacuum analyze pgqueue.active_jobs")  # pages as a worker's claim finds them
    held = execute(connection, "select id, attempt from pgqueue.claim_jobs('w1', array['default'], 200, 30)")
    ids, attempts = [int(row[0]) for row in held], [int(row[1]) for row in held]
    # the claim's old row versions removed, as autovacuum does on a table that churns
    # (this server may run without it): the heartbeats find the pages as a worker's do
    execute(connection, "vacuum pgqueue.active_jobs")

    def updates() -> tuple[int, int]:
        execute(connection, "select pg_stat_force_next_flush()")
        with connection.transaction():
            execute(connection, "select pg_stat_clear_snapshot()")
            rows = execute(
                connection,
                "select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables"
                " where schemaname = 'pgqueue' and relname = 'active_jobs'",
            )
        return int(rows[0][0]), int(rows[0][1])

    before = updates()
    for _ in range(10):
        extended = execute(
            connection,
            "select count(*) from pgqueue.heartbeat_v2('w1', %s, %s, 30) where extended",
            (ids, attempts),
        )
        assert extended == [(200,)]
    after = updates()
    updated, hot = after[0] - before[0], after[1] - before[1]
    assert updated == 2000
    # With an index on the lease, not one could be. Here 83-86% are (benchmarks/): a page's
    # first heartbeats may find it full, and fewer when other sessions' snapshots keep
    # old row versions from being pruned (measured 75% beside a second test suite).
    assert hot >= 0.5 * updated, f"{hot} of {updated} heartbeat updates were HOT"


# -- retention and pruning ----------------------------------------------------------------


def finished(
    connection: psycopg.Connection[Any],
    state: str,
    queue: str,
    age: timedelta,
    count: int = 1,
    now: datetime = NOW,
) -> None:
    """`count` jobs that reached `state` `age` before `now`."""
    execute(
        connection,
        "insert into pgqueue.finished_jobs (task, queue, state, attempt, started_at, finished_at)"
        " select 't', %s, %s::pgqueue.job_state, 1, %s, %s from generate_series(1, %s)",
        (queue, state, now - age, now - age, count),
    )


def prune(connection: psycopg.Connection[Any], limit: int = 1000, dry_run: bool = False) -> dict[str, int]:
    rows = execute(
        connection,
        "select state::text, queue, jobs from pgqueue.prune_jobs(%s, %s, %s)",
        (limit, dry_run, NOW),
    )
    return {f"{state}/{queue}": int(jobs) for state, queue, jobs in rows}


def remaining(connection: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    rows = execute(connection, "select state::text, queue, count(*) from pgqueue.jobs group by 1, 2")
    return {(state, queue): int(count) for state, queue, count in rows}


def test_pruning_keeps_each_final_state_for_its_time_and_a_queue_for_its_own(
    connection: psycopg.Connection[Any],
) -> None:
    day = timedelta(days=1)
    finished(connection, "succeeded", "default", 2 * day, 3)  # past the default 1 day
    finished(connection, "succeeded", "default", 0.5 * day, 2)
    finished(connection, "succeeded", "audit", 2 * day, 4)  # kept 30 days by its own policy
    finished(connection, "dead", "default", 10 * day, 5)  # the dead are kept 14 days
    finished(connection, "dead", "default", 15 * day, 6)
    finished(connection, "cancelled", "default", 2 * day, 1)
    # a queued job, however old, is never pruned
    execute(connection, "select pgqueue.enqueue('t', run_at => %s)", (NOW - 30 * day,))
    execute(connection, "select pgqueue.set_retention('succeeded', interval '30 days', 'audit')")

    assert prune(connection, dry_run=True) == {"succeeded/*": 3, "dead/*": 6, "cancelled/*": 1}
    assert sum(remaining(connection).values()) == 22  # a dry run removes nothing
    assert prune(connection) == {"succeeded/*": 3, "dead/*": 6, "cancelled/*": 1}
    assert remaining(connection) == {
        ("succeeded", "default"): 2,
        ("succeeded", "audit"): 4,
        ("dead", "default"): 5,
        ("queued", "default"): 1,
    }
    assert prune(connection) == {}
    # keep forever: nothing of that state goes, however old
    execute(connection, "select pgqueue.set_retention('dead', null)")
    finished(connection, "dead", "default", 400 * day)
    assert prune(connection) == {}


def test_pruning_goes_in_bounded_batches_and_skips_rows_another_transaction_holds(
    dsn: str, connection: psycopg.Connection[Any]
) -> None:
    finished(connection, "succeeded", "default", timedelta(days=2), 25)
    with psycopg.connect(dsn) as other:
        # another transaction holds the oldest of them (say, a redrive in progress)
        held = execute(other, "select id from pgqueue.finished_jobs order by id limit 1 for update")
        execute(connection, "set lock_timeout = '2s'")  # would fail, not hang, on a wait
        assert prune(connection, limit=10) == {"succeeded/*": 10}
        assert prune(connection, limit=10) == {"succeeded/*": 10}
        assert prune(connection, limit=10) == {"succeeded/*": 4}
        other.rollback()
    assert execute(connection, "select id from pgqueue.jobs") == held


def test_a_prune_in_progress_never_makes_a_claim_an_enqueue_or_a_completion_wait(
    dsn: str, connection: psycopg.Connection[Any]
) -> None:
    finished(connection, "succeeded", "default", timedelta(days=2), 5000)
    execute(connection, "select pgqueue.enqueue('t') from generate_series(1, 10)")
    with psycopg.connect(dsn) as pruner:
        # a batch deleted and not yet committed: its locks are held
        assert prune(pruner, limit=5000) == {"succeeded/*": 5000}
        with psycopg.connect(dsn, autocommit=True) as busy:
            execute(busy, "set lock_timeout = '2s'")  # a wait would fail the test, not hang it
            claimed = execute(
                busy, "select id, attempt from pgqueue.claim_jobs('w1', array['default'], 10, 30)"
            )
            assert len(claimed) == 10
            assert execute(busy, "select pgqueue.enqueue('t')")
            # the successes go to the history table the prune is deleting from
            completed = execute(
                busy,
                "select state::text from pgqueue.complete_jobs('w1', %s, %s,"
                " array_fill('succeeded'::text, array[10]), array_fill('null'::jsonb, array[10]),"
                " array_fill(null::jsonb, array[10]), array_fill(null::float8, array[10]))",
                ([row[0] for row in claimed], [row[1] for row in claimed]),
            )
            assert completed == [("succeeded",)] * 10
        pruner.commit()
    assert remaining(connection) == {("succeeded", "default"): 10, ("queued", "default"): 1}


def test_a_prune_by_hand_ends_while_jobs_finish_faster_than_it_removes_them(
    dsn: str, connection: psycopg.Connection[Any]
) -> None:
    from pgqueue.maintenance.pruning import BATCH, prune_now
    from pgqueue.sql import query

    execute(connection, "select pgqueue.set_retention('succeeded', interval '0')")
    finished(connection, "succeeded", "default", timedelta(hours=1), 2 * BATCH + 500, now=datetime.now(UTC))

    class FinishingFast:
        """The connection `pgqueue prune` uses, on which more jobs than a batch finish
        before each of its batches."""

        def __init__(self, pruning: psycopg.Connection[Any]) -> None:
            self.pruning, self.batches = pruning, 0

        def execute(self, statement: str, params: Any = None) -> Any:
            if statement == query("prune_jobs"):
                self.batches += 1
                assert self.batches < 50, "pgqueue prune is still going after 50 batches"
                execute(
                    connection,
                    "insert into pgqueue.finished_jobs (task, state, attempt, finished_at)"
                    " select 't', 'succeeded', 1, now() from generate_series(1, %s)",
                    (BATCH + 500,),
                )
            return self.pruning.execute(statement, params)

    with psycopg.connect(dsn, autocommit=True) as pruning:
        removed = prune_now(FinishingFast(pruning))  # type: ignore[arg-type]
    # what had finished when it started, and nothing that finished after
    assert removed == [("succeeded", "*", 2 * BATCH + 500)]


def test_the_retention_and_prune_commands(dsn: str, connection: psycopg.Connection[Any]) -> None:
    # the command prunes by the server's clock
    finished(connection, "cancelled", "default", timedelta(days=3), 7, now=datetime.now(UTC))

    def pgqueue(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pgqueue_command("--dsn", dsn, *arguments),
            env=subprocess_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = pgqueue("retention")
    assert listed.returncode == 0 and "cancelled  *                    1 day" in listed.stdout
    assert pgqueue("prune", "--dry-run").stdout.strip() == "would remove 7 cancelled job(s) (every queue)"
    assert remaining(connection) == {("cancelled", "default"): 7}
    kept = pgqueue("retention", "cancelled", "7 days")
    assert kept.returncode == 0 and "cancelled  *                    7 days" in kept.stdout
    assert pgqueue("prune").stdout.strip() == "removed 0 jobs: nothing is past its retention"
    assert pgqueue("retention", "cancelled", "2 days").returncode == 0
    assert pgqueue("prune").stdout.strip() == "removed 7 cancelled job(s) (every queue)"
    assert remaining(connection) == {}
    # a queue's own retention, and back to the state's default
    own = pgqueue("retention", "succeeded", "30 days", "--queue", "audit")
    assert own.returncode == 0 and "succeeded  audit                30 days" in own.stdout
    back = pgqueue("retention", "succeeded", "default", "--queue", "audit")
    assert back.returncode == 0 and "audit" not in back.stdout
    again = pgqueue("retention", "succeeded", "default", "--queue", "audit")
    assert "queue audit had no retention of its own for succeeded jobs" in again.stdout
    assert pgqueue("retention", "succeeded", "default").returncode == 2  # '*' has no default to go back to
    bad = pgqueue("retention", "succeeded", "a while")
    assert bad.returncode == 2 and "cannot keep 'a while'" in bad.stderr
    assert pgqueue("retention", "succeeded").returncode == 2  # a state needs its time


@pytest.mark.slow
def test_the_maintenance_leader_prunes_while_a_worker_runs(dsn: str, sample: Any) -> None:
    from pgqueue.testing import running_worker, wait_for, wait_for_states

    with psycopg.connect(dsn, autocommit=True) as connection:
        execute(
            connection,
            "insert into pgqueue.finished_jobs (task, queue, state, attempt, started_at, finished_at)"
            " select 'old', 'default', 'succeeded', 1, now() - interval '3 days', now() - interval '3 days'"
            " from generate_series(1, 3000)",
        )
        settings = sample.settings.model_copy(update={"rescue_interval": 0.2})
        with running_worker(sample, settings=settings):
            job_id = sample.enqueue(None, "cpu", {"n": 5}, unique_key="five")  # a key its end frees
            wait_for_states(dsn, [job_id])  # ran (its lead may have pruned before it came)
            wait_for(
                lambda: execute(connection, "select count(*) from pgqueue.jobs where task = 'old'") == [(0,)],
                timeout=60,
                what="the leader to prune the 3,000 old jobs",
            )
            wait_for(
                lambda: execute(connection, "select count(*) from pgqueue.job_keys") == [(0,)],
                timeout=60,
                what="the leader to forget the finished job's unique key",
            )
        kept = execute(connection, "select state::text from pgqueue.jobs where id = %s", (job_id,))
    assert kept == [("succeeded",)]  # today's job is kept
