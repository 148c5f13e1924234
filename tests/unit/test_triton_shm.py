"""The model input through Triton's system shared memory (api/inference/triton_shm.py) against a fake
Triton client: registered on first use, refused for good when Triton cannot map the regions (another
host), registered again after a Triton restart, a call re-sent in the message when Triton forgot the
region, and every region removed from /dev/shm at close. tests/integration/test_triton_shared_memory.py
runs it against the real Triton."""

from __future__ import annotations

import asyncio
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from api.inference.lanes import DEFAULT_LANE
from api.inference.triton import TritonModel
from api.inference.triton_shm import InputRegions, SharedMemoryMode
from headct import contract


class FakeClient:
    """Triton's shared-memory and inference calls, recorded; `mappable` says whether Triton can open them."""

    def __init__(self, mappable: bool = True) -> None:
        self.mappable = mappable
        self.registered: dict[str, tuple[str, int]] = {}
        self.calls: list[tuple[str, str]] = []
        self.inputs: list[dict[str, Any]] = []
        self.forget_on_next_infer = False

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        self.calls.append(("register", name))
        if not self.mappable:
            raise InferenceServerException(f"Unable to open shared memory region: '{key}'")
        if name in self.registered:
            raise InferenceServerException(f"shared memory region '{name}' already in manager")
        assert Path("/dev/shm", key.lstrip("/")).exists()
        self.registered[name] = (key, byte_size)

    async def get_system_shared_memory_status(self, as_json: bool = False) -> dict[str, Any]:
        return {"regions": {name: {"name": name, "key": key} for name, (key, _) in self.registered.items()}}

    async def unregister_system_shared_memory(self, name: str) -> None:
        self.calls.append(("unregister", name))
        self.registered.pop(name, None)

    async def infer(self, model_name: str, inputs: list[Any], **options: Any) -> str:
        tensor = inputs[0]._get_tensor()
        parameters = dict(tensor.parameters)
        region = parameters.get("shared_memory_region")
        if region is not None:
            name = region.string_param
            if self.forget_on_next_infer or name not in self.registered:
                self.forget_on_next_infer = False
                self.registered.clear()
                raise InferenceServerException(f"Unable to find system shared memory region: '{name}'")
            key, _ = self.registered[name]
            segment = SharedMemory(name=key.lstrip("/"))
            try:
                assert segment.buf is not None
                offset = (
                    parameters["shared_memory_offset"].int64_param
                    if "shared_memory_offset" in parameters
                    else 0
                )
                size = parameters["shared_memory_byte_size"].int64_param
                data = bytes(segment.buf[offset : offset + size])
            finally:
                segment.close()
            self.inputs.append({"transport": "shared_memory", "data": data})
        else:
            self.inputs.append({"transport": "message", "data": inputs[0]._get_content()})
        return "result"

    async def close(self) -> None:
        pass


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_regions_registered_on_first_use_and_written_through() -> None:
    async def scenario() -> None:
        client = FakeClient()
        regions = InputRegions(client, count=2)
        assert regions.lend(10) is None  # not registered yet
        assert await regions.ensure_registered(1024)
        first, second = regions.lend(1000), regions.lend(1000)
        assert first is not None and second is not None and first is not second
        assert regions.lend(10) is None  # both lent: the message
        assert set(client.registered) == {first, second}
        batch = np.arange(500, dtype=np.float16).reshape(1, 500)
        assert regions.write(first, batch) == batch.nbytes
        seen = SharedMemory(name=first)
        try:
            assert seen.buf is not None and bytes(seen.buf[: batch.nbytes]) == batch.tobytes()
        finally:
            seen.close()
        regions.give_back(first)
        assert regions.lend(10) == first
        assert regions.lend(2048) is None  # larger than a region: the message
        await regions.close()
        assert client.registered == {}
        assert not Path("/dev/shm", first).exists() and not Path("/dev/shm", second).exists()

    run(scenario())


def test_an_adopted_segment_is_registered_and_located_in_place() -> None:
    async def scenario() -> None:
        client = FakeClient()
        regions = InputRegions(client, count=0)
        slot = SharedMemory(create=True, size=4096)
        try:
            regions.adopt("pool", {slot.name: slot})
            assert await regions.ensure_registered(1024)
            assert client.registered == {slot.name: ("/" + slot.name, slot.size)}
            inside: np.ndarray = np.ndarray((2, 100), dtype=np.float16, buffer=slot.buf, offset=512)
            assert regions.locate(inside) == (slot.name, 512)
            assert regions.locate(inside[:, ::2]) is None  # not contiguous
            assert regions.locate(np.zeros((2, 100), np.float16)) is None  # elsewhere
            assert regions.lend(10) is None  # no regions of its own
            regions.adopt("pool", {})  # the pool's slots are gone: unregistered with the next use
            assert not await regions.ensure_registered(1024)
            assert client.registered == {}
            del inside
            await regions.close()
            assert client.registered == {}
        finally:
            slot.close()
            slot.unlink()

    run(scenario())


def test_regions_of_a_killed_gateway_are_unregistered_once_triton_maps_ours() -> None:
    async def scenario() -> None:
        client = FakeClient()
        client.registered = {
            "headct-slot-dead": ("/headct-slot-dead", 64),  # its gateway was killed: no segment left
            "someone-elses": ("/someone-elses", 64),  # not ours: left alone
        }
        regions = InputRegions(client, count=1)
        assert await regions.ensure_registered(64)
        assert "headct-slot-dead" not in client.registered and "someone-elses" in client.registered
        await regions.close()

    run(scenario())


def test_a_triton_that_cannot_map_the_regions_turns_them_off_for_good() -> None:
    async def scenario() -> None:
        client = FakeClient(mappable=False)
        regions = InputRegions(client, count=2)
        assert not await regions.ensure_registered(1024)
        assert regions.disabled and regions.lend(10) is None
        tries = len(client.calls)
        assert not await regions.ensure_registered(1024)
        assert len(client.calls) == tries  # not asked again
        assert client.calls and not any(Path("/dev/shm", name).exists() for _, name in client.calls)
        await regions.close()

    run(scenario())


def test_after_a_restart_the_regions_are_registered_again() -> None:
    async def scenario() -> None:
        client = FakeClient()
        regions = InputRegions(client, count=1)
        assert await regions.ensure_registered(64)
        region = regions.lend(64)
        assert region is not None
        regions.give_back(region)
        client.registered.clear()  # Triton restarted
        client.mappable = False  # ... and is not back yet
        regions.invalidate()
        assert not await regions.ensure_registered(64)
        assert regions.lend(64) is None
        assert not regions.disabled  # it worked before: a transient failure, try again next time
        client.mappable = True
        assert await regions.ensure_registered(64)
        assert regions.lend(64) == region and region in client.registered
        await regions.close()

    run(scenario())


def model_with(client: FakeClient, regions: int = 2, mode: SharedMemoryMode = "auto") -> TritonModel:
    with mock.patch("api.inference.triton.grpcclient.InferenceServerClient", lambda **kwargs: client):
        model = TritonModel(
            "127.0.0.1:1",
            "fmhct",
            "",
            timeout_s=1.0,
            retry_after_s=1,
            shared_memory=mode,
            shared_memory_regions=regions,
        )
    model.max_batch_size = 4
    return model


def batch_of(scans: int) -> np.ndarray:
    rng = np.random.default_rng(scans)
    return rng.random((scans, *contract.INPUT_SHAPE), dtype=np.float32).astype(np.float16)


def test_the_model_input_goes_through_shared_memory_when_triton_can_map_it() -> None:
    async def scenario() -> None:
        client = FakeClient()
        model = model_with(client)
        batch = batch_of(2)
        assert await model._infer_call(batch, ["probabilities"], 1.0, DEFAULT_LANE) == "result"
        assert client.inputs[-1] == {"transport": "shared_memory", "data": batch.tobytes()}
        assert model.input_in_shared_memory
        await model.close()
        assert client.registered == {}

    run(scenario())


def test_an_input_in_a_shared_slot_is_read_where_it_lies() -> None:
    async def scenario() -> None:
        client = FakeClient()
        model = model_with(client, regions=0)  # none of its own: only the slot can carry it
        scan = batch_of(1)
        slot = SharedMemory(create=True, size=2 * scan.nbytes)
        try:
            model.share_input_memory("pool", {slot.name: slot})
            in_slot: np.ndarray = np.ndarray(
                scan.shape, dtype=scan.dtype, buffer=slot.buf, offset=scan.nbytes
            )
            in_slot[...] = scan
            await model._infer_call(in_slot, ["probabilities"], 1.0, DEFAULT_LANE)
            assert client.inputs[-1] == {"transport": "shared_memory", "data": scan.tobytes()}
            del in_slot
            await model.close()
            assert client.registered == {}
        finally:
            slot.close()
            slot.unlink()

    run(scenario())


def test_a_forgotten_region_is_sent_again_in_the_message_then_registered_again() -> None:
    async def scenario() -> None:
        client = FakeClient()
        model = model_with(client)
        batch = batch_of(1)
        await model._infer_call(batch, ["probabilities"], 1.0, DEFAULT_LANE)
        client.forget_on_next_infer = True  # Triton restarted between two calls
        assert await model._infer_call(batch, ["probabilities"], 1.0, DEFAULT_LANE) == "result"
        assert client.inputs[-1] == {"transport": "message", "data": batch.tobytes()}
        await model._infer_call(batch, ["probabilities"], 1.0, DEFAULT_LANE)
        assert client.inputs[-1]["transport"] == "shared_memory"
        await model.close()

    run(scenario())


def test_off_and_unmappable_send_the_message() -> None:
    async def scenario() -> None:
        cases: list[tuple[FakeClient, SharedMemoryMode]] = [
            (FakeClient(), "off"),
            (FakeClient(False), "auto"),
        ]
        for client, mode in cases:
            model = model_with(client, mode=mode)
            batch = batch_of(1)
            await model._infer_call(batch, ["probabilities"], 1.0, DEFAULT_LANE)
            assert client.inputs[-1] == {"transport": "message", "data": batch.tobytes()}
            assert not model.input_in_shared_memory
            await model.close()

    run(scenario())


def test_other_inference_errors_are_not_retried() -> None:
    class Failing(FakeClient):
        async def infer(self, model_name: str, inputs: list[Any], **options: Any) -> str:
            self.inputs.append({})
            raise InferenceServerException("inference failed", status="StatusCode.INTERNAL")

    async def scenario() -> None:
        client = Failing()
        model = model_with(client)
        with pytest.raises(InferenceServerException):
            await model._infer_call(batch_of(1), ["probabilities"], 1.0, DEFAULT_LANE)
        assert len(client.inputs) == 1
        await model.close()

    run(scenario())
