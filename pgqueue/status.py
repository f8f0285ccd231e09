"""What `pgqueue status` and the API tell about the queue, from indexes, never all history."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from .sql import query


@dataclass(frozen=True)
class QueueState:
    """How many jobs of one queue are in one state: ready, scheduled, running or dead."""

    queue: str
    state: str
    jobs: int
    oldest_due: datetime | None

    def as_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["oldest_due"] = self.oldest_due.isoformat() if self.oldest_due else None
        return values


@dataclass(frozen=True)
class Overview:
    """The queue now, and over the last `window_seconds`."""

    queues: list[QueueState]
    window_seconds: float
    finished: int  # jobs that reached a final state in the window
    throughput_per_minute: float
    error_rate: float | None  # failed attempts / (failed attempts + successes), in the window
    mean_run_seconds: float | None  # of the successes in the window
    live_workers: int

    @property
    def oldest_ready(self) -> QueueState | None:
        ready = [state for state in self.queues if state.state == "ready" and state.oldest_due]
        return min(ready, key=lambda state: state.oldest_due or datetime.max) if ready else None

    def as_json(self) -> dict[str, Any]:
        oldest = self.oldest_ready
        return {
            "queues": [state.as_json() for state in self.queues],
            "window_seconds": self.window_seconds,
            "finished": self.finished,
            "throughput_per_minute": self.throughput_per_minute,
            "error_rate": self.error_rate,
            "mean_run_seconds": self.mean_run_seconds,
            "oldest_ready": oldest.as_json() if oldest else None,
            "live_workers": self.live_workers,
        }


def queue_states(connection: psycopg.Connection[Any]) -> list[QueueState]:
    """Jobs per queue and state; `scheduled` means queued with a run_at in the future."""
    rows = connection.execute(query("status_counts")).fetchall()
    return [QueueState(*row) for row in rows]


def overview(connection: psycopg.Connection[Any], window: float = 300.0) -> Overview:
    """Queue states now, and throughput, error rate and run time over the last `window` seconds."""
    row = connection.execute(query("status_recent"), {"seconds": window}).fetchone()
    assert row is not None
    finished, succeeded, failed, mean_run, live = row
    attempts = int(succeeded) + int(failed)
    return Overview(
        queues=queue_states(connection),
        window_seconds=window,
        finished=int(finished),
        throughput_per_minute=int(finished) * 60.0 / window,
        error_rate=int(failed) / attempts if attempts else None,
        mean_run_seconds=float(mean_run) if mean_run is not None else None,
        live_workers=int(live),
    )


def dead_letter(connection: psycopg.Connection[Any], limit: int = 20) -> list[tuple[Any, ...]]:
    """The newest dead-lettered jobs: id, task, queue, attempts, finished_at, last error."""
    return connection.execute(query("dead_jobs"), {"limit": limit}).fetchall()


def retry_dead_letter(connection: psycopg.Connection[Any], batch: int = 1000) -> int:
    """Requeue every job that is dead-lettered now, `batch` at a time; how many were requeued.

    `connection` should be in autocommit mode, so each batch commits on its own.
    """
    total, after = 0, 0
    while True:
        row = connection.execute(query("retry_dead_batch"), {"limit": batch, "after": after}).fetchone()
        if row is None or row[1] is None:
            return total
        total += int(row[0])
        after = int(row[1])
