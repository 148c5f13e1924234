"""`headct.dicom_geometry`: slice positions + orientation -> slice order and RAS affine, and the
rules on gaps, irregular spacing, duplicates, orientation and gantry tilt."""

from __future__ import annotations

import math

import numpy as np
import pytest

from headct.dicom_geometry import (
    MAX_GANTRY_TILT_DEG,
    SPACING_ABS_TOL_MM,
    SPACING_REL_TOL,
    GeometryError,
    check_same_orientation,
    is_axial,
    stack_geometry,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows toward patient left, columns toward posterior (LPS)


def _positions(z: list[float], origin: tuple[float, float] = (-100.0, -120.0)) -> list[list[float]]:
    return [[origin[0], origin[1], value] for value in z]


def _code(call: object) -> str:
    with pytest.raises(GeometryError) as raised:
        call()  # type: ignore[operator]
    return raised.value.code


def test_axial_lps_series_gives_the_nibabel_affine() -> None:
    z = [10.0 + 5.0 * k for k in range(6)]
    geometry = stack_geometry(_positions(z), AXIAL, (0.5, 0.4))
    expected = np.array(
        [
            [-0.4, 0.0, 0.0, 100.0],  # axis 0: along the row cosine (+x LPS = left -> -x RAS), column spacing
            [0.0, -0.5, 0.0, 120.0],  # axis 1: along the column cosine, row spacing
            [0.0, 0.0, 5.0, 10.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(geometry.affine, expected, atol=1e-12)
    assert geometry.order == tuple(range(6))
    assert geometry.slice_step_mm == pytest.approx(5.0)
    assert geometry.tilt_deg == 0.0


def test_slices_are_sorted_along_the_normal_whatever_the_file_order() -> None:
    z = [30.0, 10.0, 25.0, 15.0, 20.0]
    geometry = stack_geometry(_positions(z), AXIAL, (1.0, 1.0))
    assert [z[i] for i in geometry.order] == [10.0, 15.0, 20.0, 25.0, 30.0]
    assert geometry.affine[2, 3] == pytest.approx(10.0)


def test_sorting_follows_the_normal_not_z() -> None:
    # Coronal slices: the normal is anterior-posterior; positions differ in y only.
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    positions = [[0.0, y, 50.0] for y in (4.0, 0.0, 2.0, 6.0, 8.0)]
    geometry = stack_geometry(positions, coronal, (1.0, 1.0))
    normal_y = np.cross(coronal[:3], coronal[3:])[1]
    steps = np.diff([positions[i][1] * normal_y for i in geometry.order])
    assert np.all(steps > 0)
    assert not is_axial(coronal) and is_axial(AXIAL)


def test_small_jitter_within_tolerance_is_accepted() -> None:
    step = 5.0
    jitter = 0.8 * max(SPACING_REL_TOL * step, SPACING_ABS_TOL_MM)
    z = [k * step + (jitter if k % 2 else 0.0) for k in range(10)]
    geometry = stack_geometry(_positions(z), AXIAL, (1.0, 1.0))
    assert geometry.max_deviation_mm <= jitter + 1e-9


def test_missing_slice_is_refused_with_the_count() -> None:
    z = [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 9.0, 10.0]  # slices 4, 7 and 8 missing
    with pytest.raises(GeometryError) as raised:
        stack_geometry(_positions(z), AXIAL, (1.0, 1.0))
    assert raised.value.code == "missing_slices"
    assert raised.value.observed["missing_slices"] == 3
    assert raised.value.field == "ImagePositionPatient"


def test_irregular_spacing_is_refused() -> None:
    z = [0.0, 5.0, 10.0, 16.0, 21.0, 26.0]
    with pytest.raises(GeometryError) as raised:
        stack_geometry(_positions(z), AXIAL, (1.0, 1.0))
    assert raised.value.code == "non_uniform_spacing"
    assert raised.value.observed == {"min_step_mm": 5.0, "max_step_mm": 6.0}


def test_spacing_just_beyond_tolerance_is_refused() -> None:
    step = 5.0
    off = 1.2 * SPACING_REL_TOL * step
    z = [0.0, 5.0, 10.0 + off, 15.0, 20.0]
    assert _code(lambda: stack_geometry(_positions(z), AXIAL, (1.0, 1.0))) == "non_uniform_spacing"


def test_duplicate_positions_mean_a_mixed_series() -> None:
    z = [0.0, 5.0, 5.0, 10.0, 15.0]
    assert _code(lambda: stack_geometry(_positions(z), AXIAL, (1.0, 1.0))) == "mixed_series"


def test_one_slice_is_too_few() -> None:
    assert _code(lambda: stack_geometry(_positions([0.0]), AXIAL, (1.0, 1.0))) == "too_few_slices"


def test_gantry_tilt_keeps_the_exact_sheared_geometry() -> None:
    tilt = 15.0
    step = 5.0
    positions = [[-100.0, -120.0 + k * step * math.tan(math.radians(tilt)), k * step] for k in range(8)]
    geometry = stack_geometry(positions, AXIAL, (0.5, 0.5))
    assert geometry.tilted and geometry.tilt_deg == pytest.approx(tilt, abs=1e-6)
    assert geometry.slice_step_mm == pytest.approx(step)
    # third column = the real step (LPS y offset -> RAS -y)
    np.testing.assert_allclose(geometry.affine[:3, 2], [0.0, -step * math.tan(math.radians(tilt)), step])
    # every slice's first voxel lands on its own ImagePositionPatient
    for k, position in enumerate(positions):
        ras = geometry.affine @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(ras[:3], [-position[0], -position[1], position[2]], atol=1e-9)


def test_negligible_tilt_is_snapped_to_orthogonal() -> None:
    positions = [[-100.0, -120.0 + k * 1e-4, k * 1.0] for k in range(8)]  # 0.006 deg
    geometry = stack_geometry(positions, AXIAL, (0.5, 0.5))
    assert geometry.tilt_deg == 0.0
    np.testing.assert_allclose(geometry.affine[:3, 2], [0.0, 0.0, 1.0])


def test_tilt_beyond_what_gantries_do_is_refused() -> None:
    tilt = MAX_GANTRY_TILT_DEG + 5.0
    positions = [[0.0, k * math.tan(math.radians(tilt)), float(k)] for k in range(8)]
    assert _code(lambda: stack_geometry(positions, AXIAL, (0.5, 0.5))) == "gantry_tilt"


def test_orientation_rules() -> None:
    assert _code(lambda: stack_geometry(_positions([0.0, 1.0]), (1, 0, 0, 0.5, 1, 0), (1, 1))) == (
        "inconsistent_orientation"
    )
    assert _code(lambda: check_same_orientation([AXIAL, AXIAL, (1, 0, 0, 0, 0.996, -0.087)])) == (
        "inconsistent_orientation"
    )
    np.testing.assert_allclose(check_same_orientation([AXIAL, (1, 0, 0, 0, 1, 1e-5)]), AXIAL)


def test_bad_pixel_spacing() -> None:
    assert _code(lambda: stack_geometry(_positions([0.0, 1.0]), AXIAL, (0.0, 1.0))) == "bad_spacing"
