"""pgqueue: a PostgreSQL-native background job queue for Python."""

from .app import App
from .context import JobContext, current_job
from .errors import (
    ConfigurationError,
    InvalidJobError,
    JobNotFoundError,
    MigrationChecksumError,
    PgQueueError,
    SchemaError,
    SchemaNotMigratedError,
    SchemaTooNewError,
    UnknownTaskError,
)
from .migrate import check_schema, check_schema_async, migrate, migrate_async
from .models import Job, JobOptions, JobState, Priority, RetryPolicy
from .outcomes import Fail, Retry
from .settings import Settings
from .tasks import Task
from .worker import Worker

__all__ = [
    "App",
    "ConfigurationError",
    "Fail",
    "InvalidJobError",
    "Job",
    "JobContext",
    "JobNotFoundError",
    "JobOptions",
    "JobState",
    "MigrationChecksumError",
    "PgQueueError",
    "Priority",
    "Retry",
    "RetryPolicy",
    "SchemaError",
    "SchemaNotMigratedError",
    "SchemaTooNewError",
    "Settings",
    "Task",
    "UnknownTaskError",
    "Worker",
    "check_schema",
    "check_schema_async",
    "current_job",
    "migrate",
    "migrate_async",
]
