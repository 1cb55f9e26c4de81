"""Micro-batching: the faces of concurrent requests embedded in one model run.

A request announces itself (:meth:`MicroBatcher.expect`) when it starts decoding, then submits its
faces (:meth:`MicroBatcher.embed`) and awaits their rows. One task on the event loop forms the
batches: it takes the first waiting submission and keeps gathering while more are expected (requests
still decoding), up to ``max_batch`` faces or ``max_wait`` seconds after the first; with nothing
expected it runs at once, so a lone client never waits. The run itself (``run(items) -> rows``)
happens in ``executor``, one batch at a time, while the loop goes on accepting requests; the
batch that forms meanwhile runs next. ``max_batch=1`` runs every request alone (no batching).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class _Job:
    items: list
    future: asyncio.Future
    # when the job was queued (loop time), for the wait the batch adds
    queued: float = field(default=0.0)


class _Ticket:
    settled = False


class MicroBatcher:
    def __init__(self, run: Callable[[list], np.ndarray], executor, *, max_batch: int, max_wait_s: float,
                 observe: Callable[[int, float], None] | None = None):
        self._run, self._executor = run, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._observe = observe or (lambda size, seconds: None)
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._expected = 0          # requests decoding that will submit soon
        self._arrived: asyncio.Event | None = None

    # ------------------------------------------------------------ life
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="facefuse-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    # ------------------------------------------------------------ requests
    @contextlib.contextmanager
    def expect(self):
        """Held by a request from its start: until it submits (:meth:`embed` with the ticket this
        yields) or leaves, a batch being formed waits for it (up to ``max_wait``)."""
        ticket = _Ticket()
        self._expected += 1
        try:
            yield ticket
        finally:
            self._settle(ticket)

    def _settle(self, ticket: "_Ticket | None") -> None:
        if ticket is not None and not ticket.settled:
            ticket.settled = True
            self._expected -= 1
        if self._arrived is not None:
            self._arrived.set()

    async def embed(self, items: list, ticket: "_Ticket | None" = None) -> np.ndarray:
        """The rows of ``items``, computed in some batch (with other requests' items)."""
        if not items:
            self._settle(ticket)
            return np.zeros((0, 0), np.float32)
        loop = asyncio.get_running_loop()
        job = _Job(items, loop.create_future(), loop.time())
        self._queue.put_nowait(job)
        self._settle(ticket)
        return await job.future

    # ------------------------------------------------------------ the batch loop
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            n = len(jobs[0].items)
            deadline = loop.time() + self.max_wait_s
            while n < self.max_batch:
                if not self._queue.empty():
                    job = self._queue.get_nowait()
                    jobs.append(job)
                    n += len(job.items)
                    continue
                # only requests this one already counted as expected, or none, are left: run now
                left = deadline - loop.time()
                if self._expected <= 0 or left <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            await self._run_batch(loop, [j for j in jobs if not j.future.cancelled()])

    async def _run_batch(self, loop, jobs: list[_Job]) -> None:
        if not jobs:
            return
        items = [it for j in jobs for it in j.items]
        start = loop.time()
        try:
            rows = await loop.run_in_executor(self._executor, self._run, items)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, which answers it
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        self._observe(len(items), loop.time() - start)
        at = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(rows[at:at + len(j.items)])
            at += len(j.items)
