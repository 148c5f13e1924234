"""Gateway micro-batching: preprocessed scans that are ready at about the same time go to Triton as one
batch, on top of Triton's own dynamic batcher (fewer gRPC calls, fewer 5 MB messages in flight).

A batch is sent when it holds `max_size` scans or `max_delay_s` after its first scan arrived,
whichever comes first. The call's timeout is the smallest remaining deadline of its members; a member
whose deadline already passed is answered 504 ``deadline_exceeded`` and never sent; a member whose
caller went away (cancelled) is left out. When the call fails, every member gets the failure.

`enabled=False` sends each scan in its own call, from the caller's task.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from api import metrics
from api.problems import ProblemError

#: ``infer(batch [N, ...], timeout_s) -> (probabilities [N, T], embeddings [N, D])``
InferBatch = Callable[[np.ndarray, float], Awaitable[tuple[np.ndarray, np.ndarray]]]


def deadline_exceeded(detail: str = "the request deadline passed before inference") -> ProblemError:
    return ProblemError(504, "deadline_exceeded", detail)


@dataclass
class _Member:
    image: np.ndarray
    deadline: float  # event-loop time
    future: asyncio.Future[tuple[np.ndarray, np.ndarray]]


class MicroBatcher:
    def __init__(self, infer: InferBatch, *, max_size: int, max_delay_s: float, enabled: bool = True) -> None:
        self._infer = infer
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.enabled = enabled
        self._pending: list[_Member] = []
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()

    async def submit(self, image: np.ndarray, deadline: float) -> tuple[np.ndarray, np.ndarray]:
        """One scan's (probabilities [T], embedding [D]); `deadline` is in event-loop time."""
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise deadline_exceeded()
        member = _Member(image, deadline, loop.create_future())
        if not self.enabled or self.max_size <= 1:
            await self._dispatch([member])
            return member.future.result()
        self._pending.append(member)
        if len(self._pending) >= self.max_size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_delay_s, self._flush)
        return await member.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._dispatch(batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _dispatch(self, batch: list[_Member]) -> None:
        now = asyncio.get_running_loop().time()
        members = []
        for member in batch:
            if member.future.done():  # its caller gave up
                continue
            if member.deadline <= now:
                member.future.set_exception(deadline_exceeded())
                continue
            members.append(member)
        if not members:
            return
        metrics.BATCH_SIZE.observe(len(members))
        timeout_s = min(member.deadline for member in members) - now
        try:
            stacked = np.stack([member.image for member in members])
            probabilities, embeddings = await self._infer(stacked, timeout_s)
            if len(probabilities) != len(members) or len(embeddings) != len(members):
                raise ProblemError(
                    502, "inference_failed", "the inference server answered a different batch size"
                )
        except Exception as error:
            for member in members:
                if not member.future.done():
                    member.future.set_exception(copy.copy(error))
            return
        for index, member in enumerate(members):
            if not member.future.done():
                member.future.set_result((probabilities[index].copy(), embeddings[index].copy()))

    async def close(self) -> None:
        """Send what is pending and wait for the calls under way."""
        self._flush()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
