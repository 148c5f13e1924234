"""The reference steps: one function per MONAI training transform, with that transform's semantics.

Each step can be tested on its own against its MONAI transform (`tests/reference/monai_preprocess.py`,
`tests/fidelity/`); the table in `headct.preprocess` says which transform each one is. The
production path (`headct.preprocess.fused`) computes the same values without running them one after
the other; it reuses the geometry (`ras_geometry`, `monai_output_grid`) and `foreground_bbox`.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from headct.preprocess.errors import NoForegroundError
from headct.preprocess.linear import _area_axis, _area_last_axis
from headct.preprocess.resample import _check_size, _is_unchanged_grid, resample_region
from headct.preprocess.spec import (
    AFFINE_TOL,
    FOREGROUND_THRESHOLD_HU,
    OUTPUT_SPATIAL,
    TARGET_SPACING_MM,
    WINDOWS_HU,
)
from headct.volume import Volume

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
