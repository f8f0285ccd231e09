"""Typed, frozen descriptions of jobs, their options and their retry policies."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InvalidJobError

# Ten years: any longer delay is a bug, and Postgres timestamps overflow past 294276 AD.
MAX_DELAY_SECONDS = 315_360_000

# used with fullmatch: "$" alone would let a trailing newline through
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
TASK_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,199}")


class JobState(enum.StrEnum):
    """Where a job is in its life. `queued` includes jobs waiting for their run_at."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


class Priority(enum.IntEnum):
    """Named priority levels; any integer in [-32768, 32767] works, larger runs first."""

    LOW = -10
    NORMAL = 0
    HIGH = 10
    CRITICAL = 20


def _priority(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("priority must be an integer or LOW/NORMAL/HIGH/CRITICAL, not a bool")
    if isinstance(value, str):
        try:
            return Priority[value.strip().upper()]
        except KeyError:
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"priority must be an integer or one of LOW/NORMAL/HIGH/CRITICAL, got {value!r}"
                ) from None
    return value


def _seconds(value: object) -> object:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


PriorityValue = Annotated[int, BeforeValidator(_priority), Field(ge=-32768, le=32767)]
Seconds = Annotated[float, BeforeValidator(_seconds)]


class RetryPolicy(BaseModel):
    """How long to wait before attempt n+1; computed in SQL (pgqueue.backoff_seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["exponential", "linear", "fixed"] = "exponential"
    base: Seconds = Field(default=1.0, ge=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False)
    max: Seconds = Field(default=3600.0, ge=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False)
    jitter: float = Field(default=0.1, ge=0, le=1)

    @classmethod
    def exponential(
        cls, base: float | timedelta = 1.0, max: float | timedelta = 3600.0, jitter: float = 0.1
    ) -> RetryPolicy:
        """base·2^(attempt-1), capped at max, minus up to `jitter` of itself."""
        return cls(kind="exponential", base=base, max=max, jitter=jitter)  # type: ignore[arg-type]

    @classmethod
    def linear(
        cls, step: float | timedelta = 1.0, max: float | timedelta = 3600.0, jitter: float = 0.0
    ) -> RetryPolicy:
        """step·attempt, capped at max."""
        return cls(kind="linear", base=step, max=max, jitter=jitter)  # type: ignore[arg-type]

    @classmethod
    def fixed(cls, delay: float | timedelta = 1.0, jitter: float = 0.0) -> RetryPolicy:
        """The same delay before every retry."""
        return cls(kind="fixed", base=delay, max=delay, jitter=jitter)  # type: ignore[arg-type]


class JobOptions(BaseModel):
    """Options of one job; validated at the edge so bad input never reaches the table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue: str = "default"
    priority: PriorityValue = 0
    delay: Seconds = Field(default=0.0, ge=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False)
    run_at: datetime | None = None
    max_attempts: int = Field(default=10, ge=1, le=1_000_000)
    timeout: Seconds | None = Field(default=None, gt=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False)
    retry: RetryPolicy = RetryPolicy()
    # a job with a key is not created while another job of its task holds the key (queued
    # or running; with `unique_for`, for that many seconds after it was taken)
    unique_key: str | None = Field(default=None, min_length=1, max_length=500)
    unique_for: Seconds | None = Field(default=None, gt=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False)

    @model_validator(mode="after")
    def _window_needs_a_key(self) -> JobOptions:
        if self.unique_for is not None and self.unique_key is None:
            raise ValueError("unique_for goes with a unique_key")
        return self

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(
                "queue names are 1-100 characters of letters, digits, '_', '.', ':' or '-', "
                f"starting with a letter or digit; got {value!r}"
            )
        return value

    @field_validator("run_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return value

    @field_validator("max_attempts", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("max_attempts must be an integer")
        return value

    def merged(self, **changes: Any) -> JobOptions:
        """A copy with `changes` applied and validated (None means 'keep')."""
        given = {key: value for key, value in changes.items() if value is not None}
        if "delay" in given and "run_at" not in given:
            given["run_at"] = None
        if "run_at" in given and "delay" not in given:
            given["delay"] = 0.0
        if given.get("delay") and given.get("run_at") is not None:
            raise InvalidJobError("give delay or run_at, not both")
        return validate_options({**self.model_dump(), **given})


class JobId(int):
    """A job's id, as enqueue returns it, and a handle on the job.

    `duplicate` is True when the job was not created because another job holds its
    unique key: this is that job's id. From an app's enqueue, the handle reads the job
    (`state()`, `progress()`, `job()`), waits for it (`wait()`, `wait_async()`) and
    cancels it (`cancel()`), through the app's pool.
    """

    duplicate: bool
    _app: Any

    def __new__(cls, value: int, duplicate: bool = False, app: Any = None) -> JobId:
        job_id = super().__new__(cls, value)
        job_id.duplicate = duplicate
        job_id._app = app
        return job_id

    def _source(self) -> Any:
        if self._app is None:
            raise RuntimeError("this job id is not bound to an app: use app.get_job(id) / app.wait(id)")
        return self._app

    def job(self) -> Job:
        """The job as stored now."""
        return self._source().get_job(int(self))  # type: ignore[no-any-return]

    def state(self) -> JobState:
        return self._source().get_status(int(self)).state  # type: ignore[no-any-return]

    def progress(self) -> dict[str, Any] | None:
        """The last progress its handler reported, or None."""
        return self._source().get_status(int(self)).progress  # type: ignore[no-any-return]

    def wait(self, timeout: float | None = None) -> Any:
        """The job's result once it succeeded; JobFailedError when it ends dead or cancelled,
        TimeoutError when it has not ended within `timeout` seconds."""
        return self._source().wait(int(self), timeout)

    async def wait_async(self, timeout: float | None = None) -> Any:
        return await self._source().wait_async(int(self), timeout)

    def cancel(self) -> str:
        """See `App.cancel`: "cancelled" or "cancelling"."""
        return self._source().cancel(int(self))  # type: ignore[no-any-return]

    async def cancel_async(self) -> str:
        return await self._source().cancel_async(int(self))  # type: ignore[no-any-return]

    def __reduce__(self) -> tuple[Any, ...]:
        return (JobId, (int(self), self.duplicate))


def validate_options(values: dict[str, Any]) -> JobOptions:
    """Build JobOptions, turning pydantic's error into a one-line InvalidJobError."""
    try:
        return JobOptions.model_validate(values)
    except ValidationError as error:
        raise InvalidJobError(describe_validation_error(error, "invalid job options")) from None


def describe_validation_error(error: ValidationError, what: str) -> str:
    """pydantic's error as one line: `what: field: problem (got value); ...`."""
    parts = []
    for detail in error.errors():
        where = ".".join(str(part) for part in detail["loc"]) or "value"
        message = detail["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message} (got {detail.get('input')!r})")
    return f"{what}: " + "; ".join(parts)


def validate_task_name(name: str) -> str:
    if not TASK_NAME_PATTERN.fullmatch(name):
        raise InvalidJobError(
            f"task names are 1-200 characters of letters, digits, '_', '.', ':' or '-', "
            f"starting with a letter or '_'; got {name!r}"
        )
    return name


@dataclass(frozen=True)
class Job:
    """A job as stored: what a status lookup returns."""

    id: int
    task: str
    args: dict[str, Any]
    queue: str
    priority: int
    state: JobState
    attempt: int
    max_attempts: int
    run_at: datetime
    timeout_seconds: float | None
    worker: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    errors: list[dict[str, Any]] = field(default_factory=list)
    # one entry per attempt that ran: attempt, worker, outcome, started_at, ended_at, seconds
    history: list[dict[str, Any]] = field(default_factory=list)
    # the last progress its handler reported: current, total, percent, message, stage
    progress: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Job:
        values = list(row)
        values[5] = JobState(values[5])
        return cls(*values)


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds the lease of, as its claim returned it."""

    id: int
    task: str
    args: dict[str, Any]
    queue: str
    priority: int
    attempt: int
    max_attempts: int
    timeout_seconds: float | None
    run_at: datetime
    created_at: datetime
