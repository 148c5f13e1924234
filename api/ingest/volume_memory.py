"""Where a scan's stored voxel values are read, then widened to its float32 HU volume in the same pages.

A DICOM zip's slices are read in the header pass, before the series is chosen and its slice order
known. Keeping each slice's pixel bytes as its own Python object and then converting them into a fresh
float32 stack held both at once: the stored values (2 bytes a voxel) in the heap, the stack (4 bytes a
voxel) beside them, ~310 MB at the peak for 200 slices of 512x512. Here the stored planes are copied,
as they are read, one after the other into one anonymous memory map (`StoredPlanes.add`); once the
geometry is known they are put in slice order and widened to float32 HU *in the same pages*
(`StoredPlanes.stack`), so the stack costs no memory beyond its own, and nothing else is left to free.
A NIfTI file's voxels are read a few planes at a time and written into the map as float32
(`api.ingest.nifti`), or, when its planes are not whole blocks of memory, read into the map and widened
there the same way (`VolumeMemory.widen`).

Widening in place works backwards: float32 element ``i`` occupies the bytes of 16-bit elements ``2i``
and ``2i + 1``, which for ``i >= 1`` lie beyond element ``i`` and were therefore widened already.
Putting DICOM planes in slice order first is an in-place permutation (one plane of scratch), skipped
when they are already in order.

A preprocessing worker keeps one `VolumeMemory` for its life (`ProcessVolumeMemory`; `release` hands
pages beyond `VOLUME_MEMORY_KEEP_BYTES` back after each scan): its pages are reused scan after scan
instead of being faulted in and zeroed afresh. A volume built in it is valid until its next use.
"""

from __future__ import annotations

import mmap
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Final

import numpy as np

#: Bytes of a worker's volume memory kept resident between scans (one 512 x 512 x 256 float32 volume).
VOLUME_MEMORY_KEEP_BYTES: Final = 256 << 20
# Linux's MAP_NORESERVE (the mmap module does not export it): the map is address space only, its
# pages are counted when touched, so a map sized for the largest allowed series costs nothing up front.
_MAP_NORESERVE: Final = 0x4000 if sys.platform.startswith("linux") else 0
_HUGE_PAGE: Final = 2 << 20
#: Elements widened at a time (1 MiB of float32): small enough to stay in cache.
_WIDEN_BLOCK: Final = 1 << 18


def rescale(pixels: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """``out = pixels * slope + intercept`` in float32. CT almost always has slope 1: then no multiply,
    with the same float32 values (``x * 1.0`` is ``x``): the stored values cast to float32 into `out`,
    then the intercept added in place (the same casts and float32 sums as one ``np.add(pixels,
    intercept, dtype=float32)``, whose buffered mixed-type loop is slower than the two plain ones)."""
    if slope == 1.0:
        np.copyto(out, pixels, casting="unsafe")
        out += np.float32(intercept)
        return
    np.multiply(pixels, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)


def stored_values(plane: np.ndarray, bits_stored: int) -> np.ndarray:
    """The plane's values with the unused high bits of its 16-bit words shifted out (sign-extended
    for signed data), as pydicom's ``correct_unused_bits`` does."""
    if bits_stored >= 16:
        return plane
    shift = 16 - bits_stored
    return np.right_shift(np.left_shift(plane, shift), shift)


class VolumeMemory:
    """An anonymous memory map for one scan at a time: its stored values, then its float32 volume."""

    def __init__(self, capacity_bytes: int, keep_bytes: int = VOLUME_MEMORY_KEEP_BYTES) -> None:
        self.capacity = -(-max(capacity_bytes, mmap.PAGESIZE) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.keep_bytes = keep_bytes
        self._map = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        with suppress(OSError, AttributeError):  # huge pages: fewer faults and TLB misses where allowed
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self._touched = 0  # bytes from the start written since the last `release`

    def planes(self) -> StoredPlanes:
        """Start a new DICOM series here. Whatever was built in this memory before is overwritten."""
        return StoredPlanes(self)

    def view(self, dtype: np.dtype, count: int, offset: int = 0) -> np.ndarray:
        """`count` elements of `dtype` from byte `offset` (a flat view of the map)."""
        self._touched = max(self._touched, offset + count * dtype.itemsize)
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset)

    @staticmethod
    def widens(dtype: np.dtype) -> bool:
        """Whether `widen` takes values of `dtype`: 16-bit integers, native float32."""
        return (dtype.itemsize == 2 and dtype.kind in "iu") or (dtype == np.float32 and dtype.isnative)

    def widen(self, dtype: np.dtype, count: int, block: int = _WIDEN_BLOCK) -> np.ndarray:
        """The `count` elements of `dtype` at the start of the map as float32 (``astype``'s values), in
        place for 16-bit integers, as they are for float32; a flat view of the map. Works `block`
        elements at a time (the last block may be shorter), backwards."""
        if not self.widens(dtype):
            raise ValueError(f"{dtype} is not widened in place")
        out = self.view(np.dtype(np.float32), count)
        if dtype.itemsize == 4:  # float32 already
            return out
        stored = self.view(dtype, count)
        for b in range(
            -(-count // block) - 1, -1, -1
        ):  # backwards: a block's output lies beyond its unread input
            start, end = b * block, min(count, (b + 1) * block)
            values = stored[start:end]
            if 2 * start < end:  # the first block overlaps its own output
                values = values.copy()
            np.copyto(out[start:end], values, casting="unsafe")
        return out

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def release(self) -> None:
        """Hand the pages beyond `keep_bytes` back to the kernel (they read as zeros if used again)."""
        keep = -(-self.keep_bytes // _HUGE_PAGE) * _HUGE_PAGE
        if self._touched > keep:
            end = min(self.capacity, -(-self._touched // mmap.PAGESIZE) * mmap.PAGESIZE)
            self._map.madvise(mmap.MADV_DONTNEED, keep, end - keep)
            self._touched = keep


class ProcessVolumeMemory:
    """A process's one `VolumeMemory`, lent to one scan at a time (a preprocessing worker runs one scan
    at a time; a second concurrent caller gets None: memory of its own)."""

    def __init__(self) -> None:
        self._memory: VolumeMemory | None = None
        self._lock = threading.Lock()

    @contextmanager
    def lend(self, capacity_bytes: int) -> Iterator[VolumeMemory | None]:
        """The memory (at least `capacity_bytes`), its pages beyond the kept ones released afterwards.
        Nothing built in it may be used after the ``with`` block."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            if self._memory is None or self._memory.capacity < capacity_bytes:
                self._memory = None  # (the old map is unmapped once nothing refers to it)
                self._memory = VolumeMemory(capacity_bytes)
            yield self._memory
        finally:
            if self._memory is not None:
                self._memory.release()
            self._lock.release()


@dataclass(frozen=True)
class _Plane:
    dtype: np.dtype  # little-endian int16 or uint16
    bits_stored: int


class StoredPlanes:
    """The stored (16-bit) planes of one upload's slices, copied in as the header pass reads them.

    All planes share the first one's size (a series of another size in the same upload is decoded the
    ordinary way). `stack` turns the chosen ones into the float32 HU stack in place; after it, none of
    them can be read again.
    """

    def __init__(self, memory: VolumeMemory) -> None:
        self._memory = memory
        self._planes: list[_Plane] = []
        self.shape: tuple[int, int] | None = None
        self._stacked = False

    @property
    def plane_bytes(self) -> int:
        rows, columns = self.shape or (0, 0)
        return rows * columns * 2

    def __len__(self) -> int:
        return len(self._planes)

    def add(
        self, data: bytes, offset: int, shape: tuple[int, int], dtype: np.dtype, bits_stored: int
    ) -> int | None:
        """Copy the plane of `shape` stored at ``data[offset:]`` in; its index, or None where it cannot
        be kept here (another plane size than the first's, no room left, or the stack was built)."""
        if self._stacked or dtype.itemsize != 2:
            return None
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            return None
        size = self.plane_bytes
        index = len(self._planes)
        if (index + 1) * size > self._memory.capacity:
            return None
        source = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset)
        self._memory.view(np.dtype(np.uint8), size, index * size)[:] = source
        self._planes.append(_Plane(dtype, bits_stored))
        return index

    def plane(self, index: int) -> np.ndarray:
        """Stored values of plane `index` (a view: valid until `stack`)."""
        if self._stacked:
            raise RuntimeError("the planes were turned into a stack")
        rows, columns = self.shape or (0, 0)
        kind = self._planes[index]
        raw = self._memory.view(kind.dtype, rows * columns, index * self.plane_bytes)
        return stored_values(raw.reshape(rows, columns), kind.bits_stored)

    def fits_stack(self, count: int) -> bool:
        return count * 2 * self.plane_bytes <= self._memory.capacity

    def stack(
        self,
        order: Sequence[int],
        slopes: Sequence[float],
        intercepts: Sequence[float],
        each: Callable[[int, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """float32 HU ``(len(order), rows, columns)``: slice ``k`` is plane ``order[k]`` rescaled with
        ``slopes[k]`` and ``intercepts[k]``, the same float32 operations as `rescale` on each plane;
        ``each(k, slice)`` is called once slice ``k`` is done, while it is in cache."""
        n = len(order)
        if self._stacked or self.shape is None or not self.fits_stack(n):
            raise RuntimeError("no stack of these planes fits here")
        if len(set(order)) != n or not all(0 <= index < len(self._planes) for index in order):
            raise ValueError("each slice needs a plane of its own")
        self._put_in_order(order)
        self._stacked = True
        rows, columns = self.shape
        voxels = rows * columns
        stack = self._memory.view(np.dtype(np.float32), n * voxels).reshape(n, rows, columns)
        planes = [self._planes[i] for i in order]
        for k in range(n - 1, -1, -1):  # backwards: slice k's bytes hold only planes already widened
            raw = self._memory.view(planes[k].dtype, voxels, k * 2 * voxels).reshape(rows, columns)
            values = stored_values(raw, planes[k].bits_stored)
            if k == 0 and values is raw:
                values = raw.copy()  # slice 0 starts where plane 0 does
            rescale(values, slopes[k], intercepts[k], out=stack[k])
            if each is not None:
                each(k, stack[k])
        return stack

    def _put_in_order(self, order: Sequence[int]) -> None:
        """Move plane ``order[k]`` to position ``k`` for every ``k`` (the other planes' places are left
        undefined), following the permutation's cycles with one plane of scratch."""
        total = len(self._planes)
        chosen = set(order)
        target = list(order) + [i for i in range(total) if i not in chosen]  # position -> plane to put there
        if target == list(range(total)):
            return
        size = self.plane_bytes
        whole = self._memory.view(np.dtype(np.uint8), total * size).reshape(total, size)
        done = [False] * total
        for start in range(len(order)):
            if done[start] or target[start] == start:
                done[start] = True
                continue
            scratch = whole[start].copy()
            position = start
            while True:
                done[position] = True
                source = target[position]
                if source == start:
                    whole[position] = scratch
                    break
                whole[position] = whole[source]
                position = source
