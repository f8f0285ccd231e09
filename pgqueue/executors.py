"""Where handlers run: on the event loop, in a thread, or in a process-pool child.

Each runner owns its timeout and its way of stopping a handler. An async handler is
cancelled. A process child is killed; the next CPU-bound job gets a new pool. A
thread cannot be stopped in Python, so it keeps its slot ("lingers") until it
returns, and the worker claims that much less. Waiting for a free thread or process
happens before the timeout starts: a timeout counts running time only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import contextlib
import contextvars
import functools
import os
from collections.abc import Callable
from typing import Any

from . import processes
from .context import JobContext
from .outcomes import TimedOut
from .tasks import Task, run_in_process


class Executors:
    """Runs handlers of every kind for one worker, `concurrency` at a time."""

    def __init__(self, concurrency: int, on_slot_freed: Callable[[], None]) -> None:
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="pgqueue-job"
        )
        self._thread_gate = asyncio.Semaphore(concurrency)
        self._process_count = min(concurrency, os.cpu_count() or 1)
        self._process_gate = asyncio.Semaphore(self._process_count)
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None
        self._on_slot_freed = on_slot_freed
        self.lingering = 0  # threads still busy with jobs that timed out or were released

    async def run(
        self,
        task: Task[..., Any],
        context: JobContext,
        stored: dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_start: Callable[[], None],
    ) -> Any:
        """The handler's return value; raises what it raised, or TimedOut.

        `on_start` is called when the handler really begins: after waiting for a free
        thread or process, which neither its timeout nor its run time counts.
        """
        if task.executor == "async":
            on_start()
            return await _run_async(task, args, kwargs, timeout)
        loop = asyncio.get_running_loop()
        process = task.executor == "process"
        gate = self._process_gate if process else self._thread_gate
        call: Callable[[], Any]
        if process:
            call = functools.partial(
                run_in_process, task.function.__module__, task.function.__qualname__, stored, context
            )
        else:
            call = functools.partial(contextvars.copy_context().run, task.function, *args, **kwargs)
        await gate.acquire()
        on_start()
        try:
            future = self._submit(call, process)
        except BaseException:
            gate.release()
            raise
        future.add_done_callback(lambda _: _call_soon(loop, gate.release))
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await asyncio.wrap_future(future)
        except (TimeoutError, asyncio.CancelledError) as error:
            if not future.done():
                if process:
                    self.kill_processes()  # a child can be stopped: do it
                else:
                    self.lingering += 1
                    future.add_done_callback(lambda _: _call_soon(loop, self._lingering_done))
            if isinstance(error, TimeoutError) and deadline.expired():
                raise TimedOut from None
            raise
        except concurrent.futures.process.BrokenProcessPool:
            # a child died (killed, out of memory): the next job gets a fresh pool
            self.kill_processes()
            raise

    def kill_processes(self) -> None:
        """Stop the process pool's children; the next CPU-bound job starts a new pool."""
        pool, self._processes = self._processes, None
        if pool is not None:
            processes.kill_children(pool)

    def shutdown(self) -> None:
        """Leave: kill process children, and do not wait for threads (they are abandoned)."""
        self.kill_processes()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _submit(self, call: Callable[[], Any], process: bool) -> concurrent.futures.Future[Any]:
        if not process:
            return self._threads.submit(call)
        for _ in range(2):
            if self._processes is None:
                self._processes = processes.new_pool(self._process_count)
            try:
                return processes.submit(self._processes, call)
            except concurrent.futures.process.BrokenProcessPool:
                self.kill_processes()  # broke while idle: once more with a new pool
        raise concurrent.futures.process.BrokenProcessPool("could not start a process pool")

    def _lingering_done(self) -> None:
        self.lingering -= 1
        self._on_slot_freed()


async def _run_async(
    task: Task[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
) -> Any:
    if timeout is None:
        return await task.function(*args, **kwargs)
    try:
        async with asyncio.timeout(timeout) as deadline:
            return await task.function(*args, **kwargs)
    except TimeoutError:
        if deadline.expired():  # ours, not one the handler raised itself
            raise TimedOut from None
        raise


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """From an executor thread: run `callback` on the loop, unless the worker has ended."""
    with contextlib.suppress(RuntimeError):  # the loop closed while the thread finished
        loop.call_soon_threadsafe(callback)
