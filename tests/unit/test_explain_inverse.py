"""headct.explain.inverse: maps over the model input land back on the anatomy they came from.

A Gaussian blob is placed at a known world position in an analytic head, sampled on several source
grids (RAS / LPS / permuted axes, 1 mm and 0.45 x 0.45 x 5 mm, rotated, gantry-tilted). Where the
blob lands in the 96^3 model input is read off the *actual* preprocessed input (the argmax of the
difference with and without the blob); a map hot there must come back, in the source grid, on the blob.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from headct.explain import inverse, map_to_source, source_to_map_affine
from headct.preprocess import PreprocessInfo, monai_output_grid, preprocess_with_info, ras_geometry
from headct.volume import Volume

BLOB_MM = np.array([25.0, -30.0, 20.0])  # RAS: right, posterior, superior of the head's centre
BLOB_SIGMA_MM = 5.0
FOV_MM = np.array([200.0, 200.0, 160.0])

_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def _affine(axcodes: str, spacing: tuple[float, float, float], rotation_deg: float, tilt_deg: float) -> tuple:
    """Affine and shape of a grid covering `FOV_MM` (centred on 0) with array axes along `axcodes`."""
    linear = np.zeros((3, 3))
    extent = np.zeros(3)
    for axis, code in enumerate(axcodes):
        world_axis, sign = _CODES[code]
        linear[world_axis, axis] = sign * spacing[axis]
        extent[axis] = FOV_MM[world_axis]
    shape = tuple(round(float(e / s)) for e, s in zip(extent, spacing, strict=True))
    linear = Rotation.from_euler("z", rotation_deg, degrees=True).as_matrix() @ linear
    slice_axis = next(a for a, c in enumerate(axcodes) if c in "SI")
    row_axis = next(a for a, c in enumerate(axcodes) if c in "AP")
    if tilt_deg:  # gantry tilt: each slice shifted along the A-P image axis
        step = np.linalg.norm(linear[:, slice_axis])
        unit = linear[:, row_axis] / np.linalg.norm(linear[:, row_axis])
        linear[:, slice_axis] += unit * step * np.tan(np.radians(tilt_deg))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine, shape


def _head(affine: np.ndarray, shape: tuple[int, ...], blob: bool) -> Volume:
    """An analytic head (values depend on the world position only): air, a 1000 HU skull, 30 HU brain,
    and optionally a Gaussian blob (+45 HU at its centre) at `BLOB_MM`."""
    ijk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    x, y, z = (
        sum(np.float32(affine[w, a]) * ijk[a] for a in range(3)) + np.float32(affine[w, 3]) for w in range(3)
    )
    r = np.sqrt((x / 70.0) ** 2 + (y / 85.0) ** 2 + (z / 65.0) ** 2)
    hu = np.where(r < 1.0, np.float32(1000.0), np.float32(-1000.0))
    hu = np.where(r < 0.93, np.float32(30.0), hu)
    if blob:
        d2 = (x - BLOB_MM[0]) ** 2 + (y - BLOB_MM[1]) ** 2 + (z - BLOB_MM[2]) ** 2
        hu = hu + np.float32(45.0) * np.exp(-d2 / (2 * BLOB_SIGMA_MM**2)).astype(np.float32) * (r < 0.93)
    return Volume(hu=np.ascontiguousarray(hu, dtype=np.float32), affine=affine)


GEOMETRIES = {
    "RAS-1mm": ("RAS", (1.0, 1.0, 1.0), 0.0, 0.0),
    "LPS-0.45x0.45x5": ("LPS", (0.45, 0.45, 5.0), 0.0, 0.0),
    "LPS-0.45x0.45x1": ("LPS", (0.45, 0.45, 1.0), 0.0, 0.0),
    "PIR-1mm": ("PIR", (1.0, 1.0, 1.0), 0.0, 0.0),  # sagittal-like: every axis permuted and two flipped
    "LPS-rotated-0.8x0.8x2.5": ("LPS", (0.8, 0.8, 2.5), 12.0, 0.0),
    "LPS-tilted-0.5x0.5x2": ("LPS", (0.5, 0.5, 2.0), 0.0, 15.0),
}


@pytest.fixture(scope="module", params=list(GEOMETRIES), ids=list(GEOMETRIES))
def case(request: pytest.FixtureRequest) -> tuple[Volume, PreprocessInfo, tuple[int, int, int]]:
    """(source volume with the blob, its PreprocessInfo, where the blob peaks in the 96^3 input)."""
    affine, shape = _affine(*GEOMETRIES[request.param])
    with_blob, info = preprocess_with_info(_head(affine, shape, blob=True))
    without, info_without = preprocess_with_info(_head(affine, shape, blob=False))
    assert (info.crop_start, info.crop_end) == (info_without.crop_start, info_without.crop_end)
    blob_only = with_blob[0].astype(np.float32) - without[0].astype(np.float32)  # brain window
    peak = np.unravel_index(int(np.argmax(blob_only)), blob_only.shape)
    return _head(affine, shape, blob=True), info, (int(peak[0]), int(peak[1]), int(peak[2]))


def _world(volume: Volume, index: tuple[int, ...]) -> np.ndarray:
    return (volume.affine @ np.array([*index, 1.0]))[:3]


def _voxel_diagonal_mm(volume: Volume) -> float:
    return float(np.linalg.norm(volume.spacing_mm))


def test_hot_input_voxel_maps_back_onto_the_blob(case: tuple) -> None:
    volume, info, peak = case
    # a smooth spot (sd 1.5 input voxels) at the peak: 5 mm slices sample a 96^3 map every ~3.6 voxels
    d2 = sum(
        (np.arange(96.0) - p).reshape([-1 if a == i else 1 for i in range(3)]) ** 2
        for a, p in enumerate(peak)
    )
    grid_map = np.exp(-d2 / (2 * 1.5**2)).astype(np.float32)
    mapped = map_to_source(grid_map, info)
    assert mapped.shape == volume.shape and mapped.dtype == np.float32
    hottest = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
    distance = np.linalg.norm(_world(volume, hottest) - BLOB_MM)
    # the 96^3 voxel holding the peak (~2.1 mm) and the nearest source voxel to its centre
    input_voxel_mm = np.asarray(info.cropped_shape) / 96.0
    assert distance <= float(np.linalg.norm(input_voxel_mm)) + _voxel_diagonal_mm(volume) / 2 + 0.5


def test_hot_patch_cell_maps_back_onto_the_blob(case: tuple) -> None:
    volume, info, peak = case
    cell = tuple(p // 12 for p in peak)
    grid_map = np.zeros((8, 8, 8), np.float32)
    grid_map[cell] = 1.0
    mapped = map_to_source(grid_map, info)
    hottest = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
    # the maximum is the cell's centre: within half a cell (+ a source voxel) of the blob
    cell_mm = np.asarray(info.cropped_shape) / 8.0
    distance = np.linalg.norm(_world(volume, hottest) - BLOB_MM)
    assert distance <= float(np.linalg.norm(cell_mm / 2)) + _voxel_diagonal_mm(volume) / 2 + 0.5
    # and the blob's centre voxel is well inside the hot cell's footprint
    centre = np.linalg.solve(volume.affine, [*BLOB_MM, 1.0])[:3]
    assert mapped[tuple(np.round(centre).astype(int))] > 0.2
    assert mapped.max() == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("cells", [8, 96])
def test_index_coordinate_maps_round_trip(case: tuple, cells: int) -> None:
    """A map equal to its own cell index along one axis comes back as that coordinate of each source
    voxel, computed here independently from the geometry (clamped to the cells, 0 outside the crop)."""
    volume, info, _ = case
    shape_ras, affine_ras = ras_geometry(volume)
    if info.resampled:
        _, grid_affine = monai_output_grid(shape_ras, affine_ras)
    else:
        grid_affine = affine_ras
    # 200k random voxels and the 8 corners (the whole grid would be 31M voxels at 0.45 x 0.45 x 1 mm)
    rng = np.random.default_rng(0)
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in volume.shape], indexing="ij")).reshape(3, -1)
    sampled = np.stack([rng.integers(0, n, 200_000) for n in volume.shape])
    ijk = np.concatenate([corners, sampled], axis=1)
    grid = np.linalg.solve(grid_affine, volume.affine)
    g = grid[:3, :3] @ ijk.astype(np.float64) + grid[:3, 3:4]
    cropped = np.asarray(info.cropped_shape, dtype=np.float64)[:, None]
    r96 = (g - np.asarray(info.crop_start)[:, None] + 0.5) * 96.0 / cropped - 0.5
    m = (r96 + 0.5) * cells / 96.0 - 0.5
    inside = np.all((m >= -0.5 - 1e-6) & (m <= cells - 0.5 + 1e-6), axis=0)
    assert inside.mean() > 0.1
    for axis in range(3):
        grid_map = np.indices((cells,) * 3, dtype=np.float32)[axis]
        mapped = map_to_source(grid_map, info)[tuple(ijk)]
        expected = np.where(inside, np.clip(m[axis], 0.0, cells - 1.0), 0.0)
        np.testing.assert_allclose(mapped, expected, atol=2e-4 * cells)


def test_fast_paths_equal_affine_transform(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The separable path (straight grids) and the plane-by-plane one (gantry tilt) give the values of
    ``scipy.ndimage.affine_transform``; neither falls back to it."""
    volume, info, _ = case
    grid_map = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    reference = map_to_source(grid_map, info, separable=False)
    tilted = _name(info, volume) == "tilt"
    if tilted:
        with pytest.raises(ValueError, match="sheared"):
            map_to_source(grid_map, info, separable=True)

    def no_fallback(*_args: object) -> np.ndarray:
        raise AssertionError("fell back to affine_transform")

    monkeypatch.setattr(inverse, "_sample_affine", no_fallback)
    if tilted:
        monkeypatch.setattr(inverse, "_sample_separable", no_fallback)
    fast = map_to_source(grid_map, info)
    assert fast.flags.f_contiguous
    np.testing.assert_allclose(fast, reference, atol=1e-5)


def _name(info: PreprocessInfo, volume: Volume) -> str:
    """'tilt' for the sheared source grid (its first two axes are not orthogonal to the third)."""
    linear = volume.affine[:3, :3]
    return "tilt" if abs(linear[:, 2] @ linear[:, 1]) > 1e-6 else "straight"


def test_source_affine_argument_and_missing_geometry() -> None:
    affine, shape = _affine("LPS", (1.0, 1.0, 1.0), 0.0, 0.0)
    volume = _head(affine, shape, blob=False)
    _, info = preprocess_with_info(volume)
    grid_map = np.ones((8, 8, 8), np.float32)
    np.testing.assert_array_equal(
        map_to_source(grid_map, replace(info, input_affine=None), volume.affine),
        map_to_source(grid_map, info),
    )
    with pytest.raises(ValueError, match="source affine"):
        map_to_source(grid_map, replace(info, input_affine=None))
    with pytest.raises(ValueError, match="grid_affine"):
        source_to_map_affine(replace(info, grid_affine=None), (8, 8, 8))
    with pytest.raises(ValueError, match="3-D"):
        map_to_source(np.ones((8, 8)), info)
    # inside the crop box an all-ones map is 1; the air outside the head's box is 0
    mapped = map_to_source(grid_map, info)
    assert set(np.unique(mapped)) <= {0.0, 1.0} and mapped[tuple(np.array(shape) // 2)] == 1.0
    assert mapped[0, 0, 0] == 0.0
