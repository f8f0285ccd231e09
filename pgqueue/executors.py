"""Where handlers run: on the event loop, in a thread, or in a process-pool child.

Each runner owns its timeout and its way of stopping a handler. An async handler is
cancelled. A process job runs in a child of its own (a one-process pool per slot, so
stopping or losing one child never fails the jobs of the others); a child over its
timeout, or one whose job was cancelled, is killed and the slot gets a new child. A
thread cannot be stopped in Python, so it keeps its slot ("lingers") until it
returns, and the worker claims that much less. Waiting for a free thread or process
happens before the timeout starts: a timeout counts running time only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
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
        self._process_gate = asyncio.Semaphore(min(concurrency, os.cpu_count() or 1))
        # One single-child pool per busy or idle process slot. ProcessPoolExecutor
        # fails every call of a pool when one of its children dies, and offers no way
        # to stop one call; a pool of one child makes both concern that job alone.
        self._idle_children: list[concurrent.futures.ProcessPoolExecutor] = []
        self._busy_children: set[concurrent.futures.ProcessPoolExecutor] = set()
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
            future, child = self._submit(call, process)
        except BaseException:
            gate.release()
            raise
        ended = functools.partial(self._done, gate, child, future)
        future.add_done_callback(lambda _: _call_soon(loop, ended))
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await asyncio.wrap_future(future)
        except (TimeoutError, asyncio.CancelledError) as error:
            if not future.done():
                if child is not None:
                    self._kill(child)  # a child can be stopped: do it
                else:
                    self.lingering += 1
                    future.add_done_callback(lambda _: _call_soon(loop, self._lingering_done))
            if isinstance(error, TimeoutError) and deadline.expired():
                raise TimedOut from None
            raise
        except BrokenProcessPool:
            # its child died (killed, out of memory): the next job in this slot gets a new one
            if child is not None:
                self._kill(child)
            raise

    def kill_processes(self) -> None:
        """Stop every process child, busy or idle; the next CPU-bound job starts a new one."""
        for child in [*self._busy_children, *self._idle_children]:
            self._kill(child)

    def shutdown(self) -> None:
        """Leave: kill process children, and do not wait for threads (they are abandoned)."""
        self.kill_processes()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _submit(
        self, call: Callable[[], Any], process: bool
    ) -> tuple[concurrent.futures.Future[Any], concurrent.futures.ProcessPoolExecutor | None]:
        if not process:
            return self._threads.submit(call), None
        for _ in range(2):
            child = self._idle_children.pop() if self._idle_children else processes.new_pool(1)
            try:
                future = processes.submit(child, call)
            except BrokenProcessPool:
                processes.kill_children(child)  # died while idle: once more with a new child
                continue
            self._busy_children.add(child)
            return future, child
        raise BrokenProcessPool("could not start a process-pool child")

    def _done(
        self,
        gate: asyncio.Semaphore,
        child: concurrent.futures.ProcessPoolExecutor | None,
        future: concurrent.futures.Future[Any],
    ) -> None:
        """On the loop, when a handler's call has ended: its slot is free, its child idle."""
        if child is not None and child in self._busy_children:  # not killed meanwhile
            if future.cancelled() or isinstance(future.exception(), BrokenProcessPool):
                self._kill(child)
            else:
                self._busy_children.discard(child)
                self._idle_children.append(child)
        gate.release()

    def _kill(self, child: concurrent.futures.ProcessPoolExecutor) -> None:
        self._busy_children.discard(child)
        with contextlib.suppress(ValueError):
            self._idle_children.remove(child)
        processes.kill_children(child)

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
