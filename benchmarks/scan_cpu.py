"""CPU per scan: decode + validate + preprocess of one thin-slice head, per input kind, on one core,
beside the physical limits and each decoding lever measured old way vs new way on the same bytes.

    python -m benchmarks.scan_cpu [--quick]      # JSON on stdout; `make bench` runs it as `scan_cpu`

Input: a synthetic 1 mm head, 512x512x200 (quick mode: the same head, fewer repeats), as a DICOM zip
with deflated members, the same zip with stored members, NIfTI.gz, raw NIfTI
and gzip NRRD. Each kind runs the worker's function (`api.inference.pipeline.prepare_scan`) in this process
with BLAS single-threaded, as a preprocessing worker does; the figure is the median of the repeats'
CPU seconds (``process_time``: the one-core cost, steady on a shared machine), the kinds taking
turns run by run so that a slow stretch of the host is shared among them.

Levers (same bytes, side by side, median CPU seconds per scan):

- ``zip_inflate``: zipfile's streaming zlib reader (before) vs one ISA-L call per member
  (`api.ingest.inflate.read_member`);
- ``dicom_parse``: headers parsed up to the pixel data, then the member read again for its pixels
  (before) vs one parse with the pixel data (`api.ingest.dicom.ParsedMembers`);
- ``gzip``: `gzip.open` (before) vs ISA-L's `igzip.open`, reading the whole .nii.gz;
- ``dicom_pixels``: pydicom's ``pixel_array`` (before) vs the plane read straight from the pixel bytes
  (`api.ingest.dicom._native_plane`), uncompressed 16-bit slices;
- ``dicom_stack``: a zip's pixel bytes kept per dataset and rescaled into a new float32 stack, its
  plane statistics read afterwards (before) vs copied into a reused `VolumeMemory` and widened there,
  the statistics gathered slice by slice (after; `api.ingest.volume_memory.StoredPlanes`);
- ``dicom_headers``: the header pass with ``specific_tags`` as keywords and every value converted per
  member (before) vs tags built once and the values a series repeats converted once per upload
  (`api.ingest.dicom.ElementValues`);
- ``volume_reads``: validation's value range and preprocessing's per-plane extremes read separately
  (before) vs one `source_plane_stats` read for both;
- ``validate``: the finiteness and Hounsfield rules, a pass each and a full air count (before) vs one
  min/max pair and an air count that stops at the threshold (`api.ingest.validation`);
- ``result_transfer_wall``: wall seconds for the model input to come back from a worker, pickled
  through the pipe (before) vs a shared-memory slot (`api.inference.shared_arrays`);
- ``nifti_voxels``: nibabel's scaled read ``np.array(proxy, float32)`` (before) vs the stored array
  read into a numpy buffer and cast (`api.ingest.nifti._voxels_float32`), for an unscaled int16 volume;
- ``volume_memory``: a NIfTI.gz's voxels read whole into a new buffer and cast into a new array (before)
  vs read in chunks into a reused `api.ingest.volume_memory.VolumeMemory` and widened in place, the
  plane statistics gathered on the way (after).

Limits: MB/s of pixels for a memcpy of the volume's int16 pixels, zlib and ISA-L inflate of them.

SYNTHETIC DATA - NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import statistics
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from benchmarks import inputs
from benchmarks.config import ScanSpec

THIN_1MM: Final = ScanSpec("head-1mm", (512, 512, 200), (0.45, 0.45, 1.0))
CONTENT_TYPES: Final = {
    "dicom_zip_deflated": "application/zip",
    "dicom_zip_stored": "application/zip",
    "nifti_gz": "application/octet-stream",
    "nifti_raw": "application/octet-stream",
    "nrrd": "application/octet-stream",
}
#: Issue targets (CPU seconds per scan on one core).
TARGETS_S: Final = {"dicom_zip_deflated": 0.35, "dicom_zip_stored": 0.35, "nifti_gz": 0.25}


def _cpu(function: Callable[[], Any], repeats: int) -> float:
    """Median CPU seconds of `function` over `repeats` runs, after one warm-up run."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        samples.append(time.process_time() - started)
    return round(statistics.median(samples), 4)


def _stored_copy(deflated: Path) -> Path:
    """The same DICOM zip with stored (uncompressed) members, written once beside it."""
    path = deflated.with_name(deflated.stem + "-stored.zip")
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(deflated) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as target:
            for info in source.infolist():
                target.writestr(info.filename, source.read(info))
        tmp.replace(path)
    return path


def input_files(spec: ScanSpec) -> dict[str, Path]:
    from benchmarks.preprocess_bench import _nrrd_copy

    files = inputs.ensure_scan(spec)
    return {
        "dicom_zip_deflated": files.dicom_zip,
        "dicom_zip_stored": _stored_copy(files.dicom_zip),
        "nifti_gz": files.nifti_gz,
        "nifti_raw": files.nifti_raw,
        "nrrd": _nrrd_copy(files),
    }


def per_kind(files: dict[str, Path], repeats: int) -> dict[str, Any]:
    """CPU seconds per scan of decode + validate + preprocess, and the stages of the median run.

    The kinds take turns, one run each per round (after one uncounted warm-up round), so a slow stretch
    of the shared host lands on every kind alike instead of on all the repeats of one.
    """
    from api.inference.pipeline import prepare_scan

    def once(kind: str) -> tuple[float, dict[str, float]]:
        started = time.process_time()
        stages = prepare_scan(str(files[kind]), CONTENT_TYPES[kind], None)[3]
        return time.process_time() - started, stages

    for kind in files:
        once(kind)
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {kind: [] for kind in files}
    for _ in range(repeats):
        for kind in files:
            runs[kind].append(once(kind))
    out: dict[str, Any] = {}
    for kind, path in files.items():
        ordered = sorted(runs[kind], key=lambda run: run[0])
        cpu = round(statistics.median(seconds for seconds, _ in ordered), 4)
        stages = ordered[(len(ordered) - 1) // 2][1]
        target = TARGETS_S.get(kind)
        out[kind] = {
            "cpu_s": cpu,
            "stages_s": {stage: round(seconds, 4) for stage, seconds in stages.items()},
            "target_s": target,
            "status": None if target is None else ("pass" if cpu <= target else "MISS"),
            "file_mb": round(path.stat().st_size / 1e6, 1),
        }
    return out


def _zip_inflate(path: Path, repeats: int) -> dict[str, float]:
    from api.ingest.inflate import read_member

    def zipfile_stream() -> None:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    member.read()

    def isal_whole() -> None:
        with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
            for info in archive.infolist():
                read_member(archive, handle, info)

    return {"before_s": _cpu(zipfile_stream, repeats), "after_s": _cpu(isal_whole, repeats)}


def _dicom_parse(path: Path, repeats: int) -> dict[str, float]:
    """Both ways from already-inflated members, so only the parsing differs."""
    import pydicom

    from api.ingest import dicom

    with zipfile.ZipFile(path) as archive:
        members = [archive.read(info) for info in archive.infolist()]

    def twice() -> None:
        for data in members:
            pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=dicom.HEADER_TAGS)
            _ = pydicom.dcmread(io.BytesIO(data), specific_tags=dicom.PIXEL_TAGS, force=True).pixel_array

    def once() -> None:
        for data in members:
            _ = pydicom.dcmread(io.BytesIO(data), specific_tags=dicom._HEADER_AND_PIXEL_TAGS).pixel_array

    return {"before_s": _cpu(twice, repeats), "after_s": _cpu(once, repeats)}


def _dicom_headers(path: Path, repeats: int) -> dict[str, float]:
    """The header pass's parse and header extraction from already-inflated members: ``specific_tags``
    as keywords and every header value converted per member (before) vs tags built once and the values
    a series repeats converted once per upload (`api.ingest.dicom.ElementValues`, after)."""
    import pydicom

    from api.ingest import dicom

    with zipfile.ZipFile(path) as archive:
        members = [archive.read(info) for info in archive.infolist()]

    def before() -> None:
        for member, data in enumerate(members):
            ds = pydicom.dcmread(io.BytesIO(data), specific_tags=dicom._HEADER_AND_PIXEL_TAGS)
            dicom._image_headers(ds, member, dicom.ElementValues())

    def after() -> None:
        values = dicom.ElementValues()
        for member, data in enumerate(members):
            ds = pydicom.dcmread(io.BytesIO(data), specific_tags=dicom._HEADER_AND_PIXEL_TAG_VALUES)
            dicom._image_headers(ds, member, values)

    return {"before_s": _cpu(before, repeats), "after_s": _cpu(after, repeats)}


def _volume_reads(path: Path, repeats: int) -> dict[str, float]:
    """Validation's value range and preprocessing's per-plane extremes: a read of the volume each
    (before) vs the one read `source_plane_stats` shared by both (after)."""
    from api.ingest import validation
    from api.ingest.decode import decode_upload
    from headct.preprocess import source_plane_stats

    volume = decode_upload(path, "application/octet-stream").volume

    def before() -> None:
        validation.value_range(volume)
        source_plane_stats(volume.hu)

    def after() -> None:
        validation.value_range(volume, source_plane_stats(volume.hu))

    return {"before_s": _cpu(before, repeats), "after_s": _cpu(after, repeats)}


def _gzip(path: Path, repeats: int) -> dict[str, float]:
    from isal import igzip

    def read_with(opener: Callable[..., Any]) -> Callable[[], None]:
        def read() -> None:
            with opener(path, "rb") as handle:
                while handle.read(1 << 20):
                    pass

        return read

    return {"before_s": _cpu(read_with(gzip.open), repeats), "after_s": _cpu(read_with(igzip.open), repeats)}


def _nifti_voxels(path: Path, repeats: int) -> dict[str, float]:
    import nibabel as nib

    from api.ingest.nifti import _voxels_float32, squeeze_to_3d

    image = nib.load(path, mmap=False)  # raw NIfTI: both read the voxels from the file each time
    spatial = squeeze_to_3d(image.shape)

    def ours() -> None:
        with path.open("rb") as handle:
            _voxels_float32(handle, image.dataobj, spatial)

    return {
        "before_s": _cpu(lambda: np.array(image.dataobj, dtype=np.float32, copy=True), repeats),
        "after_s": _cpu(ours, repeats),
    }


def _volume_memory(path: Path, repeats: int) -> dict[str, float]:
    """A NIfTI.gz's voxels read whole into a new buffer and cast into a new float32 array (before) vs
    read in chunks into a reused `VolumeMemory` and widened there, gathering the plane statistics
    (after; what a worker does)."""
    import nibabel as nib
    from isal import igzip

    from api.ingest.nifti import _stored_array, _voxels_float32, squeeze_to_3d
    from api.ingest.volume_memory import VolumeMemory

    proxy = nib.load(path, mmap=False).dataobj
    spatial = squeeze_to_3d(proxy.shape)
    memory = VolumeMemory(4 * int(np.prod(spatial)))

    def before() -> None:
        with igzip.open(path, "rb") as handle:
            _stored_array(handle, proxy).astype(np.float32)

    def after() -> None:
        with igzip.open(path, "rb") as handle:
            _voxels_float32(handle, proxy, spatial, memory)

    return {"before_s": _cpu(before, repeats), "after_s": _cpu(after, repeats)}


def _dicom_stack(path: Path, repeats: int) -> dict[str, float]:
    """The header pass + pixel pass of a DICOM zip, then the volume's plane statistics: each plane's
    pixel bytes kept in its dataset and rescaled into a new float32 stack, the statistics read from it
    afterwards (before) vs the planes copied into a reused `VolumeMemory` and widened there in slice
    order, the statistics gathered slice by slice (after)."""
    import tempfile

    from api.ingest import dicom
    from api.ingest.decode import volume_memory_bytes
    from api.ingest.members import ZipSource
    from api.ingest.scan import DEFAULT_LIMITS
    from api.ingest.volume_memory import VolumeMemory
    from headct.preprocess import source_plane_stats

    memory = VolumeMemory(volume_memory_bytes(DEFAULT_LIMITS))

    def decode(in_place: bool) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as scratch, ZipSource(path, DEFAULT_LIMITS) as source:
                parsed = dicom.ParsedMembers(planes=memory.planes() if in_place else None)
                headers, _ = dicom.read_headers(source, parsed)
                geometry = dicom.series_geometry(headers)
                volume, stats = dicom.assemble(
                    source, headers, geometry, DEFAULT_LIMITS, Path(scratch), parsed
                )
                if stats is None:
                    source_plane_stats(volume.hu)

        return run

    return {"before_s": _cpu(decode(False), repeats), "after_s": _cpu(decode(True), repeats)}


def _dicom_pixels(path: Path, repeats: int) -> dict[str, float]:
    """pydicom's ``pixel_array`` vs the planes read straight from the pixel bytes, both from a fresh
    parse (pydicom caches the array on the dataset)."""
    import pydicom

    from api.ingest import dicom

    with zipfile.ZipFile(path) as archive:
        members = [archive.read(info) for info in archive.infolist()]

    def parsed() -> list[Any]:
        return [
            pydicom.dcmread(io.BytesIO(data), specific_tags=dicom._HEADER_AND_PIXEL_TAGS) for data in members
        ]

    def pixel_array() -> None:
        for ds in parsed():
            _ = ds.pixel_array

    def native() -> None:
        for ds in parsed():
            _ = dicom._native_plane(ds)

    return {"before_s": _cpu(pixel_array, repeats), "after_s": _cpu(native, repeats)}


def _validate(path: Path, repeats: int) -> dict[str, float]:
    """The finiteness and Hounsfield rules: a finiteness pass, min, max and a full air count (before)
    vs one min/max pair for both rules and an air count that stops at the threshold (after)."""
    from api.ingest import validation
    from api.ingest.decode import decode_upload

    volume = decode_upload(path, "application/octet-stream").volume

    def before() -> None:
        assert np.isfinite(volume.hu).all()
        volume.hu.min(), volume.hu.max()
        sample, _ = validation._sample(volume, 1.0)
        np.count_nonzero((sample >= validation.AIR_HU[0]) & (sample <= validation.AIR_HU[1]))

    def after() -> None:
        known = validation.value_range(volume)
        validation.require_finite(volume, known)
        validation.require_hounsfield_units(volume, known)

    return {"before_s": _cpu(before, repeats), "after_s": _cpu(after, repeats)}


def model_input() -> tuple[None, np.ndarray]:
    """A preprocessing worker's result, shaped like `_prepare`'s (for `_result_transfer`)."""
    return (None, np.ones((3, 96, 96, 96), dtype=np.float16))


def _result_transfer(repeats: int) -> dict[str, float]:
    """Wall seconds for the fp16 model input to come back from a worker process: pickled through the
    pool's pipe (before) vs a shared-memory slot (after). One worker, nothing else running."""
    import asyncio

    from api.inference.shared_arrays import ArraySlots
    from api.inference.workers import PreprocessPool

    async def median_s(pool: PreprocessPool) -> float:
        samples = []
        for _ in range(max(10, 4 * repeats)):
            start = time.perf_counter()
            await pool.run(model_input)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    async def both() -> dict[str, float]:
        pool = PreprocessPool(1, retry_after_s=1)
        try:
            await pool.start()
            await median_s(pool)  # warm-up
            after = await median_s(pool)
            lend = ArraySlots.lend
            ArraySlots.lend = lambda self: None  # type: ignore[method-assign]  # every job uses the pipe
            try:
                before = await median_s(pool)
            finally:
                ArraySlots.lend = lend  # type: ignore[method-assign]
            return {"before_s": round(before, 5), "after_s": round(after, 5)}
        finally:
            pool.shutdown()

    return asyncio.run(both())


def levers(files: dict[str, Path], repeats: int) -> dict[str, dict[str, float]]:
    out = {
        "zip_inflate": _zip_inflate(files["dicom_zip_deflated"], repeats),
        "dicom_parse": _dicom_parse(files["dicom_zip_deflated"], repeats),
        "dicom_headers": _dicom_headers(files["dicom_zip_deflated"], repeats),
        "dicom_pixels": _dicom_pixels(files["dicom_zip_deflated"], repeats),
        "dicom_stack": _dicom_stack(files["dicom_zip_deflated"], repeats),
        "gzip": _gzip(files["nifti_gz"], repeats),
        "nifti_voxels": _nifti_voxels(files["nifti_raw"], repeats),
        "volume_memory": _volume_memory(files["nifti_gz"], repeats),
        "validate": _validate(files["nifti_raw"], repeats),
        "volume_reads": _volume_reads(files["nifti_raw"], repeats),
        "result_transfer_wall": _result_transfer(repeats),
    }
    for lever in out.values():
        lever["speedup"] = round(lever["before_s"] / lever["after_s"], 2) if lever["after_s"] else 0.0
    return out


def limits(spec: ScanSpec, repeats: int) -> dict[str, float]:
    """MB/s of int16 pixels on one core: memcpy, zlib inflate, ISA-L inflate (level-6 deflate)."""
    import zlib

    from isal import isal_zlib

    rng = np.random.default_rng(0)
    pixels = (rng.normal(0, 40, spec.shape).astype(np.int16) - 1000).tobytes()  # CT-like noise
    deflated = zlib.compress(pixels, 6)
    target = bytearray(len(pixels))
    megabytes = len(pixels) / 1e6

    def rate(function: Callable[[], Any]) -> float:
        return round(megabytes / max(_cpu(function, repeats), 1e-9), 1)

    return {
        "pixels_mb": round(megabytes, 1),
        "memcpy_mb_s": rate(lambda: target.__setitem__(slice(None), pixels)),
        "zlib_inflate_mb_s": rate(lambda: zlib.decompress(deflated)),
        "isal_inflate_mb_s": rate(lambda: isal_zlib.decompress(deflated)),
    }


def run(quick: bool) -> dict[str, Any]:
    from api.inference.workers import prepare_pipeline_process

    prepare_pipeline_process()  # as in a preprocessing worker
    repeats = 3 if quick else 7
    # (the targets' figures: more runs than the levers', all kinds in turn)
    kind_repeats = 5 if quick else 9
    files = input_files(THIN_1MM)
    result = {
        "input": THIN_1MM.key,
        "repeats": repeats,
        "kind_repeats": kind_repeats,
        "per_kind": per_kind(files, kind_repeats),
    }
    result["levers"] = levers(files, repeats)
    pixels_mb = THIN_1MM.shape[0] * THIN_1MM.shape[1] * THIN_1MM.shape[2] * 2 / 1e6
    result["limits"] = limits(THIN_1MM, repeats)
    result["decoded_mb_s_per_core"] = {
        kind: round(pixels_mb / row["stages_s"]["decode"], 1)
        for kind, row in result["per_kind"].items()
        if row["stages_s"].get("decode")
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scan_cpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (5 per input kind, 3 per lever; else 9 and 7)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
