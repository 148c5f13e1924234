"""What a preprocessing worker runs for one scan: decode → validate → preprocess (`prepare_scan`).

Its own module so that a worker process imports only the pipeline (the ingest readers, the validation
rules, the preprocessing), not the gateway's answers, result formats and their libraries: each worker
starts ~25 MB smaller. The gateway's side of it is `api.inference.service`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from api.inference.shared_arrays import slot_array
from api.ingest import DecodedScan, decode_upload
from api.ingest.decode import volume_memory_bytes
from api.ingest.scan import DEFAULT_LIMITS, IngestLimits
from api.ingest.validation import validate
from api.ingest.volume_memory import ProcessVolumeMemory
from api.problems import ProblemCode, ProblemError
from headct.contract import INPUT_SHAPE
from headct.preprocess import PreprocessingError, preprocess, source_plane_stats, stats_describe
from headct.volume import Volume

#: The worker's memory for decoded volumes, reused scan after scan (`VolumeMemory`).
VOLUME_MEMORY = ProcessVolumeMemory()


def without_voxels(scan: DecodedScan) -> DecodedScan:
    """The scan's metadata for the response, without the (up to 1 GiB) volume and its plane statistics:
    cheap to send back."""
    return dataclasses.replace(
        scan,
        volume=Volume(hu=np.zeros((1, 1, 1), np.float32), affine=np.asarray(scan.volume.affine)),
        plane_stats=None,
    )


def prepare_scan(
    upload: str,
    content_type: str,
    series_uid: str | None,
    limits: IngestLimits | None = None,
    evidence: bool = False,
) -> tuple[DecodedScan, np.ndarray, list[tuple[str, str]], dict[str, float]]:
    """Runs in a preprocessing worker: the upload's path → (scan metadata, fp16 tensor, warnings,
    seconds per stage); with `evidence`, a DICOM scan's instances without pixels come back too. Raises
    ProblemError (pickled back to the gateway)."""
    seconds: dict[str, float] = {}
    last = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[stage] = now - last
        last = now

    limits = limits or DEFAULT_LIMITS
    with VOLUME_MEMORY.lend(volume_memory_bytes(limits)) as memory:
        scan = decode_upload(
            Path(upload), content_type, series_uid=series_uid, limits=limits, evidence=evidence, memory=memory
        )
        lap("decode")
        # One read of the volume gives validation its value range and preprocessing the head's box; none
        # where the decoder gathered them while writing the volume.
        hu = scan.volume.hu
        stats = scan.plane_stats if stats_describe(scan.plane_stats, hu) else None
        if stats is None and hu.size:
            stats = source_plane_stats(hu)
        warnings = validate(scan, stats)
        lap("validate")
        try:
            # (in a pool job: straight into the shared memory it goes back through)
            image = preprocess(scan.volume, stats, slot_array(INPUT_SHAPE, np.float16))
        except PreprocessingError as error:
            raise ProblemError(ProblemCode.from_code(error.code), str(error)) from None
        lap("preprocess")
        # (the volume lives in the worker's volume memory: only what is built from it leaves the block)
        return without_voxels(scan), np.ascontiguousarray(image, dtype=np.float16), warnings, seconds
