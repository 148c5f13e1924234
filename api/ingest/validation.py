"""Rules a scan must satisfy before preprocessing. Each refusal is a `ProblemError` (HTTP 422 unless
noted) with a machine-readable ``code``, the ``field`` and the ``observed`` value; rules that pass
with a caveat return warnings ``(code, detail)`` that end up in the response.

DICOM header rules (`check_dicom_header`, run by the reader before any pixel data is decoded):

==========================  ===========================================================================
``not_ct``                  Modality is not CT, or the SOP class is not (Enhanced / Legacy Enhanced) CT
``not_head``                the tags clearly name another body part (BodyPartExamined, or the study /
                            series description / protocol name when BodyPartExamined is empty) and
                            none of them mentions the head; when nothing says which body part it is,
                            the scan is accepted with the warning ``body_part_unknown``
``contrast_enhanced``       warning: ContrastBolusAgent is set, or a description says contrast / CTA /
                            angio (FM-HCT was trained on non-contrast head CT)
==========================  ===========================================================================

Series-structure rules (``mixed_series``, ``inconsistent_orientation``, ``missing_slices``,
``non_uniform_spacing``, ``gantry_tilt``) live with the DICOM geometry in `headct.dicom_geometry`
and series selection (``ambiguous_series``, ``unsuitable_series``, ``series_not_found``) in
`api.ingest.selection`.

Volume rules (`validate`, any format), in this order:

==========================  ===========================================================================
``non_finite_values``       NaN / inf voxels
``bad_spacing``             voxel size not finite or outside `SPACING_RANGE_MM` (0.2-6 mm) on an axis
``hu_out_of_range``         values beyond +-`MAX_ABS_HU`, or less than `MIN_AIR_FRACTION` of the voxels at
                            air density (`AIR_HU`): not Hounsfield units (raw stored values without
                            RescaleIntercept, normalised intensities, a skull-stripped brain, ...)
``too_few_slices``          fewer than `MIN_SLICES` voxels along an axis
``no_foreground``           no head: less than `MIN_HEAD_ML` of dense matter (> -300 HU) survives an
                            erosion by `HEAD_EROSION_MM`, which removes the thin table, head holder and
                            cushions; so a scan of only air, or of only the table, never gets findings
``insufficient_coverage``   the field of view is shorter than `MIN_COVERAGE_MM` along an axis
==========================  ===========================================================================
"""

from __future__ import annotations

import math
import re
from typing import Final

import numpy as np

from api.ingest.scan import DecodedScan, DicomInfo, ScanWarning
from api.problems import ProblemCode, ProblemError
from headct.preprocess import SourcePlaneStats
from headct.volume import Volume

#: SOP classes that hold CT images: CT, Enhanced CT, Legacy Converted Enhanced CT.
CT_SOP_CLASSES: Final = frozenset(
    {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
)
#: Voxel size accepted on every axis (mm). FM-HCT was trained on slices of 0.5-5 mm.
SPACING_RANGE_MM: Final = (0.2, 6.0)
#: |HU| beyond this is not a CT value (int16 stored values plus a -1024 intercept stay inside).
MAX_ABS_HU: Final = 35000.0
#: Air around and inside a head (sinuses, mastoids) reads about -1000 HU.
AIR_HU: Final = (-1200.0, -800.0)
MIN_AIR_FRACTION: Final = 0.01
#: At least this many voxels along every axis (a head at 5 mm needs ~30 slices).
MIN_SLICES: Final = 8
#: At least this much field of view along every axis (a whole adult head is ~180 x 220 x 200 mm).
MIN_COVERAGE_MM: Final = 80.0
#: "Dense matter" for the head check, and how much of it must survive the erosion.
HEAD_DENSITY_HU: Final = -300.0
HEAD_EROSION_MM: Final = 5.0
MIN_HEAD_ML: Final = 50.0
#: The head check runs on a grid of about this voxel size (subsampled: cheap on 512 x 512 x 300).
_HEAD_GRID_MM: Final = 2.0

_HEAD_STEMS: Final = ("HEAD", "BRAIN", "SKULL", "CRANI", "CEREB", "NEURO", "STROKE", "INTRACRAN")
_OTHER_STEMS: Final = (
    "CHEST",
    "THORA",
    "LUNG",
    "ABDOM",
    "ABD",
    "PELV",
    "SPINE",
    "CSPINE",
    "TSPINE",
    "LSPINE",
    "NECK",
    "HEART",
    "CARDIAC",
    "CORONAR",
    "KNEE",
    "HIP",
    "LEG",
    "ARM",
    "HAND",
    "FOOT",
    "ANKLE",
    "SHOULDER",
    "ELBOW",
    "WRIST",
    "BREAST",
    "LIVER",
    "RENAL",
    "KIDNEY",
    "COLON",
    "EXTREM",
    "WHOLEBODY",
)
_NO_CONTRAST_AGENT: Final = frozenset({"", "NONE", "NO", "N", "0", "NIL", "-", "NON"})
_CONTRAST_WORDS: Final = re.compile(r"(C\+|\bCTA\b|ANGIO|CONTRAST|\bENHANCED\b|\bW\s*/\s*C\b|\bWITH\s+C)")
_NON_CONTRAST_WORDS: Final = re.compile(
    r"(\bW\s*/?\s*O\b|WITHOUT|\bNON[\s-]*(CON|CONTRAST|ENH)|\bNO\s+CONTRAST|\bNC\b|\bNCCT\b|C-)"
)


def _tokens(text: str) -> list[str]:
    return [token for token in re.split(r"[^A-Z0-9]+", text.upper()) if token]


def _mentions(text: str, stems: tuple[str, ...]) -> bool:
    return any(token.startswith(stem) for token in _tokens(text) for stem in stems)


def check_dicom_header(info: DicomInfo) -> list[ScanWarning]:
    """Modality, body part and contrast rules on series-level DICOM tags (before pixel decoding)."""
    if info.modality.upper() != "CT" or info.sop_class_uid not in CT_SOP_CLASSES:
        raise ProblemError(
            ProblemCode.NOT_CT,
            "the series is not a CT image series",
            field="Modality" if info.modality.upper() != "CT" else "SOPClassUID",
            observed=info.modality if info.modality.upper() != "CT" else info.sop_class_uid,
            expected="Modality CT; SOP class CT, Enhanced CT or Legacy Converted Enhanced CT Image Storage",
        )
    warnings: list[ScanWarning] = []
    descriptions = " ".join((info.study_description, info.series_description, info.protocol_name))
    head = _mentions(info.body_part, _HEAD_STEMS) or _mentions(descriptions, _HEAD_STEMS)
    if not head:
        if info.body_part.strip():
            other, source = _mentions(info.body_part, _OTHER_STEMS), "BodyPartExamined"
        else:
            other, source = _mentions(descriptions, _OTHER_STEMS), "StudyDescription/SeriesDescription"
        if other:
            raise ProblemError(
                ProblemCode.NOT_HEAD,
                "the DICOM tags name a body part other than the head; FM-HCT reads head CT only",
                field=source,
                observed=info.body_part.strip() or "(see the study/series description)",
                expected="a head / brain CT",
            )
        warnings.append(
            (
                "body_part_unknown",
                "neither BodyPartExamined nor the descriptions say this is a head CT; "
                "the findings are only meaningful for a head",
            )
        )
    agent = info.contrast_agent.strip().upper()
    described = any(
        _CONTRAST_WORDS.search(text.upper()) and not _NON_CONTRAST_WORDS.search(text.upper())
        for text in (info.study_description, info.series_description, info.protocol_name)
    )
    if agent not in _NO_CONTRAST_AGENT or described:
        warnings.append(
            (
                "contrast_enhanced",
                "the tags indicate a contrast-enhanced scan (ContrastBolusAgent or description); FM-HCT "
                "was trained on non-contrast head CT, so the findings may be unreliable",
            )
        )
    return warnings


# ---- volume rules --------------------------------------------------------------------------------


def value_range(volume: Volume, stats: SourcePlaneStats | None = None) -> tuple[float, float]:
    """The smallest and largest voxel value: from the planes' extremes when the caller read them
    already (`source_plane_stats`, which preprocessing needs too), else in one pass each. numpy's min
    and max propagate NaN and infinities, so both are finite exactly when every voxel is: the
    finiteness rule needs no pass of its own."""
    if stats is not None:
        return float(stats.plane_min.min()), float(stats.plane_max.max())
    return float(volume.hu.min()), float(volume.hu.max())


def require_finite(volume: Volume, known_range: tuple[float, float] | None = None) -> None:
    low, high = known_range or value_range(volume)
    if not (math.isfinite(low) and math.isfinite(high)):
        count = int(volume.hu.size - np.isfinite(volume.hu).sum())
        raise ProblemError(
            ProblemCode.NON_FINITE_VALUES,
            "the volume contains NaN or infinite voxel values",
            field="pixel_data",
            observed=f"{count} non-finite voxels",
            expected="finite Hounsfield units",
        )


def require_valid_spacing(volume: Volume) -> None:
    spacing = [float(s) for s in volume.spacing_mm]
    low, high = SPACING_RANGE_MM
    if not all(math.isfinite(s) and low <= s <= high for s in spacing):
        raise ProblemError(
            ProblemCode.BAD_SPACING,
            "voxel spacing must be finite and within the range of clinical head CT",
            field="spacing_mm",
            observed=[round(s, 4) for s in spacing],
            expected=f"{low} to {high} mm on every axis",
        )


def _sample(volume: Volume, grid_mm: float) -> tuple[np.ndarray, tuple[float, ...]]:
    """Every n-th voxel per axis so the sample has about `grid_mm` voxels (no interpolation)."""
    strides = [max(1, int(grid_mm / s)) for s in volume.spacing_mm]
    sample = volume.hu[strides[0] :: strides[0], strides[1] :: strides[1], strides[2] :: strides[2]]
    if min(sample.shape) == 0:
        sample, strides = volume.hu, [1, 1, 1]
    return sample, tuple(s * n for s, n in zip(volume.spacing_mm, strides, strict=True))


def _air_voxels(sample: np.ndarray, enough: int) -> int:
    """Voxels of `sample` at air density (`AIR_HU`), counted plane by plane along its slowest axis (each
    plane stays in cache for both comparisons) and only until `enough` are found: the count is exact
    when it is below `enough`. A head scan has air in its first planes, so this usually reads a few."""
    planes = np.moveaxis(sample, int(np.argmax(np.abs(sample.strides))), 0)
    count = 0
    for plane in planes:
        count += int(np.count_nonzero((plane >= AIR_HU[0]) & (plane <= AIR_HU[1])))
        if count >= enough:
            break
    return count


def require_hounsfield_units(volume: Volume, known_range: tuple[float, float] | None = None) -> None:
    low, high = known_range or value_range(volume)
    if max(abs(low), abs(high)) > MAX_ABS_HU:
        raise ProblemError(
            ProblemCode.HU_OUT_OF_RANGE,
            "voxel values are far outside the Hounsfield scale",
            field="pixel_data",
            observed=[round(low, 1), round(high, 1)],
            expected=f"Hounsfield units within +-{MAX_ABS_HU:.0f}",
        )
    sample, _ = _sample(volume, 1.0)
    air = _air_voxels(sample, enough=math.ceil(MIN_AIR_FRACTION * sample.size)) / sample.size
    if air < MIN_AIR_FRACTION:
        raise ProblemError(
            ProblemCode.HU_OUT_OF_RANGE,
            "the values do not look like Hounsfield units: there is no air (about -1000 HU) around or in "
            "the head. Raw stored values without RescaleSlope/Intercept, normalised intensities or a "
            "skull-stripped brain are not accepted",
            field="pixel_data",
            observed={"air_fraction": round(air, 5), "min": round(low, 1), "max": round(high, 1)},
            expected=f">= {MIN_AIR_FRACTION:.0%} of voxels between {AIR_HU[0]:.0f} and {AIR_HU[1]:.0f} HU",
        )


def require_slices(volume: Volume) -> None:
    if min(volume.shape) < MIN_SLICES:
        raise ProblemError(
            ProblemCode.TOO_FEW_SLICES,
            "the volume is too thin to be a head CT",
            field="shape",
            observed=list(volume.shape),
            expected=f">= {MIN_SLICES} voxels along every axis",
        )


def eroded(mask: np.ndarray, radii: tuple[int, ...]) -> np.ndarray:
    """`mask` eroded by a box of ``2 r + 1`` voxels along each axis (radius `r` per axis), outside the
    array counting as False: ``scipy.ndimage.minimum_filter(mask, 2 r + 1, mode="constant", cval=0)``.

    Each axis is a run of ANDs over shifted views (a window of width w is two overlapping windows
    of the largest power of two <= w, built by doubling: ~log2(w) array operations), ~15x faster
    than scipy's filter on a head's 2 mm sample (1 vs 15 ms here).
    """
    for axis, radius in enumerate(radii):
        if radius <= 0:
            continue
        lines = np.moveaxis(mask, axis, 0)
        n, width = lines.shape[0], 2 * radius + 1
        out = np.zeros_like(lines)
        if n >= width:
            run, span = lines, 1  # run[i]: the AND of lines[i : i + span]
            while 2 * span <= width:
                run, span = run[:-span] & run[span:], 2 * span
            if span < width:  # two overlapping windows of `span` cover one of `width`
                run = run[: span - width] & run[width - span :]
            out[radius : n - radius] = run
        mask = np.moveaxis(out, 0, axis)
    return mask


def head_volume_ml(volume: Volume) -> float:
    """Volume (ml) of dense matter left after eroding away everything thinner than ~2 x 5 mm."""
    sample, spacing = _sample(volume, _HEAD_GRID_MM)
    dense = sample > HEAD_DENSITY_HU
    if not dense.any():
        return 0.0
    core = eroded(dense, tuple(max(1, round(HEAD_EROSION_MM / s)) for s in spacing))
    return float(np.count_nonzero(core)) * float(np.prod(spacing)) / 1000.0


def require_head(volume: Volume) -> None:
    found = head_volume_ml(volume)
    if found < MIN_HEAD_ML:
        raise ProblemError(
            ProblemCode.NO_FOREGROUND,
            "no head in the volume: nothing but air or thin structures (table, head holder)",
            field="pixel_data",
            observed=f"{found:.1f} ml of dense matter",
            expected=f">= {MIN_HEAD_ML:.0f} ml denser than {HEAD_DENSITY_HU:.0f} HU, thicker than "
            f"{2 * HEAD_EROSION_MM:.0f} mm",
        )


def require_coverage(volume: Volume) -> None:
    extent = [round(float(e), 1) for e in volume.extent_mm]
    if min(extent) < MIN_COVERAGE_MM:
        raise ProblemError(
            ProblemCode.INSUFFICIENT_COVERAGE,
            "the scan covers too little of the head",
            field="extent_mm",
            observed=extent,
            expected=f">= {MIN_COVERAGE_MM:.0f} mm along every axis",
        )


def validate(scan: DecodedScan | Volume, stats: SourcePlaneStats | None = None) -> list[ScanWarning]:
    """Run every volume rule; return the warnings: the decoder's (for a `DecodedScan`) and the rules'.
    `stats`: ``source_plane_stats`` of the volume, when the caller read them (for preprocessing)."""
    volume = scan.volume if isinstance(scan, DecodedScan) else scan
    warnings: list[ScanWarning] = list(scan.warnings) if isinstance(scan, DecodedScan) else []
    known_range = value_range(volume, stats)
    require_finite(volume, known_range)
    require_valid_spacing(volume)
    require_hounsfield_units(volume, known_range)
    require_slices(volume)
    require_head(volume)
    require_coverage(volume)
    return warnings
