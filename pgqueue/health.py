"""Is the queue healthy? One answer for `pgqueue health`, `/health` and load balancers.

- critical: the database cannot be reached, or a queue has ready jobs and no live
  worker serves it (they will wait forever);
- degraded: a queue's oldest ready job has waited longer than `max_ready_age`
  (workers cannot keep up), or jobs were dead-lettered in the last `dead_window`;
- healthy otherwise.

Each answer carries its reasons. `pgqueue health` exits 0, 1 or 2 (the Nagios
convention); `/health` answers 200 for healthy and degraded (the service works) and
503 for critical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from .database import KEEPALIVES, connect, watching
from .pooling import PreparedStatements
from .settings import Settings
from .sql import query

Status = Literal["healthy", "degraded", "critical"]
_RANK: dict[Status, int] = {"healthy": 0, "degraded": 1, "critical": 2}


@dataclass(frozen=True)
class Health:
    status: Status
    reasons: list[str] = field(default_factory=list)
    live_workers: int | None = None

    @property
    def exit_code(self) -> int:
        return _RANK[self.status]

    @property
    def http_status(self) -> int:
        return 503 if self.status == "critical" else 200

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": self.reasons, "live_workers": self.live_workers}


def check_health(
    dsn: str,
    *,
    max_ready_age: float = 300.0,
    dead_window: float = 900.0,
    timeout: float = 5.0,
    prepared: PreparedStatements = "auto",
) -> Health:
    """Ask the database; never raises for a database that is down (that is the answer)."""
    try:
        with (
            connect(
                dsn,
                prepared,
                connect_timeout=max(1, int(timeout)),
                application_name="pgqueue-health",
                **KEEPALIVES,
            ) as connection,
            watching(connection, timeout),
        ):
            queues = connection.execute(query("health_queues")).fetchall()
            dead_row = connection.execute(query("health_dead_recent"), {"seconds": dead_window}).fetchone()
            live_row = connection.execute(query("health_live_workers")).fetchone()
    except psycopg.Error as error:
        # psycopg's messages name host and port, never the password
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return Health("critical", [f"database unreachable: {message}"])
    return judge(
        queues,
        int(dead_row[0]) if dead_row else 0,
        int(live_row[0]) if live_row else 0,
        max_ready_age=max_ready_age,
        dead_window=dead_window,
    )


def judge(
    queues: list[tuple[Any, ...]],
    dead_recently: int,
    live_workers: int,
    *,
    max_ready_age: float,
    dead_window: float,
) -> Health:
    """The verdict from the facts: (queue, ready jobs, oldest age, live workers) per queue."""
    status: Status = "healthy"
    reasons: list[str] = []

    def worse(level: Status, reason: str) -> None:
        nonlocal status
        reasons.append(reason)
        if _RANK[level] > _RANK[status]:
            status = level

    for queue, ready, oldest_age, serving in queues:
        if int(serving) == 0:
            worse("critical", f"queue {queue!r}: {ready} ready job(s) and no live worker serves it")
        elif oldest_age is not None and float(oldest_age) > max_ready_age:
            worse(
                "degraded",
                f"queue {queue!r}: the oldest ready job has waited {float(oldest_age):.0f}s "
                f"(more than {max_ready_age:g}s): workers are not keeping up",
            )
    if dead_recently:
        worse("degraded", f"{dead_recently} job(s) dead-lettered in the last {dead_window:g}s")
    return Health(status, reasons, live_workers)


def checker(dsn: str, settings: Settings) -> Callable[[], Health]:
    """`check_health` with the settings' thresholds: what a /health endpoint asks."""
    return lambda: check_health(
        dsn,
        max_ready_age=settings.health_max_ready_age,
        dead_window=settings.health_dead_window,
        timeout=min(5.0, settings.statement_timeout),
        prepared=settings.prepared_statements,
    )
