"""Production preprocessing: reproduces the FM-HCT training pipeline (reference spec §2.1) without
torch or MONAI, fast enough for one CPU core.

The cached training pipeline of the reference code is, with MONAI dictionary transforms::

    LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") -> Spacingd(1 mm, mode=3)
    -> CropForegroundd(value > 0, margin 0) -> 3 CT windows -> Resized(96^3, "area") -> float16

Each step is one function with MONAI-transform semantics (the reference implementation built from the
MONAI transforms themselves is `tests/reference/monai_preprocess.py`; `tests/fidelity/` compares them):

=========================  =====================================================================
`reorient_to_ras`           Orientationd(axcodes="RAS"): flips/permutes axes, no interpolation
`resample_to_spacing`       Spacingd(pixdim=1 mm, mode=3, padding "border"): cubic B-spline,
                            scipy backend, MONAI output grid (`monai_output_grid`)
`crop_foreground`           CropForegroundd: bounding box of voxels > 0 HU, zero margin
`window_channels`           3 windows (L, W) -> [0, 1], clipped, stacked channel-first
`area_resize`               Resized(96^3, mode="area") == torch adaptive_avg_pool3d
`window_area_resize`        the last two fused (same values up to float32 rounding)
`preprocess`                all of the above, then float16 (CastToTyped)
=========================  =====================================================================

`preprocess` does not run those steps one after the other on whole arrays; it computes the same
values (to float32 rounding: a few float16 ulps flip) with far less work (how: `fused`).

Where things are (each module imports only from the ones above it):

=============  =======================================================================================
`spec`         the constants: the training pipeline's (spacing, spline order, crop threshold,
               windows, output size and dtype) and the production path's tolerances, limits, tuning
`errors`       `PreprocessingError` and its subclasses, each with a machine-readable `code`
`linear`       the separable linear maps: cubic-spline matrices (`spline_matrix`), banded float32
               BLAS products (`apply_along_axis`, `resample_planes`), area averages (`area_matrix`)
`resample`     the 1 mm spline resample of a box of the output grid (`resample_region`), separable
               (`source_sampling`) or sheared
`steps`        the reference steps of the table above (the first five), one function each, with the
               geometry (`ras_geometry`, `monai_output_grid`) and `foreground_bbox`
`fused`        the production path: `preprocess`, `preprocess_with_info` / `PreprocessInfo`,
               `window_area_resize`, the source read (`source_plane_stats`, or `PlaneStatsBuilder` while a
               decoder writes the volume) and the crop before
               resampling (`candidate_region`)
=============  =======================================================================================

Everything public is re-exported here: import it from `headct.preprocess`.

No torch here: this package runs in the gateway process. Importing it loads numpy and scipy (and
their BLAS), which `api/workers.py` relies on before it limits their threads.
"""

from __future__ import annotations

from headct.preprocess.errors import (
    InvalidVolumeError,
    NoForegroundError,
    PreprocessingError,
    VolumeTooLargeError,
)
from headct.preprocess.fused import (
    PlaneStatsBuilder,
    PreprocessInfo,
    SourcePlaneStats,
    candidate_region,
    outer_axis,
    preprocess,
    preprocess_with_info,
    source_foreground_box,
    source_plane_stats,
    stats_describe,
    window_area_resize,
)
from headct.preprocess.linear import apply_along_axis, area_matrix, resample_planes, spline_matrix
from headct.preprocess.resample import AxisSampling, resample_region, source_sampling
from headct.preprocess.spec import (
    AFFINE_TOL,
    BAND_BLOCK_ROWS,
    BAND_TOL,
    CROP_MARGIN_SOURCE_VOXELS,
    CROP_SEARCH_THRESHOLD_HU,
    DENSE_INNER_MAX,
    FOREGROUND_THRESHOLD_HU,
    MAX_RESAMPLED_VOXELS,
    OUTPUT_DTYPE,
    OUTPUT_SPATIAL,
    PLANE_BLOCK_ROWS,
    SEPARABLE_MAX_SHIFT_VOXELS,
    SPLINE_ORDER,
    SPLINE_PADDING_MODE,
    SPLINE_PREPAD,
    TARGET_SPACING_MM,
    WINDOW_NAMES,
    WINDOWS_HU,
)
from headct.preprocess.steps import (
    area_resize,
    crop_foreground,
    foreground_bbox,
    monai_output_grid,
    ras_geometry,
    reorient_to_ras,
    resample_to_spacing,
    window_channels,
)

__all__ = [
    "AFFINE_TOL",
    "BAND_BLOCK_ROWS",
    "BAND_TOL",
    "CROP_MARGIN_SOURCE_VOXELS",
    "CROP_SEARCH_THRESHOLD_HU",
    "DENSE_INNER_MAX",
    "FOREGROUND_THRESHOLD_HU",
    "MAX_RESAMPLED_VOXELS",
    "OUTPUT_DTYPE",
    "OUTPUT_SPATIAL",
    "PLANE_BLOCK_ROWS",
    "SEPARABLE_MAX_SHIFT_VOXELS",
    "SPLINE_ORDER",
    "SPLINE_PADDING_MODE",
    "SPLINE_PREPAD",
    "TARGET_SPACING_MM",
    "WINDOWS_HU",
    "WINDOW_NAMES",
    "AxisSampling",
    "InvalidVolumeError",
    "NoForegroundError",
    "PlaneStatsBuilder",
    "PreprocessInfo",
    "PreprocessingError",
    "SourcePlaneStats",
    "VolumeTooLargeError",
    "apply_along_axis",
    "area_matrix",
    "area_resize",
    "candidate_region",
    "crop_foreground",
    "foreground_bbox",
    "monai_output_grid",
    "outer_axis",
    "preprocess",
    "preprocess_with_info",
    "ras_geometry",
    "reorient_to_ras",
    "resample_planes",
    "resample_region",
    "resample_to_spacing",
    "source_foreground_box",
    "source_plane_stats",
    "source_sampling",
    "spline_matrix",
    "stats_describe",
    "window_area_resize",
    "window_channels",
]
