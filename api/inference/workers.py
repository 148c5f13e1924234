"""The process pool that decodes, validates and preprocesses scans, off the event loop and off the GIL.

Workers are started with the `spawn` method: forking a process that runs an asyncio loop, the gRPC
server's threads and Triton's gRPC channel is unsafe. Each worker imports the pipeline once and then
serves scans; what comes back is the small preprocessed tensor (fp16 3x96^3, ~5 MB; through a
shared-memory slot, `api/inference/shared_arrays.py`) plus timings, never the decoded volume.

A worker that dies (OOM killer, a segfault in a decoder) breaks the whole `ProcessPoolExecutor`: every
scan it was running fails with 503 ``preprocessing_worker_lost`` (Retry-After) and the next call gets a
fresh pool.

`workers=0` runs the same function in a thread of the gateway process instead (tests, debugging).

Jobs reach the executor through a `PriorityGate` of one turn per worker: the executor's own queue is
FIFO, so jobs wait in the gate instead, where a STAT scan goes before every routine and bulk one
(`lane_limits` can also keep a lane off some workers). The gateway runs bulk scans in a pool of their
own whose workers run at a lower CPU priority (`nice`): on a busy node the kernel gives the CPU to a
STAT scan's preprocessing (and to Triton) first, and bulk takes what is left
(api/inference/service.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Generic, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from api.inference.lanes import DEFAULT_LANE, Lane
from api.inference.priority_gate import PriorityGate
from api.inference.shared_arrays import ArraySlots, call_into_slot
from api.logging_config import configure_logging
from api.problems import ProblemCode, ProblemError
from headct.contract import INPUT_SHAPE

log = logging.getLogger(__name__)

T = TypeVar("T")
# glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap (glibc's largest allowed value on 64-bit).
WORKER_MMAP_THRESHOLD_BYTES = 32 << 20
#: Freed heap a worker keeps for its next scan instead of handing it back to the kernel.
WORKER_HEAP_RETAIN_BYTES = 512 << 20
#: A result slot holds one preprocessed scan (the fp16 model input).
RESULT_SLOT_BYTES = int(np.prod(INPUT_SHAPE)) * np.dtype(np.float16).itemsize
# A running scan's grace at shutdown before its worker is killed, then the wait for the killed ones.
SHUTDOWN_TIMEOUT_S = 5.0
_REAP_AFTER_KILL_S = 2.0


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Leased(Generic[T]):
    """A job's result whose array may still lie in the pool's shared memory: `release()` (exactly once,
    when done with the array) lends its slot again."""

    value: T
    release: Callable[[], None] = _nothing


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """`action`, run by the first call only: a slot given back twice could be taken from its next user."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


def _exit_with_parent() -> None:
    """Ends this worker as soon as the gateway process is gone, however it went (SIGKILL, the OOM
    killer): the pool's workers share its task queue and would otherwise wait on it forever."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="headct-parent-watch", daemon=True).start()


def single_threaded_blas() -> None:
    """The pipeline's BLAS (numpy's and scipy's OpenBLAS) runs single-threaded in a worker: the pool
    is the parallelism (one worker per core). A second BLAS thread per worker made preprocessing
    use 1.8x the CPU for no gain in wall time, and OpenBLAS threads keep spinning after each product,
    taking the cores from Triton's inference right after a scan's preprocessing (+30 ms a scan)."""
    # The preprocessing loads numpy and scipy, whose BLAS libraries the limit then applies to.
    import headct.preprocess  # noqa: F401

    threadpool_limits(limits=1, user_api="blas")


def reuse_freed_memory() -> bool:
    """Lets a worker reuse the memory of its last scan. Every scan allocates and frees again its stored
    size or more in buffers of a slice each (zip members; pixel data other than uncompressed 16-bit
    planes, which go to `api.ingest.volume_memory`). glibc's defaults serve them from fresh mmap pages
    once freed ones were returned (its thresholds move with the traffic) and trim the heap after each
    scan, so every scan faulted ~200 MB back in, 4 KiB at a time: 51,000 page faults and ~90 ms of
    system CPU for a 1 mm DICOM series, a third of its decoding (measured before those planes moved
    out of the heap). Fixed
    thresholds keep up to `WORKER_HEAP_RETAIN_BYTES` of freed heap in the process (idle RSS grows by
    about one scan's buffers; the peak does not). False where the C library is not glibc (no-op)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, WORKER_HEAP_RETAIN_BYTES)
    )


def prepare_pipeline_process() -> None:
    """What a process that runs the pipeline sets up first: BLAS single-threaded, freed memory reused
    (also used by the benchmarks' in-process baselines, so they compare like with like)."""
    single_threaded_blas()
    reuse_freed_memory()


def _initialize_worker(log_level: str, log_format: str, nice: int = 0) -> None:
    """Each worker's start: the gateway's log format (no PHI, JSON); deaf to Ctrl-C — a terminal's
    SIGINT reaches the whole process group, but a worker's life is the pool's to end; gone with the
    gateway; its CPU priority lowered by `nice` (raising a nice value needs no privilege); its imports
    done, BLAS single-threaded and freed memory kept for reuse before the first scan."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    configure_logging(log_level, log_format)
    _exit_with_parent()
    prepare_pipeline_process()


def _warm_up() -> int:
    """Runs once in each new worker (after `_initialize_worker`), so `start()` returns once all are up."""
    return os.getpid()


class PreprocessPool:
    """A replaceable process pool for the CPU-bound stages of a prediction."""

    def __init__(
        self,
        workers: int,
        *,
        retry_after_s: int,
        log_level: str = "INFO",
        log_format: str = "json",
        nice: int = 0,
        lane_limits: Mapping[Lane, int] | None = None,
        result_slots: int | None = None,
        on_slots: Callable[[Mapping[str, SharedMemory]], None] | None = None,
    ) -> None:
        self.workers = workers
        self.retry_after_s = retry_after_s
        self.nice = nice
        # Spawned workers start with bare logging: give them the gateway's formatter.
        self._initargs = (log_level, log_format, nice)
        self._executor: Executor | None = None
        self.gate = PriorityGate(max(1, workers), lane_limits)
        self.generation = 0  # bumped each time a broken pool is replaced (tests, logs)
        # Two per worker by default: a job whose caller gave up may still hold one while the next runs;
        # more where results are kept in place until inference (`run_leased`).
        self.result_slots = 2 * workers if result_slots is None else max(result_slots, 2 * workers)
        self._slots: ArraySlots | None = None  # made with the first process pool
        self._on_slots = on_slots  # told each new set of slots (to share them with Triton)

    def _current(self) -> Executor:
        if self._executor is None:
            if self.workers == 0:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headct-preprocess")
            else:
                if self._slots is None:
                    self._slots = ArraySlots(self.result_slots, RESULT_SLOT_BYTES)
                    if self._on_slots is not None:
                        self._on_slots(self._slots.segments)
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_initialize_worker,
                    initargs=self._initargs,
                )
            self.generation += 1
        return self._executor

    def pids(self) -> list[int]:
        """Process ids of the live workers (empty for the thread mode)."""
        executor = self._executor
        processes = getattr(executor, "_processes", None) or {}
        return [process.pid for process in processes.values() if process.pid is not None]

    async def start(self) -> None:
        """Start every worker now, so the first requests do not pay for process start-up and imports."""
        if self.workers == 0:
            return
        executor = self._current()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(executor, _warm_up) for _ in range(self.workers)))

    def _replace(self, broken: Executor) -> None:
        if self._executor is broken:
            log.error("a preprocessing worker died; starting a new pool")
            self._executor = None
            broken.shutdown(wait=False, cancel_futures=True)

    def _lost(self) -> ProblemError:
        return ProblemError(
            ProblemCode.PREPROCESSING_WORKER_LOST,
            "the process preprocessing this scan died (out of memory?); retry later",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    async def run(self, function: Callable[..., T], *args: Any, lane: Lane = DEFAULT_LANE) -> T:
        """`function(*args)` in a worker, once the lanes before `lane` have had their turn. Cancelling
        the caller cancels the job if it has not started."""
        leased = await self.run_leased(function, *args, lane=lane, in_place=False)
        return leased.value

    async def run_leased(
        self, function: Callable[..., T], *args: Any, lane: Lane = DEFAULT_LANE, in_place: bool = True
    ) -> Leased[T]:
        """`run`, with the result's array left in its shared-memory slot (`in_place`) until the caller
        calls `release()`; an array that came through the pipe is the caller's own (no-op release)."""
        async with self.gate.turn(lane):
            return await self._submit(function, *args, in_place=in_place)

    async def _submit(self, function: Callable[..., T], *args: Any, in_place: bool) -> Leased[T]:
        for attempt in (1, 2):
            executor = self._current()
            slots = self._slots
            slot = slots.lend() if slots is not None else None
            try:
                future = (
                    executor.submit(function, *args)
                    if slots is None or slot is None
                    else executor.submit(call_into_slot, slot, function, *args)
                )
            except BrokenProcessPool:
                # Broken before this job got in: nothing of it was lost, try once on a fresh pool.
                if slots is not None and slot is not None:
                    slots.give_back(slot)
                self._replace(executor)
                if attempt == 2:
                    raise self._lost() from None
                continue
            if slots is None or slot is None:
                return Leased(await self._result(executor, future))
            return await self._result_from_slot(executor, future, slots, slot, in_place)
        raise AssertionError("unreachable")

    async def _result(self, executor: Executor, future: Future[T]) -> T:
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as error:
            self._replace(executor)
            raise self._lost() from error

    async def _result_from_slot(
        self, executor: Executor, future: Future[Any], slots: ArraySlots, slot: str, in_place: bool
    ) -> Leased[Any]:
        """The job's result with its array copied out of `slot`, or left there (`in_place`) until the
        lease is released. The slot is lent again only once neither the worker nor the caller can use
        it any more: after the copy or the release, or when a job its caller left ends."""
        try:
            result = await self._result(executor, future)
        except asyncio.CancelledError:
            slots.give_back_when_done(slot, future)
            raise
        except BaseException:
            slots.give_back(slot)
            raise
        if in_place:
            return Leased(slots.view(result), _once(lambda: slots.give_back(slot)))
        try:
            return Leased(slots.take(result))
        finally:
            slots.give_back(slot)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop the workers: queued jobs are cancelled, a running one gets `timeout_s` to finish, then
        its worker is killed. Blocks up to `timeout_s` (call it off the event loop)."""
        executor, self._executor = self._executor, None
        slots, self._slots = self._slots, None
        if executor is not None:
            self._stop(executor, timeout_s)
        if slots is not None:
            slots.close()

    @staticmethod
    def _stop(executor: Executor, timeout_s: float) -> None:
        processes = list((getattr(executor, "_processes", None) or {}).values())
        # The executor's own shutdown reaps the workers; we only bound how long it may take.
        stopping = threading.Thread(
            target=executor.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True
        )
        stopping.start()
        stopping.join(timeout_s)
        if stopping.is_alive():
            log.warning("preprocessing workers still busy after %.0f s; killing them", timeout_s)
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            stopping.join(_REAP_AFTER_KILL_S)
