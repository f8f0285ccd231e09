"""The quick-start demo: migrate, enqueue the example jobs, run a worker, show the results."""

from __future__ import annotations

import json
import time

import psycopg

from .database import redact
from .examples import add, app, charge_card, fibonacci, flaky, resize_image
from .models import Priority
from .settings import Settings
from .worker import Worker


def run_demo(settings: Settings) -> int:
    app.configure(settings)
    print(f"database: {redact(app.dsn)}")
    applied = app.migrate()
    print(f"migrations applied: {applied or 'none (already up to date)'}")

    with psycopg.connect(app.dsn) as connection:
        # Everything below commits together: the jobs exist only if this transaction does.
        ids: list[int] = [
            add.enqueue(connection, 2, 3),
            add.options(priority=Priority.HIGH).enqueue(connection, a=40, b=2),
            resize_image.enqueue(connection, name="cat.png", width=640),
            fibonacci.enqueue(connection, n=90),
            flaky.enqueue(connection, name="newsletter"),
            charge_card.enqueue(connection, card="4242-4242"),
        ]
        ids += add.enqueue_many(connection, [{"a": n, "b": n} for n in range(10)])
    print(f"enqueued {len(ids)} jobs in one transaction: ids {ids[0]}..{ids[-1]}")

    started = time.monotonic()
    Worker(app, concurrency=8, burst=True, install_signal_handlers=False).run()
    print(f"worker drained the queue in {time.monotonic() - started:.2f}s\n")

    with psycopg.connect(app.dsn) as connection:
        rows = connection.execute(
            "select id, task, state, attempt, result, errors -> -1 ->> 'error'"
            " from pgqueue.jobs where id = any(%s) order by id",
            (ids,),
        ).fetchall()
    print(f"{'id':>6}  {'task':<34} {'state':<10} {'tries':>5}  result / last error")
    for job_id, task, state, attempt, result, error in rows:
        shown = json.dumps(result) if state == "succeeded" else error
        print(f"{job_id:>6}  {task:<34} {state:<10} {attempt:>5}  {shown}")
    dead = [row[0] for row in rows if row[2] == "dead"]
    if dead:
        print(f"\ndead-lettered: {dead}; requeue with `pgqueue retry {dead[0]}`")
    app.close()
    failed = [row for row in rows if row[2] not in ("succeeded", "dead")]
    return 1 if failed else 0
