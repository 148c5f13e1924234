"""Explanation maps in the caller's terms: the model's per-task maps (over the model input) taken back
onto the scan exactly as it was sent, and written the way the caller asked for them.

=========  ==========================================================================================
format     what comes back
=========  ==========================================================================================
`nifti`    one gzip NIfTI in the input's affine, one volume per task (`headct.explain.attention_nifti`)
`png`      a PNG montage for humans: per task three orthogonal slices through the map's hottest
           point, CT brain window with the map as a colour overlay (`headct.explain.attention_preview`)
`dicom`    a DICOM Parametric Map (float) on the source series' frame of reference and geometry, in
           the source study (`api.results.parametric_map`; DICOM uploads only)
=========  ==========================================================================================

`render_explanations` runs in a preprocessing worker after the prediction and decodes the upload a
second time (the spooled file lives until the request ends). The decoded volume never leaves a worker
(what comes back is the 5 MB model input, not a 200 MB volume), so keeping it for this optional step
would hold that memory for every request; decoding again costs one more decode + preprocess of CPU,
only for a request that asks for maps in its own grid.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import numpy as np

from api.ingest import IngestLimits, decode_upload
from api.results.dicom_sr import Algorithm
from api.results.parametric_map import parametric_map
from headct.explain import attention_nifti, attention_preview, map_to_source
from headct.preprocess import preprocess_with_info

ExplanationFormat = Literal["nifti", "png", "dicom"]
EXPLANATION_FORMATS: Final[tuple[ExplanationFormat, ...]] = ("nifti", "png", "dicom")
MEDIA_TYPES: Final[dict[ExplanationFormat, str]] = {
    "nifti": "application/gzip",
    "png": "image/png",
    "dicom": "application/dicom",
}
FILE_NAMES: Final[dict[ExplanationFormat, str]] = {
    "nifti": "attention.nii.gz",
    "png": "attention.png",
    "dicom": "attention-parametric-map.dcm",
}


def render_explanations(
    upload: str,
    content_type: str,
    series_uid: str | None,
    limits: IngestLimits,
    maps: Mapping[str, np.ndarray],
    formats: tuple[ExplanationFormat, ...],
    algorithm: Algorithm | None = None,
) -> dict[ExplanationFormat, bytes]:
    """`maps` (task -> map over the model input, e.g. the 8x8x8 patch grid) in each of `formats`, on
    the grid of the scan in `upload` (decoded again, with the same series choice). ``dicom`` needs a
    DICOM upload (its series' datasets) and `algorithm`."""
    scan = decode_upload(
        Path(upload), content_type, series_uid=series_uid, limits=limits, evidence="dicom" in formats
    )
    volume = scan.volume
    _, info = preprocess_with_info(volume)
    source = {
        task: map_to_source(np.asarray(values, dtype=np.float32), info, volume.affine)
        for task, values in maps.items()
    }
    out: dict[ExplanationFormat, bytes] = {}
    if "nifti" in formats:
        out["nifti"] = attention_nifti(source, volume.affine)
    if "png" in formats:
        out["png"] = attention_preview(volume.hu, volume.affine, source)
    if "dicom" in formats:
        if not scan.evidence or algorithm is None:
            raise ValueError("a Parametric Map needs a DICOM upload and the algorithm")
        dataset = parametric_map(scan.evidence, source, algorithm)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        out["dicom"] = buffer.getvalue()
    return out
