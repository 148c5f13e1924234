"""Geometry of a stack of DICOM image planes -> one voxel-to-RAS affine (nibabel convention).

Pure numpy (no pydicom, no torch): the gateway's DICOM reader (`api.ingest.dicom`) feeds it the
per-slice ImagePositionPatient (IPP), ImageOrientationPatient (IOP) and PixelSpacing it read, and
gets back the slice order and the affine of the `headct.volume.Volume` it builds.

DICOM patient coordinates are LPS (+x toward the patient's Left, +y Posterior, +z Superior); a
`Volume` affine is RAS, so x and y change sign (`LPS_TO_RAS`). Array axis 0 runs along the image
rows (IOP[:3], one step = PixelSpacing[1], the *column* spacing), axis 1 down the columns (IOP[3:],
one step = PixelSpacing[0]) and axis 2 through the slices, sorted along the slice normal
``IOP[:3] x IOP[3:]``.

Rules (each refusal is a `GeometryError` with a machine-readable ``code``):

* **Orientation** (``inconsistent_orientation``): IOP must be two orthogonal unit vectors (within
  `ORTHONORMAL_TOL`), and every slice of a series must have the same IOP (each cosine within
  `ORIENTATION_TOL`, about 0.06 deg).
* **Slice spacing is computed from the positions, never from SpacingBetweenSlices or
  SliceThickness** (both are often absent, rounded or wrong). Slices are sorted by their distance
  along the normal; the stack must be a uniform grid: every slice must lie within
  ``tolerance = max(SPACING_REL_TOL x step, SPACING_ABS_TOL_MM)`` (5 % of the slice step, at least
  0.05 mm) of the straight, evenly spaced line from the first to the last slice. Otherwise the
  series is refused -- nothing is interpolated across gaps:

  - ``missing_slices`` when the gaps are whole multiples of the usual step (slices were dropped,
    e.g. an incomplete transfer), with the number missing and where;
  - ``non_uniform_spacing`` for any other irregularity (e.g. variable-pitch sequential scans),
    with the smallest and largest step;
  - ``mixed_series`` when two slices sit at the same position (two stacks in one series);
  - ``too_few_slices`` for fewer than 2 slices (no slice direction at all).

* **Gantry tilt** is measured from the positions: the angle between the slice-to-slice step
  vector and the slice normal. Below `TILT_SNAP_DEG` (0.05 deg: < 0.2 mm drift over 200 mm) the
  stack is taken as orthogonal. Up to `MAX_GANTRY_TILT_DEG` (30 deg, the mechanical range of CT
  gantries) the affine keeps the exact, sheared geometry (third column = the real step vector), and
  the caller warns ``gantry_tilt``: the tilt is **corrected by resampling**, in the one cubic-spline
  resample to 1 mm that preprocessing does anyway (its output grid is orthogonal, aligned with the
  image plane and its normal, like dcm2niix's tilt-corrected output), so no extra interpolation is
  added. Beyond 30 deg the stack is refused (``gantry_tilt``): no scanner tilts that far, so the
  positions are wrong or several stacks are mixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

#: Flip x and y: DICOM LPS patient coordinates <-> RAS world coordinates (its own inverse).
LPS_TO_RAS: Final = np.diag([-1.0, -1.0, 1.0, 1.0])

#: IOP row/column cosines: |length - 1| and |dot product| at most this.
ORTHONORMAL_TOL: Final = 1e-3
#: Largest difference of any IOP cosine between slices of one series (1e-3 ~ 0.06 deg).
ORIENTATION_TOL: Final = 1e-3
#: Slice positions may deviate from a uniform grid by this fraction of the slice step ...
SPACING_REL_TOL: Final = 0.05
#: ... or by this many mm, whichever is larger (positions are often written with 0.01-0.1 mm precision).
SPACING_ABS_TOL_MM: Final = 0.05
#: Two slices closer than this along the normal are at "the same position".
DUPLICATE_POSITION_MM: Final = 0.01
#: Tilts smaller than this are treated as none (the affine is made orthogonal).
TILT_SNAP_DEG: Final = 0.05
#: Larger tilts are refused.
MAX_GANTRY_TILT_DEG: Final = 30.0


class GeometryError(ValueError):
    """The slice geometry cannot be turned into one regular volume; fields mirror a problem+json."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        observed: Any | None = None,
        expected: Any | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.field = field
        self.observed = observed
        self.expected = expected


@dataclass(frozen=True)
class StackGeometry:
    """Where each slice goes and the affine of the assembled volume.

    Attributes:
        order: input slice indices sorted along the slice normal (array index k holds ``order[k]``).
        affine: 4x4 voxel index -> RAS mm (nibabel convention); sheared when the gantry was tilted.
        slice_step_mm: distance between neighbouring slices along the normal.
        tilt_deg: angle between the slice-to-slice step and the normal (0 when snapped).
        max_deviation_mm: largest distance of a slice from the uniform grid that the affine assumes.
    """

    order: tuple[int, ...]
    affine: np.ndarray
    slice_step_mm: float
    tilt_deg: float
    max_deviation_mm: float

    @property
    def tilted(self) -> bool:
        return self.tilt_deg > 0.0


def orientation_axes(iop: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine, column cosine and slice normal (LPS) of an ImageOrientationPatient value."""
    values = np.asarray(iop, dtype=np.float64)
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise GeometryError(
            "inconsistent_orientation",
            "ImageOrientationPatient must hold 6 finite numbers",
            field="ImageOrientationPatient",
            observed=[round(float(v), 6) for v in values.ravel()[:6]],
            expected="two orthogonal unit vectors (row, column cosines)",
        )
    row, col = values[:3], values[3:]
    if (
        abs(np.linalg.norm(row) - 1.0) > ORTHONORMAL_TOL
        or abs(np.linalg.norm(col) - 1.0) > ORTHONORMAL_TOL
        or abs(float(row @ col)) > ORTHONORMAL_TOL
    ):
        raise GeometryError(
            "inconsistent_orientation",
            "ImageOrientationPatient is not two orthogonal unit vectors",
            field="ImageOrientationPatient",
            observed=[round(float(v), 6) for v in values],
            expected=f"unit row and column cosines, orthogonal within {ORTHONORMAL_TOL}",
        )
    row = row / np.linalg.norm(row)
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def check_same_orientation(iops: Sequence[Sequence[float]]) -> np.ndarray:
    """The series' common IOP (the first one), or `GeometryError` ``inconsistent_orientation``."""
    values = np.asarray(iops, dtype=np.float64).reshape(-1, 6)
    spread = np.abs(values - values[0]).max(axis=0)
    if float(spread.max()) > ORIENTATION_TOL:
        distinct = np.unique(np.round(values, 3), axis=0)
        raise GeometryError(
            "inconsistent_orientation",
            f"the slices of this series have {len(distinct)} different orientations "
            "(ImageOrientationPatient differs between instances)",
            field="ImageOrientationPatient",
            observed=[[round(float(v), 4) for v in row] for row in distinct[:4]],
            expected=f"one orientation for all slices (cosines within {ORIENTATION_TOL})",
        )
    return values[0]


def tolerance_mm(step_mm: float) -> float:
    """How far a slice may sit from the uniform grid (see the module docstring)."""
    return max(SPACING_REL_TOL * step_mm, SPACING_ABS_TOL_MM)


def stack_geometry(
    positions: Sequence[Sequence[float]],
    iop: Sequence[float] | np.ndarray,
    pixel_spacing: Sequence[float],
) -> StackGeometry:
    """Sort the slices, check they form one regular grid, and build the RAS affine.

    Args:
        positions: ImagePositionPatient (LPS mm) of each slice, in any order.
        iop: the series' ImageOrientationPatient (row cosines, column cosines).
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` in mm.

    Raises:
        GeometryError: ``too_few_slices``, ``mixed_series``, ``missing_slices``,
            ``non_uniform_spacing``, ``gantry_tilt`` (beyond `MAX_GANTRY_TILT_DEG`),
            ``inconsistent_orientation``, ``bad_spacing``.
    """
    row, col, normal = orientation_axes(iop)
    spacing = _checked_pixel_spacing(pixel_spacing)
    points = _checked_positions(positions)
    n = len(points)
    distance = points @ normal
    order = np.argsort(distance, kind="stable")
    d = distance[order]
    p = points[order]
    steps = np.diff(d)
    _check_one_slice_per_position(steps, n)
    step_vector = (p[-1] - p[0]) / (n - 1)
    step_mm = float(step_vector @ normal)
    in_plane = step_vector - step_mm * normal
    tilt_deg = math.degrees(math.atan2(float(np.linalg.norm(in_plane)), step_mm))
    tol = tolerance_mm(step_mm)
    deviation = np.linalg.norm(p - (p[0] + np.arange(n)[:, None] * step_vector), axis=1)
    max_dev = float(deviation.max())
    if max_dev > tol:
        _raise_irregular(steps, d, tol)
    _check_gantry_tilt(tilt_deg)
    # A tilt this small is position rounding, not a tilt: keep the affine orthogonal.
    if tilt_deg < TILT_SNAP_DEG:
        step_vector = step_mm * normal
        tilt_deg = 0.0
    return StackGeometry(
        order=tuple(int(i) for i in order),
        affine=LPS_TO_RAS @ _voxel_to_lps(row, col, spacing, step_vector, p[0]),
        slice_step_mm=step_mm,
        tilt_deg=tilt_deg,
        max_deviation_mm=max_dev,
    )


def _checked_pixel_spacing(pixel_spacing: Sequence[float]) -> np.ndarray:
    """PixelSpacing as a float array, or `GeometryError` ``bad_spacing``: it scales the affine's columns."""
    spacing = np.asarray(pixel_spacing, dtype=np.float64)
    if spacing.shape != (2,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise GeometryError(
            "bad_spacing",
            "PixelSpacing must be two positive numbers",
            field="PixelSpacing",
            observed=[round(float(v), 6) for v in spacing.ravel()[:4]],
            expected="(row spacing, column spacing) > 0 mm",
        )
    return spacing


def _checked_positions(positions: Sequence[Sequence[float]]) -> np.ndarray:
    """The slice positions as an (n, 3) array with n >= 2 and every value finite.

    Two slices at least, because the slice direction and step are computed from the positions.
    """
    points = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = len(points)
    if n < 2:
        raise GeometryError(
            "too_few_slices",
            f"a volume needs several slices; this series has {n}",
            field="slices",
            observed=n,
            expected=">= 2 slices",
        )
    if not np.all(np.isfinite(points)):
        raise GeometryError(
            "missing_geometry",
            "ImagePositionPatient holds non-finite values",
            field="ImagePositionPatient",
        )
    return points


def _check_one_slice_per_position(steps: np.ndarray, n: int) -> None:
    """Refuse (``mixed_series``) a stack where two of the `n` sorted slices share a position."""
    if float(steps.min()) < DUPLICATE_POSITION_MM:
        duplicates = int(np.count_nonzero(steps < DUPLICATE_POSITION_MM))
        raise GeometryError(
            "mixed_series",
            f"{duplicates} slice position(s) occur more than once: the series holds several stacks "
            "(e.g. two reconstructions or repeated acquisitions)",
            field="ImagePositionPatient",
            observed=f"{duplicates} duplicate slice positions among {n} slices",
            expected="one slice per position",
        )


def _check_gantry_tilt(tilt_deg: float) -> None:
    """Refuse (``gantry_tilt``) a tilt no CT gantry can make: the positions must be wrong or mixed."""
    if tilt_deg > MAX_GANTRY_TILT_DEG:
        raise GeometryError(
            "gantry_tilt",
            f"the slices are offset like a gantry tilt of {tilt_deg:.1f} deg, beyond what CT gantries do; "
            "the positions are wrong or several stacks are mixed",
            field="ImagePositionPatient",
            observed=round(tilt_deg, 2),
            expected=f"<= {MAX_GANTRY_TILT_DEG} deg",
        )


def _voxel_to_lps(
    row: np.ndarray, col: np.ndarray, spacing: np.ndarray, step_vector: np.ndarray, origin: np.ndarray
) -> np.ndarray:
    """4x4 voxel index -> LPS mm affine with its origin at the first sorted slice.

    Axis 0 runs along the row cosine, one step = the *column* spacing (PixelSpacing[1]); axis 1 along the
    column cosine, one step = PixelSpacing[0]; axis 2 is the slice step (sheared when the gantry tilted).
    """
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = step_vector
    lps[:3, 3] = origin
    return lps


def _raise_irregular(steps: np.ndarray, distance: np.ndarray, tol: float) -> None:
    """Classify a stack that is not a uniform grid: missing slices, or irregular spacing."""
    usual = float(np.median(steps))
    multiples = np.rint(steps / usual)
    whole = np.abs(steps - multiples * usual) <= tolerance_mm(usual)
    if np.all(whole) and np.any(multiples >= 2):
        gaps = np.flatnonzero(multiples >= 2)
        missing = int((multiples[gaps] - 1).sum())
        where = [round(float(distance[i] - distance[0]), 2) for i in gaps[:10]]
        raise GeometryError(
            "missing_slices",
            f"{missing} slice(s) missing: the series has gaps of "
            f"{', '.join(f'{steps[i]:.2f}' for i in gaps[:10])} mm where the slice step is {usual:.3f} mm "
            f"(gaps start at {where} mm from the first slice)",
            field="ImagePositionPatient",
            observed={"missing_slices": missing, "gap_mm": [round(float(steps[i]), 3) for i in gaps[:10]]},
            expected=f"a slice every {usual:.3f} mm (positions within {tol:.3f} mm of a uniform grid)",
        )
    raise GeometryError(
        "non_uniform_spacing",
        f"the distance between slices varies from {steps.min():.3f} to {steps.max():.3f} mm "
        "(computed from ImagePositionPatient)",
        field="ImagePositionPatient",
        observed={"min_step_mm": round(float(steps.min()), 4), "max_step_mm": round(float(steps.max()), 4)},
        expected=f"uniform slice spacing (every slice within {tol:.3f} mm of a uniform grid)",
    )


def is_axial(iop: Sequence[float] | np.ndarray) -> bool:
    """True when the slice normal is closest to the patient's superior-inferior axis."""
    _, _, normal = orientation_axes(iop)
    return int(np.argmax(np.abs(normal))) == 2
