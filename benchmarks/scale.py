"""Phases at scale: metrics cost, the hot path beside history, a backlog, pruning under load, a soak."""

from __future__ import annotations

import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import tasks as bench
from benchmarks.harness import Bench, _enqueue_for, drain_once, log, one
from benchmarks.latency import measure_latency
from benchmarks.report import rate
from pgqueue.database import watching

# -- 5. metrics: their cost on the hot path, and a scrape of the exporter -------------------


def bench_metrics_overhead(b: Bench) -> None:
    """Drain with a worker's metrics on (--metrics-port, every job counted and timed) and
    off, in alternation, one process at c=200: the median of each side, and their ratio."""
    rounds = 3 if b.config.name == "full" else 1
    on: list[float] = []
    off: list[float] = []
    for _ in range(rounds):
        off.append(drain_once(b, 1, 200, label="-nometrics")["window_jobs_per_s"])
        on.append(
            drain_once(b, 1, 200, env={"PGQUEUE_METRICS_PORT": "0"}, label="-metrics")["window_jobs_per_s"]
        )
    b.results["metrics_overhead"] = {
        "off_jobs_per_s": statistics.median(off),
        "on_jobs_per_s": statistics.median(on),
        "off_rounds": off,
        "on_rounds": on,
    }
    log(f"drain with metrics {rate(statistics.median(on))}, without {rate(statistics.median(off))}")


def bench_exporter_scrape(b: Bench) -> None:
    """Scrapes of the database exporter's collector with a big finished history (a million
    jobs in the full run) beside a small live queue: median and worst of 20 scrapes."""
    from prometheus_client import CollectorRegistry, generate_latest

    from pgqueue.metrics import DatabaseCollector

    history = 1_000_000 if b.config.name == "full" else 100_000
    b.reset()
    b.admin.execute(
        "insert into pgqueue.finished_jobs (task, queue, state, attempt, run_at, started_at, finished_at)"
        " select 'old', 'bench', 'succeeded', 1, t, t, t + interval '1 second'"
        " from generate_series(1, %s) as n,"
        " lateral (select now() - interval '30 days' + n * interval '1 millisecond') as s(t)",
        (history,),
    )
    b.fill(1_000)
    registry = CollectorRegistry()
    collector = DatabaseCollector(b.dsn)
    registry.register(collector)
    generate_latest(registry)  # connect once, as a running exporter is
    seconds = []
    for _ in range(20):
        started = time.perf_counter()
        generate_latest(registry)
        seconds.append(time.perf_counter() - started)
    collector.close()
    b.results["exporter_scrape"] = {
        "history_jobs": history,
        "median_ms": statistics.median(seconds) * 1000,
        "max_ms": max(seconds) * 1000,
    }
    log(f"exporter scrape with {history:,} finished jobs: median {statistics.median(seconds) * 1000:.1f} ms")


# -- 6. history: the hot path beside 10 million finished jobs and 100,000 scheduled ones -----


def build_history(b: Bench, finished: int, scheduled: int) -> float:
    """Finished jobs (a month of them: 98% succeeded, 1% dead, 1% cancelled) and jobs scheduled for the next
    days at priorities above the benchmark's, in both benchmark queues: in the claim
    index, in front of every due job. Server-side, a million rows per statement."""
    started = time.perf_counter()
    done = 0
    while done < finished:
        step = min(1_000_000, finished - done)
        b.admin.execute(
            "insert into pgqueue.finished_jobs"
            " (task, args, queue, state, attempt, run_at, started_at, finished_at)"
            " select 'bench.old', jsonb_build_object('n', n), %s,"
            # 98% successes, 1% dead, 1% cancelled
            " (case n %% 100 when 0 then 'dead' when 1 then 'cancelled' else 'succeeded' end)"
            "::pgqueue.job_state,"
            " 1, t, t, t + interval '10 milliseconds'"
            " from generate_series(%s::bigint, %s::bigint) n,"
            " lateral (select now() - interval '30 days' + n * interval '250 microseconds') s(t)",
            (bench.NOOP_QUEUE, done + 1, done + step),
        )
        done += step
    for queue in (bench.NOOP_QUEUE, bench.LATENCY_QUEUE):
        b.admin.execute(
            "insert into pgqueue.active_jobs (task, args, queue, priority, run_at)"
            " select 'bench.later', '{}', %s, 1 + n %% 3, now() + interval '1 day' + n * interval '1 second'"
            " from generate_series(1, %s) n",
            (queue, scheduled // 2),
        )
    b.admin.execute("vacuum (analyze) pgqueue.active_jobs, pgqueue.finished_jobs")
    b.checkpoint()
    return time.perf_counter() - started


def heartbeat_hot_ratio(b: Bench, jobs: int = 200, beats: int = 10) -> float:
    """Claim `jobs` fresh jobs, heartbeat them `beats` times: the share of HOT updates."""
    b.fill(jobs, queue="bench-heartbeat")
    held = b.admin.execute(
        "select id, attempt from pgqueue.claim_jobs('bench-hb', array['bench-heartbeat'], %s, 60)", (jobs,)
    ).fetchall()

    def updates() -> tuple[int, int]:
        b.admin.execute("select pg_stat_force_next_flush()")
        b.admin.execute("select pg_stat_clear_snapshot()")
        row = one(
            b.admin.execute(
                "select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables"
                " where schemaname = 'pgqueue' and relname = 'active_jobs'"
            )
        )
        return int(row[0]), int(row[1])

    before = updates()
    for _ in range(beats):
        b.admin.execute(
            "select count(*) from pgqueue.heartbeat_v2('bench-hb', %s, %s, 60)",
            ([row[0] for row in held], [row[1] for row in held]),
        )
    after = updates()
    b.admin.execute("delete from pgqueue.active_jobs where queue = 'bench-heartbeat'")
    return (after[1] - before[1]) / max(1, after[0] - before[0])


def query_ms(b: Bench, call: Callable[[], object], times: int = 10) -> float:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000


def watched(connection: psycopg.Connection[Any], read: Callable[[psycopg.Connection[Any]], Any]) -> Any:
    """`read` as the watching commands run it: one transaction without JIT."""
    with watching(connection):
        return read(connection)


def measure_hot_path(b: Bench, label: str) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    from pgqueue.metrics import DatabaseCollector
    from pgqueue.status import dead_letter, overview

    figures: dict[str, Any] = {}
    # a connection as `pgqueue status` reads on it: without JIT (see pgqueue/database.py)
    with psycopg.connect(b.dsn, autocommit=True) as connection:
        for n in range(50):
            bench.noop.enqueue(connection, n=n)  # warm-up
        rates = []
        for _ in range(3):
            jobs, elapsed = _enqueue_for(1.0, lambda n: bench.noop.enqueue(connection, n=n))
            rates.append(jobs / elapsed)
        figures["enqueue_jobs_per_s"] = statistics.median(rates)
        b.admin.execute(
            "delete from pgqueue.active_jobs where task = 'bench.noop' and state = 'queued'"
        )  # not part of the drain below
        figures["status_ms"] = query_ms(b, lambda: watched(connection, overview))
        figures["dead_letter_ms"] = query_ms(b, lambda: watched(connection, dead_letter))
    registry = CollectorRegistry()
    collector = DatabaseCollector(b.dsn)
    registry.register(collector)
    generate_latest(registry)
    figures["exporter_ms"] = query_ms(b, lambda: generate_latest(registry))
    collector.close()
    figures["heartbeat_hot_ratio"] = heartbeat_hot_ratio(b)
    figures["drain_2p_jobs_per_s"] = drain_once(b, 2, 200, label=f"-{label}", reset=False)[
        "window_jobs_per_s"
    ]
    latency = measure_latency(b, reset=False)
    figures["latency_p50_ms"], figures["latency_p99_ms"] = latency["p50_ms"], latency["p99_ms"]
    log(f"hot path ({label}): " + ", ".join(f"{key} {value:,.2f}" for key, value in figures.items()))
    return figures


def bench_history(b: Bench) -> None:
    finished = 10_000_000 if b.config.name == "full" else 100_000
    scheduled = 100_000 if b.config.name == "full" else 10_000
    # history kept, not pruned, while it is measured (pruning under load is phase 7's)
    b.admin.execute("update pgqueue.retention set keep = null")
    b.reset()
    with like_autovacuum(b):  # both sides alike: as a production server would vacuum
        empty = measure_hot_path(b, "empty")
    b.reset()
    built = build_history(b, finished, scheduled)
    log(f"history: {finished:,} finished and {scheduled:,} scheduled jobs built in {built:.0f}s")
    with like_autovacuum(b):
        full = measure_hot_path(b, "history")
    b.admin.execute("delete from pgqueue.retention")
    b.admin.execute(
        "insert into pgqueue.retention (state, queue, keep) values ('succeeded', '*', '1 day'),"
        " ('dead', '*', '14 days'), ('cancelled', '*', '1 day')"
    )
    b.results["history"] = {"finished": finished, "scheduled": scheduled, "empty": empty, "history": full}


# -- 7. a bad day: a backlog of a million ready jobs, every worker started at once ------------


@contextmanager
def vacuum_stand_in(b: Bench) -> Iterator[list[float]]:
    """What autovacuum would do with the tables' own settings (0009: the hot table at 5,000
    dead rows plus 2%, the history at 50 plus 5%), for a server that runs without
    autovacuum, as the dev machine does: a thread that looks every second and vacuums
    a table past its threshold. Yields the list of the vacuums' durations."""
    durations: list[float] = []
    stop = threading.Event()
    thresholds = {"active_jobs": (5000, 0.02), "finished_jobs": (50, 0.05)}

    def run() -> None:
        with psycopg.connect(b.dsn, autocommit=True) as connection:
            while not stop.wait(1.0):
                rows = connection.execute(
                    "select relname, n_dead_tup, n_live_tup from pg_stat_user_tables"
                    " where schemaname = 'pgqueue' and relname = any(%s)",
                    (list(thresholds),),
                ).fetchall()
                for table, dead, live in rows:
                    base, scale = thresholds[table]
                    if int(dead) > base + scale * int(live):
                        started = time.perf_counter()
                        connection.execute(sql.SQL("vacuum {}").format(sql.Identifier("pgqueue", table)))
                        durations.append(time.perf_counter() - started)

    thread = threading.Thread(target=run, name="vacuum-stand-in", daemon=True)
    thread.start()
    try:
        yield durations
    finally:
        stop.set()
        thread.join(timeout=600)


def like_autovacuum(b: Bench) -> Any:
    """The vacuum stand-in when the server runs without autovacuum, else nothing."""
    if str(one(b.admin.execute("show autovacuum"))[0]) == "off":
        return vacuum_stand_in(b)
    return nullcontext([])


def bench_backlog(b: Bench) -> None:
    """Two workers started at once on a backlog of a million ready jobs (100,000 quick),
    beside the same on 50,000: the rate must not sag as dead tuples pile up during the
    drain, and the workers must be at full speed within seconds of starting. Without a
    vacuum, and with a stand-in for autovacuum when the server runs without it."""
    big = 1_000_000 if b.config.name == "full" else 100_000
    small = drain_once(b, 2, 200, label="-backlog-small", count=50_000)
    large = drain_once(b, 2, 200, label="-backlog-large", count=big)
    b.results["backlog"] = {"small": small, "large": large}
    if str(one(b.admin.execute("show autovacuum"))[0]) == "off":
        with vacuum_stand_in(b) as vacuums:
            vacuumed = drain_once(b, 2, 200, label="-backlog-vacuumed", count=big)
        b.results["backlog"]["vacuumed"] = vacuumed
        b.results["backlog"]["vacuums"] = vacuums
        log(f"backlog with the vacuum stand-in: {len(vacuums)} vacuums, {sum(vacuums):.1f}s in all")


def old_successes(b: Bench, count: int) -> None:
    """`count` jobs that succeeded a month ago, in another queue than the drain's."""
    b.admin.execute(
        "insert into pgqueue.finished_jobs"
        " (task, args, queue, state, attempt, run_at, started_at, finished_at)"
        " select 'bench.old', '{}', 'history', 'succeeded', 1, t, t, t"
        " from generate_series(1, %s) n, lateral (select now() - interval '30 days') s(t)",
        (count,),
    )
    b.admin.execute("vacuum (analyze) pgqueue.finished_jobs")


def bench_prune_under_load(b: Bench) -> None:
    """The 2-process drain of 300,000 jobs (50,000 quick) beside a million successes a month
    old (100,000 quick), twice: with retention keeping them, and with the maintenance
    leader pruning them (every second, up to 20 batches of 1,000) while the drain runs."""
    history = 1_000_000 if b.config.name == "full" else 100_000
    jobs = 300_000 if b.config.name == "full" else 50_000
    env = {"PGQUEUE_RESCUE_INTERVAL": "1"}
    runs: dict[str, Any] = {}
    for label, keep in (("kept", None), ("pruned", "1 day")):
        b.reset()
        b.admin.execute("select pgqueue.set_retention('succeeded', %s::interval)", (keep,))
        old_successes(b, history)
        with like_autovacuum(b):
            run = drain_once(b, 2, 200, env=env, label=f"-prune-{label}", reset=False, count=jobs)
        left = int(
            one(b.admin.execute("select count(*) from pgqueue.finished_jobs where queue = 'history'"))[0]
        )
        runs[label] = {"drain": run, "removed": history - left}
    b.admin.execute("select pgqueue.set_retention('succeeded', interval '1 day')")
    b.results["prune_under_load"] = {"history": history, **runs}
    log(
        f"prune under load: drain {rate(runs['pruned']['drain']['window_jobs_per_s'])} while pruning "
        f"{runs['pruned']['removed']:,} rows, {rate(runs['kept']['drain']['window_jobs_per_s'])} without"
    )


# -- 8. soak: millions of jobs through with retention on; the table stays bounded ----------


def relation_sizes(b: Bench) -> tuple[int, int]:
    """Bytes of both job tables (the hot one and the history), and of their indexes."""
    row = one(
        b.admin.execute(
            "select sum(pg_relation_size(t)), sum(pg_indexes_size(t))"
            " from unnest(array['pgqueue.active_jobs', 'pgqueue.finished_jobs']::regclass[]) t"
        )
    )
    return int(row[0]), int(row[1])


def bench_soak(b: Bench) -> None:
    """Jobs through two workers at full speed while their leader prunes successes after 20 s:
    the table and its indexes are sampled as it goes and must level off, not grow with the
    number of jobs that went through."""
    total = 2_000_000 if b.config.name == "full" else 100_000
    batch = 50_000 if b.config.name == "full" else 10_000
    b.reset()
    b.admin.execute("select pgqueue.set_retention('succeeded', interval '20 seconds')")
    env = {"PGQUEUE_RESCUE_INTERVAL": "1"}  # the leader's round: prune often
    # autovacuum as the tables ship it (the stand-in on a server that runs without): without
    # any vacuum, no page freed by pruning is ever reused
    with like_autovacuum(b) as vacuums:
        workers = [
            b.spawn_worker(bench.NOOP_QUEUE, 200, burst=False, tag=f"soak-{i}", env=env) for i in range(2)
        ]
        samples: list[tuple[float, int, int, int]] = []
        started = time.perf_counter()
        enqueued = 0
        next_sample = 0.0
        try:
            while True:
                waiting = int(
                    one(b.admin.execute("select count(*) from pgqueue.active_jobs where state = 'queued'"))[0]
                )
                if enqueued < total and waiting < batch:
                    b.fill(batch)
                    enqueued += batch
                now = time.perf_counter() - started
                if now >= next_sample:
                    table_bytes, index_bytes = relation_sizes(b)
                    rows = int(one(b.admin.execute("select count(*) from pgqueue.jobs"))[0])
                    samples.append((now, table_bytes, index_bytes, rows))
                    next_sample = now + (15.0 if b.config.name == "full" else 2.0)
                if enqueued >= total and waiting == 0:
                    break
                if any(worker.poll() is not None for worker in workers):
                    raise RuntimeError(f"a soak worker exited:\n{b.worker_log('soak-0')}")
                time.sleep(0.5)
            elapsed = time.perf_counter() - started
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                with suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=60)
            b.children.clear()
            b.admin.execute("select pgqueue.set_retention('succeeded', interval '1 day')")
    table_bytes, index_bytes = relation_sizes(b)
    b.results["soak"] = {
        "jobs": total,
        "seconds": elapsed,
        "samples": samples,
        "half_way": samples[len(samples) // 2],
        "end": (elapsed, table_bytes, index_bytes),
        "vacuums": len(vacuums),
    }
    log(
        f"soak: {total:,} jobs in {elapsed:.0f}s; table {table_bytes / 1e6:.0f} MB, indexes "
        f"{index_bytes / 1e6:.0f} MB at the end (half-way: {samples[len(samples) // 2][1] / 1e6:.0f} MB, "
        f"{samples[len(samples) // 2][2] / 1e6:.0f} MB)"
    )
