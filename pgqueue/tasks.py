"""Task: a registered handler, with typed enqueue methods bound to its app."""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar

import psycopg

from . import producer
from .context import JobContext, _current
from .errors import InvalidJobError
from .models import JobId, JobOptions, RetryPolicy

if TYPE_CHECKING:
    from .app import App

Executor = Literal["async", "thread", "process"]
P = ParamSpec("P")
R = TypeVar("R")


class Task(Generic[P, R]):
    """A function registered with `@app.task`; call it directly, or enqueue it as a job."""

    def __init__(
        self,
        app: App,
        name: str,
        function: Callable[P, R],
        options: JobOptions,
        executor: Executor,
    ) -> None:
        self.app = app
        self.name = name
        self.function = function
        self.default_options = options
        self.executor: Executor = executor
        self.signature = inspect.signature(function)
        self._plain_parameters = _plain_parameters(self.signature)
        self.__doc__ = function.__doc__
        self.__wrapped__ = function

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, without a job (handy in tests)."""
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.default_options.queue} executor={self.executor}>"

    # -- options ------------------------------------------------------------------

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | str | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        timeout: float | timedelta | None = None,
        retry: RetryPolicy | None = None,
        unique_key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> Task[P, R]:
        """A copy of this task whose next jobs use these options."""
        return self.with_options(
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
            timeout=timeout,
            retry=retry,
            unique_key=unique_key,
            unique_for=unique_for,
        )

    def with_options(self, **options: Any) -> Task[P, R]:
        if not any(value is not None for value in options.values()):
            return self
        copy: Task[P, R] = Task(self.app, self.name, self.function, self.default_options, self.executor)
        copy.default_options = self.default_options.merged(**options)
        return copy

    # -- arguments ----------------------------------------------------------------

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Check the arguments against the function's signature; return them by name."""
        if not args and self._plain_parameters is not None:
            names, required = self._plain_parameters
            if kwargs.keys() <= names and required <= kwargs.keys():
                return kwargs
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise InvalidJobError(f"bad arguments for task {self.name!r}: {error}") from None
        return dict(bound.arguments)

    def call_arguments(self, stored: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Rebuild (args, kwargs) from stored arguments; TypeError when they do not fit."""
        if self._plain_parameters is not None:
            # the common case, checked with two set operations instead of inspect's bind
            # (which cost a third of the worker's time per no-op job)
            names, required = self._plain_parameters
            if stored.keys() <= names and required <= stored.keys():
                return (), stored
        unexpected = sorted(set(stored) - set(self.signature.parameters))
        if unexpected:
            raise TypeError(f"unexpected argument(s) {', '.join(unexpected)}")
        bound = inspect.BoundArguments(self.signature, OrderedDict(stored))
        self.signature.bind(*bound.args, **bound.kwargs)  # raises TypeError on a mismatch
        return bound.args, bound.kwargs

    def prepare_kwargs(self, arguments: dict[str, Any]) -> producer.PreparedJob:
        return self.prepare(**arguments)

    def prepare(self, *args: Any, **kwargs: Any) -> producer.PreparedJob:
        # the name was validated when the task was registered
        return producer.PreparedJob(
            self.name, producer.encode_args(self.name, self.bind(*args, **kwargs)), self.default_options
        )

    # -- enqueue ------------------------------------------------------------------

    def enqueue(
        self, connection: psycopg.Connection[Any] | None, /, *args: P.args, **kwargs: P.kwargs
    ) -> JobId:
        """Write a job for this task on `connection` (in its open transaction) and return its id
        (with a unique key another job holds: that job's id, marked `duplicate`).

        Pass `None` to use the app's own connection pool (committed at once).
        """
        return self.app.insert(connection, self.prepare(*args, **kwargs))

    async def enqueue_async(
        self, connection: psycopg.AsyncConnection[Any] | None, /, *args: P.args, **kwargs: P.kwargs
    ) -> JobId:
        """The async twin of `enqueue`."""
        return await self.app.insert_async(connection, self.prepare(*args, **kwargs))

    def enqueue_many(
        self, connection: psycopg.Connection[Any] | None, arguments: Iterable[dict[str, Any]]
    ) -> list[int]:
        """Write one job per keyword-argument dict with a single COPY; returns the ids."""
        jobs = [self.prepare(**kwargs) for kwargs in arguments]
        return self.app.insert_many(connection, jobs)

    async def enqueue_many_async(
        self, connection: psycopg.AsyncConnection[Any] | None, arguments: Iterable[dict[str, Any]]
    ) -> list[int]:
        """The async twin of `enqueue_many`."""
        jobs = [self.prepare(**kwargs) for kwargs in arguments]
        return await self.app.insert_many_async(connection, jobs)


def _plain_parameters(signature: inspect.Signature) -> tuple[frozenset[str], frozenset[str]] | None:
    """(names, required names) when every parameter can be passed by keyword, else None."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(parameter.kind not in keyword for parameter in signature.parameters.values()):
        return None
    names = frozenset(signature.parameters)
    required = frozenset(
        name for name, parameter in signature.parameters.items() if parameter.default is parameter.empty
    )
    return names, required


class ChildError(Exception):
    """A process-pool handler's exception that could not cross back to the worker as itself.

    The pool pickles what a child raises; an exception that cannot be pickled (or
    unpickled: a custom `__init__` with required arguments) would otherwise turn into
    a pickling error, or break the whole pool. This one carries its type and message.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[type[ChildError], tuple[str, str]]:
        return (ChildError, (self.type_name, self.message))


def run_in_process(module: str, qualname: str, stored: dict[str, Any], context: JobContext) -> Any:
    """Entry point of a process-pool job: find the task by import path and run it."""
    _current.set(context)  # current_job() works in the child too
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    try:
        if isinstance(target, Task):
            args, kwargs = target.call_arguments(stored)
            return target.function(*args, **kwargs)
        return target(**stored)
    except BaseException as error:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            kind = type(error)
            raise ChildError(f"{kind.__module__}.{kind.__qualname__}", str(error)) from error
        raise
