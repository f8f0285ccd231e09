"""Presence: every worker says it is alive, so `pgqueue.workers` and the health check know.

A worker records itself (host, pid, queues, concurrency, version) when it starts and
on every maintenance round after, and says when it stops. A worker not seen for
three rounds (and the time two slow calls may take) is "lost". The leader forgets
workers a day after they stopped or were lost.
"""

from __future__ import annotations

import os
import socket
from importlib import metadata

from ..connection import WorkerConnection
from ..sql import query
from .leader import GOODBYE_TIMEOUT


def version() -> str:
    try:
        return metadata.version("pgqueue")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


class Presence:
    """This worker's row in pgqueue.worker_sessions."""

    def __init__(
        self, connection: WorkerConnection, worker: str, queues: list[str], concurrency: int, ttl: float
    ) -> None:
        self._connection = connection
        self._params = {
            "worker": worker,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": queues,
            "concurrency": concurrency,
            "version": version(),
            "ttl": ttl,
            "now": None,
        }

    async def seen(self) -> None:
        await self._connection.fetch(query("worker_seen"), self._params)

    async def stopped(self) -> None:
        await self._connection.fetch(
            query("worker_stopped"), {"worker": self._params["worker"]}, timeout=GOODBYE_TIMEOUT
        )


async def prune_sessions(connection: WorkerConnection) -> None:
    """The leader's duty: forget workers gone for more than a day."""
    await connection.fetch(query("prune_worker_sessions"), {})
