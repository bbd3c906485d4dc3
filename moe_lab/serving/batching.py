"""Dynamic batching for a model that decodes one batch at a time (pure asyncio; no Ray).

    executor = ThreadPoolExecutor(max_workers=1)            # the model thread
    batcher = DecodeBatcher(run_batch, executor, max_batch_size=8, batch_wait_timeout_s=0.0)
    result = await batcher.submit(request, deadline)        # deadline: a time.monotonic() value

``run_batch(items, deadlines) -> results`` (one result per item, in order) runs on the
executor, which must have exactly one worker thread. Semantics:

- Each ``submit`` queues its item and schedules one *drain* on the model thread. A drain
  takes up to ``max_batch_size`` queued items, from any caller, and runs them as one batch.
  So requests that arrive while the model is busy queue up and form the next batch.
- ``batch_wait_timeout_s`` > 0: a drain that finds fewer than ``max_batch_size`` items waits
  up to that long for more. 0: it takes what is queued.
- Drains run in order, so each item is taken by its own drain at the latest.
- An item whose deadline passed before it was taken fails with ``asyncio.TimeoutError``; an
  item whose caller was cancelled (timed out, disconnected) is dropped. ``run_batch`` sees
  the deadlines, to stop rows that run past theirs.
- An exception in ``run_batch`` fails the items of that batch only.

Why not Ray Serve's ``@serve.batch``: in Ray 2.60 it forms the next batch as soon as the
previous one is handed to the batch function (``max_concurrent_batches`` only queues
batches already formed), so while a decode runs, each arrival becomes a batch of one, and
merging those needed a second queue on top. This one queue does both jobs. Back-pressure
(``max_ongoing_requests``, ``max_queued_requests``: 503) stays with Serve.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, List, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)  # compared by identity
class _Pending:
    value: Any
    deadline: float
    future: "asyncio.Future[Any]"
    loop: asyncio.AbstractEventLoop


def _settle(fut: "asyncio.Future[Any]", value: Any, is_error: bool) -> None:
    if fut.done():  # the caller is gone (cancelled)
        return
    if is_error:
        fut.set_exception(value)
    else:
        fut.set_result(value)


class DecodeBatcher(Generic[T, R]):
    """Batches concurrent ``submit`` calls into ``run_batch`` calls on a one-thread executor."""

    def __init__(self, run_batch: Callable[[List[T], List[float]], Sequence[R]], executor: Executor,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._pending: List[_Pending] = []
        self._cond = threading.Condition()
        self._stats = {"batches": 0, "batched_requests": 0, "max_batch": 0}

    async def submit(self, value: T, deadline: float) -> R:
        """Queue ``value``; returns its result, or raises its batch's exception or TimeoutError."""
        loop = asyncio.get_running_loop()
        item = _Pending(value, deadline, loop.create_future(), loop)
        with self._cond:
            self._pending.append(item)
            self._cond.notify()
        loop.run_in_executor(self._executor, self._drain)  # never raises; nothing to await
        try:
            return await item.future
        except asyncio.CancelledError:
            with self._cond:
                if item in self._pending:
                    self._pending.remove(item)
            raise

    def stats(self) -> Dict[str, int]:
        """``batches`` run, ``batched_requests`` in them, the largest batch (``max_batch``)."""
        with self._cond:
            return dict(self._stats)

    # ---- on the model thread ----------------------------------------------------------
    def _take(self) -> "tuple[List[_Pending], List[_Pending]]":
        """(expired, batch): the queued items past their deadline, and the next batch."""
        with self._cond:
            if not self._pending:
                return [], []
            if self.batch_wait_timeout_s > 0:
                self._cond.wait_for(lambda: len(self._pending) >= self.max_batch_size, self.batch_wait_timeout_s)
            now = time.monotonic()
            expired = [p for p in self._pending if p.deadline <= now]
            live = [p for p in self._pending if p.deadline > now]
            batch, self._pending = live[: self.max_batch_size], live[self.max_batch_size:]
            if batch:
                self._stats["batches"] += 1
                self._stats["batched_requests"] += len(batch)
                self._stats["max_batch"] = max(self._stats["max_batch"], len(batch))
            return expired, batch

    def _drain(self) -> None:
        expired, batch = self._take()
        for p in expired:  # their callers have had their TimeoutError already, or get it now
            self._reply(p, asyncio.TimeoutError(), is_error=True)
        if not batch:
            return
        try:
            results = list(self._run_batch([p.value for p in batch], [p.deadline for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # a bug, not bad input (validated before submit): fail this batch
            for p in batch:
                self._reply(p, exc, is_error=True)
            return
        for p, res in zip(batch, results):
            self._reply(p, res, is_error=False)

    @staticmethod
    def _reply(p: _Pending, value: Any, is_error: bool) -> None:
        try:
            p.loop.call_soon_threadsafe(_settle, p.future, value, is_error)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is waiting
            pass
