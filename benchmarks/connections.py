"""How many server connections N worker processes need, straight to PostgreSQL and
through PgBouncer in transaction pooling, and what each costs the drain.

    python benchmarks/connections.py [--workers 50] [--jobs 20000] [--concurrency 4]

Runs on a throwaway cluster of its own (max_connections 400, so the direct run is not
cut short by the limit it measures) and Debian's PgBouncer (default_pool_size 20) in
front of it. Each run starts the workers, waits until all are up, enqueues the jobs in
bulk and samples pg_stat_activity every 100 ms until they are done: the figure is the
most client backends seen at once. Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import tasks  # noqa: E402
from pgqueue import migrate  # noqa: E402
from tests.clusters import OwnCluster  # noqa: E402
from tests.pgbouncer import PgBouncer  # noqa: E402

BACKENDS = (
    "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()"
)


def run(
    server_dsn: str, workers: int, concurrency: int, jobs: int, logs: Path, **settings: str
) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **settings}
    children = []
    for n in range(workers):
        with open(logs / f"worker-{n}.log", "wb") as log:
            children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pgqueue",
                        "worker",
                        "benchmarks.tasks:app",
                        "--concurrency",
                        str(concurrency),
                        "--queues",
                        tasks.NOOP_QUEUE,
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            deadline = time.monotonic() + 300
            while True:
                row = admin.execute(
                    "select count(*) from pgqueue.worker_sessions where stopped_at is null"
                ).fetchone()
                if row and row[0] >= workers:
                    break
                if time.monotonic() > deadline:
                    tail = (logs / "worker-0.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"only {row[0] if row else 0} of {workers} workers started:\n{tail}")
                time.sleep(0.2)
            time.sleep(2)  # every connection of every worker open
            idle = int(admin.execute(BACKENDS).fetchone()[0])  # type: ignore[index]
            started = time.monotonic()
            tasks.noop.enqueue_many(admin, [{}] * jobs)
            peak = idle
            while True:
                peak = max(peak, int(admin.execute(BACKENDS).fetchone()[0]))  # type: ignore[index]
                row = admin.execute("select count(*) from pgqueue.active_jobs").fetchone()
                if row and row[0] == 0:
                    break
                time.sleep(0.1)
            seconds = time.monotonic() - started
            admin.execute("delete from pgqueue.finished_jobs")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(30)
    return {"idle": idle, "peak": peak, "jobs_per_s": jobs / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=20_000)
    arguments = parser.parse_args()
    cluster = OwnCluster("-c max_connections=400")
    try:
        dsn = cluster.dsn
        with psycopg.connect(dsn, autocommit=True) as connection:
            migrate(connection)
        bouncer = PgBouncer(dsn, "transaction", pool_size=20)
        try:
            with tempfile.TemporaryDirectory() as logs:
                shape = (arguments.workers, arguments.concurrency, arguments.jobs, Path(logs))
                results = {
                    "direct": run(dsn, *shape, PGQUEUE_DSN=dsn),
                    "pgbouncer, polling": run(dsn, *shape, PGQUEUE_DSN=bouncer.through(dsn)),
                    "pgbouncer + direct LISTEN": run(
                        dsn, *shape, PGQUEUE_DSN=bouncer.through(dsn), PGQUEUE_LISTEN_DSN=dsn
                    ),
                }
        finally:
            bouncer.close()
    finally:
        cluster.remove()
    print(
        f"\n{arguments.workers} worker processes x concurrency {arguments.concurrency}, "
        f"{arguments.jobs:,} jobs"
    )
    print(f"{'path':<26} {'server connections idle':>24} {'peak':>6} {'drain jobs/s':>13}")
    for path, result in results.items():
        print(f"{path:<26} {result['idle']:>24.0f} {result['peak']:>6.0f} {result['jobs_per_s']:>13,.0f}")


if __name__ == "__main__":
    main()
