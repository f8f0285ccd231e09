"""When periodic jobs are due: cron expressions and `@every` intervals, in a time zone.

Standard 5-field cron expressions are parsed by `cronsim` (kept, small, handles time
zones and daylight-saving changes the way cron does). Two forms it lacks are read here:
the aliases (`@hourly`, `@daily`, ...), which are fixed expressions, and `@every 30s`
(s, m, h or d), whose ticks are multiples of the interval since the epoch (in UTC,
whatever the schedule's time zone), so every worker computes the same ones, which cron
cannot express below a minute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from .errors import ConfigurationError

Missed = Literal["latest", "skip", "all"]
MISSED: tuple[Missed, ...] = ("latest", "skip", "all")
# Under `missed="skip"`, a tick more than this late is skipped.
ON_TIME = timedelta(seconds=60)
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
EVERY = re.compile(r"@every\s+(\d+)\s*([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_EVERY_SECONDS = 10 * 365 * 86400


class InvalidScheduleError(ConfigurationError):
    """A schedule is wrong: a bad cron expression, time zone, missed-tick policy or name."""


@dataclass(frozen=True)
class Timetable:
    """A schedule's ticks: a cron expression (or `@every` interval) in a time zone."""

    cron: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise InvalidScheduleError(
                f"unknown time zone {self.timezone!r} (an IANA name, e.g. Europe/Paris)"
            ) from None
        if not isinstance(self.cron, str):
            raise InvalidScheduleError(f"a cron expression is a string, got {type(self.cron).__name__}")
        match = EVERY.fullmatch(self.cron.strip())
        if match is not None:
            if not 0 < int(match[1]) * UNITS[match[2]] <= MAX_EVERY_SECONDS:
                raise InvalidScheduleError(
                    f"{self.cron!r}: the interval must be positive and at most 10 years"
                )
            return
        if self.cron.strip().startswith("@every"):
            raise InvalidScheduleError(f"{self.cron!r}: write '@every <n>s', m, h or d (e.g. '@every 30s')")
        if len(self._expression().split()) != 5:
            raise InvalidScheduleError(
                f"bad cron expression {self.cron!r}: 5 fields (minute hour day-of-month month "
                "day-of-week), an alias such as @daily, or '@every 30s'"
            )
        try:
            CronSim(self._expression(), datetime.now(self.zone))
        except CronSimError as error:
            raise InvalidScheduleError(
                f"bad cron expression {self.cron!r}: {error} (5 fields: minute hour day-of-month month "
                "day-of-week, an alias such as @daily, or '@every 30s')"
            ) from None

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after `moment`."""
        every = self._every()
        if every is not None:
            periods = (moment - EPOCH) // every
            return EPOCH + (periods + 1) * every
        # In the hour a daylight-saving change repeats, cronsim can answer the hour's first
        # pass (already gone): walk on to a tick that really is later.
        ticks = CronSim(self._expression(), moment.astimezone(self.zone))
        while (tick := next(ticks).astimezone(UTC)) <= moment:
            pass
        return tick

    def last_at_or_before(self, moment: datetime) -> datetime:
        """The latest tick at or before `moment`."""
        every = self._every()
        if every is not None:
            return EPOCH + ((moment - EPOCH) // every) * every
        # cronsim's reverse walk starts strictly before its start: start just after `moment`
        start = (moment + timedelta(microseconds=1)).astimezone(self.zone)
        ticks = CronSim(self._expression(), start, reverse=True)
        while (tick := next(ticks).astimezone(UTC)) > moment:
            pass
        # around a daylight-saving change the reverse walk can pass over a tick: the
        # forward walk, which handles it, has the last word
        while (following := self.next_after(tick)) <= moment:
            tick = following
        return tick

    def period(self, around: datetime) -> timedelta:
        """The time from one tick to the next near `around` (for the unique key's window)."""
        first = self.next_after(around)
        return self.next_after(first) - first

    def due(self, first: datetime, now: datetime, missed: Missed, max_catch_up: int) -> list[datetime]:
        """The ticks to fire when `first` (the schedule's next_run_at) has come by `now`."""
        if first > now:
            return []
        latest = self.last_at_or_before(now)
        if missed == "latest":
            return [latest]
        if missed == "skip":
            return [latest] if now - latest <= ON_TIME else []
        ticks = [latest]  # all: walk back from the latest, at most max_catch_up
        while len(ticks) < max_catch_up:
            earlier = self.last_at_or_before(ticks[-1] - timedelta(microseconds=1))
            if earlier < first:
                break
            ticks.append(earlier)
        return sorted(ticks)

    def _every(self) -> timedelta | None:
        match = EVERY.fullmatch(self.cron.strip())
        if match is None:
            return None
        return timedelta(seconds=int(match[1]) * UNITS[match[2]])

    def _expression(self) -> str:
        text = self.cron.strip()
        return ALIASES.get(text, text)
