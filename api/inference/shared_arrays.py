"""The preprocessed tensor back from a worker through shared memory instead of the pool's pipe.

A `ProcessPoolExecutor` pickles a job's result and streams it through a pipe that the parent's result
thread reads in small pieces: for the 5.3 MB fp16 model input that took 16-18 ms per scan on our
2-core machine, most of what the gateway added between its stages. Instead the parent owns a few
shared-memory segments (`ArraySlots`), lends one to each job, the worker computes the array into it
(`slot_array`) or copies it there (`call_into_slot`, ~0.5 ms) and sends back only a `SharedArray`
reference, and the parent copies the array out before the segment is lent again.

A slot goes back to the free list only once its worker is done with it: after the copy-out, or, for a
job whose caller gave up (cancelled, timed out) while it ran, when the job ends. With no free slot, or
an array larger than a slot, the result simply travels through the pipe as before.

A caller may also keep the array where it lies (`view`) and give the slot back when done with it: the
gateway lends the slots to a Triton on the same host (api/inference/triton_shm.py), so a scan's model
input goes from the worker that computed it to Triton without a copy in the gateway.

The segments are registered with multiprocessing's resource tracker (a process of its own, shared by
the spawned workers), which removes them from /dev/shm if the gateway dies without `close()`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Final

import numpy as np

#: Names of this gateway's shared-memory segments start with "headct-" (Triton's registrations too).
SLOT_PREFIX: Final = "headct-slot-"


@dataclass(frozen=True)
class SharedArray:
    """What crosses the pipe instead of an array: where it lies and how to read it."""

    slot: str
    shape: tuple[int, ...]
    dtype: str


class ArraySlots:
    """The parent's shared-memory segments of `slot_bytes` each, each lent to one job at a time."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self._segments = {
            segment.name: segment
            for segment in (
                SharedMemory(name=f"{SLOT_PREFIX}{uuid.uuid4().hex}", create=True, size=slot_bytes)
                for _ in range(count)
            )
        }
        self._free = list(self._segments)
        self._lock = threading.Lock()  # give_back also runs in the executor's result thread

    def lend(self) -> str | None:
        """A free slot's name, or None when all are lent (the job then uses the pipe)."""
        with self._lock:
            return self._free.pop() if self._free else None

    def give_back(self, slot: str) -> None:
        with self._lock:
            if slot in self._segments and slot not in self._free:
                self._free.append(slot)

    def give_back_when_done(self, slot: str, future: Future[Any]) -> None:
        """For a job whose caller stopped waiting: its worker may still write into the slot."""
        future.add_done_callback(lambda _: self.give_back(slot))

    def take(self, result: Any) -> Any:
        """`result` with its `SharedArray` (if any) replaced by a private copy of the array."""
        if not isinstance(result, tuple):
            return result
        return tuple(self._copy_out(item) if isinstance(item, SharedArray) else item for item in result)

    def view(self, result: Any) -> Any:
        """`result` with its `SharedArray` (if any) replaced by the array in place, valid until its slot
        is given back (the caller gives it back once done with the array)."""
        if not isinstance(result, tuple):
            return result
        return tuple(self._in_place(item) if isinstance(item, SharedArray) else item for item in result)

    def _in_place(self, ref: SharedArray) -> np.ndarray:
        segment = self._segments[ref.slot]
        return np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=segment.buf)

    def _copy_out(self, ref: SharedArray) -> np.ndarray:
        return self._in_place(ref).copy()

    @property
    def segments(self) -> dict[str, SharedMemory]:
        """Every slot's segment by name (all of them, lent or not)."""
        return dict(self._segments)

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)

    def close(self) -> None:
        """Release and remove every segment (after the workers are gone)."""
        with self._lock:
            segments, self._segments, self._free = list(self._segments.values()), {}, []
        for segment in segments:
            segment.close()
            segment.unlink()


# ---- worker side ---------------------------------------------------------------------------------

# The worker's mappings of the parent's segments, opened once each (a fresh mapping would page-fault
# the whole slot in again on every scan).
_attached: dict[str, SharedMemory] = {}


def _segment(slot: str) -> SharedMemory:
    segment = _attached.get(slot)
    if segment is None:
        segment = _attached[slot] = SharedMemory(name=slot)
    return segment


# The slot lent to the job this worker runs now (`call_into_slot`), for `slot_array`.
_running_slot: SharedMemory | None = None


def slot_array(shape: tuple[int, ...], dtype: np.dtype | type[np.generic]) -> np.ndarray | None:
    """In a job run by `call_into_slot`: an array of `shape` and `dtype` at the start of its slot, for
    the job to compute its result into (returned, it is not copied again: ~0.5 ms for the 5.3 MB model
    input); None outside such a job or when the slot is too small."""
    segment, dtype = _running_slot, np.dtype(dtype)
    if segment is None or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > segment.size:
        return None
    return np.ndarray(shape, dtype=dtype, buffer=segment.buf)


def call_into_slot(slot: str, function: Callable[..., Any], *args: Any) -> Any:
    """Runs in the worker: ``function(*args)``, with the first array of its (tuple) result that fits
    the slot written there (unless the job wrote it there already, `slot_array`) and replaced by a
    `SharedArray`."""
    global _running_slot
    segment = _running_slot = _segment(slot)
    try:
        result = function(*args)
    finally:
        _running_slot = None
    if not isinstance(result, tuple):
        return result
    items = list(result)
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray) and item.nbytes <= segment.size:
            target: np.ndarray = np.ndarray(item.shape, dtype=item.dtype, buffer=segment.buf)
            if not (item.flags.c_contiguous and item.ctypes.data == target.ctypes.data):
                np.copyto(target, item, casting="no")
            items[index] = SharedArray(slot=slot, shape=tuple(item.shape), dtype=item.dtype.str)
            break
    return tuple(items)
