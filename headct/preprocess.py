"""Production preprocessing: reproduces the FM-HCT training pipeline (reference spec §2.1) without
torch or MONAI.

The cached training pipeline of the reference code is, with MONAI dictionary transforms::

    LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") -> Spacingd(1 mm, mode=3)
    -> CropForegroundd(value > 0, margin 0) -> 3 CT windows -> Resized(96^3, "area") -> float16

Each step below is one function with MONAI-transform semantics, so a served scan gets the tensor the
fine-tuned heads were trained on:

=========================  =====================================================================
`reorient_to_ras`           Orientationd(axcodes="RAS"): flips/permutes axes, no interpolation
`resample_to_spacing`       Spacingd(pixdim=1 mm, mode=3, padding "border"): cubic B-spline,
                            scipy backend, MONAI output grid (`monai_output_grid`)
`crop_foreground`           CropForegroundd: bounding box of voxels > 0 HU, zero margin
`window_channels`           3 windows (L, W) -> [0, 1], clipped, stacked channel-first
`area_resize`               Resized(96^3, mode="area") == torch adaptive_avg_pool3d
`preprocess`                all of the above, then float16 (CastToTyped)
=========================  =====================================================================

Errors are `PreprocessingError` subclasses carrying a machine-readable `code`; the gateway maps them
to HTTP 422. In particular a volume with nothing denser than water raises `NoForegroundError`
instead of producing a tensor (the reference dataset silently returned zeros; a scan with no head
must never get findings).

Crop-before-resample was considered and rejected: the cubic-spline prefilter is a recursive (IIR)
filter over each whole axis, the "border" padding depends on where the array ends, and spline
overshoot can lift sub-zero voxels next to dense bone above 0 HU, so resampling a cropped volume is
not exactly the resampling of the full one. Instead the resample itself is made cheap: for the
usual non-sheared grid it runs as three 1-D spline passes, which is the same interpolant as
MONAI's 3-D ``map_coordinates`` call (tensor-product B-splines are separable) at roughly 1/5 of
the cost (see `resample_to_spacing`).

No torch here: this module runs in the gateway process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

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


def reorient_to_ras(volume: Volume) -> Volume:
    """Flip/permute array axes so they run toward patient Right, Anterior, Superior (``Orientationd``).

    Uses nibabel's closest-axis orientation (`io_orientation`), exactly what MONAI does, so an
    oblique scan keeps its obliquity in the affine; only whole-axis flips and transposes are applied
    to the voxels, hence no value changes. The returned affine still maps the new indices to the
    same world points.
    """
    start = nib.orientations.io_orientation(volume.affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(start, target)
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
    ``(0, 0, 0)``). So the new grid starts exactly on an input voxel centre and covers the input
    from first to last voxel centre (the last output voxel may sit up to half a voxel beyond it,
    where "border" padding applies).

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
    k = 0
    for i in range(corners.shape[1]):
        # the first corner that no other corner undercuts along any output axis (MONAI's rtol 1e-3)
        min_corner = np.min(mat @ corners_world[:3] - mat @ corners_world[:3, i : i + 1], axis=1)
        if np.allclose(min_corner, 0.0, rtol=AFFINE_TOL):
            k = i
            break
    new_affine[:3, 3] = corners_world[:3, k]
    return (int(out_shape[0]), int(out_shape[1]), int(out_shape[2])), new_affine


def _prefilter_1d(x: np.ndarray, axis: int, npad: int) -> np.ndarray:
    """Edge-pad `axis` by `npad` and apply the cubic B-spline prefilter along it (float64).

    This is scipy's own recipe for mode="nearest" (`_prepad_for_spline_filter`: 12 edge voxels, then
    `spline_filter` with the same mode), restricted to one axis.
    """
    pad = [(0, 0)] * x.ndim
    pad[axis] = (npad, npad)
    padded = np.pad(x, pad, mode="edge")
    return ndi.spline_filter1d(
        padded, order=SPLINE_ORDER, axis=axis, output=np.float64, mode=SPLINE_PADDING_MODE
    )


def _cubic_weights(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cubic B-spline weights for taps ``floor(x)-1 .. floor(x)+2`` at fractional offset ``t`` in [0, 1)."""
    s = 1.0 - t
    t2 = t * t
    w0 = s * s * s / 6.0
    w1 = (3.0 * t2 * t - 6.0 * t2 + 4.0) / 6.0
    w3 = t2 * t / 6.0
    w2 = 1.0 - w0 - w1 - w3
    return w0, w1, w2, w3


def _spline_pass(x: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Evaluate the cubic spline of `x` along `axis` at source positions `coords` (voxel units).

    Other axes are untouched (the spline interpolates exactly at integer positions, so skipping them
    is the same as evaluating there).
    """
    npad = 12  # scipy's pre-padding for mode="nearest"; the IIR tail beyond 12 voxels is < 1e-7.
    coef = _prefilter_1d(x, axis, npad)
    n_padded = coef.shape[axis]
    pos = coords + npad
    base = np.floor(pos)
    weights = _cubic_weights(pos - base)
    base = base.astype(np.intp) - 1
    shape = [1] * x.ndim
    shape[axis] = coords.size
    out = np.zeros([coords.size if a == axis else n for a, n in enumerate(x.shape)], dtype=np.float64)
    for tap, w in enumerate(weights):
        # positions stay inside the padded array for coords in [-npad+1, n+npad-3]; clip = "nearest".
        idx = np.clip(base + tap, 0, n_padded - 1)
        out += np.take(coef, idx, axis=axis) * w.reshape(shape)
    return out


def resample_to_spacing(volume: Volume, spacing_mm: float = TARGET_SPACING_MM) -> Volume:
    """Resample to isotropic `spacing_mm` (mm) with cubic B-splines, as ``Spacingd(pixdim, mode=3)``.

    Semantics (MONAI 1.3 `Spacing` with an integer mode, i.e. the scipy backend):

    * output grid from `monai_output_grid` (rotation kept, shear dropped, origin on an input corner);
    * value at output voxel ``o`` = cubic B-spline (order 3, with prefilter) of the input evaluated at
      input index ``inv(A_in) @ A_out @ o``; outside the input the edge value is repeated
      (MONAI padding "border" -> scipy "nearest"); computed in float64 (Spacing's default dtype),
      returned as float32;
    * skipped entirely when the output grid equals the input grid within MONAI's tolerance
      (``AFFINE_TOL``), e.g. a volume already on a 1 mm RAS grid -- the spline interpolates the
      samples exactly there, so this is not an approximation.

    When ``inv(A_in) @ A_out`` is diagonal (any non-sheared grid, oblique or not; off-diagonal rounding
    noise moving samples by < `SEPARABLE_MAX_SHIFT_VOXELS` is ignored) the 3-D spline is
    computed as three 1-D passes: the tensor-product B-spline, its prefilter and the edge padding are
    all separable, so this equals scipy's 3-D evaluation up to float64 rounding (tested), at a
    fraction of the cost. Sheared grids (uncorrected gantry tilt) use scipy's 3-D
    `affine_transform`, the same kernel as MONAI's ``map_coordinates``.

    Raises:
        VolumeTooLargeError: the 1 mm grid would exceed `MAX_RESAMPLED_VOXELS`.
    """
    out_shape, out_affine = monai_output_grid(volume.shape, volume.affine, spacing_mm)
    xform = np.linalg.solve(volume.affine, out_affine)  # output index -> input index
    same_shape = out_shape == volume.shape
    if same_shape and (
        np.allclose(volume.affine, out_affine, atol=AFFINE_TOL)
        or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)
    ):
        return volume
    n_out = int(np.prod(out_shape, dtype=np.int64))
    if n_out > MAX_RESAMPLED_VOXELS:
        raise VolumeTooLargeError(
            f"resampling {volume.shape} at {np.round(volume.spacing_mm, 3)} mm to {spacing_mm} mm gives "
            f"{out_shape} ({n_out} voxels > {MAX_RESAMPLED_VOXELS}); not a head CT?"
        )
    src = volume.hu.astype(np.float64)
    linear = xform[:3, :3]
    # Largest sampling-position change (input voxels) from ignoring the off-diagonal terms. Oblique
    # grids give exact zeros in theory but ~1e-8 from float32 NIfTI affines: well below any effect.
    off_diagonal = np.abs(linear - np.diag(np.diag(linear)))
    max_shift = float((off_diagonal @ (np.asarray(out_shape, dtype=np.float64) - 1.0)).max())
    if max_shift < SEPARABLE_MAX_SHIFT_VOXELS:
        out = src
        # Shrinking axes first keeps the intermediate arrays small.
        order = sorted(range(3), key=lambda a: out_shape[a] / volume.shape[a])
        for axis in order:
            scale, shift = xform[axis, axis], xform[axis, 3]
            n_axis = out_shape[axis]
            if n_axis == volume.shape[axis] and abs(scale - 1.0) * n_axis < 1e-9 and abs(shift) < 1e-9:
                # samples land on the input voxels, where the spline reproduces them (up to 1e-13)
                continue
            coords = scale * np.arange(n_axis, dtype=np.float64) + shift
            out = _spline_pass(out, axis, coords)
    else:
        out = ndi.affine_transform(
            src,
            linear,
            offset=xform[:3, 3],
            output_shape=out_shape,
            order=SPLINE_ORDER,
            mode=SPLINE_PADDING_MODE,
            prefilter=True,
        )
    return Volume(hu=out.astype(np.float32), affine=out_affine)


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
        np.clip(out[c], 0.0, 1.0, out=out[c])
    return out


# ---- step 5: area resize -----------------------------------------------------------------------


def area_matrix(n: int, m: int) -> np.ndarray:
    """``(m, n)`` float32 adaptive-average weights: row i is 1/len on ``[floor(i n/m), ceil((i+1) n/m))``.

    The exact window rule of torch's ``adaptive_avg_pool`` (and so of MONAI ``Resize(mode="area")``).
    """
    i = np.arange(m, dtype=np.int64)
    starts = (i * n) // m
    ends = -((-(i + 1) * n) // m)  # ceil((i + 1) * n / m) in integer arithmetic
    cols = np.arange(n, dtype=np.int64)
    inside = (cols[None, :] >= starts[:, None]) & (cols[None, :] < ends[:, None])
    return (inside / (ends - starts)[:, None]).astype(np.float32)


def area_resize(x: np.ndarray, size: tuple[int, int, int] = OUTPUT_SPATIAL) -> np.ndarray:
    """Resize the last three axes of `x` to `size` by area averaging (MONAI ``Resize(mode="area")``).

    Same as ``torch.nn.functional.adaptive_avg_pool3d`` (what ``interpolate(mode="area")`` calls):
    output voxel i along an axis of input length n and output length m averages inputs
    ``[floor(i*n/m), ceil((i+1)*n/m))``; works for down- and up-sampling. The 3-D box mean is the
    product of per-axis means, so it is done one axis at a time as a float32 matrix product with
    `area_matrix` (BLAS; float32 accumulation like torch's CPU kernel, agreement ~3e-7).

    Args:
        x: array ``(..., X, Y, Z)``, e.g. channel-first ``(C, X, Y, Z)``.
        size: output ``(X, Y, Z)``.

    Returns:
        float32 array ``(..., *size)``, C-contiguous.
    """
    if x.ndim < 3:
        raise ValueError(f"area_resize needs >= 3 dims, got {x.shape}")
    out = np.asarray(x, dtype=np.float32)
    first = x.ndim - 3
    # Shrink the most-reduced axis first so the later products touch fewer voxels.
    for axis in sorted(range(first, x.ndim), key=lambda a: size[a - first] / x.shape[a]):
        n, m = out.shape[axis], int(size[axis - first])
        if n == m:
            continue
        out = np.moveaxis(np.tensordot(area_matrix(n, m), out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


# ---- the whole pipeline ------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessInfo:
    """What happened to a volume on its way to the model input (for logs / response metadata)."""

    input_shape: tuple[int, int, int]
    input_spacing_mm: tuple[float, float, float]
    input_axcodes: tuple[str, str, str]
    resampled: bool
    resampled_shape: tuple[int, int, int]
    crop_start: tuple[int, ...]
    crop_end: tuple[int, ...]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in zip(self.crop_start, self.crop_end, strict=True))


def preprocess_with_info(volume: Volume) -> tuple[np.ndarray, PreprocessInfo]:
    """`preprocess`, also returning a `PreprocessInfo` (shapes, crop box, per-step timings)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not np.all(np.isfinite(volume.hu)):
        raise InvalidVolumeError("volume contains NaN or infinite HU values")

    ras = reorient_to_ras(volume)
    t1 = time.perf_counter()
    timings["reorient"] = t1 - t0

    iso = resample_to_spacing(ras, TARGET_SPACING_MM)
    t2 = time.perf_counter()
    timings["resample"] = t2 - t1

    start, end = foreground_bbox(iso.hu, FOREGROUND_THRESHOLD_HU)
    cropped = iso.hu[tuple(slice(s, e) for s, e in zip(start, end, strict=True))]
    t3 = time.perf_counter()
    timings["crop"] = t3 - t2

    windowed = window_channels(cropped)
    t4 = time.perf_counter()
    timings["window"] = t4 - t3

    resized = area_resize(windowed, OUTPUT_SPATIAL)
    out = resized.astype(OUTPUT_DTYPE)
    timings["resize"] = time.perf_counter() - t4

    info = PreprocessInfo(
        input_shape=volume.shape,
        input_spacing_mm=volume.spacing_mm,
        input_axcodes=volume.axcodes,
        resampled=iso is not ras,
        resampled_shape=iso.shape,
        crop_start=start,
        crop_end=end,
        timings_s=timings,
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
