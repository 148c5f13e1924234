"""Gateway micro-batching: preprocessed scans that are ready at about the same time go to Triton as one
batch, on top of Triton's own dynamic batcher (fewer gRPC calls, fewer 5 MB messages in flight).

A batch is sent when it holds `max_size` scans or `max_delay_s` after its first scan arrived,
whichever comes first — or at once when no other scan is on its way: callers that wrap their
preprocessing in `expecting()` tell the batcher what may still join, so a scan that is alone (the usual
case at low load) never waits for company that cannot come, and the last of a burst closes its batch.

Each scan names the Triton outputs it needs (its tasks' backbone groups); a batch asks for the union,
and each member gets the rows of the outputs it asked for. The call's timeout is the smallest remaining
deadline of its members; a member whose deadline already
passed is answered 504 ``deadline_exceeded`` and never sent; a member whose caller went away
(cancelled) is left out. When the call fails, every member gets the failure.

Priority lanes (api/inference/lanes.py): a STAT scan closes its batch at once (whatever joined it so far
goes with it), and a batch goes to Triton in the best lane of its members.

`enabled=False` sends each scan in its own call, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from api import metrics
from api.inference.lanes import DEFAULT_LANE, Lane
from api.problems import ProblemCode, ProblemError


@dataclass(frozen=True)
class BatchAnswer:
    """A batch call's outputs ({name: [N, width]}) and the model version that computed them."""

    outputs: Mapping[str, np.ndarray]
    model_version: str = ""


class Outputs(dict[str, np.ndarray]):
    """One scan's outputs ({name: [width]}); `model_version` is the version that computed them ("" if the
    call did not say), so the caller can tell whether the card it labels them with still fits."""

    model_version: str = ""


class InferBatch(Protocol):
    """``infer(batch [N, ...], timeout_s, output names, lane=) -> BatchAnswer`` (or a bare
    {name: [N, width]})."""

    def __call__(
        self, batch: np.ndarray, timeout_s: float, outputs: Sequence[str], *, lane: Lane
    ) -> Awaitable[BatchAnswer | Mapping[str, np.ndarray]]: ...


def deadline_exceeded(detail: str = "the request deadline passed before inference") -> ProblemError:
    return ProblemError(ProblemCode.DEADLINE_EXCEEDED, detail)


@dataclass
class _Member:
    image: np.ndarray
    deadline: float  # event-loop time
    outputs: tuple[str, ...]
    future: asyncio.Future[Outputs]
    lane: Lane = DEFAULT_LANE


class MicroBatcher:
    def __init__(self, infer: InferBatch, *, max_size: int, max_delay_s: float, enabled: bool = True) -> None:
        self._infer = infer
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.enabled = enabled
        self._pending: list[_Member] = []
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._expected = 0  # scans being prepared inside `expecting()`

    async def submit(
        self, image: np.ndarray, deadline: float, outputs: Sequence[str] = (), lane: Lane = DEFAULT_LANE
    ) -> Outputs:
        """One scan's outputs ({name: [width]}); `deadline` is in event-loop time."""
        return await self.enqueue(image, deadline, outputs, lane)

    def enqueue(
        self, image: np.ndarray, deadline: float, outputs: Sequence[str] = (), lane: Lane = DEFAULT_LANE
    ) -> asyncio.Future[Outputs]:
        """Add one scan to the open batch now; the future resolves to the `outputs` it asked for (all the
        call returned when it named none). A STAT scan sends the batch at once."""
        member = self._member(image, deadline, tuple(outputs), lane)
        if not self.enabled or self.max_size <= 1:
            self._send([member])
            return member.future
        self._pending.append(member)
        if len(self._pending) >= self.max_size or lane is Lane.STAT:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self._flush)
        return member.future

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Wraps the work that precedes a scan's `enqueue` (its preprocessing): while any such work is
        under way the open batch waits (up to `max_delay_s`) for it; when the last ends, the batch goes."""
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1
            if self._expected == 0 and self._pending:
                self._flush()

    def _member(self, image: np.ndarray, deadline: float, outputs: tuple[str, ...], lane: Lane) -> _Member:
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise deadline_exceeded()
        return _Member(image, deadline, outputs, loop.create_future(), lane)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            self._send(batch)

    def _send(self, batch: list[_Member]) -> None:
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
            # A lone scan goes as a view: no 5 MB copy on the common low-load path.
            images = [member.image for member in members]
            stacked = images[0][np.newaxis] if len(images) == 1 else np.stack(images)
            wanted = sorted({name for member in members for name in member.outputs})
            lane = min((member.lane for member in members), key=lambda item: item.rank)
            answer = await self._infer(stacked, timeout_s, wanted, lane=lane)
            if not isinstance(answer, BatchAnswer):
                answer = BatchAnswer(answer)
            if any(len(rows) != len(members) for rows in answer.outputs.values()):
                raise ProblemError(
                    ProblemCode.INFERENCE_FAILED, "the inference server answered a different batch size"
                )
        except Exception as error:
            for member in members:
                if not member.future.done():
                    member.future.set_exception(copy.copy(error))
            return
        for index, member in enumerate(members):
            if not member.future.done():
                names = member.outputs or tuple(answer.outputs)
                rows = Outputs((name, answer.outputs[name][index].copy()) for name in names)
                rows.model_version = answer.model_version
                member.future.set_result(rows)

    async def close(self) -> None:
        """Send what is pending and wait for the calls under way."""
        self._flush()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
