#!/usr/bin/env python
"""pgqueue benchmarks, each next to the raw-SQL ceiling of the same server.

    python benchmarks/run.py            # full run (a few minutes)
    python benchmarks/run.py --quick    # smoke test for CI (< 60 s)

Creates its own database (pgqueue_bench_<random>), migrates it, and drops it at the
end, also on failure or Ctrl-C. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `benchmarks.tasks` must import when run as a script

import psycopg  # noqa: E402

import pgqueue  # noqa: E402
from benchmarks import tasks as bench  # noqa: E402
from benchmarks.controls import bench_limits  # noqa: E402
from benchmarks.events import bench_events  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    FULL,
    QUICK,
    RESULTS_DIR,
    Bench,
    Interrupted,
    _enqueue_for,
    _raise_interrupted,
    bench_database,
    drain_once,
    log,
    one,
)
from benchmarks.latency import measure_latency  # noqa: E402
from benchmarks.report import details, rate, table  # noqa: E402
from benchmarks.scale import (  # noqa: E402
    bench_backlog,
    bench_exporter_scrape,
    bench_history,
    bench_metrics_overhead,
    bench_prune_under_load,
    bench_soak,
)
from pgqueue.sql import query as pgqueue_query  # noqa: E402

# -- 1. single enqueue ----------------------------------------------------------------------

# The same statement as insert_job in sql/queries.sql, with the values pgqueue sends for
# `noop.enqueue(conn, n=...)` (default options): one INSERT per transaction.
PGBENCH_INSERT = """\
\\set n random(1, 1000000000)
insert into pgqueue.active_jobs (
    task, args, queue, priority, run_at, max_attempts, timeout_seconds,
    backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter
) values (
    'bench.noop', ('{"n":' || :n::text || '}')::jsonb, 'bench', 0,
    coalesce(null::timestamptz, now()) + make_interval(secs => 0::double precision),
    10, null::double precision,
    'exponential'::pgqueue.backoff_kind, 1::double precision,
    3600::double precision, 0.1::real
) returning id;
"""


def bench_single_enqueue(b: Bench) -> None:
    """pgqueue, plain psycopg and pgbench take turns, a few rounds each: a single client
    committing one row at a time is bound by WAL flushes, which a neighbour's writes slow
    down for seconds at a time; alternating spreads such bursts over all three sides."""
    seconds, rounds = b.config.single_seconds, b.config.single_rounds
    pgqueue_rates: list[float] = []
    psycopg_rates: list[float] = []
    pgbench_rates: list[float] = []
    jobs_total = 0
    statement, params = pgqueue_query("insert_job"), bench.noop.prepare(n=1).params()
    with psycopg.connect(b.dsn, autocommit=True) as connection:
        for n in range(50):  # warm up: psycopg prepares the statement after 5 runs
            bench.noop.enqueue(connection, n=n)
        for _round in range(rounds):
            b.reset()
            jobs, elapsed = _enqueue_for(seconds, lambda n: bench.noop.enqueue(connection, n=n))
            jobs_total += jobs
            pgqueue_rates.append(jobs / elapsed)
            # The same statement through plain psycopg (no pgqueue code): the driver's own cost.
            b.reset()
            jobs, elapsed = _enqueue_for(seconds, lambda _: connection.execute(statement, params).fetchall())
            psycopg_rates.append(jobs / elapsed)
            if b.pgbench:
                b.reset()
                run = b.run_pgbench("insert_one", PGBENCH_INSERT, clients=1, seconds=max(1, round(seconds)))
                pgbench_rates.append(run["tps"])
    pgqueue_rate = statistics.median(pgqueue_rates)
    ceiling = statistics.median(pgbench_rates) if pgbench_rates else None
    b.results["single_enqueue"] = {
        "pgqueue_jobs_per_s": pgqueue_rate,
        "ceiling_pgbench_jobs_per_s": ceiling,
        "raw_psycopg_jobs_per_s": statistics.median(psycopg_rates),
        "rounds": rounds,
        "seconds_per_round": seconds,
        "jobs": jobs_total,
        "pgqueue_rounds": pgqueue_rates,
        "psycopg_rounds": psycopg_rates,
        "pgbench_rounds": pgbench_rates,
    }
    log(f"single enqueue: pgqueue {rate(pgqueue_rate)}, pgbench {rate(ceiling)} (medians of {rounds} rounds)")


# -- 2. bulk enqueue ------------------------------------------------------------------------


def bench_bulk_enqueue(b: Bench) -> None:
    count = b.config.bulk_jobs
    arguments = [{"n": n} for n in range(count)]
    b.reset()
    with psycopg.connect(b.dsn, autocommit=True) as connection:
        bench.noop.enqueue_many(connection, arguments[:100])  # warm up (imports, type loading)
        b.reset()
        started = time.perf_counter()
        ids = bench.noop.enqueue_many(connection, arguments)
        elapsed = time.perf_counter() - started
    assert len(ids) == count and b.count("true") == count
    pgqueue_rate = count / elapsed
    # Where the time goes: validating and serialising the jobs in Python (no database).
    started = time.perf_counter()
    for kwargs in arguments:
        bench.noop.prepare(**kwargs)
    prepare_seconds = time.perf_counter() - started
    # ... and reserving the ids (the first of enqueue_many's two statements).
    with psycopg.connect(b.dsn, autocommit=True) as connection:
        started = time.perf_counter()
        connection.execute(pgqueue_query("reserve_ids"), {"count": count}).fetchall()
        reserve_seconds = time.perf_counter() - started

    # The ceiling: the same rows (same columns and values) in one COPY, prepared up front.
    b.reset()
    options = bench.noop.default_options
    with psycopg.connect(b.dsn, autocommit=True) as connection:
        now = one(connection.execute("select now()"))[0]
        rows = [
            (
                bench.noop.name,
                json.dumps(a, separators=(",", ":")),
                options.queue,
                options.priority,
                now,
                options.max_attempts,
                options.timeout,
                options.retry.kind,
                options.retry.base,
                options.retry.max,
                options.retry.jitter,
            )
            for a in arguments
        ]
        started = time.perf_counter()
        with (
            connection.transaction(),
            connection.cursor().copy(
                "copy pgqueue.active_jobs (task, args, queue, priority, run_at, max_attempts,"
                " timeout_seconds, backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter)"
                " from stdin"
            ) as copy,
        ):
            for row in rows:
                copy.write_row(row)
        raw_elapsed = time.perf_counter() - started
    assert b.count("true") == count
    raw_rate = count / raw_elapsed
    b.results["bulk_enqueue"] = {
        "jobs": count,
        "pgqueue_seconds": elapsed,
        "pgqueue_jobs_per_s": pgqueue_rate,
        "python_prepare_seconds": prepare_seconds,
        "reserve_ids_seconds": reserve_seconds,
        "raw_copy_seconds": raw_elapsed,
        "raw_copy_jobs_per_s": raw_rate,
    }
    log(f"bulk enqueue: pgqueue {rate(pgqueue_rate)}, raw COPY {rate(raw_rate)}")


# -- 3. drain -------------------------------------------------------------------------------


def bench_drain(b: Bench) -> None:
    drains: dict[str, Any] = b.results.setdefault("drain", {})  # partial results survive a failure
    for processes in b.config.drain_procs:
        for concurrency in b.config.concurrencies:
            run = drain_once(b, processes, concurrency)
            entry = drains.setdefault(str(processes), {"runs": [], "best": run})
            entry["runs"].append(run)
            if run["window_jobs_per_s"] > entry["best"]["window_jobs_per_s"]:
                entry["best"] = run


# Ceiling (a): claim one job with SKIP LOCKED and complete it, one transaction.
# Ceiling (b): claim 100 with one FOR UPDATE SKIP LOCKED CTE + UPDATE (commit), then
# complete them with one UPDATE (commit): two commits per batch, as any queue that
# must survive a crash mid-job needs (the claim is durable before the job runs).
# Ceiling (c): like (b) with claim and complete in one transaction (one commit per
# batch: faster, but a job's lease is never visible to others while it runs).
# Claimed rows are marked with the client id, so the complete needs no id list.
_CLAIM = """\
with claimable as (
    select id from pgqueue.active_jobs
    where state = 'queued' and queue = 'bench' and run_at <= now()
    order by priority desc, run_at, id
    limit {limit}
    for update skip locked
)
update pgqueue.active_jobs j
set state = 'running', attempt = j.attempt + 1, worker = 'pgbench-' || :client_id::text,
    started_at = now(), lease_expires_at = now() + interval '30 seconds'
from claimable c
where j.id = c.id
returning j.id, j.task, j.args, j.queue, j.priority, j.attempt, j.max_attempts,
          j.timeout_seconds, j.run_at, j.created_at;
"""
# A success moves the job from the hot table to the history, as pgqueue's does (0009).
_COMPLETE = """\
with done as (
    delete from pgqueue.active_jobs
    where state = 'running' and worker = 'pgbench-' || :client_id::text
    returning *
)
insert into pgqueue.finished_jobs
select id, queue, task, args, priority, 'succeeded', attempt, max_attempts, run_at, timeout_seconds,
       backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter, worker, null, created_at,
       started_at, now(), 'null'::jsonb, errors, history
from done;
"""
CEILINGS: dict[str, tuple[str, int, str]] = {
    "claim1": ("begin;\n" + _CLAIM.format(limit=1) + _COMPLETE + "commit;\n", 1, "claim 1 + complete, 1 tx"),
    "batch100": (_CLAIM.format(limit=100) + _COMPLETE, 100, "claim 100 (tx) + complete 100 (tx)"),
    "batch100_1tx": (
        "begin;\n" + _CLAIM.format(limit=100) + _COMPLETE + "commit;\n",
        100,
        "claim 100 + complete 100, 1 tx",
    ),
}


def pgbench_drain_ceiling(b: Bench, name: str, clients: int) -> dict[str, Any]:
    script, _, label = CEILINGS[name]
    seconds = b.config.pgbench_seconds
    # pre-filled jobs per second of run: about twice what this machine drains
    fill = {"claim1": 3_000, "batch100": 20_000, "batch100_1tx": 30_000}[name] * seconds
    for _attempt in range(4):
        b.reset()
        b.fill(fill)
        run = b.run_pgbench(f"{name}-c{clients}", script, clients, seconds)
        done = b.count("state = 'succeeded'")
        if b.count("state = 'queued'") > 0:
            result = {
                "script": name,
                "label": label,
                "clients": clients,
                "seconds": seconds,
                "jobs_per_s": done / seconds,
                "tps": run["tps"],
                "prefilled": fill,
            }
            log(f"ceiling {name} -c{clients}: {rate(result['jobs_per_s'])} ({run['tps']:,.0f} tps)")
            return result
        log(f"ceiling {name} -c{clients}: the {fill:,} pre-filled jobs ran out; refilling more")
        fill *= 3
    raise RuntimeError(f"pgbench {name} drained every pre-filled job four times")


def bench_drain_ceilings(b: Bench) -> None:
    if not b.pgbench:
        log("pgbench not found: drain ceilings skipped")
        return
    ceilings: dict[str, Any] = {}
    runs = [("claim1", 2), ("batch100", 1), ("batch100", 2)]
    if b.config.name == "full":
        runs.append(("batch100_1tx", 2))
    for name, clients in runs:
        ceilings[f"{name}-c{clients}"] = pgbench_drain_ceiling(b, name, clients)
    b.results["drain_ceilings"] = ceilings


# -- 4. latency -----------------------------------------------------------------------------


def bench_latency(b: Bench) -> None:
    b.results["latency"] = measure_latency(b, reset=True)


def describe_server(b: Bench) -> str:
    settings: dict[str, str] = dict(
        b.admin.execute(
            "select name, setting from pg_settings where name in"
            " ('server_version', 'fsync', 'synchronous_commit', 'autovacuum', 'shared_buffers')"
        ).fetchall()
    )
    return (
        f"PostgreSQL {settings.get('server_version')}, fsync={settings.get('fsync')}, "
        f"synchronous_commit={settings.get('synchronous_commit')}, "
        f"autovacuum={settings.get('autovacuum')}; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )


PHASES: list[tuple[str, Callable[[Bench], None]]] = [
    ("single_enqueue", bench_single_enqueue),
    ("bulk_enqueue", bench_bulk_enqueue),
    ("drain", bench_drain),
    ("drain_ceilings", bench_drain_ceilings),
    ("latency", bench_latency),
    ("metrics_overhead", bench_metrics_overhead),
    ("exporter_scrape", bench_exporter_scrape),
    ("history", bench_history),
    ("backlog", bench_backlog),
    ("prune_under_load", bench_prune_under_load),
    ("soak", bench_soak),
    ("limits", bench_limits),
    ("events", bench_events),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller, faster run (CI smoke test)")
    parser.add_argument("--only", help="comma-separated phases: " + ", ".join(name for name, _ in PHASES))
    parser.add_argument("--logs", type=Path, help="keep the worker logs in this folder")
    parser.add_argument(
        "--json", type=Path, help="also write the results here (default: benchmarks/results/)"
    )
    arguments = parser.parse_args(argv)
    config = QUICK if arguments.quick else FULL
    wanted = set(arguments.only.split(",")) if arguments.only else {name for name, _ in PHASES}
    unknown = wanted - {name for name, _ in PHASES}
    if unknown:
        parser.error(f"unknown phases: {sorted(unknown)}")

    signal.signal(signal.SIGTERM, _raise_interrupted)
    began = time.perf_counter()
    server = "server not reached"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pgqueue-bench-") as tmp, bench_database(Path(tmp)) as (dsn, _):
        with psycopg.connect(dsn, autocommit=True) as connection:
            pgqueue.migrate(connection)
        b = Bench(dsn, config, Path(tmp), arguments.logs)
        try:  # every child stopped and the database dropped, whatever happens
            server = describe_server(b)
            log(f"{config.name} run on {server}")
            for name, phase in PHASES:
                if name not in wanted:
                    continue
                phase_began = time.perf_counter()
                try:
                    phase(b)
                except (KeyboardInterrupt, Interrupted):
                    raise
                except Exception as error:  # report, go on with the other phases
                    b.errors[name] = f"{type(error).__name__}: {error}"
                    log(f"phase {name} failed: {b.errors[name]}")
                    b.stop_children()
                log(f"phase {name} took {time.perf_counter() - phase_began:.1f}s")
        finally:
            b.stop_children()
            b.admin.close()
    elapsed = time.perf_counter() - began
    load = f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(f"\npgqueue benchmarks ({config.name} run, {dt.date.today().isoformat()}): {server}; {load}\n")
    print(table(b))
    print()
    print(details(b))
    print(f"\ntotal time {elapsed:.1f}s")
    b.results.update(
        {
            "config": config.name,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "server": server,
            "load": load,
            "errors": b.errors,
            "total_seconds": elapsed,
        }
    )
    target = arguments.json
    if target is None:
        RESULTS_DIR.mkdir(exist_ok=True)
        target = RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.name}.json"
    target.write_text(json.dumps(b.results, indent=2, default=str))
    print(f"results written to {target}")
    return 1 if b.errors else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (KeyboardInterrupt, Interrupted):
        log("interrupted: workers stopped, benchmark database dropped")
        raise SystemExit(130) from None
