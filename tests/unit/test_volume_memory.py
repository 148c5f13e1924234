"""`VolumeMemory` / `StoredPlanes`: a series' stored planes become its float32 HU stack in place, with
the values a plane-by-plane `rescale` into a new array gives, whatever order the planes came in; and the
DICOM decoder uses that path for uncompressed slices (the same volume as the ordinary one)."""

from __future__ import annotations

import random
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from api.ingest import IngestLimits, decode_upload, dicom
from api.ingest.members import ZipSource
from api.ingest.volume_memory import ProcessVolumeMemory, VolumeMemory, rescale, stored_values
from demo.dicom_writer import ct_series, phantom_head, to_bytes
from headct.preprocess import SourcePlaneStats, source_plane_stats, stats_describe
from headct.volume import Volume

SHAPE = (24, 20)


def _assert_same_stats(stats: SourcePlaneStats | None, hu: np.ndarray) -> None:
    """`stats` are what reading the volume `hu` again would give."""
    expected = source_plane_stats(hu)
    assert stats is not None and stats_describe(stats, hu)
    assert stats.outer_axis == expected.outer_axis
    np.testing.assert_array_equal(stats.plane_max, expected.plane_max)
    np.testing.assert_array_equal(stats.plane_min, expected.plane_min)
    np.testing.assert_array_equal(stats.max_over_planes, expected.max_over_planes)
    assert stats.max_over_planes.dtype == expected.max_over_planes.dtype
    assert stats.max_over_planes.strides == expected.max_over_planes.strides


def _planes(count: int, dtype: str, seed: int) -> list[np.ndarray]:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    return [rng.integers(info.min, info.max, SHAPE, dtype=dtype, endpoint=True) for _ in range(count)]


def _expected(planes: list[np.ndarray], bits: list[int], order: list[int], slopes, intercepts) -> np.ndarray:
    out = np.empty((len(order), *SHAPE), np.float32)
    for k, index in enumerate(order):
        rescale(stored_values(planes[index], bits[index]), slopes[k], intercepts[k], out=out[k])
    return out


@pytest.mark.parametrize(
    "arrangement", ["in order", "reversed", "shuffled", "subset of a larger upload", "one plane"]
)
@pytest.mark.parametrize("dtype", ["<i2", "<u2"])
def test_the_stack_equals_rescaling_each_plane_into_a_new_array(arrangement: str, dtype: str) -> None:
    total = 1 if arrangement == "one plane" else 37
    planes = _planes(total, dtype, seed=total)
    bits = [16 if i % 3 else 12 for i in range(total)]  # some planes with unused high bits
    stored = VolumeMemory(64 << 20).planes()
    for plane, bits_stored in zip(planes, bits, strict=True):
        data = b"\x00" * 7 + plane.tobytes()  # the plane somewhere inside a member's bytes
        assert stored.add(data, 7, SHAPE, np.dtype(dtype), bits_stored) is not None
    order = list(range(total))
    if arrangement == "reversed":
        order.reverse()
    elif arrangement == "shuffled":
        random.Random(3).shuffle(order)
    elif arrangement == "subset of a larger upload":
        order = random.Random(4).sample(order, 15)
    rng = np.random.default_rng(5)
    slopes = [1.0 if k % 4 else float(rng.uniform(0.5, 2.0)) for k in range(len(order))]
    intercepts = [float(rng.uniform(-1100, 0)) for _ in order]
    expected = _expected(planes, bits, order, slopes, intercepts)
    stack = stored.stack(order, slopes, intercepts)
    assert stack.dtype == np.float32 and stack.shape == expected.shape
    np.testing.assert_array_equal(stack, expected)
    with pytest.raises(RuntimeError):
        stored.plane(0)  # the planes are gone: the stack took their place
    assert stored.add(planes[0].tobytes(), 0, SHAPE, np.dtype(dtype), 16) is None


def test_a_plane_is_kept_only_where_it_fits() -> None:
    plane_bytes = SHAPE[0] * SHAPE[1] * 2
    memory = VolumeMemory(3 * plane_bytes)  # (rounded up to whole pages)
    room = memory.capacity // plane_bytes
    stored = memory.planes()
    data = _planes(1, "<i2", 0)[0].tobytes()
    added = [stored.add(data, 0, SHAPE, np.dtype("<i2"), 16) for _ in range(room + 1)]
    assert added == [*range(room), None]
    assert stored.add(data[:120], 0, (10, 6), np.dtype("<i2"), 16) is None  # not the first plane's size
    assert stored.fits_stack(room // 2) and not stored.fits_stack(room // 2 + 1)  # a slice is two planes
    with pytest.raises(ValueError, match="plane of its own"):
        stored.stack([0, 0], [1.0, 1.0], [0.0, 0.0])


def test_release_hands_back_only_the_pages_beyond_the_kept_ones() -> None:
    mib = 1 << 20
    memory = VolumeMemory(16 * mib, keep_bytes=2 * mib)
    ones = memory.view(np.dtype(np.uint8), 8 * mib)
    ones[:] = 1
    memory.release()
    after = memory.view(np.dtype(np.uint8), 8 * mib)
    assert after[: 2 * mib].min() == 1  # kept
    assert after[2 * mib :].max() == 0  # returned to the kernel: reads as zero pages


def test_a_process_lends_its_memory_to_one_scan_at_a_time() -> None:
    lender = ProcessVolumeMemory()
    with lender.lend(1 << 20) as first:
        assert first is not None
        seen: list[VolumeMemory | None] = []

        def other() -> None:
            with lender.lend(1 << 20) as memory:
                seen.append(memory)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert seen == [None]  # busy: that caller works in memory of its own
    with lender.lend(1 << 20) as again:
        assert again is first  # reused, not mapped again
    with lender.lend(4 << 20) as bigger:
        assert bigger is not None and bigger.capacity >= 4 << 20


@pytest.fixture(scope="module")
def head() -> Volume:
    volume = phantom_head()
    return volume.with_hu(np.rint(volume.hu))


@pytest.mark.parametrize("shuffle", [False, True])
def test_dicom_slices_are_stacked_in_place_with_the_ordinary_paths_values(
    tmp_path: Path, head: Volume, shuffle: bool
) -> None:
    datasets = ct_series(head, bits_stored=12, signed=False, intercept=-1024.0)
    members = [to_bytes(ds) for ds in datasets]
    if shuffle:  # members in no particular order: the planes are put in slice order first
        random.Random(1).shuffle(members)
    path = tmp_path / "series.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for n, member in enumerate(members):
            archive.writestr(f"IM{n:04d}", member)
    limits = IngestLimits()
    volumes = []
    for in_place in (True, False):
        memory = VolumeMemory(1 << 28)
        with ZipSource(path, limits) as source:
            parsed = dicom.ParsedMembers(planes=memory.planes() if in_place else None)
            headers, _ = dicom.read_headers(source, parsed)
            assert len(parsed.planes or ()) == (len(members) if in_place else 0)
            geometry = dicom.series_geometry(headers)
            volume, stats = dicom.assemble(source, headers, geometry, limits, tmp_path, parsed)
        stack_memory = memory.view(np.dtype(np.float32), volume.hu.size)
        assert np.shares_memory(volume.hu, stack_memory) == in_place
        if in_place:  # gathered slice by slice
            _assert_same_stats(stats, volume.hu)
        else:
            assert stats is None
        volumes.append(volume)
    np.testing.assert_array_equal(volumes[0].hu, volumes[1].hu)
    np.testing.assert_array_equal(volumes[0].affine, volumes[1].affine)


@pytest.mark.parametrize("dtype", ["<i2", "<u2", ">i2", "<f4"])
@pytest.mark.parametrize("count", [1, 5, (1 << 18) + 3, 3 * (1 << 18)])  # around the block size
def test_widening_in_place_gives_astypes_values(dtype: str, count: int) -> None:
    rng = np.random.default_rng(count)
    if dtype == "<f4":
        values = rng.normal(0, 500, count).astype(dtype)
    else:
        info = np.iinfo(np.dtype(dtype).newbyteorder("="))
        values = rng.integers(info.min, info.max, count, endpoint=True).astype(dtype)
    memory = VolumeMemory(4 * count)
    memory.view(np.dtype(np.uint8), values.nbytes)[:] = values.view(np.uint8)
    widened = memory.widen(np.dtype(dtype), count)
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, values.astype(np.float32))


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<u2", "<f4"])
def test_a_nifti_volume_is_widened_in_the_memory_with_the_same_values(
    tmp_path: Path, head: Volume, dtype: str
) -> None:
    offset = 1024 if dtype == "<u2" else 0  # (unsigned: stored values shifted up, read as they are)
    stored = (np.rint(head.hu) + offset).astype(dtype)
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(stored, head.affine), path)
    memory = VolumeMemory(1 << 28)
    scan = decode_upload(path, "application/gzip", memory=memory)
    in_memory = scan.volume
    _assert_same_stats(scan.plane_stats, in_memory.hu)
    own = decode_upload(path, "application/gzip").volume
    assert np.shares_memory(in_memory.hu, memory.view(np.dtype(np.float32), in_memory.hu.size))
    assert not np.shares_memory(own.hu, memory.view(np.dtype(np.float32), own.hu.size))
    np.testing.assert_array_equal(in_memory.hu, own.hu)
    np.testing.assert_array_equal(in_memory.hu, stored.astype(np.float32))
    assert in_memory.hu.strides == own.hu.strides  # the same memory layout


@pytest.mark.parametrize(("dtype", "planes_per_read"), [("<i2", 5), ("<i2", 7), (">u2", 10), ("<f4", 5)])
def test_a_nifti_read_a_few_planes_at_a_time_has_every_value_and_plane_statistic(
    tmp_path: Path, head: Volume, monkeypatch: pytest.MonkeyPatch, dtype: str, planes_per_read: int
) -> None:
    """Planes read `planes_per_read` at a time (a last read of fewer), the statistics gathered from the
    stored values of each read: the same volume and statistics as a plain read."""
    from api.ingest import nifti

    stored = (np.rint(head.hu) + (1024 if dtype == ">u2" else 0)).astype(dtype)
    assert stored.shape[2] % planes_per_read  # (the last read is a short one)
    plane_bytes = stored.shape[0] * stored.shape[1] * stored.dtype.itemsize
    monkeypatch.setattr(nifti, "_READ_CHUNK_BYTES", planes_per_read * plane_bytes + plane_bytes // 2)
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(stored, head.affine), path)
    scan = decode_upload(path, "application/gzip", memory=VolumeMemory(1 << 28))
    np.testing.assert_array_equal(scan.volume.hu, stored.astype(np.float32))
    _assert_same_stats(scan.plane_stats, scan.volume.hu)
