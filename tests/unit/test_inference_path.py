"""The gateway's inference path without Triton: micro-batching, admission, deadlines, the preprocessing
process pool (including a worker killed mid-scan), problems crossing the process boundary, draining."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import threadpoolctl

import api.inference.service
from api import metrics
from api.inference.admission import Admission
from api.inference.batching import MicroBatcher
from api.inference.lanes import DEFAULT_LANE, Lane
from api.inference.pipeline import prepare_scan
from api.inference.service import PredictionService
from api.inference.workers import PreprocessPool
from api.lifecycle import Lifecycle
from api.problems import ProblemCode, ProblemError
from api.settings import Settings
from tests.unit.test_gateway import FakeModel, _head_nifti


def run(coroutine: Awaitable[Any]) -> Any:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


class Recorder:
    """A fake Triton call: probability = the image's first voxel, embedding = [voxel, batch size]."""

    def __init__(self, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.batches: list[int] = []
        self.lanes: list[Lane] = []
        self.timeouts: list[float] = []
        self.delay_s = delay_s
        self.error = error

    async def __call__(
        self, batch: np.ndarray, timeout_s: float, outputs: Sequence[str] = (), *, lane: Lane = DEFAULT_LANE
    ) -> dict[str, np.ndarray]:
        self.lanes.append(lane)
        self.batches.append(len(batch))
        self.timeouts.append(timeout_s)
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        first = batch.reshape(len(batch), -1)[:, 0].astype(np.float32)
        return {
            "probabilities": first[:, None],
            "embedding": np.stack([first, np.full(len(batch), len(batch), np.float32)], axis=1),
        }


def image(value: float) -> np.ndarray:
    return np.full((2, 2), value, np.float16)


def later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


# --- micro-batcher -------------------------------------------------------------------------------------


def test_concurrent_scans_share_one_call_and_get_their_own_outputs() -> None:
    infer = Recorder()

    async def main() -> list[tuple[np.ndarray, np.ndarray]]:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.05)
        return await asyncio.gather(*(batcher.submit(image(v), later(10)) for v in (1, 2, 3)))

    results = run(main())
    assert infer.batches == [3]
    assert [float(r["probabilities"][0]) for r in results] == [1.0, 2.0, 3.0]  # split back in order
    assert all(float(r["embedding"][1]) == 3 for r in results)


def test_a_full_batch_goes_at_once_and_the_rest_follows() -> None:
    infer = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(infer, max_size=2, max_delay_s=5.0)
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit(image(v), later(10)) for v in range(4)))
        return time.perf_counter() - started

    assert run(main()) < 1.0  # two full batches: nobody waited for the 5 s delay
    assert infer.batches == [2, 2]


def test_a_lone_scan_waits_at_most_the_max_delay() -> None:
    infer = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.2)
        started = time.perf_counter()
        await batcher.submit(image(1), later(10))
        return time.perf_counter() - started

    waited = run(main())
    assert 0.19 <= waited < 1.0
    assert infer.batches == [1]


async def _prepared(batcher: MicroBatcher, value: float, prepare_s: float, fail: bool = False) -> Any:
    """What PredictionService.predict does: preparation inside `expecting()`, then enqueue, then wait."""
    with batcher.expecting():
        await asyncio.sleep(prepare_s)
        if fail:
            raise ProblemError(ProblemCode.NO_FOREGROUND, "nothing but air")
        answer = batcher.enqueue(image(value), later(10))
    return await answer


def test_a_scan_with_nothing_else_on_its_way_goes_at_once() -> None:
    infer = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=5.0)
        started = time.perf_counter()
        await _prepared(batcher, 1, 0.0)
        return time.perf_counter() - started

    assert run(main()) < 1.0  # not the 5 s max delay
    assert infer.batches == [1]


def test_the_last_scan_being_prepared_closes_the_batch() -> None:
    infer = Recorder()

    async def main() -> tuple[float, list[Any]]:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=5.0)
        started = time.perf_counter()
        results = await asyncio.gather(*(_prepared(batcher, v, 0.05 * v) for v in (1, 2, 3)))
        return time.perf_counter() - started, results

    elapsed, results = run(main())
    assert infer.batches == [3]  # the first two waited for the third, which was on its way
    assert elapsed < 1.0  # and nobody waited for the 5 s max delay
    assert [float(r["probabilities"][0]) for r in results] == [1.0, 2.0, 3.0]


def test_a_scan_that_fails_preparation_releases_the_waiting_batch() -> None:
    infer = Recorder()

    async def main() -> tuple[float, list[Any]]:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=5.0)
        started = time.perf_counter()
        results = await asyncio.gather(
            _prepared(batcher, 1, 0.0), _prepared(batcher, 2, 0.1, fail=True), return_exceptions=True
        )
        return time.perf_counter() - started, results

    elapsed, (ok, failed) = run(main())
    assert isinstance(failed, ProblemError) and failed.code == "no_foreground"
    assert float(ok["probabilities"][0]) == 1.0
    assert infer.batches == [1]
    assert elapsed < 1.0


def test_batching_off_sends_each_scan_alone() -> None:
    infer = Recorder()

    async def main() -> list[tuple[np.ndarray, np.ndarray]]:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.05, enabled=False)
        return await asyncio.gather(*(batcher.submit(image(v), later(10)) for v in (1, 2, 3)))

    results = run(main())
    assert infer.batches == [1, 1, 1]
    assert [float(r["probabilities"][0]) for r in results] == [1.0, 2.0, 3.0]


def test_a_failed_call_fails_every_member_with_its_problem() -> None:
    infer = Recorder(error=ProblemError(ProblemCode.MODEL_UNAVAILABLE, "down", headers={"Retry-After": "5"}))

    async def main() -> list[Any]:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.05)
        return await asyncio.gather(
            *(batcher.submit(image(v), later(10)) for v in (1, 2, 3)), return_exceptions=True
        )

    results = run(main())
    assert infer.batches == [3]
    assert [(e.status, e.code, e.headers["Retry-After"]) for e in results] == [
        (503, "model_unavailable", "5")
    ] * 3


def test_the_call_gets_the_smallest_remaining_deadline_and_late_members_never_go() -> None:
    infer = Recorder()

    async def main() -> list[Any]:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.2)
        return await asyncio.gather(
            batcher.submit(image(1), later(0.1)),  # expires while the batch is still open
            batcher.submit(image(2), later(3.0)),
            batcher.submit(image(3), later(5.0)),
            return_exceptions=True,
        )

    expired, second, third = run(main())
    assert isinstance(expired, ProblemError) and (expired.status, expired.code) == (504, "deadline_exceeded")
    assert float(second["probabilities"][0]) == 2.0 and float(third["probabilities"][0]) == 3.0
    assert infer.batches == [2]  # the expired scan was never sent
    assert 2.5 < infer.timeouts[0] <= 2.8  # ~3.0 - 0.2 s: the tightest deadline in the batch


def test_a_scan_past_its_deadline_is_refused_before_batching() -> None:
    infer = Recorder()

    async def main() -> None:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.01)
        await batcher.submit(image(1), later(-0.001))

    with pytest.raises(ProblemError) as raised:
        run(main())
    assert raised.value.code == "deadline_exceeded"
    assert infer.batches == []


def test_a_cancelled_caller_is_left_out_of_the_batch() -> None:
    infer = Recorder()

    async def main() -> None:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.1)
        gone = asyncio.create_task(batcher.submit(image(1), later(10)))
        stays = asyncio.create_task(batcher.submit(image(2), later(10)))
        await asyncio.sleep(0.01)
        gone.cancel()
        answer = await stays
        assert float(answer["probabilities"][0]) == 2.0

    run(main())
    assert infer.batches == [1]


# --- admission -------------------------------------------------------------------------------------------


def gauge(g: Any) -> float:
    return float(g._value.get())


def test_admission_queues_then_refuses_with_429_and_accounts_exactly() -> None:
    async def main() -> None:
        admission = Admission(1, 1, busy_retry_after_s=2, shutdown_retry_after_s=5)
        inflight0, queue0 = gauge(metrics.INFLIGHT), gauge(metrics.QUEUE_DEPTH)
        release_first = asyncio.Event()
        order: list[str] = []

        async def hold(name: str, until: asyncio.Event | None) -> None:
            async with admission.slot():
                order.append(name)
                if until is not None:
                    await until.wait()

        first = asyncio.create_task(hold("first", release_first))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(hold("second", None))
        await asyncio.sleep(0.01)
        assert (admission.inflight, admission.queued) == (1, 1)
        assert (gauge(metrics.INFLIGHT) - inflight0, gauge(metrics.QUEUE_DEPTH) - queue0) == (1, 1)
        with pytest.raises(ProblemError) as raised:
            await hold("third", None)
        assert (raised.value.status, raised.value.code) == (429, "gateway_busy")
        assert raised.value.headers["Retry-After"] == "2"
        with pytest.raises(ProblemError), admission.enter():  # the early gate refuses too
            pass
        release_first.set()
        await asyncio.gather(first, second)
        assert order == ["first", "second"]
        assert (admission.inflight, admission.queued, admission.active) == (0, 0, 0)
        assert (gauge(metrics.INFLIGHT), gauge(metrics.QUEUE_DEPTH)) == (inflight0, queue0)

    run(main())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        admission = Admission(1, 4, busy_retry_after_s=1, shutdown_retry_after_s=5)
        queue0 = gauge(metrics.QUEUE_DEPTH)
        async with admission.slot():
            waiter = asyncio.create_task(admission._acquire(DEFAULT_LANE))
            await asyncio.sleep(0.01)
            assert admission.queued == 1
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            assert admission.queued == 0 and gauge(metrics.QUEUE_DEPTH) == queue0
        assert admission.inflight == 0

    run(main())


def test_draining_refuses_new_requests_with_503_and_waits_for_active_ones() -> None:
    async def main() -> None:
        admission = Admission(4, 4, busy_retry_after_s=1, shutdown_retry_after_s=7)
        lifecycle = Lifecycle(admission, grace_s=5)

        async def active_request() -> None:
            with admission.enter():
                await asyncio.sleep(0.3)

        request = asyncio.create_task(active_request())
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        drain = asyncio.create_task(lifecycle.drain())
        await asyncio.sleep(0.01)
        with pytest.raises(ProblemError) as raised, admission.enter():
            pass
        assert (raised.value.status, raised.value.code) == (503, "shutting_down")
        assert raised.value.headers["Retry-After"] == "7"
        assert await drain is True
        assert 0.25 < time.perf_counter() - started < 2
        await request

    run(main())


def test_sigterm_drains_then_hands_the_signal_on(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[tuple[int, float]] = []

    async def main() -> None:
        admission = Admission(4, 4, busy_retry_after_s=1, shutdown_retry_after_s=5)
        lifecycle = Lifecycle(admission, grace_s=5)
        finished = asyncio.Event()
        previous = signal.signal(
            signal.SIGTERM, lambda signum, frame: received.append((signum, time.monotonic()))
        )
        try:
            assert lifecycle.install()

            async def active_request() -> None:
                with admission.enter():
                    await asyncio.sleep(0.3)
                finished.set()

            request = asyncio.create_task(active_request())
            await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)
            assert admission.draining and received == []  # not handed on while a request runs
            await request
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.02)
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert [signum for signum, _ in received] == [signal.SIGTERM]

    run(main())


# --- deadlines through the service ----------------------------------------------------------------------


class SlowModel(FakeModel):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.calls = 0

    async def infer_batch(
        self, batch: np.ndarray, timeout_s: float, outputs: Sequence[str] = (), *, lane: Lane = DEFAULT_LANE
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return await super().infer_batch(batch, timeout_s, outputs, lane=lane)


def fake_prepare(
    upload: str, content_type: str, series_uid: str | None, limits: Any = None, evidence: bool = False
) -> Any:
    return None, np.zeros((3, 4, 4, 4), np.float16), [], {"decode": 0.001}


def service_for(model: FakeModel, **settings: Any) -> PredictionService:
    base = {"preprocess_workers": 0, "grpc_enabled": False, "batch_max_delay_ms": 1.0}
    return PredictionService(model, Settings(**{**base, **settings}))  # type: ignore[arg-type]


def test_the_request_deadline_covers_inference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(api.inference.service, "prepare_scan", fake_prepare)
    model = SlowModel(delay_s=1.0)
    service = service_for(model, request_timeout_s=0.3)

    async def main() -> None:
        started = time.perf_counter()
        with pytest.raises(ProblemError) as raised:
            await service.predict(tmp_path / "scan", "application/octet-stream")
        assert (raised.value.status, raised.value.code) == (504, "deadline_exceeded")
        assert time.perf_counter() - started < 1.0
        assert service.admission.inflight == 0  # the slot came back
        await service.close()

    run(main())


def test_a_request_that_times_out_in_the_queue_never_reaches_triton(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(api.inference.service, "prepare_scan", fake_prepare)
    model = SlowModel(delay_s=0.0)
    service = service_for(model, request_timeout_s=0.3, max_inflight=1, max_queue=4)

    async def main() -> None:
        async with service.admission.slot():  # another request holds the only slot for longer
            waiting = asyncio.create_task(service.predict(tmp_path / "a", "application/octet-stream"))
            await asyncio.sleep(0.1)
            assert service.admission.queued == 1
            with pytest.raises(ProblemError) as raised:
                await waiting
            assert (raised.value.status, raised.value.code) == (504, "deadline_exceeded")
            assert service.admission.queued == 0
        assert model.calls == 0  # expired while queued: never sent
        assert service.admission.inflight == 0
        await service.close()

    run(main())


def test_the_batch_size_never_exceeds_the_models_max_batch_size() -> None:
    service = service_for(FakeModel(), batch_max_size=32)
    service._limit_batch_size(run(FakeModel().card()))
    assert service.batcher.max_size == 8  # the model card's max_batch_size
    model = FakeModel()
    model.max_batch_size = 4  # type: ignore[attr-defined]  # Triton's config says less: it wins
    service = service_for(model, batch_max_size=32)
    service._limit_batch_size(run(model.card()))
    assert service.batcher.max_size == 4


# --- problems across processes, the process pool --------------------------------------------------------


def test_problem_error_survives_pickling() -> None:
    error = ProblemError(
        ProblemCode.NOT_3D,
        "a 2-D image",
        field="shape",
        observed=[1, 2],
        expected="3-D",
        headers={"Retry-After": "3"},
    )
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ProblemError)
    assert copy.to_problem("r") == error.to_problem("r")
    assert copy.headers == {"Retry-After": "3"}


@pytest.fixture
def nifti_path(tmp_path: Path) -> Path:
    path = tmp_path / "head.nii"
    path.write_bytes(_head_nifti())
    return path


def test_preprocessing_runs_in_worker_processes_and_problems_come_back(
    nifti_path: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"definitely not medical" * 40)

    async def main() -> None:
        pool = PreprocessPool(1, retry_after_s=4)
        try:
            await pool.start()
            (worker,) = pool.pids()
            assert worker != os.getpid()
            scan, tensor, _, seconds = await pool.run(
                prepare_scan, str(nifti_path), "application/octet-stream", None
            )
            assert tensor.shape == (3, 96, 96, 96) and tensor.dtype == np.float16
            assert scan.file_shape == (40, 40, 30) and scan.volume.hu.size == 1  # voxels stayed there
            assert set(seconds) == {"decode", "validate", "preprocess"}
            with pytest.raises(ProblemError) as raised:
                await pool.run(prepare_scan, str(garbage), "application/octet-stream", None)
            assert (raised.value.status, raised.value.code) == (400, "unreadable_file")
        finally:
            pool.shutdown()

    run(main())


def test_a_killed_worker_fails_its_request_with_503_and_the_pool_recovers() -> None:
    async def main() -> None:
        pool = PreprocessPool(1, retry_after_s=4)
        try:
            await pool.start()
            (victim,) = pool.pids()
            generation = pool.generation
            job = asyncio.create_task(pool.run(time.sleep, 30))
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGKILL)
            started = time.perf_counter()
            with pytest.raises(ProblemError) as raised:
                await job
            assert time.perf_counter() - started < 10
            assert (raised.value.status, raised.value.code) == (503, "preprocessing_worker_lost")
            assert raised.value.headers["Retry-After"] == "4"
            # The next request gets a fresh pool.
            assert await pool.run(os.getpid) not in (victim, os.getpid())
            assert pool.generation == generation + 1
        finally:
            pool.shutdown()

    run(main())


def test_workers_run_blas_single_threaded() -> None:
    """One worker per core is the parallelism; BLAS threads on top only spin against Triton."""

    async def main() -> list[dict[str, Any]]:
        pool = PreprocessPool(1, retry_after_s=4)
        try:
            await pool.start()
            return await pool.run(threadpoolctl.threadpool_info)
        finally:
            pool.shutdown()

    blas = [info for info in run(main()) if info["user_api"] == "blas"]
    assert blas, "numpy/scipy BLAS not loaded in the worker"
    assert {info["num_threads"] for info in blas} == {1}


def test_shutdown_stops_idle_workers_at_once_and_kills_a_busy_one_after_the_timeout() -> None:
    async def main() -> None:
        idle = PreprocessPool(2, retry_after_s=4)
        await idle.start()
        workers = idle.pids()
        started = time.perf_counter()
        await asyncio.to_thread(idle.shutdown, 10.0)
        assert time.perf_counter() - started < 5  # nothing to wait for
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]

        busy = PreprocessPool(1, retry_after_s=4)
        await busy.start()
        (worker,) = busy.pids()
        job = asyncio.create_task(busy.run(time.sleep, 60))
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        await asyncio.to_thread(busy.shutdown, 1.0)
        assert time.perf_counter() - started < 5  # not the job's 60 s
        assert not Path(f"/proc/{worker}").exists()
        with pytest.raises(ProblemError) as raised:  # its caller hears the worker is gone
            await job
        assert (raised.value.status, raised.value.code) == (503, "preprocessing_worker_lost")

    run(main())


def test_the_service_observes_worker_timings_in_the_gateway_process(nifti_path: Path) -> None:
    before = {
        stage: metrics.STAGE_DURATION.labels(stage=stage)._sum.get()
        for stage in ("decode", "validate", "preprocess", "queue", "infer")
    }
    model = FakeModel()
    service = service_for(model, preprocess_workers=1)

    async def main() -> api.inference.service.Prediction:
        await service.start()
        try:
            return await service.predict(nifti_path, "application/octet-stream")
        finally:
            await service.close()

    prediction = run(main())
    assert set(prediction.timings_ms) == {"queue", "decode", "validate", "preprocess", "infer"}
    assert prediction.timings_ms["preprocess"] > 0
    assert prediction.result.probabilities["hemorrhage"] == pytest.approx(0.9)
    for stage in ("decode", "validate", "preprocess"):
        assert metrics.STAGE_DURATION.labels(stage=stage)._sum.get() > before[stage]
    (image_sent,) = model.images
    assert image_sent.shape == (3, 96, 96, 96)


# --- the same admission on gRPC ----------------------------------------------------------------------------


def test_grpc_predict_gets_the_same_admission_answers() -> None:
    from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
    from api.grpc.server import GrpcGateway
    from tests.stack import free_port

    settings = Settings(grpc_port=free_port(), preprocess_workers=0, max_inflight=1, max_queue=0)
    service = PredictionService(FakeModel(), settings)  # type: ignore[arg-type]

    async def call(stub: headct_pb2_grpc.HeadCTStub) -> tuple[grpc.StatusCode, dict[str, Any]]:
        request = headct_pb2.PredictRequest(scan=b"\0" * 64, options=headct_pb2.PredictOptions())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Predict(request)
        return raised.value.code(), dict(raised.value.trailing_metadata() or ())

    async def main() -> None:
        gateway = GrpcGateway(service, settings)
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                stub = headct_pb2_grpc.HeadCTStub(channel)
                async with service.admission.slot():  # the only slot is taken, no queue
                    code, metadata = await call(stub)
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert metadata["headct-problem-code"] == "gateway_busy" and metadata["retry-after"] == "1"
                service.admission.draining = True
                code, metadata = await call(stub)
                assert code == grpc.StatusCode.UNAVAILABLE
                assert metadata["headct-problem-code"] == "shutting_down" and metadata["retry-after"]
        finally:
            await gateway.stop(0)

    run(main())


def test_workers_keep_freed_memory_on_glibc() -> None:
    """The workers' heap set-up takes on this (glibc) machine; a musl or macOS build would get False."""
    import platform

    from api.inference.workers import reuse_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert reuse_freed_memory() is True
