"""Prometheus metrics: a worker's own (`WorkerMetrics`, fed by its hooks) and the
database's (`DatabaseCollector`, read at scrape time by `pgqueue metrics`), served
with `/health` by `MetricsServer`."""

from __future__ import annotations

from .database import DatabaseCollector
from .server import MetricsServer
from .worker import WorkerMetrics

__all__ = ["DatabaseCollector", "MetricsServer", "WorkerMetrics"]
