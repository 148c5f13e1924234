"""The preprocessed tensor comes back from a real worker process through a shared-memory slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from api.inference.shared_arrays import ArraySlots, SharedArray, call_into_slot, slot_array
from api.inference.workers import RESULT_SLOT_BYTES, PreprocessPool


def scan_result(fill: float, delay_s: float = 0.0) -> tuple[str, np.ndarray, list[str], dict[str, float]]:
    """Shaped like `prepare_scan`'s result: metadata, the fp16 model input, warnings, timings."""
    time.sleep(delay_s)
    return ("scan", np.full((3, 96, 96, 96), fill, dtype=np.float16), ["w"], {"decode": 0.1})


def scan_result_in_slot(fill: float) -> tuple[str, np.ndarray, bool]:
    """Like `prepare_scan` in a pool job: the model input computed straight into the job's slot."""
    out = slot_array((3, 96, 96, 96), np.float16)
    image = np.full((3, 96, 96, 96), fill, dtype=np.float16) if out is None else out
    image[...] = fill
    return ("scan", image, out is not None)


def too_large() -> tuple[np.ndarray]:
    return (np.arange(RESULT_SLOT_BYTES, dtype=np.float32),)


@pytest.fixture
def pool() -> Iterator[PreprocessPool]:
    pool = PreprocessPool(1, retry_after_s=1)
    yield pool
    pool.shutdown()


def test_slot_round_trip_in_this_process() -> None:
    slots = ArraySlots(1, RESULT_SLOT_BYTES)
    try:
        slot = slots.lend()
        assert slot is not None and slots.lend() is None  # one slot, lent
        sent = call_into_slot(slot, scan_result, 2.5)
        assert isinstance(sent[1], SharedArray)  # only a reference crosses the pipe
        got = slots.take(sent)
        slots.give_back(slot)
        assert got[0] == "scan" and got[2] == ["w"] and got[3] == {"decode": 0.1}
        assert got[1].dtype == np.float16 and got[1].shape == (3, 96, 96, 96) and np.all(got[1] == 2.5)
        assert slots.free == 1
    finally:
        slots.close()


def test_a_job_may_compute_its_array_in_the_slot() -> None:
    """`slot_array` is the slot's memory during `call_into_slot` (and None outside it or when too
    small); what the job wrote there is the result, not copied onto itself."""
    assert slot_array((3, 96, 96, 96), np.float16) is None  # not in a job
    slots = ArraySlots(1, RESULT_SLOT_BYTES)
    try:
        slot = slots.lend()
        assert slot is not None
        assert call_into_slot(slot, lambda: slot_array((RESULT_SLOT_BYTES + 1,), np.uint8)) is None
        sent = call_into_slot(slot, scan_result_in_slot, 4.5)
        assert isinstance(sent[1], SharedArray) and sent[2] is True
        got = slots.take(sent)
        assert got[1].shape == (3, 96, 96, 96) and np.all(got[1] == 4.5)
        assert slot_array((3, 96, 96, 96), np.float16) is None  # the job is over
        slots.give_back(slot)
    finally:
        slots.close()


async def _test_arrays_computed_in_a_workers_slot_come_back(pool: PreprocessPool) -> None:
    first = await pool.run(scan_result_in_slot, 1.5)
    second = await pool.run(scan_result_in_slot, 2.5)
    assert first[2] and second[2]  # both written in place by the worker
    assert np.all(first[1] == 1.5) and np.all(second[1] == 2.5)  # private copies, as from the pipe


async def _test_results_through_a_worker_are_private_copies(pool: PreprocessPool) -> None:
    first = await pool.run(scan_result, 1.0)
    second = await pool.run(scan_result, 2.0)
    # The second scan reused the first one's slot: the first array must not have changed under us.
    assert np.all(first[1] == 1.0) and np.all(second[1] == 2.0)
    assert pool._slots is not None and pool._slots.free == 2


async def _test_an_array_larger_than_a_slot_uses_the_pipe(pool: PreprocessPool) -> None:
    (array,) = await pool.run(too_large)
    assert array.size == RESULT_SLOT_BYTES and array[-1] == RESULT_SLOT_BYTES - 1
    assert pool._slots is not None and pool._slots.free == 2


async def _test_a_slot_is_not_lent_again_while_a_left_job_may_write_it(pool: PreprocessPool) -> None:
    await pool.start()
    slots = pool._slots
    assert slots is not None
    job = asyncio.ensure_future(pool.run(scan_result, 3.0, 0.5))
    await asyncio.sleep(0.2)  # the job is running in the worker
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert slots.free == 1  # still the worker's until the job ends
    deadline = time.monotonic() + 5
    while slots.free != 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert slots.free == 2


async def _test_shutdown_removes_the_segments(pool: PreprocessPool) -> None:
    await pool.run(scan_result, 1.0)
    assert pool._slots is not None
    names = list(pool._slots._segments)
    assert names and all(Path("/dev/shm", name).exists() for name in names)
    pool.shutdown()
    assert not any(Path("/dev/shm", name).exists() for name in names)


def test_results_through_a_worker_are_private_copies(pool: PreprocessPool) -> None:
    asyncio.run(_test_results_through_a_worker_are_private_copies(pool))


def test_arrays_computed_in_a_workers_slot_come_back(pool: PreprocessPool) -> None:
    asyncio.run(_test_arrays_computed_in_a_workers_slot_come_back(pool))


def test_an_array_larger_than_a_slot_uses_the_pipe(pool: PreprocessPool) -> None:
    asyncio.run(_test_an_array_larger_than_a_slot_uses_the_pipe(pool))


def test_a_slot_is_not_lent_again_while_a_left_job_may_write_it(pool: PreprocessPool) -> None:
    asyncio.run(_test_a_slot_is_not_lent_again_while_a_left_job_may_write_it(pool))


def test_shutdown_removes_the_segments(pool: PreprocessPool) -> None:
    asyncio.run(_test_shutdown_removes_the_segments(pool))


async def _test_a_leased_result_stays_in_its_slot_until_released(pool: PreprocessPool) -> None:
    leased = await pool.run_leased(scan_result, 4.0)
    slots = pool._slots
    assert slots is not None and slots.free == 1  # held by the lease: its array is a view of the slot
    array = leased.value[1]
    assert np.all(array == 4.0) and not array.flags.owndata
    assert array.ctypes.data in {
        np.frombuffer(segment.buf, np.uint8, count=1).ctypes.data  # type: ignore[arg-type]
        for segment in slots.segments.values()
    }
    other = await pool.run(scan_result, 5.0)  # meanwhile another job gets the other slot
    assert np.all(array == 4.0) and np.all(other[1] == 5.0)
    leased.release()
    leased.release()  # a second release must not free the slot under its next user
    assert slots.free == 2
    again = await pool.run_leased(scan_result, 6.0)
    leased.release()
    assert slots.free == 1
    again.release()
    assert slots.free == 2


def test_a_leased_result_stays_in_its_slot_until_released(pool: PreprocessPool) -> None:
    asyncio.run(_test_a_leased_result_stays_in_its_slot_until_released(pool))
