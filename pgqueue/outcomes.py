"""Exceptions a handler raises to steer its job: retry later, or fail for good."""

from __future__ import annotations

from datetime import timedelta

from .errors import InvalidJobError

# Ten years: any longer delay is a bug, and Postgres timestamps overflow past 294276 AD.
MAX_DELAY_SECONDS = 315_360_000


class Retry(Exception):
    """Raise in a handler to retry the job after `delay` seconds (counts as an attempt).

    `raise Retry(delay=30)` or `raise Retry(timedelta(minutes=5), "rate limited")`.
    When no attempts are left the job is dead-lettered like any other failure.
    """

    def __init__(self, delay: float | timedelta = 0.0, reason: str = "retry requested") -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not 0 <= seconds < float("inf"):
            raise InvalidJobError(f"Retry delay must be a non-negative number of seconds, got {delay!r}")
        if seconds > MAX_DELAY_SECONDS:
            raise InvalidJobError(
                f"Retry delay is capped at {MAX_DELAY_SECONDS} seconds (10 years), got {seconds}"
            )
        super().__init__(reason)
        self.delay = seconds
        self.reason = reason

    def __reduce__(self) -> tuple[type[Retry], tuple[float, str]]:
        # process-pool handlers raise it in a child: it must survive pickling intact
        return (Retry, (self.delay, self.reason))


class Fail(Exception):
    """Raise in a handler to fail the job permanently: no more retries, straight to the dead letter."""
