"""Model-input maps back onto the caller's voxel grid: `map_to_source`.

A map over the model input -- FM-HCT's attention over its 8x8x8 patch grid (one cell = a 12^3 block
of the 96^3 input), or a map over the 96^3 input itself -- is in the preprocessed volume's frame:
RAS axis order, 1 mm grid, cropped to the head, area-resized per axis to 96. `preprocess_with_info`
records that geometry (`PreprocessInfo`), and the whole chain is affine, so a source voxel index
``v`` maps to a map coordinate ``m`` by one 4x4 matrix (`source_to_map_affine`):

    world      = A_src @ v                                   (the source Volume's affine)
    grid index = inv(A_grid) @ world                         (the RAS 1 mm grid that was cropped)
    crop index c = grid index - crop_start
    96 index   = (c + 0.5) * 96 / cropped - 0.5              (area resize: per-axis scaling)
    map coord  = (96 index + 0.5) * n / 96 - 0.5             (n = 8 cells, or 96)
               = (c + 0.5) * n / cropped - 0.5

where map coordinate ``i`` is the centre of cell ``i``. The map is sampled there trilinearly, with the
edge value repeated up to the edge of the crop box (``-0.5 <= m <= n - 0.5``) and 0 outside it (what
was cropped away never reached the model).

Sampling. Without gantry tilt the matrix's 3x3 part is a scaled permutation: the 1 mm grid keeps the
source's rotation (`monai_output_grid`), so each map axis depends on one source axis only and
trilinear interpolation factorises into three small (source length x n) weight matrices, applied as
two tiny contractions and one BLAS product that writes the output (`_sample_separable`; ~0.04 s for
512x512x200 from 8^3, one core). A gantry-tilted source (slices shifted along an in-plane axis) is
still separable plane by plane: each source slice samples one plane of the map, interpolated to its
position, with two small weight matrices (`_sample_planes`). Any other geometry goes through
``scipy.ndimage.affine_transform`` (order 1, mode "nearest") and a mask of the crop box
(`_sample_affine`; the same values, tested, ~50x slower than the separable path).
No torch: this runs in the gateway.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from scipy import ndimage as ndi

from headct.preprocess.fused import PreprocessInfo

#: The separable path drops off-diagonal terms of the index map that move no sample by more than
#: this many map cells (float rounding of affines; a real tilt moves them by whole cells).
SEPARABLE_MAX_SHIFT_CELLS: Final = 1e-3
#: Tolerance (map cells) on the crop box's edge, for float rounding of voxels exactly on it.
_EDGE_TOL: Final = 1e-6
#: Source planes per `affine_transform` call on the sheared path (bounds its coordinate temporaries).
_SLAB_PLANES: Final = 32


def source_to_map_affine(
    info: PreprocessInfo,
    map_shape: tuple[int, ...],
    source_affine: np.ndarray | None = None,
) -> np.ndarray:
    """The 4x4 matrix taking a source voxel index ``(i, j, k, 1)`` to map coordinates ``(a, b, c, 1)``.

    `map_shape`: the map's spatial shape over the model input, RAS axis order (e.g. ``(8, 8, 8)`` for
    the patch grid, ``(96, 96, 96)`` for the input). `source_affine`: the source Volume's affine;
    defaults to `info.input_affine`. Map coordinate ``a`` is the centre of cell ``a``.

    Raises:
        ValueError: `info` has no grid affine (a `PreprocessInfo` not made by `preprocess_with_info`),
            or no source affine is known.
    """
    if info.grid_affine is None:
        raise ValueError("PreprocessInfo has no grid_affine: make it with preprocess_with_info")
    if source_affine is None:
        if info.input_affine is None:
            raise ValueError("no source affine: pass source_affine or a PreprocessInfo with input_affine")
        source_affine = np.asarray(info.input_affine, dtype=np.float64)
    if len(map_shape) != 3:
        raise ValueError(f"map_shape must be 3-D, got {map_shape}")
    grid_affine = np.asarray(info.grid_affine, dtype=np.float64)
    to_grid = np.linalg.solve(grid_affine, np.asarray(source_affine, dtype=np.float64))
    cropped = np.asarray(info.cropped_shape, dtype=np.float64)
    scale = np.asarray(map_shape, dtype=np.float64) / cropped
    # m = (g - crop_start + 0.5) * scale - 0.5
    to_map = np.eye(4)
    to_map[:3, :3] = np.diag(scale)
    to_map[:3, 3] = (0.5 - np.asarray(info.crop_start, dtype=np.float64)) * scale - 0.5
    return to_map @ to_grid


def map_to_source(
    grid_map: np.ndarray,
    info: PreprocessInfo,
    source_affine: np.ndarray | None = None,
    *,
    separable: bool | None = None,
) -> np.ndarray:
    """`grid_map` (over the model input, RAS order: ``(8, 8, 8)`` patch cells or ``(96, 96, 96)``)
    sampled at every voxel of the source volume: float32 of shape `info.input_shape`, indexed like the
    source Volume's array. Fortran-ordered (axis 0 fastest in memory): the order NIfTI stores and
    DICOM frames are read in (`frame k` = ``out[:, :, k].T`` is contiguous).

    Trilinear inside the crop box (edge values held up to its edge), 0 outside it. `source_affine`:
    the source Volume's affine, by default `info.input_affine`. `separable`: None picks the fastest
    path the geometry allows (separable; plane by plane under gantry tilt; else affine_transform), all
    giving the same values; False forces ``scipy.ndimage.affine_transform``; True requires the fully
    separable path (ValueError if the source grid is sheared).

    Raises:
        ValueError: `grid_map` not 3-D or not finite; no geometry (see `source_to_map_affine`).
    """
    grid_map = np.asarray(grid_map, dtype=np.float32)
    if grid_map.ndim != 3:
        raise ValueError(f"grid_map must be 3-D, got shape {grid_map.shape}")
    if not np.all(np.isfinite(grid_map)):
        raise ValueError("grid_map contains NaN or infinite values")
    shape = tuple(int(n) for n in info.input_shape)
    matrix = source_to_map_affine(info, grid_map.shape, source_affine)
    perm = _axis_permutation(matrix, shape)
    if separable is True and perm is None:
        raise ValueError("the source grid is sheared relative to the model input: not separable")
    if separable is False:
        return _sample_affine(grid_map, matrix, shape)
    if perm is not None:
        return _sample_separable(grid_map, matrix, shape, perm)
    planes = _plane_structure(matrix, shape)
    if planes is not None:
        return _sample_planes(grid_map, matrix, shape, *planes)
    return _sample_affine(grid_map, matrix, shape)


def _axis_permutation(matrix: np.ndarray, shape: tuple[int, ...]) -> list[int] | None:
    """For each map axis, the one source axis it depends on; None if some map axis depends on two
    (beyond `SEPARABLE_MAX_SHIFT_CELLS` over the source's extent)."""
    linear = np.abs(matrix[:3, :3])
    perm = [int(np.argmax(linear[i])) for i in range(3)]
    if sorted(perm) != [0, 1, 2]:
        return None
    extent = np.asarray(shape, dtype=np.float64) - 1.0
    for i, j in enumerate(perm):
        others = [k for k in range(3) if k != j]
        if float(linear[i, others] @ extent[others]) > SEPARABLE_MAX_SHIFT_CELLS:
            return None
    return perm


def _plane_structure(
    matrix: np.ndarray, shape: tuple[int, ...]
) -> tuple[int, int, int, int, int, int] | None:
    """Gantry tilt: a source axis ``s`` such that the other two, ``p`` and ``q``, each move one map axis
    only (``rp``, ``rq``; ``s`` may move those too, and moves the third, ``r3``, alone). Then each source
    plane ``v_s = k`` is a separable 2-D sampling of the map's plane at ``m_r3(k)``. Returns
    ``(s, p, q, rp, rq, r3)`` or None."""
    linear = np.abs(matrix[:3, :3])
    extent = np.asarray(shape, dtype=np.float64) - 1.0
    for s in range(3):
        p, q = (a for a in range(3) if a != s)
        rp, rq = int(np.argmax(linear[:, p])), int(np.argmax(linear[:, q]))
        if rp == rq:
            continue
        (r3,) = (r for r in range(3) if r not in (rp, rq))
        leak = sum(
            float(linear[r, a]) * extent[a] for a, ra in ((p, rp), (q, rq)) for r in range(3) if r != ra
        )
        if leak <= SEPARABLE_MAX_SHIFT_CELLS:
            return s, p, q, rp, rq, r3
    return None


def _sample_planes(
    grid_map: np.ndarray,
    matrix: np.ndarray,
    shape: tuple[int, ...],
    s: int,
    p: int,
    q: int,
    rp: int,
    rq: int,
    r3: int,
) -> np.ndarray:
    """Trilinear sampling plane by plane along source axis `s` (see `_plane_structure`): the map is
    interpolated along `r3` to that plane's position, then sampled as ``W_p @ plane @ W_q.T``."""
    out = np.empty(shape, dtype=np.float32, order="F")
    cells = np.ascontiguousarray(grid_map.transpose(r3, rp, rq))  # (n3, n_p, n_q)
    vp = np.arange(shape[p], dtype=np.float64)
    vq = np.arange(shape[q], dtype=np.float64)
    for k in range(shape[s]):
        w3 = _weights(np.array([matrix[r3, s] * k + matrix[r3, 3]]), cells.shape[0])[0]
        index: list[int | slice] = [slice(None)] * 3
        index[s] = k
        target = out[tuple(index)]  # (N_p, N_q)
        if not w3.any():  # the plane is outside the crop box
            target[...] = 0.0
            continue
        plane = np.tensordot(w3, cells, axes=(0, 0))  # (n_p, n_q)
        w_p = _weights(matrix[rp, p] * vp + matrix[rp, s] * k + matrix[rp, 3], cells.shape[1])
        w_q = _weights(matrix[rq, q] * vq + matrix[rq, s] * k + matrix[rq, 3], cells.shape[2])
        target[...] = w_p @ (plane @ w_q.T)
    return out


def _weights(coords: np.ndarray, n: int) -> np.ndarray:
    """Linear-interpolation weights ``(len(coords), n)`` (float32) of map positions `coords` on ``n``
    cells: edge held (scipy mode "nearest") within the crop box, zero rows outside it."""
    inside = (coords >= -0.5 - _EDGE_TOL) & (coords <= n - 0.5 + _EDGE_TOL)
    clamped = np.clip(coords, 0.0, n - 1.0)
    lo = np.minimum(np.floor(clamped).astype(np.int64), max(n - 2, 0))
    frac = clamped - lo
    w = np.zeros((coords.size, n), dtype=np.float64)
    rows = np.arange(coords.size)
    if n == 1:
        w[:, 0] = 1.0
    else:
        w[rows, lo] = 1.0 - frac
        w[rows, lo + 1] += frac
    w[~inside] = 0.0
    return w.astype(np.float32)


def _sample_separable(
    grid_map: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...], perm: list[int]
) -> np.ndarray:
    """Trilinear sampling as three 1-D weight matrices (map axis ``i`` <- source axis ``perm[i]``)."""
    # weight matrix of each source axis j: its map coordinate is matrix[i, j] * v + matrix[i, 3]
    weights: list[np.ndarray] = [np.empty(0)] * 3
    for i, j in enumerate(perm):
        v = np.arange(shape[j], dtype=np.float64)
        weights[j] = _weights(matrix[i, j] * v + matrix[i, 3], grid_map.shape[i])
    # the map with its axes in source order: axis j of `cells` is map axis perm.index(j)
    cells = np.ascontiguousarray(grid_map.transpose([perm.index(j) for j in range(3)]))
    # two small contractions (source axes 2 and 1), then one BLAS product writing the output, which
    # is Fortran-ordered (axis 0 fastest): its transpose (N2, N1, N0) is C-contiguous
    t = np.tensordot(cells, weights[2], axes=(2, 1))  # (n0, n1, N2)
    t = np.einsum("bj,ajc->cba", weights[1], t, optimize=True)  # (N2, N1, n0)
    t = np.ascontiguousarray(t).reshape(-1, t.shape[2])
    out_t = np.empty(shape[::-1], dtype=np.float32)
    np.matmul(t, weights[0].T, out=out_t.reshape(-1, shape[0]))
    return out_t.T


def _sample_affine(grid_map: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``scipy.ndimage.affine_transform`` (order 1, mode "nearest"), then 0 outside the crop box; slab
    by slab along source axis 2 (contiguous in the Fortran-ordered output), the crop box's mask
    computed per source plane."""
    out = np.empty(shape, dtype=np.float32, order="F")
    linear, offset = matrix[:3, :3], matrix[:3, 3]
    upper = np.asarray(grid_map.shape, dtype=np.float64)[:, None, None] - 0.5 + _EDGE_TOL
    plane = (
        linear[:, 0, None, None] * np.arange(shape[0], dtype=np.float64)[:, None]
        + linear[:, 1, None, None] * np.arange(shape[1], dtype=np.float64)[None, :]
        + offset[:, None, None]
    )  # map coordinates of source plane k = 0, (3, N0, N1)
    for start in range(0, shape[2], _SLAB_PLANES):
        stop = min(start + _SLAB_PLANES, shape[2])
        slab = out[:, :, start:stop]
        ndi.affine_transform(
            grid_map,
            linear,
            offset=offset + linear[:, 2] * start,
            output_shape=slab.shape,
            output=slab,
            order=1,
            mode="nearest",
        )
        for k in range(start, stop):
            coords = plane + linear[:, 2, None, None] * k
            inside = np.all((coords >= -0.5 - _EDGE_TOL) & (coords <= upper), axis=0)
            slab[:, :, k - start][~inside] = 0.0
    return out
