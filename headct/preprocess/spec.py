"""The constants of the preprocessing, each with what it is for: those of the FM-HCT training pipeline
(reference spec §2.1: spacing, spline, crop threshold, windows, output size and dtype), then the
tolerances, limits and tuning of the production path."""

from __future__ import annotations

from typing import Final

import numpy as np

from headct import contract

# ---- constants of the training pipeline (reference spec §2.1) -----------------------------------

#: Target voxel size of `Spacingd`, mm (isotropic).
TARGET_SPACING_MM: Final = 1.0
#: Spline order of `Spacingd(mode=3)` (scipy backend).
SPLINE_ORDER: Final = 3
#: scipy boundary mode equivalent to MONAI's padding_mode="border" (MONAI maps BORDER -> "nearest").
SPLINE_PADDING_MODE: Final = "nearest"
#: `CropForegroundd` default selector is ``value > 0`` on the raw HU volume.
FOREGROUND_THRESHOLD_HU: Final = 0.0
#: CT windows as (level L, width W) in HU, in channel order; each maps [L - W/2, L + W/2] -> [0, 1].
WINDOWS_HU: Final = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
WINDOW_NAMES: Final = ("brain", "subdural", "bone")
#: Model input size (X, Y, Z) after `Resized`, RAS array order.
OUTPUT_SPATIAL: Final = contract.INPUT_SPATIAL
OUTPUT_DTYPE: Final = np.float16

# ---- tolerances and limits; tuning of the production path --------------------------------------

#: MONAI's tolerance (`monai.data.utils.AFFINE_TOL`) for "this affine is unchanged", used to skip a
#: resample that would be the identity.
AFFINE_TOL: Final = 1e-3
#: The separable spline path ignores off-diagonal terms of the index mapping that move any sample by
#: less than this many input voxels (float32 rounding of oblique NIfTI affines).
SEPARABLE_MAX_SHIFT_VOXELS: Final = 1e-4
#: Refuse to resample into more voxels than this (a 400 mm cube at 1 mm). A head fits in ~250 mm;
#: anything bigger is a wrong series (e.g. whole body) or a bogus affine, and would cost GBs of RAM.
MAX_RESAMPLED_VOXELS: Final = 400**3

#: scipy pre-pads this many edge voxels before its spline prefilter for mode "nearest"
#: (`scipy.ndimage._interpolation._prepad_for_spline_filter`); the prefilter's tail beyond it is
#: 0.268**12 < 1.5e-7.
SPLINE_PREPAD: Final = 12
#: Entries of a 1-D spline matrix below this are outside its band (error < 1e-7 x the HU range).
BAND_TOL: Final = 1e-8
#: Output rows per block of a banded matrix product (a few % of wasted multiplies vs BLAS efficiency).
BAND_BLOCK_ROWS: Final = 16
#: Lines along the innermost axis up to this many voxels are mapped with one dense product (see
#: `apply_along_axis`).
DENSE_INNER_MAX: Final = 256
#: Output rows per block in the per-plane in-plane passes (`resample_planes`): each block is one BLAS
#: call per plane, so bigger blocks trade wasted multiplies (the band is ~31 + 2.2 x rows wide at
#: 0.45 mm) for fewer calls.
PLANE_BLOCK_ROWS: Final = 24
#: Which 1 mm samples can be > 0 HU? The spline value is a weighted mean of the nearby source voxels
#: plus overshoot at edges, and overshoot is large: between -3024 HU padding and a -60 HU table edge
#: it lifts samples above 0 HU (seen on synthetic heads). It stays far below 900 HU, though, so a
#: sample whose source neighbourhood is all below `CROP_SEARCH_THRESHOLD_HU` (air, padding) stays
#: below 0 HU; the region computed is the box of source voxels above it, widened by
#: `CROP_MARGIN_SOURCE_VOXELS` (the kernel's reach; its lobes are < 3 % beyond 2 voxels). The exact
#: crop found inside is still checked against the region edge (`preprocess_with_info`).
CROP_SEARCH_THRESHOLD_HU: Final = -900.0
CROP_MARGIN_SOURCE_VOXELS: Final = 4.0

assert len(WINDOWS_HU) == contract.INPUT_CHANNELS
