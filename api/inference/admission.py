"""Bounded admission of predictions: a fixed number in flight, a bounded wait queue, then 429.

A prediction passes two gates:

1. `enter()` as soon as the request arrives (before its body is read): refused with 503
   ``shutting_down`` while draining and with 429 ``gateway_busy`` when the queue is already full, so an
   overloaded gateway does not read a 500 MB body to refuse it afterwards. Entered requests count as
   *active*; draining waits for them.
2. `slot()` once the body is spooled: one of `max_inflight` slots (preprocessing + inference), waiting
   in FIFO order in a queue of at most `max_queue`; beyond it 429 ``gateway_busy`` with Retry-After.

Gauges: ``headct_inflight_requests`` = slots held, ``headct_queue_depth`` = requests waiting for one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from api import metrics
from api.problems import ProblemCode, ProblemError


class Admission:
    def __init__(
        self, max_inflight: int, max_queue: int, *, busy_retry_after_s: int, shutdown_retry_after_s: int
    ) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.busy_retry_after_s = busy_retry_after_s
        self.shutdown_retry_after_s = shutdown_retry_after_s
        self.inflight = 0
        self.active = 0
        self.draining = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _busy(self) -> ProblemError:
        return ProblemError(
            ProblemCode.GATEWAY_BUSY,
            f"the gateway is at capacity ({self.max_inflight} in flight, {self.max_queue} queued); "
            "retry later",
            headers={"Retry-After": str(self.busy_retry_after_s)},
        )

    def shutting_down(self) -> ProblemError:
        return ProblemError(
            ProblemCode.SHUTTING_DOWN,
            "this gateway instance is shutting down; retry (another instance will answer)",
            headers={"Retry-After": str(self.shutdown_retry_after_s)},
        )

    def _full(self) -> bool:
        return self.inflight >= self.max_inflight and len(self._waiters) >= self.max_queue

    @contextmanager
    def enter(self) -> Iterator[None]:
        """The early gate; hold it for the whole request (upload included)."""
        if self.draining:
            raise self.shutting_down()
        if self._full():
            raise self._busy()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Until no entered request is left (True) or `timeout_s` passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            metrics.INFLIGHT.inc()
            return
        if len(self._waiters) >= self.max_queue:
            raise self._busy()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        metrics.QUEUE_DEPTH.inc()
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as we were cancelled: pass it on
            elif waiter in self._waiters:  # (else `_release` already dropped it)
                self._waiters.remove(waiter)
                metrics.QUEUE_DEPTH.dec()
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            metrics.QUEUE_DEPTH.dec()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the next in line; `inflight` is unchanged
                return
        self.inflight -= 1
        metrics.INFLIGHT.dec()
