"""Priority lanes without Triton: choosing a lane (and what a key may send), admission budgets per lane,
the preprocessing pool's order, the micro-batcher closing a batch for STAT, and the lane reaching the
backend, the answer and the metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import api.inference.service
from api import metrics
from api.auth import Keyring, key_id, parse_key_entries
from api.inference.admission import Admission
from api.inference.batching import MicroBatcher
from api.inference.lanes import ALL_LANES, Lane, parse_lanes, resolve_lane
from api.inference.priority_gate import PriorityGate
from api.inference.service import ScanRequest, _preprocess_pools
from api.problems import ProblemError
from api.settings import Settings
from tests.unit.test_gateway import FakeModel
from tests.unit.test_inference_path import Recorder, fake_prepare, image, later, run, service_for

BULK_KEY = "k-bulk-0123456789"
ROUTINE_KEY = "k-routine-0123456789"


# --- choosing a lane -------------------------------------------------------------------------------------


def test_the_default_lane_is_routine_and_names_are_case_insensitive() -> None:
    assert resolve_lane(None) is Lane.ROUTINE
    assert resolve_lane("") is Lane.ROUTINE
    assert resolve_lane(" STAT ") is Lane.STAT
    assert resolve_lane("bulk") is Lane.BULK
    assert [lane.triton_priority for lane in Lane] == [1, 2, 3]


def test_an_unknown_lane_is_a_400_naming_the_field() -> None:
    with pytest.raises(ProblemError) as raised:
        resolve_lane("urgent")
    assert (raised.value.status, raised.value.code, raised.value.field) == (
        400,
        "invalid_priority",
        "priority",
    )


def test_a_bulk_key_cannot_send_stat_and_defaults_to_bulk() -> None:
    bulk_only = frozenset({Lane.BULK})
    with pytest.raises(ProblemError) as raised:
        resolve_lane("stat", bulk_only)
    assert (raised.value.status, raised.value.code) == (403, "priority_not_allowed")
    assert resolve_lane(None, bulk_only) is Lane.BULK
    assert resolve_lane(None, frozenset({Lane.STAT, Lane.BULK})) is Lane.STAT  # its best lane
    assert resolve_lane(None, frozenset({Lane.ROUTINE, Lane.BULK})) is Lane.ROUTINE


def test_parse_lanes_refuses_unknown_names() -> None:
    assert parse_lanes("routine, bulk") == {Lane.ROUTINE, Lane.BULK}
    for bad in ("", "stat,urgent", " , "):
        with pytest.raises(ValueError):
            parse_lanes(bad)


def test_keys_file_lanes_and_a_bad_line_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = f"# keys\n{ROUTINE_KEY}\n{BULK_KEY} lanes=bulk  # cohort team\nk-bad-line lanes=urgent\n"
    entries = parse_key_entries(text)
    assert entries == [(ROUTINE_KEY, ALL_LANES), (BULK_KEY, frozenset({Lane.BULK}))]
    keys = tmp_path / "keys"
    keys.write_text(text)
    with caplog.at_level(logging.ERROR):
        ring = Keyring(path=keys)
    assert "line 4" in caplog.text and "k-bad-line" not in caplog.text  # never the key itself
    assert ring.lanes(ring.authenticate(BULK_KEY, None)) == {Lane.BULK}
    assert ring.lanes(ring.authenticate(ROUTINE_KEY, None)) == ALL_LANES
    with pytest.raises(ProblemError):
        ring.authenticate("k-bad-line", None)  # its line was refused: not a key at all
    assert ring.lanes(key_id("anything else")) == ALL_LANES


# --- admission ------------------------------------------------------------------------------------------


def test_stat_is_admitted_while_bulk_fills_its_queue_and_is_refused() -> None:
    async def main() -> None:
        admission = Admission(
            2, 2, busy_retry_after_s=1, shutdown_retry_after_s=5, bulk_max_inflight=1, bulk_max_queue=1
        )
        refused0 = metrics.LANE_REJECTIONS.labels(lane="bulk")._value.get()
        async with admission.slot(Lane.BULK):
            waiting_bulk = asyncio.create_task(admission._acquire(Lane.BULK))
            await asyncio.sleep(0)
            assert admission.queued_in(Lane.BULK) == 1  # bulk may hold one slot only: it waits
            with pytest.raises(ProblemError) as raised, admission.enter(Lane.BULK):
                pass
            assert raised.value.code == "gateway_busy"
            assert metrics.LANE_REJECTIONS.labels(lane="bulk")._value.get() == refused0 + 1
            with admission.enter(Lane.STAT):  # the slot bulk may not take is STAT's at once
                async with admission.slot(Lane.STAT):
                    assert admission.inflight_by_lane == {Lane.STAT: 1, Lane.ROUTINE: 0, Lane.BULK: 1}
            assert not waiting_bulk.done()  # still over bulk's share
        await waiting_bulk  # the bulk slot came free: the waiting bulk scan takes it
        assert admission.inflight_by_lane[Lane.BULK] == 1
        admission._release(Lane.BULK)
        assert (admission.inflight, admission.queued) == (0, 0)

    run(main())


def test_a_freed_slot_goes_to_stat_then_routine_then_bulk() -> None:
    async def main() -> list[Lane]:
        admission = Admission(1, 8, busy_retry_after_s=1, shutdown_retry_after_s=5)
        order: list[Lane] = []

        async def scan(lane: Lane) -> None:
            async with admission.slot(lane):
                order.append(lane)
                await asyncio.sleep(0.01)

        async with admission.slot(Lane.BULK):
            tasks = []
            for lane in (Lane.BULK, Lane.ROUTINE, Lane.BULK, Lane.STAT, Lane.ROUTINE):
                tasks.append(asyncio.create_task(scan(lane)))
                await asyncio.sleep(0)  # queued in this order
            assert admission.queued == 5
        await asyncio.gather(*tasks)
        assert (admission.inflight, admission.queued) == (0, 0)
        return order

    assert run(main()) == [Lane.STAT, Lane.ROUTINE, Lane.ROUTINE, Lane.BULK, Lane.BULK]


def test_each_lane_has_its_own_queue_budget() -> None:
    async def main() -> None:
        admission = Admission(1, 1, busy_retry_after_s=1, shutdown_retry_after_s=5)
        async with admission.slot(Lane.BULK):
            queued = [asyncio.create_task(admission._acquire(lane)) for lane in Lane]
            await asyncio.sleep(0)
            assert admission.queued == 3  # one of each: the budgets are per lane
            for lane in Lane:
                with pytest.raises(ProblemError):
                    await admission._acquire(lane)
        for task in queued:  # handed over one after the other
            await task
            admission._release(next(lane for lane in Lane if admission.inflight_by_lane[lane]))
        assert (admission.inflight, admission.queued) == (0, 0)

    run(main())


def test_the_default_bulk_share_is_three_quarters_of_the_slots() -> None:
    assert Settings(max_inflight=16).bulk_inflight_limit == 12
    assert Settings(max_inflight=1).bulk_inflight_limit == 1
    assert Settings(max_inflight=4, bulk_max_inflight=9).bulk_inflight_limit == 4


# --- the preprocessing pool's gate ----------------------------------------------------------------------


def test_the_pool_gate_starts_stat_first_and_fifo_within_a_lane() -> None:
    async def main() -> list[str]:
        gate = PriorityGate(1)
        started: list[str] = []

        async def job(name: str, lane: Lane) -> None:
            async with gate.turn(lane):
                started.append(name)
                await asyncio.sleep(0.01)

        async with gate.turn(Lane.BULK):
            tasks = []
            for name, lane in (("b1", Lane.BULK), ("b2", Lane.BULK), ("r1", Lane.ROUTINE), ("s1", Lane.STAT)):
                tasks.append(asyncio.create_task(job(name, lane)))
                await asyncio.sleep(0)
            tasks[1].cancel()  # a caller that went away is skipped, its turn not lost
            await asyncio.sleep(0)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (gate.running, gate.waiting) == (0, 0)
        return started

    assert run(main()) == ["s1", "r1", "b1"]


def test_bulk_leaves_one_pool_worker_free_for_stat() -> None:
    async def main() -> None:
        gate = PriorityGate(2, {Lane.BULK: 1})
        async with gate.turn(Lane.BULK):
            second_bulk = asyncio.create_task(gate._acquire(Lane.BULK))
            await asyncio.sleep(0)
            assert gate.running == 1 and gate.waiting == 1  # a worker is free, but not for bulk
            async with gate.turn(Lane.STAT):  # STAT starts at once on the free worker
                assert gate.running_by_lane == {Lane.STAT: 1, Lane.ROUTINE: 0, Lane.BULK: 1}
        await second_bulk  # the first bulk job ended: the next one starts
        gate._release(Lane.BULK)
        assert (gate.running, gate.waiting) == (0, 0)

    run(main())


def test_no_bulk_scan_starts_while_the_gate_is_held() -> None:
    async def main() -> None:
        gate = PriorityGate(2)
        with gate.held():
            waiting = asyncio.create_task(gate._acquire(Lane.BULK))
            await asyncio.sleep(0)
            assert (gate.running, gate.waiting) == (0, 1)  # a free worker, but a STAT scan is running
        await waiting  # the hold ended: it starts
        assert gate.running == 1
        gate._release(Lane.BULK)

    run(main())


def test_bulk_scans_run_in_their_own_lower_priority_workers() -> None:
    pool, bulk = _preprocess_pools(Settings(preprocess_workers=1, bulk_nice=7))
    assert bulk is not None

    async def main() -> tuple[int, int]:
        try:
            return await pool.run(os.nice, 0), await bulk.run(os.nice, 0, lane=Lane.BULK)
        finally:
            pool.shutdown()
            bulk.shutdown()

    base, lowered = run(main())
    assert lowered == min(19, base + 7)


def test_without_a_bulk_pool_bulk_shares_all_workers_but_one() -> None:
    pool, bulk = _preprocess_pools(Settings(preprocess_workers=3, bulk_preprocess_workers=0))
    assert bulk is None and pool.gate.limits[Lane.BULK] == 2 and pool.gate.limits[Lane.STAT] == 3


# --- micro-batcher ---------------------------------------------------------------------------------------


def test_a_stat_scan_closes_its_batch_at_once_in_the_stat_lane() -> None:
    infer = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=5.0)
        started = time.perf_counter()
        with batcher.expecting():  # another scan is on its way: a routine batch would wait for it
            bulk = batcher.enqueue(image(1), later(10), lane=Lane.BULK)
            stat = batcher.enqueue(image(2), later(10), lane=Lane.STAT)
            await asyncio.gather(bulk, stat)
        return time.perf_counter() - started

    assert run(main()) < 1.0  # not the 5 s delay
    assert infer.batches == [2] and infer.lanes == [Lane.STAT]  # the bulk scan rode along, as STAT


def test_a_batch_without_stat_still_waits_for_company() -> None:
    infer = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.2)
        started = time.perf_counter()
        with batcher.expecting():
            answer = batcher.enqueue(image(1), later(10), lane=Lane.BULK)
            await answer
        return time.perf_counter() - started

    assert run(main()) >= 0.19
    assert infer.lanes == [Lane.BULK]


# --- through the service ---------------------------------------------------------------------------------


async def _chunks(data: bytes) -> Any:
    yield data


def test_the_lane_reaches_the_backend_the_answer_and_the_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(api.inference.service, "prepare_scan", _prepare_without_scan)
    monkeypatch.setattr(api.inference.service, "build_predict_response", _fake_response)
    model = FakeModel()
    service = service_for(model, spool_dir=str(tmp_path))
    before = _samples("stat")

    async def main() -> Any:
        request = ScanRequest(
            chunks=_chunks(b"scan"),
            content_type="application/octet-stream",
            request_id="r1",
            started_at=time.perf_counter(),
            lane=Lane.STAT,
        )
        handled = await service.handle(request)
        await service.close()
        return handled

    handled = run(main())
    assert handled.lane is Lane.STAT and handled.response["priority"] == "stat"
    assert model.lanes == [Lane.STAT]
    ok, count = _samples("stat")
    assert (ok, count) == (before[0] + 1, before[1] + 1)


def _prepare_without_scan(*args: Any) -> Any:
    """`fake_prepare`'s tensor, with a scan that says only what the service reads of it."""
    _, image, warnings, seconds = fake_prepare(*args)
    return SimpleNamespace(dicom=None, evidence=()), image, warnings, seconds


def _fake_response(prediction: Any, **fields: Any) -> dict[str, Any]:
    return {"priority": fields["lane"].value}


def _samples(lane: str) -> tuple[float, float]:
    ok = metrics.PREDICTIONS.labels(lane=lane, outcome="ok")._value.get()
    counts = [
        sample.value
        for family in metrics.PREDICTION_DURATION.collect()
        for sample in family.samples
        if sample.name.endswith("_count") and sample.labels.get("lane") == lane
    ]
    count = counts[0] if counts else 0.0
    return ok, count


def test_fake_backend_signature_matches_the_protocol() -> None:
    # The fakes the suites use take the lane keyword the service passes (a mismatch would only show
    # at run time).
    async def call() -> Any:
        return await FakeModel().infer_batch(np.zeros((1, 3, 4, 4, 4), np.float16), 1.0, (), lane=Lane.BULK)

    assert "probabilities" in run(call())
