"""The production path: `preprocess` (and `preprocess_with_info`), the training pipeline's values from
far less work.

`preprocess` does not run the reference steps (`headct.preprocess.steps`) one after the other on
whole arrays; it computes the same values (to float32 rounding: a few float16 ulps flip) with far
less work, measured against the MONAI chain on one core by `benchmarks/preprocess_bench.py`:

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
  kernels on CPUs it does not know (Sapphire Rapids), ~6x slower than scipy's build on one core.
  The ~3000 small products of the per-plane and per-slab loops call it through its pointer
  interface on strided views (`_fortran_sgemm`: no operand copies, no per-call argument checks),
  with the same sizes, or whole BLAS tiles of them, so the same bits;
* **one read of the source before resampling** (`source_plane_stats`): per-plane max/min and the
  element-wise max over planes give both the NaN/inf check and the head's box;
* **crop before resampling**: only 1 mm samples that can be > 0 HU are computed: the box of source
  voxels that are not air (> `CROP_SEARCH_THRESHOLD_HU`, because spline overshoot lifts samples next
  to -3024 HU padding by 100+ HU), widened by `CROP_MARGIN_SOURCE_VOXELS`, mapped onto the 1 mm
  grid (`candidate_region`). The exact > 0 HU box is then found inside that region; if it touches
  a side of the region that is not the grid's edge, the full grid is computed instead, so the crop
  always equals the one of the full resample;
* **windows + area resize** run on the crop only (`window_area_resize`), one output slab at a time
  while in cache: each voxel is clipped once per window and summed into its area slab, then the
  slab's middle axis (row sums) and innermost axis (a banded BLAS product) are reduced, and the
  windows' affine part and the means' divisions (linear, so they commute with averaging) applied
  to the slab's 96x96 result; no array larger than the output is written.
* **float32 throughout** (MONAI resamples in float64; the difference is ~1e-3 HU), no copy of the
  source volume.

The resample machinery is in `headct.preprocess.resample` (`source_sampling`, `resample_region`) and
`headct.preprocess.linear` (`spline_matrix`, `resample_planes`, `apply_along_axis`, `_sgemm`).

No torch here: this module runs in the gateway process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from headct.preprocess.errors import InvalidVolumeError, NoForegroundError
from headct.preprocess.linear import (
    BLAS_TILE_ROWS,
    RowBandProduct,
    WindowSums,
    _area_last_axis,
    _area_windows,
    area_matrix,
)
from headct.preprocess.resample import _check_size, _is_unchanged_grid, resample_region
from headct.preprocess.spec import (
    CROP_MARGIN_SOURCE_VOXELS,
    CROP_SEARCH_THRESHOLD_HU,
    FOREGROUND_THRESHOLD_HU,
    OUTPUT_DTYPE,
    OUTPUT_SPATIAL,
    TARGET_SPACING_MM,
    WINDOWS_HU,
)
from headct.preprocess.steps import _clip01, foreground_bbox, monai_output_grid, ras_geometry, reorient_to_ras
from headct.volume import Volume

# ---- one read of the source: finite check and the head's box -----------------------------------


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


def outer_axis(hu: np.ndarray) -> int:
    """The axis `source_plane_stats` reads planes along: the one with the largest stride in memory."""
    return int(np.argmax(np.abs(hu.strides)))


class PlaneStatsBuilder:
    """`SourcePlaneStats` gathered one plane at a time, in any order: a decoder that writes a volume
    plane by plane adds each plane while it is still in cache, and the volume is not read again."""

    def __init__(self, outer: int, n_planes: int) -> None:
        self.outer_axis = outer
        self._plane_max = np.empty(n_planes, dtype=np.float64)
        self._plane_min = np.empty(n_planes, dtype=np.float64)
        self._added = np.zeros(n_planes, dtype=bool)
        self._max_over: np.ndarray | None = None

    def add(self, k: int, plane: np.ndarray) -> None:
        """Plane `k` along the outer axis (``np.moveaxis(hu, outer, 0)[k]``), or the values it is made
        from in any dtype float32 holds exactly (a NIfTI's stored int16: half the bytes to reduce)."""
        self._plane_max[k] = plane.max()
        self._plane_min[k] = plane.min()
        self._added[k] = True
        if self._max_over is None:
            self._max_over = plane.copy(order="K")  # same memory order as the planes: a streaming max
        else:
            np.maximum(self._max_over, plane, out=self._max_over)

    def result(self) -> SourcePlaneStats | None:
        """The statistics, once every plane was added (None before)."""
        if self._max_over is None or not self._added.all():
            return None
        max_over = self._max_over
        if max_over.dtype != np.float32:
            max_over = max_over.astype(np.float32, order="K")
        return SourcePlaneStats(self.outer_axis, self._plane_max, self._plane_min, max_over)


def source_plane_stats(hu: np.ndarray) -> SourcePlaneStats:
    """`SourcePlaneStats` of `hu` (any strides) in one pass: each plane is read from memory once and
    reduced three ways while in cache (a moved-axis ``reshape`` would copy the whole volume)."""
    outer = outer_axis(hu)
    planes = np.moveaxis(hu, outer, 0)
    builder = PlaneStatsBuilder(outer, planes.shape[0])
    for k, plane in enumerate(planes):
        builder.add(k, plane)
    stats = builder.result()
    assert stats is not None  # (every plane was added)
    return stats


def stats_describe(stats: SourcePlaneStats | None, hu: np.ndarray) -> bool:
    """Whether `stats` (e.g. a decoder's) are `source_plane_stats(hu)`'s shape: same outer axis, plane
    count and plane shape."""
    if stats is None:
        return False
    outer = outer_axis(hu)
    plane_shape = tuple(n for axis, n in enumerate(hu.shape) if axis != outer)
    return (
        stats.outer_axis == outer
        and stats.plane_max.shape == (hu.shape[outer],)
        and stats.max_over_planes.shape == plane_shape
    )


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


# ---- windows + area resize, fused --------------------------------------------------------------


def _window_means(sums: np.ndarray, lengths: np.ndarray, lows: np.ndarray, widths: np.ndarray) -> None:
    """In place, per channel (axis 0): area sums -> means (divided by `lengths`), then the window's
    affine map ``(mean - lo) / W`` and a clip to [0, 1] (rounding can leave a mean a hair outside;
    the windowed voxels never are). `lows` and `widths` broadcast over the other axes."""
    np.divide(sums, lengths, out=sums)
    np.subtract(sums, lows, out=sums)
    np.divide(sums, widths, out=sums)
    _clip01(sums)


def window_area_resize(
    hu: np.ndarray,
    size: tuple[int, int, int] = OUTPUT_SPATIAL,
    windows: tuple[tuple[float, float], ...] = WINDOWS_HU,
    dtype: type[np.floating] = np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``area_resize(window_channels(hu), size)`` with one clip per voxel and channel, and no more.

    A window is ``(clip(hu, lo, hi) - lo) / W``: a clip, then an affine map. The clip is non-linear and
    must precede the area averaging; the affine map is linear and commutes with it, so it is applied
    to the 96^3 result instead of to every voxel, as are the divisions that turn area sums into
    means. Everything runs output slab by output slab along the outermost axis in memory (the next
    one if the outermost is upsampled), in cache: each input plane clipped once for all windows
    and summed into the 1-2 output slabs that cover it, then the slab's middle axis as sums of
    whole rows (`WindowSums`), its innermost as a banded BLAS product with `area_matrix`
    (`RowBandProduct`; after the loop, over all slabs at once, if the output size along it is not
    whole BLAS tiles), the means and the affine maps. Each output value takes the same float32
    operations in the same order whatever the slab loop (sums in index order: outer, middle, inner
    axis). Equal to the two steps up to float32 rounding (< 1e-6, tested).

    Returns:
        ``(len(windows), *size)`` in `dtype` (computed in float32), C-contiguous: `out` when given
        (that shape and dtype; e.g. the shared memory the result leaves a worker through), written
        by the same cast.
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
    n_windows, (n1, n2) = len(windows), src.shape[1:]
    starts, ends = _area_windows(src.shape[0], sizes[0])
    middle_starts, middle_ends = _area_windows(n1, sizes[1])
    bounds = [(np.float32(level - width / 2.0), np.float32(level + width / 2.0)) for level, width in windows]
    # each channel's clip bounds and window width, broadcast over a plane
    lows = np.array([lo for lo, _ in bounds], dtype=np.float32)[:, None, None]
    highs = np.array([hi for _, hi in bounds], dtype=np.float32)[:, None, None]
    widths = np.array([hi - lo for lo, hi in bounds], dtype=np.float32)[:, None, None]
    # area sum -> mean divisors: outer x middle window lengths, (m0, m1, 1)
    lengths = (ends - starts).astype(np.float32)[:, None, None] * (middle_ends - middle_starts).astype(
        np.float32
    )[None, :, None]
    # Clipped planes live in a small ring buffer: a plane shared by two output slabs is clipped once.
    ring_size = int((ends - starts).max()) + 1
    ring = np.empty((ring_size, n_windows, n1, n2), dtype=np.float32)
    held = [-1] * ring_size  # input plane index held by each ring slot
    slab = np.empty((n_windows, n1, n2), dtype=np.float32)  # one output slab's outer-axis sums
    middle_sums = WindowSums(n1, sizes[1])
    # The innermost axis slab by slab (in cache) if the banded product equals the one over all slabs
    # at once bit for bit (whole BLAS tiles: the 96 outputs of the model input), else at the end.
    inner = None
    if n2 != sizes[2] and sizes[2] % BLAS_TILE_ROWS == 0:
        inner = RowBandProduct(area_matrix(n2, sizes[2]).astype(np.float64))
    per_slab = inner is not None or n2 == sizes[2]
    middle = np.empty((n_windows, sizes[1], n2), dtype=np.float32)
    # results slab-major, (m0, C, m1, m2) (or n2 if the innermost axis is left for the end)
    sums = np.empty((sizes[0], n_windows, sizes[1], sizes[2] if per_slab else n2), dtype=np.float32)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        for j in range(s, e):
            if held[j % ring_size] != j:  # all channels' clips of plane j
                np.maximum(src[j], lows, out=ring[j % ring_size])
                np.minimum(ring[j % ring_size], highs, out=ring[j % ring_size])
                held[j % ring_size] = j
        # 1. outer axis: the slab's clipped planes summed, left to right
        if e - s == 1:
            np.copyto(slab, ring[s % ring_size])
        else:
            np.add(ring[s % ring_size], ring[(s + 1) % ring_size], out=slab)
            for j in range(s + 2, e):
                np.add(slab, ring[j % ring_size], out=slab)
        # 2. middle axis: sums of whole rows; 3. innermost axis: a banded product with `area_matrix`
        if inner is None:
            middle_sums(slab, sums[i])
        else:
            middle_sums(slab, middle)
            inner(middle.reshape(-1, n2), sums[i].reshape(-1, sizes[2]))
        if per_slab:  # 4. while in cache: means and windows' affine maps
            _window_means(sums[i], lengths[i], lows, widths)
    partial = sums.transpose(1, 0, 2, 3)  # (C, m0, m1, m2 or n2)
    if not per_slab:
        partial = _area_last_axis(partial, sizes[2])
        _window_means(partial, lengths, lows[:, None], widths[:, None])
    # memory order -> the caller's axis order, cast in the same copy (numpy's float16 cast is not
    # vectorised: one pass for both)
    result = partial.transpose([0, *(1 + axes.index(a) for a in range(3))])
    if out is None:
        return result.astype(dtype, order="C")
    if out.shape != result.shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        expected = f"C-contiguous {np.dtype(dtype)} {result.shape}"
        raise ValueError(f"out must be {expected}, got {out.dtype} {out.shape}")
    np.copyto(out, result, casting="same_kind")
    return out


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
    #: The source volume's affine (voxel index -> RAS mm), row by row; None when not recorded.
    input_affine: tuple[tuple[float, ...], ...] | None = None
    #: The affine of the grid that was cropped (index -> RAS mm): the 1 mm grid of shape
    #: `resampled_shape`, or the RAS-reoriented source grid when nothing was resampled. With
    #: `input_affine` it maps model-input positions back to source voxels (`headct.explain`).
    grid_affine: tuple[tuple[float, ...], ...] | None = None

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


def preprocess_with_info(
    volume: Volume, stats: SourcePlaneStats | None = None, out: np.ndarray | None = None
) -> tuple[np.ndarray, PreprocessInfo]:
    """`preprocess`, also returning a `PreprocessInfo` (shapes, crop box, per-step timings)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = stats or source_plane_stats(volume.hu)
    _check_finite(stats)

    # Orientationd: only the RAS affine is needed; the voxels are read through the sampling map.
    shape_ras, affine_ras = ras_geometry(volume)
    out_shape, out_affine = monai_output_grid(shape_ras, affine_ras, TARGET_SPACING_MM)
    t1 = time.perf_counter()
    timings["plan"] = t1 - t0  # source statistics + the RAS and 1 mm grids (no voxel is moved)

    if _is_unchanged_grid(shape_ras, affine_ras, out_shape, out_affine):
        # No resample (MONAI skips it): the RAS voxels are the source voxels, flipped/permuted.
        grid_affine = affine_ras
        iso = reorient_to_ras(volume).hu
        start, end = foreground_bbox(iso, FOREGROUND_THRESHOLD_HU)
        cropped = iso[tuple(slice(s, e) for s, e in zip(start, end, strict=True))]
        computed: tuple[int, ...] = out_shape
        did_resample = False
        t2 = time.perf_counter()
    else:
        _check_size(volume, out_shape, TARGET_SPACING_MM)
        grid_affine = out_affine
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
    # Resample and crop are one step here (only the crop's region is resampled).
    timings["resample_crop"] = t2 - t1
    out = window_area_resize(cropped, OUTPUT_SPATIAL, dtype=OUTPUT_DTYPE, out=out)
    timings["window_resize"] = time.perf_counter() - t2

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
        input_affine=_affine_tuple(volume.affine),
        grid_affine=_affine_tuple(grid_affine),
    )
    return out, info


def _affine_tuple(affine: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """A 4x4 affine as nested tuples of floats (hashable, comparable: `PreprocessInfo` is frozen)."""
    return tuple(tuple(float(v) for v in row) for row in np.asarray(affine, dtype=np.float64))


def preprocess(
    volume: Volume, stats: SourcePlaneStats | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """HU volume -> FM-HCT input: float16 ``(3, 96, 96, 96)`` in [0, 1], RAS array order.

    Training order (reference spec §2.1): RAS -> 1 mm cubic spline -> crop (> 0 HU) -> 3 windows ->
    area resize -> float16. The network side casts back to float32, as the training loader did.
    `stats` are ``source_plane_stats(volume.hu)`` when the caller has them already (validation reads
    them too: one read of the volume for both); computed here otherwise. With `out` (float16
    ``(3, 96, 96, 96)``, C-contiguous) the input is written there and `out` returned.

    Raises:
        PreprocessingError: (``code``) ``no_foreground``, ``invalid_volume``, ``volume_too_large``.
    """
    image, _ = preprocess_with_info(volume, stats, out)
    return image
