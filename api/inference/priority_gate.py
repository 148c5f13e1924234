"""`PriorityGate`: at most `capacity` jobs at once; waiting jobs start best lane first, FIFO within a
lane, and a lane may be held to fewer turns than the capacity (`limits`).

The preprocessing pool runs behind one (`ProcessPoolExecutor` itself is FIFO): a STAT scan is the next
to start however many bulk scans wait for a worker, and with bulk limited to one turn less than the
workers, a STAT scan never waits for a bulk scan to finish first.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from api.inference.lanes import Lane


@dataclass
class _Waiter:
    lane: Lane
    order: int
    future: asyncio.Future[None]


class PriorityGate:
    def __init__(self, capacity: int, limits: Mapping[Lane, int] | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.limits = {lane: max(1, min(capacity, (limits or {}).get(lane, capacity))) for lane in Lane}
        self.running = 0
        self.running_by_lane = dict.fromkeys(Lane, 0)
        self._waiting: list[_Waiter] = []
        self._order = itertools.count()
        self._holds = 0  # while > 0, no new turn starts (`held`)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def turn(self, lane: Lane) -> AsyncIterator[None]:
        """Hold one of the `capacity` turns for the `async with` block."""
        await self._acquire(lane)
        try:
            yield
        finally:
            self._release(lane)

    @contextmanager
    def held(self) -> Iterator[None]:
        """No new turn starts inside the block (turns under way go on); waiting jobs start after it."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                self._hand_over()

    def _may_start(self, lane: Lane) -> bool:
        return (
            not self._holds
            and self.running < self.capacity
            and self.running_by_lane[lane] < self.limits[lane]
        )

    def _start(self, lane: Lane) -> None:
        self.running += 1
        self.running_by_lane[lane] += 1

    async def _acquire(self, lane: Lane) -> None:
        ahead = any(waiter.lane.rank <= lane.rank for waiter in self._waiting)
        if self._may_start(lane) and not ahead:
            self._start(lane)
            return
        waiter = _Waiter(lane, next(self._order), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(lane)  # handed a turn just as we were cancelled: pass it on
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise

    def _release(self, lane: Lane) -> None:
        self.running -= 1
        self.running_by_lane[lane] -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        """Start the best waiting jobs whose lane is under its limit."""
        for waiter in sorted(self._waiting, key=lambda item: (item.lane.rank, item.order)):
            if self.running >= self.capacity:
                return
            if self._may_start(waiter.lane) and not waiter.future.done():
                self._waiting.remove(waiter)
                self._start(waiter.lane)
                waiter.future.set_result(None)
