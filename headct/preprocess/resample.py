"""The 1 mm cubic-spline resample (``Spacingd(mode=3)`` values) of a box of the output grid.

`resample_region` computes the output voxels inside a region: for a separable mapping
(`source_sampling`: each output axis moves along one source axis, any flip, permutation or oblique
orthogonal grid) as banded matrix products along the source array's own axes
(`headct.preprocess.linear`), for a sheared one with scipy's 3-D `affine_transform`. Used by the
reference step `resample_to_spacing` (the whole grid) and by the production path (only the region
that can hold the head), with the two checks both make first (`_is_unchanged_grid`, `_check_size`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from headct.preprocess.errors import VolumeTooLargeError
from headct.preprocess.linear import apply_along_axis, resample_planes, spline_matrix
from headct.preprocess.spec import (
    AFFINE_TOL,
    BAND_TOL,
    MAX_RESAMPLED_VOXELS,
    SEPARABLE_MAX_SHIFT_VOXELS,
    SPLINE_ORDER,
    SPLINE_PADDING_MODE,
    SPLINE_PREPAD,
)
from headct.volume import Volume


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
