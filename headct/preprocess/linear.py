"""The separable linear maps behind the resample and the area resize, as float32 BLAS products.

* cubic-spline matrices: scipy's ``map_coordinates(order=3, mode="nearest")`` along one axis *is* a
  matrix (`spline_matrix`), built exactly by pushing the identity through scipy's own prefilter;
* banded products: `apply_along_axis` (one axis of an array) and `resample_planes` (the two axes of
  every plane, one plane at a time), each block of output rows one product over its band only
  (`_bands`), through scipy's BLAS (`_sgemm`);
* area averages: torch's adaptive-average windows (`area_matrix`, `_area_axis`, `_area_last_axis`).

Plain numpy/scipy maths: nothing here knows about volumes, affines or MONAI.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.ndimage as ndi
from scipy.linalg import blas as scipy_blas

from headct.preprocess.spec import (
    BAND_BLOCK_ROWS,
    BAND_TOL,
    DENSE_INNER_MAX,
    PLANE_BLOCK_ROWS,
    SPLINE_ORDER,
    SPLINE_PADDING_MODE,
    SPLINE_PREPAD,
)

# ---- 1-D cubic-spline matrices (scipy's map_coordinates along one axis) ------------------------


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


# ---- banded float32 BLAS products --------------------------------------------------------------


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


# ---- area (adaptive-average) maps --------------------------------------------------------------


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
