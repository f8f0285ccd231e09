"""The worker's LISTEN connection: wakes the claim loop when jobs of its queues arrive,
and passes on cancel requests of running jobs.

Polling stays the fallback (a lost notification, a pooler that cannot LISTEN, jobs
that become due later). A silent network cut leaves a LISTEN socket open but deaf,
so the link is probed whenever it has been quiet for a while, and reconnected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .connection import Backoff, Link
from .outcomes import describe
from .sql import query

log = logging.getLogger("pgqueue")

CHANNEL = "pgqueue_jobs"
CANCEL_CHANNEL = "pgqueue_cancel"  # payload: the id of a running job asked to stop


class Listener:
    """LISTENs on the jobs channel for as long as `run()` runs, setting `wake` on news."""

    def __init__(
        self,
        link: Link,
        queues: list[str],
        wake: asyncio.Event,
        *,
        statement_timeout: float,
        poll_interval: float,
        reconnect_max_delay: float,
        on_cancel: Callable[[set[int]], None],
        running: Callable[[], list[int]],
    ) -> None:
        self._connection = link.open("listen", statement_timeout)
        self._direct = link.direct
        self._served = set(queues)
        self._wake = wake
        self._on_cancel = on_cancel
        self._running = running
        self._poll_interval = poll_interval
        self._backoff = Backoff(cap=reconnect_max_delay)
        self._probe_every = max(1.0, min(5.0, statement_timeout))

    def abort(self) -> None:
        """The worker is leaving: end a call in flight at once (see WorkerConnection.abort)."""
        self._connection.abort()

    async def run(self) -> None:
        try:
            while True:
                try:
                    if not await self._listen():
                        return
                except Exception as error:  # the listener must outlive anything the server says
                    await self._connection.discard()
                    delay = self._backoff.next_delay()
                    log.warning(
                        "LISTEN connection lost (%s); polling every %.1fs meanwhile, reconnecting in %.1fs",
                        describe(error),
                        self._poll_interval,
                        delay,
                    )
                    await asyncio.sleep(delay)
        finally:
            await self._connection.close()

    async def _listen(self) -> bool:
        """LISTEN until the link fails; False at once when a pooler stands in the way."""
        await self._connection.connect()
        if self._connection.behind_pooler and not self._direct:
            # A transaction pooler hands each transaction to any server connection: a LISTEN
            # would hear nothing, or another client's news. Polling finds every job.
            log.info(
                "the database is reached through a connection pooler: this worker polls every "
                "%.1fs instead of waiting on LISTEN; set PGQUEUE_LISTEN_DSN to a direct "
                "connection to wake on NOTIFY",
                self._poll_interval,
            )
            return False
        await self._connection.fetch(f"listen {CHANNEL}", {})
        await self._connection.fetch(f"listen {CANCEL_CHANNEL}", {})
        # requests sent before we listened (at start, or while the link was down)
        running = self._running()
        if running:
            rows = await self._connection.fetch(query("cancel_requested"), {"ids": running})
            if rows:
                self._on_cancel({int(row[0]) for row in rows})
        connection = await self._connection.connect()
        if self._backoff.failures:
            log.info("LISTEN connection back")
        self._backoff.reset()
        self._wake.set()  # notifications sent while we were away are lost: look now
        while True:
            asked: set[int] = set()
            async for notification in connection.notifies(timeout=self._probe_every):
                if notification.channel == CANCEL_CHANNEL:
                    if notification.payload.isdigit():
                        asked.add(int(notification.payload))
                        break  # to confirm it now
                elif notification.payload in self._served:
                    self._wake.set()
            if asked:
                # Anyone may NOTIFY, no right needed: a cancel counts only when its request
                # is stored (pgqueue.cancel, by a role allowed to cancel).
                rows = await self._connection.fetch(query("cancel_requested"), {"ids": sorted(asked)})
                if rows:
                    self._on_cancel({int(row[0]) for row in rows})
            else:
                await self._connection.fetch("select 1", {})
