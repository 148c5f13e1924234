"""The model input handed to a Triton on the same host through system shared memory, not inside the
gRPC message.

A 5.3 MB fp16 scan sent in the gRPC message is copied five times on its way: into the request
(`set_data_from_numpy`), into the serialised protobuf, through the loopback socket twice, and out of
the message in Triton. When Triton runs on this host (the embedded local default, `make serve`), the
request only names a POSIX shared-memory region that Triton has mapped (Triton's system shared-memory
extension): for a scan sent alone, the preprocessing worker's result slot it already lies in (`adopt`,
`locate`: no copy in the gateway at all); for a batch, a region of the gateway's own it is copied into
once. On a cluster, where Triton runs in its own pods, registration fails (Triton cannot open the
region) and the input goes in the message as before: `auto` needs no configuration either way.

The gateway's own regions are lent one per Triton call and given back when the call returns. A call
that finds none free, or a batch larger than a region, uses the message. The names are random, so a
gateway never maps another's, and `close()` unregisters all from Triton and removes its own regions
from /dev/shm (the pools remove their slots). If the gateway dies, multiprocessing's resource tracker
removes the files; Triton keeps its own mapping of the dead gateway's regions until the next gateway on
this host registers, which unregisters every ``headct-`` region whose segment is gone.

A Triton restart forgets registrations: `invalidate()` (called when the model's readiness changes, or a
call names a region Triton no longer knows) makes the next call register them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Literal

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from api.inference.shared_arrays import ArraySlots

log = logging.getLogger(__name__)

SharedMemoryMode = Literal["auto", "off"]
#: Triton calls that can use a region at once; more at once send their input in the message.
DEFAULT_REGIONS = 4
#: What the names of every gateway's segments start with (regions and result slots).
OUR_PREFIX = "headct-"


def _address(segment: SharedMemory) -> int:
    return int(np.frombuffer(segment.buf, dtype=np.uint8, count=1).ctypes.data)  # type: ignore[arg-type]


class InputRegions:
    """The shared memory this gateway registers with one Triton: `count` regions of `region_bytes` of
    its own, lent one per call (`lend`), and segments it adopts (`adopt`: the preprocessing pool's
    result slots, so a scan's input is read where its worker wrote it, `locate`). Registered on first
    use (`ensure_registered`) if Triton can map them."""

    def __init__(self, client: grpcclient.InferenceServerClient, count: int) -> None:
        self._client = client
        self.count = count
        self.region_bytes = 0  # set by the first `ensure_registered`
        self._own: ArraySlots | None = None  # this gateway's regions, lent one per call
        self._adopted: dict[str, dict[str, SharedMemory]] = {}  # owner -> segments by name
        self.registered = False  # with the Triton that runs now
        self.ever_registered = False
        self._names: set[str] = set()  # registered with Triton (to unregister when replaced or closed)
        self._names_current = True  # False after `invalidate`: Triton may not know `_names` any more
        self.disabled = False  # Triton cannot map them (not on this host): the message, for good
        self._registering = asyncio.Lock()  # one registration at a time

    def adopt(self, owner: str, segments: Mapping[str, SharedMemory]) -> None:
        """Register `segments` too, in place of `owner`'s earlier ones (with the next use); the owner
        keeps them alive until `close()`."""
        self._adopted[owner] = dict(segments)
        self.registered = False

    def _adopted_segments(self) -> dict[str, SharedMemory]:
        return {name: segment for segments in self._adopted.values() for name, segment in segments.items()}

    async def ensure_registered(self, region_bytes: int) -> bool:
        """Whether regions are registered with Triton now, registering them if need be (this
        gateway's own regions are made by the first call, `region_bytes` each)."""
        if self.disabled:
            return False
        if not self.registered:
            async with self._registering:
                if not self.registered:
                    if self._own is None and self.count > 0:
                        self.region_bytes = region_bytes
                        self._own = ArraySlots(self.count, region_bytes)
                    if not await self._register():
                        return False
        return bool(self._names)

    def locate(self, batch: np.ndarray) -> tuple[str, int] | None:
        """(region name, byte offset) of a C-contiguous `batch` that lies inside an adopted segment."""
        if not self.registered or not batch.flags.c_contiguous:
            return None
        start = int(batch.ctypes.data)
        for name, segment in self._adopted_segments().items():
            offset = start - _address(segment)
            if offset >= 0 and offset + batch.nbytes <= segment.size:
                return name, offset
        return None

    def lend(self, nbytes: int) -> str | None:
        """A free region of this gateway's own (its name, after `ensure_registered`), or None: then
        send the input in the message."""
        if not self.registered or self._own is None or nbytes > self.region_bytes:
            return None
        return self._own.lend()

    def write(self, region: str, batch: np.ndarray) -> int:
        """Copy `batch` to the start of the lent `region`; the number of bytes written."""
        assert self._own is not None
        view: np.ndarray = np.ndarray(batch.shape, dtype=batch.dtype, buffer=self._own.segments[region].buf)
        np.copyto(view, batch, casting="no")
        del view  # no export of the buffer may outlive a call (SharedMemory.close refuses then)
        return int(batch.nbytes)

    def give_back(self, region: str) -> None:
        if self._own is not None:
            self._own.give_back(region)

    def invalidate(self) -> None:
        """Register all again before the next use (Triton may have restarted and forgotten them)."""
        self.registered = False
        self._names_current = False

    def _registrations(self) -> list[tuple[str, str, int]]:
        """(name, key, size) of every region to register."""
        own = self._own.segments if self._own is not None else {}
        segments = {**own, **self._adopted_segments()}
        return [(name, "/" + name, segment.size) for name, segment in segments.items()]

    async def _register(self) -> bool:
        """Register every region. The first failure before any success means Triton cannot map them
        (another host or container): the message is then used for good. After a success, a failure is
        taken as transient (Triton restarting): the next call tries again."""
        registrations = self._registrations()
        try:
            for name in self._names - {name for name, _, _ in registrations}:  # segments replaced
                await self._client.unregister_system_shared_memory(name)
                self._names.discard(name)
            for name, key, size in registrations:
                if self._names_current and name in self._names:
                    continue  # (only new segments are registered when a pool adds its slots)
                with contextlib.suppress(InferenceServerException):  # not registered: nothing to undo
                    await self._client.unregister_system_shared_memory(name)
                await self._client.register_system_shared_memory(name, key, size)
                self._names.add(name)
            self._names_current = True
        except InferenceServerException as error:
            if not self.ever_registered:
                log.info(
                    "Triton cannot map this gateway's shared memory (%s): the model input goes in the "
                    "gRPC message",
                    error.message(),
                )
                self.disabled = True
                self._close_regions()
            return False
        if not self.ever_registered:  # Triton maps our memory: it is on this host
            with contextlib.suppress(InferenceServerException):
                await self._forget_dead_gateways_regions()
        self.registered = self.ever_registered = True
        return True

    async def _forget_dead_gateways_regions(self) -> None:
        """Unregister the regions of gateways that died without unregistering theirs (killed): their
        segment is gone from this host's /dev/shm (the resource tracker removed it), but Triton still
        maps it. Only our own names, and only once Triton has mapped ours (so it shares this /dev/shm)."""
        status = await self._client.get_system_shared_memory_status(as_json=True)
        for name, region in (status.get("regions") or {}).items():
            key = str(region.get("key", ""))
            if name.startswith(OUR_PREFIX) and key.startswith("/") and not Path("/dev/shm", key[1:]).exists():
                log.info("unregistering a dead gateway's shared-memory region from Triton")
                await self._client.unregister_system_shared_memory(name)

    def _close_regions(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            own.close()

    async def close(self) -> None:
        """Unregister every region from Triton (if it is still there) and remove this gateway's own."""
        for name in sorted(self._names):
            with contextlib.suppress(InferenceServerException):
                await self._client.unregister_system_shared_memory(name)
        self._names.clear()
        self.registered = False
        self.disabled = True
        self._adopted = {}
        self._close_regions()
