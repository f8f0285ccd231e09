"""Example tasks: the quick-start demo and the docker-compose worker run these."""

from __future__ import annotations

import asyncio
import time

from .app import App
from .context import current_job
from .models import RetryPolicy
from .outcomes import Fail

app = App()


@app.task(queue="default")
async def add(a: int, b: int) -> int:
    """An async handler: runs on the worker's event loop."""
    await asyncio.sleep(0.01)
    return a + b


@app.task(queue="default", timeout=10)
def resize_image(name: str, width: int) -> dict[str, object]:
    """A sync handler: runs in the worker's thread pool."""
    time.sleep(0.05)
    return {"image": name, "width": width, "resized": True}


@app.task(queue="default", executor="process")
def fibonacci(n: int) -> int:
    """A CPU-bound handler: runs in a process pool, off the event loop."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@app.task(queue="default", max_attempts=3, retry=RetryPolicy.fixed(0.2))
async def flaky(name: str) -> str:
    """Fails on its first attempt, succeeds on the second: shows retries."""
    if current_job().attempt < 2:
        raise ConnectionError(f"upstream for {name} timed out (attempt {current_job().attempt})")
    return f"{name} delivered on attempt {current_job().attempt}"


@app.task(queue="default", max_attempts=2, retry=RetryPolicy.fixed(0.1))
async def charge_card(card: str) -> None:
    """Always fails: shows the dead letter."""
    if card.startswith("0000"):
        raise Fail(f"card {card} was declined; not retrying")
    raise ValueError(f"payment gateway rejected card {card}")
