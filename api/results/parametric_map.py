"""Attention maps as a DICOM Parametric Map, to be filed next to the CT they explain.

One multi-frame Parametric Map instance (built and encoded by highdicom) on the source series' exact
geometry: one frame per source slice and per task (the tasks are the map's channels, highdicom's 4-D
``(slices, rows, columns, tasks)`` pixel array), 32-bit float pixels (Float Pixel Data), the source's
Frame of Reference, plane positions, orientation and pixel spacing. Each task has a Real World Value
Mapping (identity, unit UCUM "1": a unitless attention weight) whose LUT label / explanation name the
task, so a viewer (OHIF, 3D Slicer) lists and overlays them. The algorithm is identified as the
"device" that made it (manufacturer HeadCT-Serve, model = algorithm name, software version, device
serial number = the model's sha256) and in the content description. It belongs to the source study
(patient and study copied from the evidence), in a new series; content qualification RESEARCH.

Maps come in the source Volume's array order as `api.ingest.dicom` builds it from the series: axis 0
along the image rows (column index), axis 1 down the columns (row index), axis 2 through the slices
sorted along the slice normal (IOP row x column cosines) -- so frame ``k`` is ``map[:, :, k].T``.
Pure: no I/O; with the UIDs given, the same inputs give the same dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from api.results.dicom_sr import (
    CODING_SCHEME,
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    Algorithm,
    _coding_scheme,
    _with_type2_attributes,
)

#: The parametric map's series number (the SR is 9901): sorts after the scanner's own series.
SERIES_NUMBER: Final = 9902
ATTENTION: Final = hd.sr.CodedConcept("attention", CODING_SCHEME, "Attention weight")
UNITY: Final = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
CONTENT_LABEL: Final = "ATTENTION"
#: LUT Label is SH (16 characters), LUT Explanation and Content Description LO (64).
_SH_MAX: Final = 16
_LO_MAX: Final = 64


def parametric_map(
    evidence: Sequence[pydicom.Dataset],
    maps: Mapping[str, np.ndarray],
    algorithm: Algorithm,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.pm.ParametricMap:
    """The maps (task -> array on the source grid, see the module docstring) as a Parametric Map.

    `evidence`: the source series' single-frame CT instances (any order; headers are enough, no pixel
    data needed). Returns highdicom's dataset (with file meta), ready for ``save_as``.

    Raises:
        ValueError: no evidence or no maps, evidence from several series or without a common frame of
            reference, a map whose shape is not (Columns, Rows, number of slices), a bad task name, or
            non-finite values.
    """
    sources = sort_slices(evidence)
    if not maps:
        raise ValueError("no maps: the parametric map needs at least one task")
    first = sources[0]
    expected = (int(first.Columns), int(first.Rows), len(sources))
    for name, task_map in maps.items():
        if not name or len(name) > _LO_MAX or not (name.isascii() and name.isprintable()) or "\\" in name:
            raise ValueError(f"task name must be 1-{_LO_MAX} printable ASCII characters, no '\\': {name!r}")
        if np.shape(task_map) != expected:
            raise ValueError(
                f"map {name!r} has shape {np.shape(task_map)}; the series is {expected} (cols, rows, slices)"
            )
    # (slices, rows, columns, tasks): frame k of task t = map[:, :, k].T
    pixels = np.empty((len(sources), expected[1], expected[0], len(maps)), dtype=np.float32)
    for t, task_map in enumerate(maps.values()):
        pixels[..., t] = np.transpose(np.asarray(task_map, dtype=np.float32), (2, 1, 0))
    if not np.all(np.isfinite(pixels)):
        raise ValueError("maps contain NaN or infinite values")
    mappings = [[_value_mapping(name, pixels[..., t])] for t, name in enumerate(maps)]
    description = f"{algorithm.name} attention: " + ", ".join(maps)
    low, high = float(pixels.min()), float(pixels.max())
    window = hd.VOILUTTransformation(
        window_center=(low + high) / 2.0,
        window_width=max(high - low, 1e-6),
        window_explanation="ATTENTION",
        voi_lut_function="LINEAR_EXACT",  # a width below 1 is only allowed with LINEAR_EXACT
    )
    pm = hd.pm.ParametricMap(
        source_images=[_with_type2_attributes(sources[0]), *sources[1:]],
        pixel_array=pixels if len(maps) > 1 else pixels[..., 0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.model_sha256,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=mappings if len(maps) > 1 else mappings[0],
        content_description=description[:_LO_MAX],
        content_label=CONTENT_LABEL,
        voi_lut_transformations=[window],
        series_description=series_description(algorithm),
        coding_schemes=[_coding_scheme()],
    )
    # General Series: Laterality (type 2C) is required for a paired body part; naming the (unpaired)
    # body part tells validators why it is absent
    pm.BodyPartExamined = str(first.get("BodyPartExamined") or "HEAD")
    return pm


def series_description(algorithm: Algorithm) -> str:
    """``<name> <version> attention``, with the synthetic-model notice when it applies (64 characters;
    the name and version are shortened first, the notice must survive)."""
    suffix = f" - {NOT_FOR_CLINICAL_USE}" if algorithm.synthetic_demo else ""
    head = f"{algorithm.name} {algorithm.version}"[: _LO_MAX - len(" attention") - len(suffix)].rstrip()
    return f"{head} attention{suffix}"


def sort_slices(evidence: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source slices in the order of `api.ingest.dicom`'s axis 2: ascending along the slice normal.

    Raises:
        ValueError: no evidence, several series, or no common frame of reference / orientation.
    """
    if not evidence:
        raise ValueError("no evidence: the parametric map needs the source series' instances")
    series = {str(ds.SeriesInstanceUID) for ds in evidence}
    if len(series) != 1:
        raise ValueError(f"evidence spans {len(series)} series; a parametric map is made on one")
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in evidence}
    if len(frames) != 1 or "" in frames:
        raise ValueError("the evidence has no single frame of reference")
    iop = np.asarray([float(v) for v in evidence[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    distance = [float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal) for ds in evidence]
    return [evidence[i] for i in np.argsort(distance, kind="stable")]


def _value_mapping(name: str, values: np.ndarray) -> hd.pm.RealWorldValueMapping:
    """Identity mapping of stored floats to a unitless attention weight, labelled with the task."""
    low, high = float(values.min()), float(values.max())
    return hd.pm.RealWorldValueMapping(
        lut_label=name[:_SH_MAX],
        lut_explanation=f"attention weight: {name}"[:_LO_MAX],
        unit=UNITY,
        value_range=(low, high if high > low else low + 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=ATTENTION,
    )
