"""A worker's own metrics, fed by its hooks (once per claim and per flush) and served to Prometheus.

Jobs started and finished (by outcome), handler run time and queue wait, jobs in
flight and free slots, claim and flush batches, reconnects, maintenance rescues and
the worker's identity. Labels are `queue`, `task`, `outcome` and `connection`: all
bounded (a job id or an error message never becomes a label).

Why a collector of its own instead of prometheus-client's Counter and Histogram: the
job metrics change several times per job on the worker's event loop, the hot path of
a worker that runs 15,000 jobs a second. prometheus-client's metric objects take a
lock and look up their label set on every change, and a histogram walks its buckets
one by one; here one thread writes plain numbers (a bisection for the bucket) and a
scrape copies them. The exposition is still prometheus-client's: this is a
`Collector` yielding its metric families, registered in a `CollectorRegistry`.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from ..hooks import (
    Connected,
    Hooks,
    JobRescued,
    JobsClaimed,
    OutcomesFlushed,
    WorkerStarted,
)
from ..maintenance.presence import version

if TYPE_CHECKING:
    from ..app import App
    from ..settings import Settings

log = logging.getLogger("pgqueue")

# Seconds, from a 1 ms job to a 20 min one: about three buckets per decade.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
)  # fmt: skip
# Jobs per claim or flush: a worker asks for its free slots, up to its concurrency.
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
# Round trips of claim and flush calls.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class _Histogram:
    """Bucket counts (not cumulative) and the sum of one labelled histogram."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # le-buckets: the first bound >= value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        counts, total = list(self.counts), self.total  # a copy: the loop thread writes on
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return buckets, total


def _final_outcome(kind: str, state: str | None) -> str:
    """The `outcome` label of a recorded outcome, from its kind and the job's new state."""
    if state is None:
        return "lease_lost"  # not recorded: another worker runs the job now
    if state == "succeeded":
        return "succeeded"
    if state == "dead":
        return "dead"
    if kind == "released":
        return "released"
    if kind == "deferred":
        return "handed_back"
    if state == "cancelled":
        return "cancelled"
    return "retried"


# the common (outcome kind, new state) pairs, looked up instead of reasoned out per job
_LABELS = {
    (kind, state): _final_outcome(kind, state)
    for kind in ("succeeded", "failed", "retry", "fatal", "released", "deferred")
    for state in ("succeeded", "queued", "dead", None)
}


class WorkerMetrics(Collector):
    """Attach to a worker's hooks with `attach(hooks)`; register in a CollectorRegistry."""

    def __init__(
        self,
        worker: str,
        slots: Callable[[], tuple[int, int]] | None = None,
        tasks: Iterable[tuple[str, str]] = (),
    ) -> None:
        # worker: the id whose events count (an App's hooks hear every Worker of the app);
        # slots(): (jobs in flight, concurrency), read at scrape time; tasks: the (queue,
        # task) pairs the worker serves, whose series start at zero (see _zeros), and the
        # only task names used as labels: a job of any other name (a producer's typo, a
        # task of another deploy) counts as task "unknown", so labels stay bounded
        self._slots = slots
        self._tasks = list(tasks)
        self._known = {task for _, task in self._tasks}
        self._worker = worker
        self._queues: tuple[str, ...] = ()
        self._concurrency = 0
        self._started_at = 0.0
        self._started: dict[tuple[str, str], int] = {}
        self._finished: dict[tuple[str, str, str], int] = {}
        self._run: dict[tuple[str, str], _Histogram] = {}
        self._wait: dict[tuple[str, str], _Histogram] = {}
        self._claims = _Histogram(BATCH_BUCKETS)
        self._claim_seconds = _Histogram(CALL_BUCKETS)
        self._flushes = _Histogram(BATCH_BUCKETS)
        self._flush_seconds = _Histogram(CALL_BUCKETS)
        self._connects: dict[tuple[str, bool], int] = {}
        self._rescued: dict[str, int] = {}

    def _handlers(self) -> list[tuple[type[Any], Callable[[Any], None]]]:
        # Per claim and per flush, never per job: a job's figures come in the batch of its
        # claim and of its flush, so metrics add no event to the hot path of a job.
        return [
            (WorkerStarted, self._on_worker_started),
            (JobsClaimed, self._on_claimed),
            (OutcomesFlushed, self._on_flushed),
            (Connected, self._on_connected),
            (JobRescued, self._on_rescued),
        ]

    def attach(self, hooks: Hooks) -> None:
        for event, handler in self._handlers():
            hooks.add(event, handler)

    def detach(self, hooks: Hooks) -> None:
        for event, handler in self._handlers():
            hooks.remove(event, handler)

    # -- hooks: on the worker's event loop ------------------------------------------

    def _on_worker_started(self, event: WorkerStarted) -> None:
        if event.worker != self._worker:
            return
        self._queues, self._concurrency = event.queues, event.concurrency
        self._started_at = time.time()
        self._zeros()

    def _zeros(self) -> None:
        """Start the counters of what is bound to happen at zero: Prometheus computes no
        rate() from a series' first sample, so a series born at its first event would
        hide that event (a task's first dead job, the first reconnect)."""
        for queue, task in self._tasks:
            if queue in self._queues:
                self._started.setdefault((queue, task), 0)
                for outcome in ("succeeded", "retried", "dead"):
                    self._finished.setdefault((queue, task, outcome), 0)
        for outcome in ("requeued", "dead"):
            self._rescued.setdefault(outcome, 0)
        for role in ("claim", "complete", "heartbeat", "maintenance", "listen"):
            self._connects.setdefault((role, True), 0)

    def _task(self, name: str) -> str:
        return name if name in self._known else "unknown"

    def _on_claimed(self, event: JobsClaimed) -> None:
        if event.worker != self._worker:
            return
        if event.jobs:  # an idle poll is a round trip, not a batch
            self._claims.observe(len(event.jobs))
        self._claim_seconds.observe(event.seconds)
        started = self._started
        for job in event.jobs:
            key = (job.queue, self._task(job.task))
            started[key] = started.get(key, 0) + 1

    def _on_flushed(self, event: OutcomesFlushed) -> None:
        if event.worker != self._worker:
            return
        self._flushes.observe(len(event.outcomes))
        self._flush_seconds.observe(event.seconds)
        states = event.states
        finished, runs, waits = self._finished, self._run, self._wait
        labels = _LABELS
        for outcome in event.outcomes:
            kind_state = (outcome.kind, states.get(outcome.job_id))
            label = labels.get(kind_state) or _final_outcome(*kind_state)
            task = outcome.task if outcome.task in self._known else "unknown"
            key = (outcome.queue, task, label)
            finished[key] = finished.get(key, 0) + 1
            started_at, ended_at = outcome.started_at, outcome.ended_at
            if started_at is None or ended_at is None or outcome.kind == "released":
                continue  # the handler never ran (a hand-back), or was stopped at shutdown
            pair = (outcome.queue, task)
            run = runs.get(pair)
            if run is None:
                run = runs[pair] = _Histogram(DURATION_BUCKETS)
                waits[pair] = _Histogram(DURATION_BUCKETS)
            run.observe(ended_at - started_at)  # the handler's own time, no wait for a slot
            if outcome.due is not None:
                waits[pair].observe(max(0.0, started_at - outcome.due.timestamp()))

    def _on_connected(self, event: Connected) -> None:
        if event.worker != self._worker:
            return
        key = (event.role, event.reconnect)
        self._connects[key] = self._connects.get(key, 0) + 1

    def _on_rescued(self, event: JobRescued) -> None:
        if event.worker != self._worker:
            return
        outcome = "dead" if event.state == "dead" else "requeued"
        self._rescued[outcome] = self._rescued.get(outcome, 0) + 1

    # -- scrape: in the metrics server's thread ------------------------------------

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        info = InfoMetricFamily("pgqueue_worker", "This worker process", labels=[])
        info.add_metric(
            [],
            {
                "worker": self._worker,
                "queues": ",".join(self._queues),
                "version": version(),
            },
        )
        yield info  # type: ignore[misc]
        start = GaugeMetricFamily(
            "pgqueue_worker_start_time_seconds", "When this worker started, as a Unix time"
        )
        start.add_metric([], self._started_at)
        yield start

        started = CounterMetricFamily(
            "pgqueue_jobs_started",
            "Jobs this worker claimed to run (hand-backs of tasks it does not know included)",
            labels=["queue", "task"],
        )
        for (queue, task), count in dict(self._started).items():
            started.add_metric([queue, task], count)
        yield started
        finished = CounterMetricFamily(
            "pgqueue_jobs_finished",
            "Job attempts this worker finished and recorded, by outcome: succeeded, retried (failed, "
            "will run again), dead (dead-lettered), cancelled, released (handed back at shutdown), "
            "handed_back (task unknown here), lease_lost (not recorded: the lease had expired)",
            labels=["queue", "task", "outcome"],
        )
        for (queue, task, outcome), count in dict(self._finished).items():
            finished.add_metric([queue, task, outcome], count)
        yield finished
        rescued = CounterMetricFamily(
            "pgqueue_jobs_rescued",
            "Jobs whose lease had expired that this worker, as maintenance leader, requeued or dead-lettered",
            labels=["outcome"],
        )
        for outcome, count in dict(self._rescued).items():
            rescued.add_metric([outcome], count)
        yield rescued

        yield _histogram_family(
            "pgqueue_job_run_seconds", "Handler run time, from its start to its end", self._run
        )
        yield _histogram_family(
            "pgqueue_job_wait_seconds", "Queue wait: from a job's due time to its handler's start", self._wait
        )

        in_flight, concurrency = self._slots() if self._slots else (0, self._concurrency)
        for name, text, value in (
            ("pgqueue_worker_jobs_in_flight", "Jobs this worker is running now", in_flight),
            ("pgqueue_worker_concurrency", "Jobs this worker runs at most at once", concurrency),
            (
                "pgqueue_worker_free_slots",
                "Jobs this worker could start now",
                max(0, concurrency - in_flight),
            ),
        ):
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], value)
            yield gauge

        for name, text, histogram in (
            ("pgqueue_claim_batch_jobs", "Jobs per claim call that found any", self._claims),
            ("pgqueue_claim_duration_seconds", "Round trip of a claim call", self._claim_seconds),
            ("pgqueue_flush_batch_jobs", "Outcomes per flush (one complete_jobs call)", self._flushes),
            ("pgqueue_flush_duration_seconds", "Round trip of a flush", self._flush_seconds),
        ):
            family = HistogramMetricFamily(name, text)
            buckets, total = histogram.cumulative()
            family.add_metric([], buckets, total)
            yield family

        connects = CounterMetricFamily(
            "pgqueue_worker_reconnects",
            "Connections re-opened after one was lost, by connection role",
            labels=["connection"],
        )
        for (role, reconnect), count in dict(self._connects).items():
            if reconnect:
                connects.add_metric([role], count)
        yield connects


def _histogram_family(
    name: str, documentation: str, histograms: dict[tuple[str, str], _Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["queue", "task"], unit="")
    for (queue, task), histogram in dict(histograms).items():
        buckets, total = histogram.cumulative()
        family.add_metric([queue, task], buckets, total)
    return family


def serve_worker_metrics(
    worker: str, app: App, settings: Settings, slots: Callable[[], tuple[int, int]]
) -> tuple[int, Callable[[], None]]:
    """Serve a worker's /metrics and /health on `settings.metrics_port`: (the port, the stopper)."""
    hooks, dsn = app.hooks, app.dsn
    tasks = [(task.default_options.queue, task.name) for task in app.tasks.values()]
    from prometheus_client import CollectorRegistry

    from ..health import checker
    from .server import MetricsServer

    registry = CollectorRegistry(auto_describe=True)
    metrics = WorkerMetrics(worker, slots, tasks)
    metrics.attach(hooks)
    registry.register(metrics)
    assert settings.metrics_port is not None
    server = MetricsServer(
        registry,
        settings.metrics_port,
        settings.metrics_host,
        health=checker(dsn, settings),
    )
    log.info("metrics on http://%s:%d/metrics, health on /health", settings.metrics_host, server.port)

    def stop() -> None:
        metrics.detach(hooks)
        server.close()

    return server.port, stop
