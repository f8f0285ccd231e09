"""The database's view of the queue, read at scrape time: right even when no worker runs.

Jobs per queue and state (ready, scheduled, running, dead), the age of the oldest
ready job per queue, and workers by status (live, lost, stopped). Every figure comes
from `pgqueue.queue_stats` and `pgqueue.workers`, which read the claim, lease and
dead-letter indexes and the small worker table: a scrape costs the same with ten
million finished jobs in history as with none. Run one exporter per database
(`pgqueue metrics`): every worker's own metrics are per process, these are not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..database import KEEPALIVES, connect, watching
from ..pooling import PreparedStatements
from ..sql import query

log = logging.getLogger("pgqueue")

STATES = ("ready", "scheduled", "running", "dead")


class DatabaseCollector(Collector):
    """Collects from the database on each scrape, on one connection kept between scrapes."""

    def __init__(self, dsn: str, timeout: float = 5.0, prepared: PreparedStatements = "auto") -> None:
        self._dsn = dsn
        self._prepared = prepared
        self._timeout = timeout
        self._connection: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # scrapes may overlap; one connection serves them in turn
        # A drained queue has no row in queue_stats; its series must drop to zero, not
        # vanish: every queue seen once, or known from the task registry and the workers.
        self._queues: set[str] = set()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:  # scrapes may overlap: one reads (and remembers queues) at a time
            families = self._collect()
        yield from families

    def _collect(self) -> list[GaugeMetricFamily]:
        started = time.perf_counter()
        families: list[GaugeMetricFamily] = []
        try:
            queues, workers, known = self._read()
            self._queues.update(known)
            up = 1.0
        except psycopg.Error as error:
            log.warning("metrics: could not read the database (%s: %s)", type(error).__name__, error)
            self.close()
            queues, workers, up = [], [], 0.0
        families.append(_gauge("pgqueue_up", "1 if the exporter could read the database at this scrape", up))
        jobs = GaugeMetricFamily(
            "pgqueue_queue_jobs",
            "Jobs per queue and state: ready (due now), scheduled (due later), running, dead",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "pgqueue_queue_oldest_ready_age_seconds",
            "How long the oldest ready job of a queue has been due (0 when none is ready)",
            labels=["queue"],
        )
        counts: dict[str, dict[str, float]] = {}
        if up:
            counts = {queue: dict.fromkeys(STATES, 0.0) for queue in self._queues}
        ages: dict[str, float] = {}
        for queue, state, count, age in queues:
            self._queues.add(queue)
            counts.setdefault(queue, dict.fromkeys(STATES, 0.0))[state] = float(count)
            if state == "ready":
                ages[queue] = max(0.0, float(age or 0.0))
        for queue, by_state in sorted(counts.items()):
            for state, count in by_state.items():
                jobs.add_metric([queue, state], count)  # zeros too: a panel's line drops to 0
            oldest.add_metric([queue], ages.get(queue, 0.0))
        families += [jobs, oldest]
        by_status = GaugeMetricFamily(
            "pgqueue_workers",
            "Worker processes by status: live, lost (stopped heartbeating), stopped (recently)",
            labels=["status"],
        )
        seen = dict.fromkeys(("live", "lost", "stopped"), 0.0)
        for status, count in workers:
            seen[str(status)] = float(count)
        for status, count in seen.items():
            by_status.add_metric([status], count)
        families.append(by_status)
        families.append(
            _gauge(
                "pgqueue_exporter_scrape_duration_seconds",
                "How long this scrape's database reads took",
                time.perf_counter() - started,
            )
        )
        return families

    def _read(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[str]]:
        connection = self._connection
        if connection is None or connection.closed:
            connection = self._connection = connect(
                self._dsn,
                self._prepared,
                connect_timeout=max(1, int(self._timeout)),
                application_name="pgqueue-metrics",
                **KEEPALIVES,
            )
        with watching(connection, self._timeout):
            queues = connection.execute(query("metrics_queue_stats")).fetchall()
            workers = connection.execute(query("metrics_workers")).fetchall()
            known = [str(row[0]) for row in connection.execute(query("metrics_known_queues")).fetchall()]
        return queues, workers, known

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge
