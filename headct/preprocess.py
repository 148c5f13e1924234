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
values (to float32 rounding: a few float16 ulps flip) with far less work, measured against the MONAI
chain on one core by `benchmarks/preprocess_bench.py`:

* **no reorientation copy**: Orientationd only flips/permutes voxels, so the 1 mm sample positions
  are mapped straight into the *source* array's index space (`source_sampling`), and the result is
  permuted to RAS at the end (a view);
* **the spline resample is three banded matrix products**: scipy's cubic-spline evaluation
  (edge pre-padding, recursive prefilter, 4-tap B-spline weights) is linear along each axis and
  separable, so along one axis it *is* a matrix ``R`` (`spline_matrix`, built exactly by pushing
  the identity through scipy's own 1-D prefilter). Its entries decay by 0.268 per voxel away from
  the sample, so ``R`` is applied block-banded in float32 BLAS, dropping only terms below
  `BAND_TOL`: the two in-plane axes one source slice at a time, so the intermediate stays in cache
  (`resample_planes`; readers give slices outermost in memory), then the slice axis (a strided view
  for 1 mm slices, else `apply_along_axis`);
* **scipy's BLAS, not numpy's** (`_sgemm`): numpy's bundled OpenBLAS falls back to generic SSE3
  kernels on CPUs it does not know (Sapphire Rapids), ~6x slower than scipy's build on one core;
* **one read of the source before resampling** (`source_plane_stats`): per-plane max/min and the
  element-wise max over planes give both the NaN/inf check and the head's box;
* **crop before resampling**: only 1 mm samples that can be > 0 HU are computed: the box of source
  voxels that are not air (> `CROP_SEARCH_THRESHOLD_HU`, because spline overshoot lifts samples next
  to -3024 HU padding by 100+ HU), widened by `CROP_MARGIN_SOURCE_VOXELS`, mapped onto the 1 mm
  grid (`candidate_region`). The exact > 0 HU box is then found inside that region; if it touches
  a side of the region that is not the grid's edge, the full grid is computed instead, so the crop
  always equals the one of the full resample;
* **windows + area resize** run on the crop only (`window_area_resize`): each voxel is clipped once
  per window while in cache and summed into its area slab; the other two axes are row sums and one
  BLAS product; the windows' affine part and the means' divisions (linear, so they commute with
  averaging) are applied to the 96^3 result.
* **float32 throughout** (MONAI resamples in float64; the difference is ~1e-3 HU), no copy of the
  source volume.

No torch here: this module runs in the gateway process.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Final

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
from scipy.linalg import blas as scipy_blas

from headct import contract
from headct.volume import Volume

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


# ---- errors ------------------------------------------------------------------------------------


class PreprocessingError(ValueError):
    """The volume cannot be turned into a model input. `code` is machine readable (HTTP 422 body)."""

    code: str = "preprocessing_failed"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NoForegroundError(PreprocessingError):
    """No voxel is above the foreground threshold (> 0 HU): there is no head in this volume."""

    code = "no_foreground"


class InvalidVolumeError(PreprocessingError):
    """Voxel values are unusable (NaN/inf)."""

    code = "invalid_volume"


class VolumeTooLargeError(PreprocessingError):
    """Resampling to 1 mm would exceed `MAX_RESAMPLED_VOXELS`."""

    code = "volume_too_large"


# ---- step 1: orientation -----------------------------------------------------------------------


def _ras_transform(volume: Volume) -> np.ndarray:
    """nibabel orientation transform (axis, flip) pairs taking the volume's axes to RAS."""
    start = nib.orientations.io_orientation(volume.affine)
    return nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(("R", "A", "S")))


def ras_geometry(volume: Volume) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` that `reorient_to_ras` gives `volume`, without touching the voxels."""
    transform = _ras_transform(volume)
    shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        shape[int(new_axis)] = volume.shape[axis]
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    return (shape[0], shape[1], shape[2]), affine


def reorient_to_ras(volume: Volume) -> Volume:
    """Flip/permute array axes so they run toward patient Right, Anterior, Superior (``Orientationd``).

    Uses nibabel's closest-axis orientation (`io_orientation`), exactly what MONAI does, so an
    oblique scan keeps its obliquity in the affine; only whole-axis flips and transposes are applied
    to the voxels, hence no value changes. The returned affine still maps the new indices to the
    same world points. (`preprocess` folds this step into its sampling positions instead of copying.)
    """
    transform = _ras_transform(volume)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):  # already RAS: nothing to do
        return volume
    hu = np.ascontiguousarray(nib.orientations.apply_orientation(volume.hu, transform))
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    return Volume(hu=hu, affine=affine)


# ---- step 2: 1 mm cubic-spline resample --------------------------------------------------------


def _zoom_affine(affine: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """MONAI `zoom_affine(diagonal=False)`: keep the affine's rotation, replace the voxel sizes.

    ``affine[:3, :3] = R @ Z`` with ``Z`` upper triangular (Cholesky of ``A^T A``); the new linear part
    is ``R @ diag(sign(diag(Z)) * spacing)``, i.e. any shear in ``Z`` is dropped. Translation is set
    by `monai_output_grid`.
    """
    rzs = affine[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(4)
    new[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(spacing_mm))
    return new


def monai_output_grid(
    shape: tuple[int, ...],
    affine: np.ndarray,
    spacing_mm: float | tuple[float, float, float] = TARGET_SPACING_MM,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Output shape and affine of ``Spacing(pixdim=spacing_mm, diagonal=False, scale_extent=False)``.

    MONAI (`zoom_affine` + `compute_shape_offset`): the 8 corner voxel *centres* of the input are
    mapped into the new grid; the output shape is ``round(extent + 1)`` per axis, and the output
    origin is the input corner that is smallest along every new axis (for a RAS input: voxel
    ``(0, 0, 0)``; a sheared input has no such corner and MONAI centres the new grid on the input
    instead). So the new grid starts exactly on an input voxel centre and covers the input
    from first to last voxel centre (the last output voxel may sit up to half a voxel beyond it,
    where "border" padding applies). `affine` must be the RAS one (after `reorient_to_ras`).

    Returns:
        ``(shape, affine)`` of the 1 mm grid; the affine maps output indices to world mm.
    """
    target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    new_affine = _zoom_affine(affine, target)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(3, -1)
    corners_world = affine @ np.concatenate([corners, np.ones((1, corners.shape[1]))])
    inv_new = np.linalg.inv(new_affine)
    corners_out = (inv_new @ corners_world)[:3]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0).astype(int)
    mat = inv_new[:3, :3]
    origin = None
    for i in range(corners.shape[1]):
        # the first corner that no other corner undercuts along any output axis (MONAI's rtol 1e-3)
        min_corner = np.min(mat @ corners_world[:3] - mat @ corners_world[:3, i : i + 1], axis=1)
        if np.allclose(min_corner, 0.0, rtol=AFFINE_TOL):
            origin = corners_world[:3, i]
            break
    if origin is None:
        # No such corner (a sheared input, e.g. gantry tilt): MONAI centres the new grid on the input.
        origin = (
            affine[:3, :3] @ (np.asarray(shape, dtype=np.float64) / 2.0)
            + affine[:3, 3]
            - new_affine[:3, :3] @ (out_shape / 2.0)
        )
    new_affine[:3, 3] = origin
    return (int(out_shape[0]), int(out_shape[1]), int(out_shape[2])), new_affine


def _cubic_weights(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cubic B-spline weights for taps ``floor(x)-1 .. floor(x)+2`` at fractional offset ``t`` in [0, 1)."""
    s = 1.0 - t
    t2 = t * t
    w0 = s * s * s / 6.0
    w1 = (3.0 * t2 * t - 6.0 * t2 + 4.0) / 6.0
    w3 = t2 * t / 6.0
    w2 = 1.0 - w0 - w1 - w3
    return w0, w1, w2, w3


@functools.lru_cache(maxsize=16)
def _prefiltered_identity(n_in: int) -> np.ndarray:
    """Spline coefficients (rows: padded positions) of each unit impulse (columns) of length `n_in`."""
    eye = np.pad(np.eye(n_in), ((SPLINE_PREPAD, SPLINE_PREPAD), (0, 0)), mode="edge")
    coef = ndi.spline_filter1d(eye, order=SPLINE_ORDER, axis=0, output=np.float64, mode=SPLINE_PADDING_MODE)
    coef.flags.writeable = False  # shared by every call: never modified
    return coef


def spline_matrix(n_in: int, coords: np.ndarray) -> np.ndarray:
    """``(len(coords), n_in)`` float64 matrix ``R``: ``R @ x`` = cubic spline of `x` at `coords`.

    `coords` are positions in input voxel units. This is scipy's ``map_coordinates(order=3,
    mode="nearest")`` along one axis, built exactly as scipy computes it: pre-pad `SPLINE_PREPAD`
    edge voxels, run `spline_filter1d` (the recursive prefilter) -- here on the identity, so each
    column holds the coefficients of one unit impulse -- and combine 4 rows with the B-spline
    weights. Positions beyond the padded range repeat the edge ("nearest").
    """
    coef = _prefiltered_identity(n_in)
    pos = np.asarray(coords, dtype=np.float64) + SPLINE_PREPAD
    base = np.floor(pos)
    weights = _cubic_weights(pos - base)
    first = base.astype(np.intp) - 1
    matrix = np.zeros((pos.size, n_in), dtype=np.float64)
    for tap, w in enumerate(weights):
        matrix += w[:, None] * coef[np.clip(first + tap, 0, coef.shape[0] - 1)]
    return matrix


def _bands(matrix: np.ndarray, block_rows: int = BAND_BLOCK_ROWS) -> list[tuple[int, int, int, int]]:
    """``(row0, row1, col0, col1)`` blocks covering every entry of `matrix` with ``|entry| > BAND_TOL``."""
    significant = np.abs(matrix) > BAND_TOL
    blocks = []
    for r0 in range(0, matrix.shape[0], block_rows):
        r1 = min(r0 + block_rows, matrix.shape[0])
        cols = np.flatnonzero(significant[r0:r1].any(axis=0))
        if cols.size:
            blocks.append((r0, r1, int(cols[0]), int(cols[-1]) + 1))
    return blocks


def _sgemm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[...] = a @ b`` for 2-D float32 arrays, through scipy's BLAS; returns `out`.

    Why not ``np.matmul``: numpy's bundled OpenBLAS chooses its kernels by CPU model and falls back
    to generic SSE3 ones ("Prescott") on CPUs it does not know (seen on Sapphire Rapids servers:
    ~15 GFLOPS on one core); scipy's own OpenBLAS build recognises them (~80-100 GFLOPS, AVX-512).
    `a` and `b` may be C- or F-contiguous (a transposed view costs nothing), other layouts are
    copied; `out` must be C-contiguous. BLAS is column-major, so it computes ``out.T = b.T @ a.T``.
    """
    if not out.flags.c_contiguous:
        raise ValueError("_sgemm needs a C-contiguous output")

    def fortran_operand(m: np.ndarray) -> tuple[np.ndarray, int]:
        # (array as BLAS sees it, transpose flag) such that op(array) == m.T
        if m.flags.c_contiguous:
            return m.T, 0
        if m.flags.f_contiguous:
            return m, 1
        return np.ascontiguousarray(m).T, 0

    fa, trans_a = fortran_operand(b)
    fb, trans_b = fortran_operand(a)
    result = scipy_blas.sgemm(1.0, fa, fb, beta=0.0, c=out.T, trans_a=trans_a, trans_b=trans_b, overwrite_c=1)
    if result.ctypes.data != out.ctypes.data:  # f2py had to copy `out` (never for float32): write back
        out[...] = result.T
    return out


def _band_matrix32(matrix: np.ndarray) -> np.ndarray:
    """`matrix` in float32 with entries below `BAND_TOL` zeroed: far tails of the prefilter
    (0.268**k) would be float32 denormals, which make each multiply ~100x slower on x86."""
    return np.where(np.abs(matrix) > BAND_TOL, matrix, 0.0).astype(np.float32)


def apply_along_axis(x: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """``y = matrix @ x`` along `axis` of a float32 array (a 1-D linear map per line).

    The matrix is applied block-banded (`_bands`): each block of `BAND_BLOCK_ROWS` output rows is one
    float32 BLAS product (`_sgemm`) with the slab of input rows its band touches, so no transposed
    copy of `x` is made. Returns a new C-contiguous float32 array.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_in = x.shape[axis]
    if matrix.shape[1] != n_in:
        raise ValueError(f"matrix {matrix.shape} does not fit axis {axis} of {x.shape}")
    before = int(np.prod(x.shape[:axis], dtype=np.int64))
    after = int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
    n_out = matrix.shape[0]
    blocks = _bands(matrix)
    m32 = _band_matrix32(matrix)
    out = np.empty((*x.shape[:axis], n_out, *x.shape[axis + 1 :]), dtype=np.float32)
    if after == 1:  # innermost axis: rows of x are the lines
        x2, o2 = x.reshape(before, n_in), out.reshape(before, n_out)
        # Banded blocks would need a contiguous copy of each column block (BLAS operands), so short
        # lines (an area resize of a head crop, 32 thick slices) are one dense product instead.
        band_entries = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in blocks)
        if n_in <= DENSE_INNER_MAX or band_entries > 0.5 * m32.size:
            _sgemm(x2, m32.T, o2)
            return out
        o2[...] = 0.0
        for r0, r1, c0, c1 in blocks:
            o2[:, r0:r1] = _sgemm(x2[:, c0:c1], m32[r0:r1, c0:c1].T, np.empty((before, r1 - r0), np.float32))
        return out
    x3, o3 = x.reshape(before, n_in, after), out.reshape(before, n_out, after)
    covered = np.zeros(n_out, dtype=bool)
    for r0, r1, _, _ in blocks:
        covered[r0:r1] = True
    o3[:, ~covered] = 0.0
    for r0, r1, c0, c1 in blocks:
        if before == 1:  # outermost axis: one product per block on whole contiguous slabs
            _sgemm(m32[r0:r1, c0:c1], x3[0, c0:c1], o3[0, r0:r1])
        else:
            o3[:, r0:r1] = np.matmul(m32[r0:r1, c0:c1], x3[:, c0:c1])
    return out


def resample_planes(
    x: np.ndarray, row_matrix: np.ndarray, col_matrix: np.ndarray, block_rows: int = PLANE_BLOCK_ROWS
) -> np.ndarray:
    """Apply two 1-D maps to every plane ``x[k]``: ``out[k] = col_matrix @ (row_matrix @ x[k]).T``.

    The in-plane part of the separable spline resample, one plane (a source slice) at a time so the
    intermediate stays in cache (L2) instead of streaming a volume-sized temporary through memory.
    Both passes are block-banded BLAS products (`_bands`, `_sgemm`): the row pass on whole
    contiguous rows of the plane, the column pass on a small copy of the columns its band touches
    (BLAS wants contiguous operands). Writing the column pass as ``col_matrix @ rows.T`` puts the
    output columns on the middle axis, a transpose that costs nothing.

    Args:
        x: float32 ``(n_planes, n_rows, n_cols)`` with contiguous rows (e.g. the transposed view of
            a Fortran-ordered volume: slices outermost).
        row_matrix: ``(n_rows_out, n_rows)``; col_matrix: ``(n_cols_out, n_cols)``.

    Returns:
        float32 ``(n_planes, n_cols_out, n_rows_out)``, C-contiguous.
    """
    n_planes, n_rows, n_cols = x.shape
    if row_matrix.shape[1] != n_rows or col_matrix.shape[1] != n_cols:
        raise ValueError(f"matrices {row_matrix.shape}, {col_matrix.shape} do not fit planes {x.shape[1:]}")
    row_blocks, col_blocks = _bands(row_matrix, block_rows), _bands(col_matrix, block_rows)
    rows32, cols32 = _band_matrix32(row_matrix), _band_matrix32(col_matrix)
    n_rows_out, n_cols_out = row_matrix.shape[0], col_matrix.shape[0]
    # The row pass runs on whole rows, even the columns no column block reads (~10 % of a head
    # scan): trimming them would make every operand non-contiguous, and copying costs more.
    rows_out = np.zeros((n_rows_out, n_cols), dtype=np.float32)  # one plane after the row pass
    out = np.zeros((n_planes, n_cols_out, n_rows_out), dtype=np.float32)
    for k in range(n_planes):
        plane = x[k]
        for r0, r1, c0, c1 in row_blocks:
            _sgemm(rows32[r0:r1, c0:c1], plane[c0:c1], rows_out[r0:r1])
        for r0, r1, c0, c1 in col_blocks:
            _sgemm(cols32[r0:r1, c0:c1], np.ascontiguousarray(rows_out[:, c0:c1]).T, out[k, r0:r1])
    return out


@dataclass(frozen=True)
class AxisSampling:
    """How output (1 mm, RAS) axis `out_axis` samples source array axis `src_axis`.

    Output index ``o`` reads source position ``scale * o + offset`` (source voxel units).
    """

    out_axis: int
    src_axis: int
    scale: float
    offset: float

    def coords(self, start: int, stop: int) -> np.ndarray:
        """Source positions of output indices ``start .. stop - 1``."""
        return self.scale * np.arange(start, stop, dtype=np.float64) + self.offset

    def is_identity_like(self, n_src: int, n_out: int) -> bool:
        """Samples land exactly on source voxels (scale +-1, integer offset, inside the array)."""
        if abs(abs(self.scale) - 1.0) * max(n_out, 1) > 1e-9:
            return False
        if abs(self.offset - round(self.offset)) > 1e-9:
            return False
        ends = (round(self.offset), round(self.offset + self.scale * (n_out - 1)))
        return min(ends) >= 0 and max(ends) <= n_src - 1


def source_sampling(
    source_affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, int, int]
) -> list[AxisSampling] | None:
    """Per output axis, the source axis and positions it samples; None if the mapping is sheared.

    The map output index -> source index is ``inv(source_affine) @ out_affine``. When every output
    axis moves along exactly one source axis (any flip/permutation from `reorient_to_ras`, any
    oblique-but-orthogonal grid) the 3-D spline factorises into three 1-D ones. Off-diagonal terms
    that move no sample by `SEPARABLE_MAX_SHIFT_VOXELS` are float32-affine noise and ignored.
    """
    xform = np.linalg.solve(source_affine, out_affine)
    linear = xform[:3, :3]
    src_of_out = np.argmax(np.abs(linear), axis=0)
    if sorted(src_of_out.tolist()) != [0, 1, 2]:
        return None
    kept = np.zeros_like(linear)
    for o, s in enumerate(src_of_out):
        kept[s, o] = linear[s, o]
    max_shift = float((np.abs(linear - kept) @ (np.asarray(out_shape, dtype=np.float64) - 1.0)).max())
    if max_shift >= SEPARABLE_MAX_SHIFT_VOXELS:
        return None
    return [
        AxisSampling(out_axis=o, src_axis=int(s), scale=float(linear[s, o]), offset=float(xform[s, 3]))
        for o, s in enumerate(src_of_out)
    ]


def _check_size(volume: Volume, out_shape: tuple[int, int, int], spacing_mm: float) -> None:
    n_out = int(np.prod(out_shape, dtype=np.int64))
    if n_out > MAX_RESAMPLED_VOXELS:
        raise VolumeTooLargeError(
            f"resampling {volume.shape} at {np.round(volume.spacing_mm, 3)} mm to {spacing_mm} mm gives "
            f"{out_shape} ({n_out} voxels > {MAX_RESAMPLED_VOXELS}); not a head CT?"
        )


def _is_unchanged_grid(
    shape: tuple[int, ...], affine: np.ndarray, out_shape: tuple[int, ...], out_affine: np.ndarray
) -> bool:
    """MONAI skips the resample when the new grid equals the old one within `AFFINE_TOL`."""
    if tuple(out_shape) != tuple(shape):
        return False
    xform = np.linalg.solve(affine, out_affine)
    return bool(
        np.allclose(affine, out_affine, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)
    )


def resample_region(
    hu: np.ndarray,
    source_affine: np.ndarray,
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    region: tuple[tuple[int, int], ...],
) -> np.ndarray:
    """Cubic-spline values (``Spacingd`` mode=3) of the 1 mm grid voxels inside `region`, in HU.

    Args:
        hu: source voxels (any axis order; float32).
        source_affine: `hu`'s index -> world affine.
        out_shape, out_affine: the full 1 mm grid (`monai_output_grid` of the RAS affine).
        region: ``((start, stop), ...)`` per output axis.

    Returns:
        float32 array of the region's shape, output (RAS) axis order (may be a permuted view).

    Separable mappings (`source_sampling`) run as banded matrix products along the source array's
    own axes, in memory order: the two inner axes plane by plane (`resample_planes`, only the planes
    the region needs), then the outermost (slice) axis on the in-plane-shrunk result; the result is
    permuted to output order at the end. Sheared grids (uncorrected gantry tilt) use scipy's 3-D
    `affine_transform` on the part of the source the region needs (plus `SPLINE_PREPAD` voxels, so
    the prefilter sees the same neighbourhood), the same kernel as MONAI's ``map_coordinates``.
    """
    sampling = source_sampling(source_affine, out_affine, out_shape)
    if sampling is None:
        return _resample_region_sheared(hu, source_affine, out_affine, region)
    # Axes in memory order, outermost first (a transposed view, never a copy): DICOM and NIfTI
    # readers give slices outermost (Fortran order), so x[k] is one contiguous source slice.
    x = np.asarray(hu, dtype=np.float32)
    memory_order = sorted(range(3), key=lambda a: -abs(x.strides[a]))
    x = x.transpose(memory_order)
    by_source_axis = {s.src_axis: s for s in sampling}
    slice_axis, row_axis, col_axis = (by_source_axis[a] for a in memory_order)

    def matrix(s: AxisSampling) -> np.ndarray:
        start, stop = region[s.out_axis]
        return spline_matrix(x.shape[memory_order.index(s.src_axis)], s.coords(start, stop))

    # Slice axis first, but only as a selection: an identity-like one (1 mm slices) is a strided view
    # of the slices the region needs; otherwise the slices its band touches, resampled last (on
    # the in-plane-shrunk planes, ~5x fewer voxels than the source).
    start, stop = region[slice_axis.out_axis]
    slice_matrix = None
    if slice_axis.is_identity_like(x.shape[0], out_shape[slice_axis.out_axis]):
        first, last = (int(np.rint(v)) for v in slice_axis.coords(start, stop)[[0, -1]])
        step = 1 if last >= first else -1
        x = x[first : None if last + step < 0 else last + step : step]
    else:
        slice_matrix = matrix(slice_axis)
        touched = np.flatnonzero((np.abs(slice_matrix) > BAND_TOL).any(axis=0))
        x, slice_matrix = x[touched[0] : touched[-1] + 1], slice_matrix[:, touched[0] : touched[-1] + 1]
    planes = resample_planes(x, matrix(row_axis), matrix(col_axis))  # (slices, cols out, rows out)
    if slice_matrix is not None:
        planes = apply_along_axis(planes, slice_matrix, 0)
    # axes of `planes` -> output (RAS) axis order
    axes_sampling = (slice_axis, col_axis, row_axis)
    return planes.transpose([next(a for a in range(3) if axes_sampling[a].out_axis == o) for o in range(3)])


def _resample_region_sheared(
    hu: np.ndarray, source_affine: np.ndarray, out_affine: np.ndarray, region: tuple[tuple[int, int], ...]
) -> np.ndarray:
    xform = np.linalg.solve(source_affine, out_affine)
    lo = np.array([a for a, _ in region], dtype=np.float64)
    hi = np.array([b - 1 for _, b in region], dtype=np.float64)
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
    src = xform[:3, :3] @ corners + xform[:3, 3:4]
    pad = SPLINE_PREPAD + 2
    s0 = np.clip(np.floor(src.min(1)).astype(int) - pad, 0, np.asarray(hu.shape))
    s1 = np.clip(np.ceil(src.max(1)).astype(int) + pad + 1, 0, np.asarray(hu.shape))
    if np.any(s1 <= s0):  # region entirely outside the source: "nearest" padding, use the whole array
        s0, s1 = np.zeros(3, int), np.asarray(hu.shape)
    block = np.asarray(hu[tuple(slice(a, b) for a, b in zip(s0, s1, strict=True))], dtype=np.float64)
    out = ndi.affine_transform(
        block,
        xform[:3, :3],
        offset=xform[:3, :3] @ lo + xform[:3, 3] - s0,
        output_shape=tuple(int(b - a) for a, b in region),
        order=SPLINE_ORDER,
        mode=SPLINE_PADDING_MODE,
        prefilter=True,
    )
    return out.astype(np.float32)


def resample_to_spacing(volume: Volume, spacing_mm: float = TARGET_SPACING_MM) -> Volume:
    """Resample to isotropic `spacing_mm` (mm) with cubic B-splines, as ``Spacingd(pixdim, mode=3)``.

    Semantics (MONAI 1.3 `Spacing` with an integer mode, i.e. the scipy backend):

    * output grid from `monai_output_grid` (rotation kept, shear dropped, origin on an input corner);
    * value at output voxel ``o`` = cubic B-spline (order 3, with prefilter) of the input evaluated at
      input index ``inv(A_in) @ A_out @ o``; outside the input the edge value is repeated
      (MONAI padding "border" -> scipy "nearest"); returned as float32;
    * skipped entirely when the output grid equals the input grid within MONAI's tolerance
      (``AFFINE_TOL``), e.g. a volume already on a 1 mm RAS grid -- the spline interpolates the
      samples exactly there, so this is not an approximation.

    Computed with `resample_region` over the whole grid (separable banded products, or scipy's 3-D
    spline for sheared grids); equals scipy's 3-D evaluation to float32 rounding (tested).

    Raises:
        VolumeTooLargeError: the 1 mm grid would exceed `MAX_RESAMPLED_VOXELS`.
    """
    out_shape, out_affine = monai_output_grid(volume.shape, volume.affine, spacing_mm)
    if _is_unchanged_grid(volume.shape, volume.affine, out_shape, out_affine):
        return volume
    _check_size(volume, out_shape, spacing_mm)
    full = tuple((0, n) for n in out_shape)
    hu = resample_region(volume.hu, volume.affine, out_shape, out_affine, full)
    return Volume(hu=np.ascontiguousarray(hu), affine=out_affine)


# ---- step 3: foreground crop -------------------------------------------------------------------


def foreground_bbox(
    hu: np.ndarray, threshold: float = FOREGROUND_THRESHOLD_HU
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, end)`` voxel indices (end exclusive) of the box holding every voxel > `threshold` HU.

    Same as MONAI `generate_spatial_bounding_box` with margin 0 (``foreground_start_coord`` /
    ``foreground_end_coord`` in the reference cache).

    Raises:
        NoForegroundError: no voxel is above `threshold`.
    """
    mask = hu > threshold
    start: list[int] = []
    end: list[int] = []
    for axis in range(hu.ndim):
        # Project onto one axis: is anything above threshold in this slice?
        other = tuple(a for a in range(hu.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            raise NoForegroundError(
                f"no voxel above {threshold} HU (max {float(np.max(hu)):.1f} HU): the volume contains no head"
            )
        start.append(int(hit[0]))
        end.append(int(hit[-1]) + 1)
    return tuple(start), tuple(end)


def crop_foreground(hu: np.ndarray, threshold: float = FOREGROUND_THRESHOLD_HU) -> np.ndarray:
    """Crop `hu` (HU, 3-D) to the bounding box of voxels > `threshold` HU, zero margin (``CropForegroundd``).

    The box includes everything denser than water: head, skull and the table/head holder if it is
    > 0 HU, as in training. Returns a contiguous copy.

    Raises:
        NoForegroundError: nothing above `threshold` (code ``no_foreground``).
    """
    start, end = foreground_bbox(hu, threshold)
    return np.ascontiguousarray(hu[tuple(slice(s, e) for s, e in zip(start, end, strict=True))])


@dataclass(frozen=True)
class SourcePlaneStats:
    """Extremes of the source volume's planes along its outermost axis in memory (HU).

    Everything `preprocess` needs to know about the source before resampling -- is it finite, where
    is the head -- from one read of the volume, one contiguous plane at a time.
    """

    outer_axis: int
    plane_max: np.ndarray  #: (n_planes,) max of each plane; NaN if the plane has a NaN
    plane_min: np.ndarray  #: (n_planes,) min of each plane (catches -inf)
    max_over_planes: np.ndarray  #: element-wise max of all planes, shape of one plane


def source_plane_stats(hu: np.ndarray) -> SourcePlaneStats:
    """`SourcePlaneStats` of `hu` (any strides) in one pass: each plane is read from memory once and
    reduced three ways while in cache (a moved-axis ``reshape`` would copy the whole volume)."""
    outer = int(np.argmax(np.abs(hu.strides)))
    planes = np.moveaxis(hu, outer, 0)
    max_over = planes[0].copy(order="K")  # same memory order as the planes: a streaming max
    plane_max = np.empty(planes.shape[0], dtype=np.float64)
    plane_min = np.empty(planes.shape[0], dtype=np.float64)
    for k, plane in enumerate(planes):
        plane_max[k] = plane.max()
        plane_min[k] = plane.min()
        np.maximum(max_over, plane, out=max_over)
    return SourcePlaneStats(outer, plane_max, plane_min, max_over)


def _check_finite(stats: SourcePlaneStats) -> None:
    """Raise `InvalidVolumeError` on NaN/inf voxels (NaN propagates through max and min)."""
    if not (np.all(np.isfinite(stats.plane_max)) and np.all(np.isfinite(stats.plane_min))):
        raise InvalidVolumeError("volume contains NaN or infinite HU values")


def source_foreground_box(
    stats: SourcePlaneStats, threshold: float = CROP_SEARCH_THRESHOLD_HU
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Box (start, end exclusive) of the *source* voxels > `threshold` HU; None if there are none.

    From `source_plane_stats`: the planes' maxima give the outermost axis, the element-wise max over
    planes gives the other two.
    """
    plane = stats.max_over_planes > threshold
    if not plane.any():
        return None
    outer = stats.outer_axis
    others = [a for a in range(3) if a != outer]
    hits = {
        outer: np.flatnonzero(stats.plane_max > threshold),
        others[0]: np.flatnonzero(plane.any(axis=1)),
        others[1]: np.flatnonzero(plane.any(axis=0)),
    }
    return tuple(int(hits[a][0]) for a in range(3)), tuple(int(hits[a][-1]) + 1 for a in range(3))


def candidate_region(
    source_box: tuple[tuple[int, ...], tuple[int, ...]],
    source_affine: np.ndarray,
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    margin_voxels: float = CROP_MARGIN_SOURCE_VOXELS,
) -> tuple[tuple[int, int], ...]:
    """The 1 mm grid box (per output axis ``(start, stop)``) whose samples can be > 0 HU.

    The source box widened by `margin_voxels` source voxels on each side, its 8 corners mapped into
    output indices, rounded outward and clipped to the grid.
    """
    lo = np.asarray(source_box[0], dtype=np.float64) - margin_voxels
    hi = np.asarray(source_box[1], dtype=np.float64) - 1.0 + margin_voxels
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
    to_out = np.linalg.solve(out_affine, source_affine)
    out = to_out[:3, :3] @ corners + to_out[:3, 3:4]
    start = np.clip(np.floor(out.min(1)).astype(int), 0, np.asarray(out_shape))
    stop = np.clip(np.ceil(out.max(1)).astype(int) + 1, 0, np.asarray(out_shape))
    if np.any(stop <= start):  # box entirely off the grid (odd geometry): search the whole grid
        return tuple((0, int(n)) for n in out_shape)
    return tuple((int(a), int(b)) for a, b in zip(start, stop, strict=True))


# ---- step 4: CT windows ------------------------------------------------------------------------


def window_channels(hu: np.ndarray, windows: tuple[tuple[float, float], ...] = WINDOWS_HU) -> np.ndarray:
    """Map HU to ``len(windows)`` channels in [0, 1]: channel c = clip((hu - (L - W/2)) / W, 0, 1).

    Same arithmetic as MONAI ``ScaleIntensityRange(a_min=L - W/2, a_max=L + W/2, b_min=0, b_max=1,
    clip=True)`` in float32. A 40 HU voxel gives (0.5, 0.3, 0.3).

    Returns:
        float32 array of shape ``(len(windows), *hu.shape)``.
    """
    hu32 = np.asarray(hu, dtype=np.float32)
    out = np.empty((len(windows), *hu32.shape), dtype=np.float32)
    for c, (level, width) in enumerate(windows):
        a_min = level - width / 2.0
        a_max = level + width / 2.0
        np.subtract(hu32, np.float32(a_min), out=out[c])
        np.divide(out[c], np.float32(a_max - a_min), out=out[c])
        _clip01(out[c])
    return out


def _clip01(x: np.ndarray) -> None:
    """In-place clip to [0, 1] (``np.clip`` is ~2x slower than the two ufuncs in numpy 1.26)."""
    np.maximum(x, np.float32(0.0), out=x)
    np.minimum(x, np.float32(1.0), out=x)


# ---- step 5: area resize -----------------------------------------------------------------------


def _area_windows(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """torch adaptive-pool windows ``[floor(i n/m), ceil((i+1) n/m))`` for ``i < m`` (start, end)."""
    i = np.arange(m, dtype=np.int64)
    return (i * n) // m, -((-(i + 1) * n) // m)


def area_matrix(n: int, m: int) -> np.ndarray:
    """``(m, n)`` float32 adaptive-average weights: row i is 1/len on ``[floor(i n/m), ceil((i+1) n/m))``.

    The exact window rule of torch's ``adaptive_avg_pool`` (and so of MONAI ``Resize(mode="area")``).
    """
    starts, ends = _area_windows(n, m)
    cols = np.arange(n, dtype=np.int64)
    inside = (cols[None, :] >= starts[:, None]) & (cols[None, :] < ends[:, None])
    return (inside / (ends - starts)[:, None]).astype(np.float32)


def _area_axis(x: np.ndarray, axis: int, m: int, *, mean: bool = True) -> np.ndarray:
    """Area-resize one axis of `x` to `m`: each output slab is the mean of its 1-3 input slabs (their
    sum if not `mean`, for a caller that divides later on a smaller array)."""
    n = x.shape[axis]
    starts, ends = _area_windows(n, m)
    out = np.empty((*x.shape[:axis], m, *x.shape[axis + 1 :]), dtype=np.float32)
    src, dst = np.moveaxis(x, axis, 0), np.moveaxis(out, axis, 0)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        # binary adds: ~2x faster than np.sum's reduction machinery for 2-3 slabs
        if e - s == 1:
            np.copyto(dst[i], src[s])
            continue
        np.add(src[s], src[s + 1], out=dst[i])
        for j in range(s + 2, e):
            np.add(dst[i], src[j], out=dst[i])
        if mean:
            np.divide(dst[i], np.float32(e - s), out=dst[i])
    return out


def _area_last_axis(x: np.ndarray, m: int) -> np.ndarray:
    """`_area_axis` for the innermost axis: a banded product with `area_matrix` (slab sums along the
    innermost axis would stride through all of memory once per output)."""
    return apply_along_axis(x, area_matrix(x.shape[-1], m).astype(np.float64), x.ndim - 1)


def area_resize(x: np.ndarray, size: tuple[int, int, int] = OUTPUT_SPATIAL) -> np.ndarray:
    """Resize the last three axes of `x` to `size` by area averaging (MONAI ``Resize(mode="area")``).

    Same as ``torch.nn.functional.adaptive_avg_pool3d`` (what ``interpolate(mode="area")`` calls):
    output voxel i along an axis of input length n and output length m averages inputs
    ``[floor(i*n/m), ceil((i+1)*n/m))``; works for down- and up-sampling. The 3-D box mean is the
    product of per-axis means, so it is done one axis at a time: the outer axes most-shrinking first,
    each output slab as the float32 mean of its few input slabs, then the innermost axis as a banded
    product with `area_matrix` (agreement with torch ~3e-7).

    Args:
        x: array ``(..., X, Y, Z)``, e.g. channel-first ``(C, X, Y, Z)``; any strides.
        size: output ``(X, Y, Z)``.

    Returns:
        float32 array ``(..., *size)``, C-contiguous.
    """
    if x.ndim < 3:
        raise ValueError(f"area_resize needs >= 3 dims, got {x.shape}")
    out = np.asarray(x, dtype=np.float32)
    first = x.ndim - 3
    last = x.ndim - 1
    # Slab sums for the outer axes (most-shrinking first); the innermost axis last, on the smallest
    # array, as a banded matrix product (slab sums along it would stride through memory m times).
    for axis in sorted(range(first, last), key=lambda a: size[a - first] / x.shape[a]):
        if out.shape[axis] != int(size[axis - first]):
            out = _area_axis(out, axis, int(size[axis - first]))
    m = int(size[-1])
    if out.shape[last] != m:
        out = _area_last_axis(out, m)
    return np.ascontiguousarray(out, dtype=np.float32)


def window_area_resize(
    hu: np.ndarray,
    size: tuple[int, int, int] = OUTPUT_SPATIAL,
    windows: tuple[tuple[float, float], ...] = WINDOWS_HU,
    dtype: type[np.floating] = np.float32,
) -> np.ndarray:
    """``area_resize(window_channels(hu), size)`` with one clip per voxel and channel, and no more.

    A window is ``(clip(hu, lo, hi) - lo) / W``: a clip, then an affine map. The clip is non-linear and
    must precede the area averaging; the affine map is linear and commutes with it, so it is applied
    to the 96^3 result instead of to every voxel, as are the divisions that turn area sums into
    means. The clip runs slab by slab along the outermost axis in memory (the next one if the
    outermost is upsampled), each input plane clipped once and summed into the 1-2 output slabs that
    cover it while it is in cache; then the middle axis as sums of whole rows, the innermost as one
    BLAS product with `area_matrix`. Equal to the two steps up to float32 rounding (< 1e-6, tested).

    Returns:
        ``(len(windows), *size)`` in `dtype` (computed in float32), C-contiguous.
    """
    if hu.ndim != 3:
        raise ValueError(f"window_area_resize needs a 3-D HU array, got {hu.shape}")
    # Work in memory order (outermost axis first; a transposed view): slabs of the outer axis are
    # contiguous planes, the middle axis reduces whole rows, the innermost is one BLAS product. If
    # the outer axis is upsampled (a thin slab of slices), the next one is the slab axis instead: the
    # slab sums would otherwise double the array that the later steps read.
    axes = sorted(range(3), key=lambda a: -abs(hu.strides[a]))
    if size[axes[0]] > hu.shape[axes[0]] and size[axes[1]] <= hu.shape[axes[1]]:
        axes = [axes[1], axes[0], axes[2]]
    src = np.asarray(hu, dtype=np.float32).transpose(axes)
    sizes = [int(size[a]) for a in axes]
    starts, ends = _area_windows(src.shape[0], sizes[0])
    bounds = [(np.float32(level - width / 2.0), np.float32(level + width / 2.0)) for level, width in windows]
    # 1. outer axis: clipped planes summed into their output slabs, (C, m0, n1, n2)
    partial = np.empty((len(windows), sizes[0], *src.shape[1:]), dtype=np.float32)
    # Clipped planes live in a small ring buffer: a plane shared by two windows is clipped once.
    ring_size = int((ends - starts).max()) + 1
    ring = np.empty((ring_size, *src.shape[1:]), dtype=np.float32)
    for c, (lo, hi) in enumerate(bounds):
        held = [-1] * ring_size  # input plane index held by each ring slot
        for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            for j in range(s, e):
                if held[j % ring_size] != j:
                    np.maximum(src[j], lo, out=ring[j % ring_size])
                    np.minimum(ring[j % ring_size], hi, out=ring[j % ring_size])
                    held[j % ring_size] = j
            if e - s == 1:
                np.copyto(partial[c, i], ring[s % ring_size])
                continue
            np.add(ring[s % ring_size], ring[(s + 1) % ring_size], out=partial[c, i])
            for j in range(s + 2, e):
                np.add(partial[c, i], ring[j % ring_size], out=partial[c, i])
    # 2. middle axis: sums of whole rows; 3. innermost axis: a banded product with `area_matrix`
    middle_starts, middle_ends = _area_windows(partial.shape[2], sizes[1])
    partial = _area_axis(partial, 2, sizes[1], mean=False)
    if partial.shape[3] != sizes[2]:
        partial = _area_last_axis(partial, sizes[2])
    # slab sums -> means along the outer and middle axes, then each channel's affine map (HU -> [0, 1])
    lengths = (ends - starts).astype(np.float32)[:, None, None] * (middle_ends - middle_starts).astype(
        np.float32
    )[None, :, None]
    for c, (lo, hi) in enumerate(bounds):
        np.divide(partial[c], lengths, out=partial[c])
        np.subtract(partial[c], lo, out=partial[c])
        np.divide(partial[c], np.float32(hi - lo), out=partial[c])
    # rounding can leave a mean a hair outside [0, 1]; the windowed voxels never are
    _clip01(partial)
    # memory order -> the caller's axis order, cast in the same copy (numpy's float16 cast is not
    # vectorised: one pass for both saves ~5 ms)
    return partial.transpose([0, *(1 + axes.index(a) for a in range(3))]).astype(dtype, order="C")


# ---- the whole pipeline ------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessInfo:
    """What happened to a volume on its way to the model input (for logs / response metadata).

    `crop_start` / `crop_end` are indices on the full 1 mm grid of shape `resampled_shape` (what
    MONAI stores as ``foreground_start_coord`` / ``foreground_end_coord``); `computed_shape` is the
    part of that grid that was actually resampled.
    """

    input_shape: tuple[int, int, int]
    input_spacing_mm: tuple[float, float, float]
    input_axcodes: tuple[str, str, str]
    resampled: bool
    resampled_shape: tuple[int, int, int]
    crop_start: tuple[int, ...]
    crop_end: tuple[int, ...]
    timings_s: dict[str, float] = field(default_factory=dict)
    computed_shape: tuple[int, ...] = ()

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in zip(self.crop_start, self.crop_end, strict=True))


def _crop_on_region(
    volume: Volume,
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    region: tuple[tuple[int, int], ...],
) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...], bool]:
    """Resample `region`, find the > 0 HU box in it; ``(crop view, start, end, box is exact)``.

    The box is exact (equals the full grid's) unless it touches a side of the region that is not a
    side of the grid: the foreground might continue beyond it.
    """
    iso = resample_region(volume.hu, volume.affine, out_shape, out_affine, region)
    start, end = foreground_bbox(iso, FOREGROUND_THRESHOLD_HU)
    exact = all(
        (s > 0 or a == 0) and (e < b - a or b == n)
        for s, e, (a, b), n in zip(start, end, region, out_shape, strict=True)
    )
    crop = iso[tuple(slice(s, e) for s, e in zip(start, end, strict=True))]
    full_start = tuple(s + a for s, (a, _) in zip(start, region, strict=True))
    full_end = tuple(e + a for e, (a, _) in zip(end, region, strict=True))
    return crop, full_start, full_end, exact


def preprocess_with_info(volume: Volume) -> tuple[np.ndarray, PreprocessInfo]:
    """`preprocess`, also returning a `PreprocessInfo` (shapes, crop box, per-step timings)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = source_plane_stats(volume.hu)
    _check_finite(stats)

    # Orientationd: only the RAS affine is needed; the voxels are read through the sampling map.
    shape_ras, affine_ras = ras_geometry(volume)
    out_shape, out_affine = monai_output_grid(shape_ras, affine_ras, TARGET_SPACING_MM)
    t1 = time.perf_counter()
    timings["reorient"] = t1 - t0

    if _is_unchanged_grid(shape_ras, affine_ras, out_shape, out_affine):
        # No resample (MONAI skips it): the RAS voxels are the source voxels, flipped/permuted.
        iso = reorient_to_ras(volume).hu
        t2 = time.perf_counter()
        start, end = foreground_bbox(iso, FOREGROUND_THRESHOLD_HU)
        cropped = iso[tuple(slice(s, e) for s, e in zip(start, end, strict=True))]
        computed: tuple[int, ...] = out_shape
        did_resample = False
    else:
        _check_size(volume, out_shape, TARGET_SPACING_MM)
        source_box = source_foreground_box(stats, CROP_SEARCH_THRESHOLD_HU)
        full = tuple((0, n) for n in out_shape)
        region = (
            full
            if source_box is None
            else candidate_region(source_box, volume.affine, out_shape, out_affine, CROP_MARGIN_SOURCE_VOXELS)
        )
        try:
            cropped, start, end, exact = _crop_on_region(volume, out_shape, out_affine, region)
        except NoForegroundError:
            if region == full:
                raise
            exact = False
        if not exact:  # the foreground may reach beyond the region: do the whole grid
            region = full
            cropped, start, end, _ = _crop_on_region(volume, out_shape, out_affine, region)
        computed = tuple(b - a for a, b in region)
        did_resample = True
        t2 = time.perf_counter()
    timings["resample"] = t2 - t1
    t3 = time.perf_counter()
    timings["crop"] = t3 - t2

    # windows + area resize fused (`window_area_resize`); timed as one step under "resize"
    timings["window"] = 0.0
    out = window_area_resize(cropped, OUTPUT_SPATIAL, dtype=OUTPUT_DTYPE)
    timings["resize"] = time.perf_counter() - t3

    info = PreprocessInfo(
        input_shape=volume.shape,
        input_spacing_mm=volume.spacing_mm,
        input_axcodes=volume.axcodes,
        resampled=did_resample,
        resampled_shape=out_shape,
        crop_start=start,
        crop_end=end,
        timings_s=timings,
        computed_shape=computed,
    )
    return out, info


def preprocess(volume: Volume) -> np.ndarray:
    """HU volume -> FM-HCT input: float16 ``(3, 96, 96, 96)`` in [0, 1], RAS array order.

    Training order (reference spec §2.1): RAS -> 1 mm cubic spline -> crop (> 0 HU) -> 3 windows ->
    area resize -> float16. The network side casts back to float32, as the training loader did.

    Raises:
        PreprocessingError: (``code``) ``no_foreground``, ``invalid_volume``, ``volume_too_large``.
    """
    out, _ = preprocess_with_info(volume)
    return out
