"""pgqueue: a PostgreSQL-native background job queue for Python."""

from .app import App
from .context import Cancelled, JobContext, current_job
from .errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    InvalidJobError,
    JobFailedError,
    JobFinishedError,
    JobNotFoundError,
    MigrationChecksumError,
    MigrationLockTimeoutError,
    PermissionDeniedError,
    PgQueueError,
    PreparedStatementsLost,
    QueueFull,
    SchemaError,
    SchemaNotMigratedError,
    SchemaTooNewError,
    UnknownQueueError,
    UnknownTaskError,
)
from .events import AsyncEventStream, EventStream, JobEvent
from .hooks import (
    Connected,
    EnqueueRefused,
    Hooks,
    JobFinished,
    JobProgress,
    JobRescued,
    JobsClaimed,
    JobStarted,
    OutcomesFlushed,
    QueuesEmpty,
    WorkerStarted,
    WorkerStopped,
)
from .migrate import check_schema, check_schema_async, migrate, migrate_async
from .models import Job, JobId, JobOptions, JobState, Priority, RetryPolicy
from .outcomes import Fail, Retry, Snooze
from .periodic import InvalidScheduleError
from .queues import QueueControl, QueueControls
from .schedules import Schedule, Schedules, ScheduleState, UnknownScheduleError
from .settings import Settings
from .tasks import Task
from .worker import Worker

__all__ = [
    "App",
    "AsyncEventStream",
    "Cancelled",
    "ConfigurationError",
    "Connected",
    "DatabaseUnavailableError",
    "EnqueueRefused",
    "EventStream",
    "Fail",
    "Hooks",
    "InvalidJobError",
    "InvalidScheduleError",
    "Job",
    "JobContext",
    "JobEvent",
    "JobFailedError",
    "JobFinished",
    "JobFinishedError",
    "JobId",
    "JobNotFoundError",
    "JobOptions",
    "JobProgress",
    "JobRescued",
    "JobStarted",
    "JobState",
    "JobsClaimed",
    "MigrationChecksumError",
    "MigrationLockTimeoutError",
    "OutcomesFlushed",
    "PermissionDeniedError",
    "PgQueueError",
    "PreparedStatementsLost",
    "Priority",
    "QueueControl",
    "QueueControls",
    "QueueFull",
    "QueuesEmpty",
    "Retry",
    "RetryPolicy",
    "Schedule",
    "ScheduleState",
    "Schedules",
    "SchemaError",
    "SchemaNotMigratedError",
    "SchemaTooNewError",
    "Settings",
    "Snooze",
    "Task",
    "UnknownQueueError",
    "UnknownScheduleError",
    "UnknownTaskError",
    "Worker",
    "WorkerStarted",
    "WorkerStopped",
    "check_schema",
    "check_schema_async",
    "current_job",
    "migrate",
    "migrate_async",
]
