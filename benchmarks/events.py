"""Phase: what the lifecycle event stream costs the drain when it is on (0015), beside off."""

from __future__ import annotations

import statistics

from benchmarks.harness import Bench, drain_once, log
from benchmarks.report import rate


def bench_events(b: Bench) -> None:
    """The 2-process drain (c=200) with events off and on, in alternation: the median of
    each. Nobody listens: the cost measured is the triggers and their NOTIFYs."""
    rounds = 3 if b.config.name == "full" else 1
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for name in rates:
            b.admin.execute(f"select pgqueue.{'enable' if name == 'on' else 'disable'}_events()")
            rates[name].append(drain_once(b, 2, 200, label=f"-events-{name}")["window_jobs_per_s"])
    b.admin.execute("select pgqueue.disable_events()")
    b.results["events"] = {name: {"median": statistics.median(r), "rounds": r} for name, r in rates.items()}
    log(
        "drain with the event stream "
        + ", ".join(f"{n} {rate(statistics.median(r))}" for n, r in rates.items())
    )
