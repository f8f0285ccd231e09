"""The SQL state machine with an injected clock: exact backoff, leases, rescue, cancel, redrive."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgqueue.status import retry_dead_letter

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def enqueue(connection: psycopg.Connection[Any], **options: Any) -> int:
    names = ", ".join(f"{key} => %({key})s" for key in options)
    row = connection.execute(
        f"select pgqueue.enqueue('t', '{{}}'{', ' if names else ''}{names})", options
    ).fetchone()
    assert row
    return int(row[0])


def claim(
    connection: psycopg.Connection[Any], now: datetime, worker: str = "w1", limit: int = 10, lease: float = 30
) -> list[int]:
    rows = connection.execute(
        "select id from pgqueue.claim_jobs(%s, %s, %s, %s, %s)",
        (worker, ["default"], limit, lease, now),
    ).fetchall()
    return sorted(row[0] for row in rows)


def fail(
    connection: psycopg.Connection[Any],
    job_id: int,
    attempt: int,
    now: datetime,
    outcome: str = "failed",
    retry_in: float | None = None,
    worker: str = "w1",
) -> list[Any]:
    return connection.execute(
        "select id, state::text, run_at from pgqueue.complete_jobs(%s, %s, %s, %s, %s::jsonb[],"
        " %s::jsonb[], %s::double precision[], %s)",
        (
            worker,
            [job_id],
            [attempt],
            [outcome],
            [None],
            [json.dumps({"kind": "exception", "error": "boom", "traceback": None})],
            [retry_in],
            now,
        ),
    ).fetchall()


def job(connection: psycopg.Connection[Any], job_id: int) -> tuple[Any, ...]:
    row = connection.execute(
        "select state::text, attempt, run_at, worker, lease_expires_at, jsonb_array_length(errors)"
        " from pgqueue.jobs where id = %s",
        (job_id,),
    ).fetchone()
    assert row
    return tuple(row)


@pytest.mark.parametrize(
    ("backoff", "base", "cap", "expected"),
    [
        ("exponential", 2.0, 3600.0, [2, 4, 8, 16, 32]),
        ("exponential", 1.0, 5.0, [1, 2, 4, 5, 5]),
        ("linear", 3.0, 3600.0, [3, 6, 9, 12, 15]),
        ("fixed", 7.0, 7.0, [7, 7, 7, 7, 7]),
    ],
)
def test_exact_backoff_timestamps_with_an_injected_clock(
    connection: psycopg.Connection[Any], backoff: str, base: float, cap: float, expected: list[int]
) -> None:
    job_id = enqueue(
        connection,
        run_at=T0,
        max_attempts=6,
        backoff=backoff,
        backoff_base_seconds=base,
        backoff_max_seconds=cap,
        backoff_jitter=0.0,
    )
    now = T0
    for attempt, delay in enumerate(expected, start=1):
        assert claim(connection, now) == [job_id]
        # one second of work, then the failure is recorded
        now += timedelta(seconds=1)
        [(_, state, run_at)] = fail(connection, job_id, attempt, now)
        assert state == "queued"
        assert run_at == now + timedelta(seconds=delay), f"attempt {attempt}"
        # not claimable a microsecond early, claimable exactly on time
        assert claim(connection, run_at - timedelta(microseconds=1)) == []
        now = run_at
    assert claim(connection, now) == [job_id]
    [(_, state, _)] = fail(connection, job_id, 6, now)
    assert state == "dead"
    assert job(connection, job_id)[5] == 6  # every attempt's error kept


def test_jitter_shortens_the_delay_by_at_most_its_fraction_and_is_repeatable(
    connection: psycopg.Connection[Any],
) -> None:
    delays = []
    for _ in range(20):
        job_id = enqueue(connection, run_at=T0, backoff_base_seconds=100.0, backoff_jitter=0.5)
        claim(connection, T0, limit=1)
        [(_, _, run_at)] = fail(connection, job_id, 1, T0)
        delays.append((run_at - T0).total_seconds())
        row = connection.execute(
            "select pgqueue.backoff_seconds('exponential', 100, 3600, 0.5, 1, %s)", (job_id,)
        ).fetchone()
        assert row and row[0] == pytest.approx(delays[-1], abs=1e-5)
    assert all(50 <= delay <= 100 for delay in delays)
    assert len({round(delay, 3) for delay in delays}) > 10  # spread out, not one thundering herd


def test_handler_requested_retry_uses_its_own_delay(connection: psycopg.Connection[Any]) -> None:
    job_id = enqueue(connection, run_at=T0)
    claim(connection, T0)
    [(_, state, run_at)] = fail(connection, job_id, 1, T0, outcome="retry", retry_in=42.5)
    assert (state, run_at) == ("queued", T0 + timedelta(seconds=42.5))


def test_fatal_goes_straight_to_the_dead_letter(connection: psycopg.Connection[Any]) -> None:
    job_id = enqueue(connection, run_at=T0, max_attempts=10)
    claim(connection, T0)
    [(_, state, _)] = fail(connection, job_id, 1, T0, outcome="fatal")
    assert state == "dead"


def test_claim_takes_a_lease_and_skips_locked_and_running_jobs(connection: psycopg.Connection[Any]) -> None:
    ids = [enqueue(connection, run_at=T0) for _ in range(5)]
    assert claim(connection, T0, worker="a", limit=3, lease=10) == ids[:3]
    assert claim(connection, T0, worker="b", limit=10, lease=10) == ids[3:]
    assert claim(connection, T0, worker="c") == []
    state, attempt, _, worker, lease_expires_at, _ = job(connection, ids[0])
    assert (state, attempt, worker, lease_expires_at) == ("running", 1, "a", T0 + timedelta(seconds=10))
    # a row locked by another transaction is skipped, not waited for
    enqueue(connection, run_at=T0)
    with psycopg.connect(connection.info.dsn) as other:
        other.execute("select id from pgqueue.active_jobs where state = 'queued' for update")
        assert claim(connection, T0, worker="c") == []
    assert len(claim(connection, T0, worker="c")) == 1


def test_outcome_from_a_worker_that_lost_its_lease_changes_nothing(
    connection: psycopg.Connection[Any],
) -> None:
    job_id = enqueue(connection, run_at=T0, max_attempts=5)
    claim(connection, T0, worker="old", lease=5)
    # the lease runs out and a sweep rescues the job
    rescued = connection.execute(
        "select id, state::text from pgqueue.rescue_expired_jobs(%s)", (T0 + timedelta(seconds=6),)
    ).fetchall()
    assert rescued == [(job_id, "queued")]
    state, attempt, _, worker, _, errors = job(connection, job_id)
    assert (state, attempt, worker, errors) == ("queued", 1, None, 1)
    claim(connection, T0 + timedelta(seconds=8), worker="new")  # after the rescue's backoff
    # the old worker comes back and reports success: ignored, the new attempt owns the job
    late = connection.execute(
        "select id from pgqueue.complete_jobs('old', %s, %s, %s, %s::jsonb[], %s::jsonb[],"
        " %s::double precision[], %s)",
        ([job_id], [1], ["succeeded"], ['"late"'], [None], [None], T0 + timedelta(seconds=9)),
    ).fetchall()
    assert late == []
    assert job(connection, job_id)[:2] == ("running", 2)


def test_heartbeat_extends_only_the_owners_leases(connection: psycopg.Connection[Any]) -> None:
    mine, theirs = enqueue(connection, run_at=T0), enqueue(connection, run_at=T0)
    claim(connection, T0, worker="me", limit=1, lease=5)
    claim(connection, T0, worker="them", limit=1, lease=5)
    later = T0 + timedelta(seconds=4)
    extended = connection.execute(
        "select pgqueue.heartbeat('me', %s, 5, %s)", ([mine, theirs], later)
    ).fetchall()
    assert extended == [(mine,)]
    assert job(connection, mine)[4] == later + timedelta(seconds=5)
    assert job(connection, theirs)[4] == T0 + timedelta(seconds=5)
    rescued = connection.execute(
        "select id from pgqueue.rescue_expired_jobs(%s)", (T0 + timedelta(seconds=6),)
    ).fetchall()
    assert rescued == [(theirs,)]


def test_rescue_dead_letters_a_job_on_its_last_attempt(connection: psycopg.Connection[Any]) -> None:
    job_id = enqueue(connection, run_at=T0, max_attempts=1)
    claim(connection, T0, lease=1)
    rescued = connection.execute(
        "select id, state::text from pgqueue.rescue_expired_jobs(%s)", (T0 + timedelta(seconds=2),)
    ).fetchall()
    assert rescued == [(job_id, "dead")]
    row = connection.execute(
        "select errors->0->>'kind', errors->0->>'error' from pgqueue.jobs where id = %s", (job_id,)
    ).fetchone()
    assert row and row[0] == "lease_expired" and "stopped heartbeating" in row[1]


def test_release_hands_back_orphans_of_a_lost_claim_reply(connection: psycopg.Connection[Any]) -> None:
    kept, *orphans = [enqueue(connection, run_at=T0) for _ in range(3)]
    claim(connection, T0, worker="w")
    released = connection.execute("select pgqueue.release_jobs('w', %s, %s)", ([kept], T0)).fetchall()
    assert sorted(row[0] for row in released) == orphans
    assert [job(connection, job_id)[:2] for job_id in orphans] == [("queued", 0), ("queued", 0)]
    assert job(connection, kept)[:2] == ("running", 1)


def test_cancel_and_redrive_from_sql(connection: psycopg.Connection[Any]) -> None:
    queued, running = enqueue(connection, run_at=T0), enqueue(connection, run_at=T0)
    claim(connection, T0, limit=1)  # takes `queued` (lower id)... so cancel the other one
    row = connection.execute("select pgqueue.cancel_job(%s)", (running,)).fetchone()
    assert row == (True,)
    row = connection.execute("select pgqueue.cancel_job(%s)", (queued,)).fetchone()
    assert row == (False,)  # already running: not cancelled
    assert job(connection, running)[0] == "cancelled"
    row = connection.execute("select pgqueue.retry_job(%s)", (running,)).fetchone()
    assert row == (True,)
    assert job(connection, running)[:2] == ("queued", 0)


def test_claim_across_several_queues_keeps_priority_order(connection: psycopg.Connection[Any]) -> None:
    low = enqueue(connection, run_at=T0, queue="a", priority=0)
    high = enqueue(connection, run_at=T0, queue="b", priority=10)
    middle = enqueue(connection, run_at=T0, queue="a", priority=5)
    enqueue(connection, run_at=T0, queue="c", priority=20)  # not a queue this worker serves

    def claim_from(queues: list[str]) -> list[int]:
        rows = connection.execute(
            "select id from pgqueue.claim_jobs('w', %s, 1, 30, %s)", (queues, T0)
        ).fetchall()
        return [row[0] for row in rows]

    assert [claim_from(["a", "b"]) for _ in range(4)] == [[high], [middle], [low], []]


def test_redrive_of_the_whole_dead_letter_goes_in_batches(connection: psycopg.Connection[Any]) -> None:
    connection.execute("select pgqueue.enqueue('broken.task') from generate_series(1, 23)")
    connection.execute("select pgqueue.enqueue('fine.task')")
    connection.execute("update pgqueue.jobs set state = 'dead', attempt = 3 where task = 'broken.task'")
    # retry_job would requeue a cancelled job too: only the dead letter may be redriven
    connection.execute("update pgqueue.jobs set state = 'cancelled' where task = 'fine.task'")
    assert retry_dead_letter(connection, batch=5) == 23
    row = connection.execute("select count(*) from pgqueue.jobs where state = 'dead'").fetchone()
    assert row == (0,)
    assert retry_dead_letter(connection, batch=5) == 0
    untouched = connection.execute("select state::text from pgqueue.jobs where task = 'fine.task'").fetchone()
    assert untouched == ("cancelled",)


def rescue(connection: psycopg.Connection[Any], now: datetime, limit: int = 1000) -> list[tuple[int, str]]:
    rows = connection.execute(
        "select id, state::text from pgqueue.rescue_expired_jobs(%s, %s)", (now, limit)
    ).fetchall()
    return [(int(job_id), str(state)) for job_id, state in rows]


def test_rescue_waits_the_retry_backoff_before_the_next_attempt(connection: psycopg.Connection[Any]) -> None:
    job_id = enqueue(
        connection, run_at=T0, max_attempts=5, backoff="fixed", backoff_base_seconds=30, backoff_jitter=0
    )
    claim(connection, T0, lease=5)
    swept = T0 + timedelta(seconds=6)
    assert rescue(connection, swept) == [(job_id, "queued")]
    # a crash is a failed attempt: the job waits its backoff instead of starting again at once
    assert job(connection, job_id)[2] == swept + timedelta(seconds=30)
    assert claim(connection, swept + timedelta(seconds=29)) == []
    assert claim(connection, swept + timedelta(seconds=30)) == [job_id]


def test_a_job_that_kills_its_worker_three_times_in_a_row_is_dead_lettered(
    connection: psycopg.Connection[Any],
) -> None:
    job_id = enqueue(connection, run_at=T0, max_attempts=10, backoff="fixed", backoff_base_seconds=0)
    now = T0
    states = []
    for _ in range(3):
        claim(connection, now, lease=5)
        now += timedelta(seconds=6)
        states += [state for _, state in rescue(connection, now)]
    assert states == ["queued", "queued", "dead"]
    row = connection.execute(
        "select attempt, errors -> -1 ->> 'error' from pgqueue.jobs where id = %s", (job_id,)
    ).fetchone()
    assert row is not None and row[0] == 3 and "last 3 attempts all ended this way" in row[1]
    # each lost attempt is in the attempt history: claimed by w1 at its claim, end unknown
    attempts = connection.execute(
        "select attempt, worker, outcome, started_at, ended_at from pgqueue.attempts"
        " where job_id = %s order by attempt",
        (job_id,),
    ).fetchall()
    assert attempts == [
        (n, "w1", "lease_expired", T0 + timedelta(seconds=6 * (n - 1)), None) for n in (1, 2, 3)
    ]


def test_a_redriven_poison_job_gets_three_fresh_expiries_before_the_dead_letter(
    connection: psycopg.Connection[Any],
) -> None:
    job_id = enqueue(connection, run_at=T0, max_attempts=10, backoff="fixed", backoff_base_seconds=0)
    now = T0
    for _ in range(3):
        claim(connection, now, lease=5)
        now += timedelta(seconds=6)
        rescue(connection, now)
    assert job(connection, job_id)[0] == "dead"
    # the operator fixed what killed the workers and redrives the job
    row = connection.execute("select pgqueue.retry_job(%s, %s)", (job_id, now)).fetchone()
    assert row == (True,)
    states = []
    for _ in range(3):
        claim(connection, now, lease=5)
        now += timedelta(seconds=6)
        states += [state for _, state in rescue(connection, now)]
    assert states == ["queued", "queued", "dead"]  # not dead at its first expiry
    kinds = connection.execute(
        "select array_agg(e ->> 'kind' order by n) from pgqueue.jobs,"
        " jsonb_array_elements(errors) with ordinality as x(e, n) where id = %s",
        (job_id,),
    ).fetchone()
    assert kinds == (["lease_expired"] * 3 + ["redriven"] + ["lease_expired"] * 3,)


def test_a_failure_in_between_resets_the_count_of_lease_expiries(connection: psycopg.Connection[Any]) -> None:
    job_id = enqueue(connection, run_at=T0, max_attempts=10, backoff="fixed", backoff_base_seconds=0)
    now = T0
    for step in range(4):
        claim(connection, now, lease=5)
        if step == 1:  # an ordinary failure: not the worker-killing kind
            fail(connection, job_id, 2, now)
        else:
            now += timedelta(seconds=6)
            assert rescue(connection, now) == [(job_id, "queued")]
    assert job(connection, job_id)[0] == "queued"  # two expiries since the failure, not three


def hand_back(connection: psycopg.Connection[Any], job_id: int, now: datetime, kind: str) -> str:
    """Claim the job and hand it back as a worker that cannot run it does (give up after 60 s)."""
    assert claim(connection, now) == [job_id]
    attempt = connection.execute("select attempt from pgqueue.jobs where id = %s", (job_id,)).fetchone()
    assert attempt is not None
    error = {"kind": kind, "error": f"cannot run it: {kind}", "traceback": None, "give_up_after": 60}
    rows = connection.execute(
        "select state::text from pgqueue.complete_jobs(%s, %s, %s, %s, %s::jsonb[], %s::jsonb[],"
        " %s::double precision[], %s)",
        ("w1", [job_id], [attempt[0]], ["deferred"], [None], [json.dumps(error)], [0.0], now),
    ).fetchall()
    return str(rows[0][0])


def test_hand_backs_in_a_row_share_one_error_entry_and_their_clock(
    connection: psycopg.Connection[Any],
) -> None:
    job_id = enqueue(connection, run_at=T0, max_attempts=10, backoff="fixed", backoff_base_seconds=0)
    # a deploy: old workers do not know the task, new ones cannot fit the arguments
    states = [
        hand_back(connection, job_id, T0 + timedelta(seconds=step * 10), kind)
        for step, kind in enumerate(["unknown_task", "bad_arguments"] * 3)
    ]
    assert states == ["queued"] * 6  # 50 s since the first hand-back: under the 60 s limit
    errors = connection.execute("select errors from pgqueue.jobs where id = %s", (job_id,)).fetchone()
    assert errors is not None
    [entry] = errors[0]
    assert (entry["kind"], entry["count"]) == ("bad_arguments", 6)
    assert datetime.fromisoformat(entry["first_at"]) == T0
    assert hand_back(connection, job_id, T0 + timedelta(seconds=61), "unknown_task") == "dead"
    # a failed attempt in between ends the row: the next hand-back starts a new clock
    other = enqueue(connection, run_at=T0, max_attempts=10, backoff="fixed", backoff_base_seconds=0)
    hand_back(connection, other, T0, "unknown_task")
    assert claim(connection, T0) == [other]
    fail(connection, other, 1, T0)
    assert hand_back(connection, other, T0 + timedelta(seconds=100), "unknown_task") == "queued"
    kinds = connection.execute(
        "select jsonb_path_query_array(errors, '$[*].kind') from pgqueue.jobs where id = %s", (other,)
    ).fetchone()
    assert kinds == (["unknown_task", "exception", "unknown_task"],)


def test_rescue_works_in_batches_of_the_oldest_expiries(connection: psycopg.Connection[Any]) -> None:
    ids = [enqueue(connection, run_at=T0) for _ in range(5)]
    for offset, job_id in enumerate(ids):  # leases expiring one second apart, last claimed first
        connection.execute(
            "update pgqueue.jobs set state = 'running', attempt = 1, worker = 'w',"
            " lease_expires_at = %s where id = %s",
            (T0 + timedelta(seconds=10 - offset), job_id),
        )
    later = T0 + timedelta(seconds=60)
    assert sorted(job_id for job_id, _ in rescue(connection, later, limit=2)) == sorted(ids[-2:])
    assert len(rescue(connection, later, limit=2)) == 2
    assert len(rescue(connection, later, limit=2)) == 1
    assert rescue(connection, later, limit=2) == []


def test_one_leader_at_a_time_until_its_lease_runs_out(connection: psycopg.Connection[Any]) -> None:
    def lead(worker: str, now: datetime) -> bool:
        row = connection.execute("select pgqueue.lead('maintenance', %s, 15, %s)", (worker, now)).fetchone()
        return bool(row and row[0])

    assert lead("a", T0) is True
    assert lead("b", T0 + timedelta(seconds=1)) is False
    assert lead("a", T0 + timedelta(seconds=10)) is True  # renewed until T0 + 25 s
    assert lead("b", T0 + timedelta(seconds=20)) is False
    assert lead("b", T0 + timedelta(seconds=26)) is True  # a's lease ran out: b takes over
    assert lead("a", T0 + timedelta(seconds=27)) is False
    connection.execute("select pgqueue.resign('maintenance', 'b')")
    assert lead("a", T0 + timedelta(seconds=28)) is True  # no wait after a resignation


def test_heartbeat_never_waits_for_a_row_a_completion_is_writing(
    connection: psycopg.Connection[Any], dsn: str
) -> None:
    mine, busy, theirs = (enqueue(connection, run_at=T0) for _ in range(3))
    claim(connection, T0, worker="me", limit=2, lease=5)
    claim(connection, T0, worker="them", limit=1, lease=5)
    with psycopg.connect(dsn) as completion:  # holds the row lock a flush would hold
        completion.execute("select 1 from pgqueue.active_jobs where id = %s for update", (busy,))
        connection.execute("set statement_timeout = '5s'")  # waiting would fail the test
        rows = connection.execute(
            "select id, attempt, extended from pgqueue.heartbeat_v2('me', %s, %s, 5, %s) order by id",
            ([mine, busy, theirs, mine], [1, 1, 1, 2], T0 + timedelta(seconds=4)),
        ).fetchall()
        connection.execute("reset statement_timeout")
    # the busy row is still mine but was left alone; the other worker's job is not mine,
    # nor is an attempt of my job that is not the one running
    assert rows == [(mine, 1, True), (busy, 1, False)]
    assert job(connection, mine)[4] == T0 + timedelta(seconds=9)
    assert job(connection, busy)[4] == T0 + timedelta(seconds=5)
