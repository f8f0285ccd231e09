"""Phase: what queue controls cost the drain (0010), beside the same drain without them."""

from __future__ import annotations

import statistics

from benchmarks import tasks as bench
from benchmarks.harness import Bench, drain_once, log
from benchmarks.report import rate

# Limits that do not throttle (2 processes x 200 slots; far more starts per second than a
# drain makes): what is measured is the mechanism, the row lock and the running count
# every claim of a limited queue takes, not the throttling a binding limit is for.
# "max_running" (1,000) cannot bind, so claims share the queue's lock (0017);
# "max_running_400" equals the slots, so it could bind (a worker's outcomes not yet
# recorded count as running), and every claim counts exactly under an exclusive lock.
VARIANTS = {
    "none": None,
    "max_running": "select pgqueue.limit_queue(%s, 1000, null)",
    "max_running_400": "select pgqueue.limit_queue(%s, 400, null)",
    "rate": "select pgqueue.limit_queue(%s, null, 1000000, 1000000)",
}


def bench_limits(b: Bench) -> None:
    """The 2-process drain (c=200) with no control on its queue, with a global limit of
    running jobs and with a rate limit, in alternation: the median of each."""
    rounds = 3 if b.config.name == "full" else 1
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, statement in VARIANTS.items():
            b.admin.execute("delete from pgqueue.queues")
            if statement:
                b.admin.execute(statement, (bench.NOOP_QUEUE,))
            rates[name].append(drain_once(b, 2, 200, label=f"-limit-{name}")["window_jobs_per_s"])
    # many small claimers (6 processes x 20 slots): more claims per job, so more turns to
    # take on the queue's row while the limit cannot bind
    many: dict[str, list[float]] = {"none": [], "max_running": []}
    for _ in range(rounds):
        for name in many:
            b.admin.execute("delete from pgqueue.queues")
            if VARIANTS[name]:
                b.admin.execute(VARIANTS[name], (bench.NOOP_QUEUE,))
            many[name].append(drain_once(b, 6, 20, label=f"-limit-many-{name}")["window_jobs_per_s"])
    b.admin.execute("delete from pgqueue.queues")
    b.results["limits"] = {name: {"median": statistics.median(r), "rounds": r} for name, r in rates.items()}
    b.results["limits"].update(
        {f"{name}_6x20": {"median": statistics.median(r), "rounds": r} for name, r in many.items()}
    )
    log(
        "drain with a global limit "
        + ", ".join(f"{name} {rate(statistics.median(r))}" for name, r in rates.items())
        + "; 6 processes x 20: "
        + ", ".join(f"{name} {rate(statistics.median(r))}" for name, r in many.items())
    )
