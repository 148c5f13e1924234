"""Bounded admission of predictions, per priority lane: a fixed number in flight, a bounded wait queue
per lane, then 429.

A prediction passes two gates:

1. `enter(lane)` as soon as the request arrives (before its body is read): refused with 503
   ``shutting_down`` while draining and with 429 ``gateway_busy`` when its lane's queue is already
   full, so an overloaded gateway does not read a 500 MB body to refuse it afterwards. Entered requests
   count as *active*; draining waits for them.
2. `slot(lane)` once the body is spooled: one of `max_inflight` slots (preprocessing + inference).
   Each lane waits in its own FIFO queue of at most its budget (`max_queue`, bulk: `bulk_max_queue`);
   beyond it 429 ``gateway_busy`` with Retry-After. A freed slot goes to the first waiter of the best
   lane (STAT, then routine, then bulk), and bulk may hold at most `bulk_max_inflight` slots: however
   much bulk work is queued, a STAT scan is never refused for it and waits at most for one slot to free
   (none, while bulk is below `max_inflight`).

Gauges: ``headct_inflight_requests`` = slots held, ``headct_queue_depth`` = requests waiting for one,
and both per lane (``headct_lane_inflight_requests``, ``headct_lane_queue_depth``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from api import metrics
from api.inference.lanes import DEFAULT_LANE, Lane
from api.problems import ProblemCode, ProblemError


class Admission:
    def __init__(
        self,
        max_inflight: int,
        max_queue: int,
        *,
        busy_retry_after_s: int,
        shutdown_retry_after_s: int,
        bulk_max_inflight: int | None = None,
        bulk_max_queue: int | None = None,
    ) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.bulk_max_inflight = max_inflight if bulk_max_inflight is None else bulk_max_inflight
        self.queue_budget = {
            Lane.STAT: max_queue,
            Lane.ROUTINE: max_queue,
            Lane.BULK: max_queue if bulk_max_queue is None else bulk_max_queue,
        }
        self.busy_retry_after_s = busy_retry_after_s
        self.shutdown_retry_after_s = shutdown_retry_after_s
        self.inflight = 0
        self.inflight_by_lane = dict.fromkeys(Lane, 0)
        self.active = 0
        self.draining = False
        self._waiters: dict[Lane, deque[asyncio.Future[None]]] = {lane: deque() for lane in Lane}

    @property
    def queued(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    def queued_in(self, lane: Lane) -> int:
        return len(self._waiters[lane])

    def _busy(self, lane: Lane) -> ProblemError:
        metrics.LANE_REJECTIONS.labels(lane=lane.value).inc()
        return ProblemError(
            ProblemCode.GATEWAY_BUSY,
            f"the gateway is at capacity for {lane.value} predictions ({self.max_inflight} in flight, "
            f"{self.queue_budget[lane]} queued); retry later",
            headers={"Retry-After": str(self.busy_retry_after_s)},
        )

    def shutting_down(self) -> ProblemError:
        return ProblemError(
            ProblemCode.SHUTTING_DOWN,
            "this gateway instance is shutting down; retry (another instance will answer)",
            headers={"Retry-After": str(self.shutdown_retry_after_s)},
        )

    def _slot_free_for(self, lane: Lane) -> bool:
        if self.inflight >= self.max_inflight:
            return False
        return lane is not Lane.BULK or self.inflight_by_lane[Lane.BULK] < self.bulk_max_inflight

    def _may_take_now(self, lane: Lane) -> bool:
        """A free slot, and nobody of this lane or a better one is waiting for it (FIFO per lane)."""
        ahead = any(self._waiters[other] for other in Lane if other.rank <= lane.rank)
        return self._slot_free_for(lane) and not ahead

    def _full(self, lane: Lane) -> bool:
        return not self._may_take_now(lane) and len(self._waiters[lane]) >= self.queue_budget[lane]

    @contextmanager
    def enter(self, lane: Lane = DEFAULT_LANE) -> Iterator[None]:
        """The early gate; hold it for the whole request (upload included)."""
        if self.draining:
            raise self.shutting_down()
        if self._full(lane):
            raise self._busy(lane)
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
    async def slot(self, lane: Lane = DEFAULT_LANE) -> AsyncIterator[None]:
        await self._acquire(lane)
        try:
            yield
        finally:
            self._release(lane)

    def _take(self, lane: Lane) -> None:
        self.inflight += 1
        self.inflight_by_lane[lane] += 1
        metrics.INFLIGHT.inc()
        metrics.LANE_INFLIGHT.labels(lane=lane.value).inc()

    async def _acquire(self, lane: Lane) -> None:
        if self._may_take_now(lane):
            self._take(lane)
            return
        waiters = self._waiters[lane]
        if len(waiters) >= self.queue_budget[lane]:
            raise self._busy(lane)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        self._queue_changed(lane, +1)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(lane)  # the slot was handed over just as we were cancelled: pass it on
            elif waiter in waiters:  # (else `_hand_over` already dropped it)
                waiters.remove(waiter)
                self._queue_changed(lane, -1)
            raise

    def _release(self, lane: Lane) -> None:
        self.inflight -= 1
        self.inflight_by_lane[lane] -= 1
        metrics.INFLIGHT.dec()
        metrics.LANE_INFLIGHT.labels(lane=lane.value).dec()
        self._hand_over()

    def _hand_over(self) -> None:
        """Give free slots to the first waiters of the best lanes that may take one."""
        for lane in Lane:
            waiters = self._waiters[lane]
            while waiters and self._slot_free_for(lane):
                waiter = waiters.popleft()
                self._queue_changed(lane, -1)
                if not waiter.done():  # (a cancelled waiter is skipped)
                    self._take(lane)
                    waiter.set_result(None)

    def _queue_changed(self, lane: Lane, delta: int) -> None:
        metrics.QUEUE_DEPTH.inc(delta)
        metrics.LANE_QUEUE_DEPTH.labels(lane=lane.value).inc(delta)
