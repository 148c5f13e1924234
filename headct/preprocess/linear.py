"""The separable linear maps behind the resample and the area resize, as float32 BLAS products.

* cubic-spline matrices: scipy's ``map_coordinates(order=3, mode="nearest")`` along one axis *is* a
  matrix (`spline_matrix`), built exactly by pushing the identity through scipy's own prefilter;
* banded products: `apply_along_axis` (one axis of an array), `resample_planes` (the two axes of
  every plane, one plane at a time) and `RowBandProduct` (the innermost axis, set up once), each
  block of output rows one product over its band only (`_bands`), through scipy's BLAS: its f2py
  wrapper (`_sgemm`) or, for the many small products of the per-plane and per-slab loops, its
  pointer interface on strided operands (`_fortran_sgemm`), which keeps the bits of the wrapper's
  products (whole BLAS tiles: `BLAS_TILE_ROWS`);
* area averages: torch's adaptive-average windows (`area_matrix`, `_area_axis`, `_area_last_axis`,
  `WindowSums`).

Plain numpy/scipy maths: nothing here knows about volumes, affines or MONAI.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import scipy.ndimage as ndi
from scipy.linalg import blas as scipy_blas
from scipy.linalg import cython_blas

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


# ---- scipy's BLAS sgemm through its pointer interface -----------------------------------------


@functools.cache
def _fortran_sgemm() -> Callable[..., None]:
    """scipy's own BLAS ``sgemm`` as a ctypes function: the Fortran interface (column-major, every
    argument by reference: ``transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc``), from
    the function pointer that `scipy.linalg.cython_blas` exports to Cython code.

    The same BLAS as `_sgemm` (scipy's OpenBLAS build), without the f2py wrapper: that one wants
    contiguous operands (copies anything else) and spends microseconds on argument checks per call;
    here an operand is any matrix with unit steps along one axis and a leading dimension (``ld*``)
    for the other, passed as the address of its first element (arguments made with `_ref`).
    """
    capsule = cython_blas.__pyx_capi__["sgemm"]
    api = ctypes.pythonapi
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", api))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", api)
    )
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))(address)


def _ref(value: int | float | bytes) -> Any:
    """A by-reference argument of `_fortran_sgemm`: ``int`` (sizes, leading dimensions), ``float``
    (alpha, beta) or a one-letter ``bytes`` flag (b"N", b"T"); it keeps its C value alive."""
    if isinstance(value, bytes):
        return ctypes.byref(ctypes.c_char(value))
    if isinstance(value, float):
        return ctypes.byref(ctypes.c_float(value))
    return ctypes.byref(ctypes.c_int(value))


#: OpenBLAS's float32 kernels compute the result in tiles of 16 (column-major) rows, and the rows
#: of a last, partial tile are summed by other code, whose rounding can depend on the problem's
#: size (seen on SkylakeX: small-matrix vs packed paths). A product over part of a row range gives
#: the full product's bits only if it keeps whole tiles at the same offsets.
BLAS_TILE_ROWS: Final = 16


def _tile_aligned_range(first: int, last: int, n: int) -> tuple[int, int]:
    """The rows to compute of a BLAS product over rows ``[0, n)`` when only ``[first, last)`` are
    needed: ``[first, last)`` widened to whole `BLAS_TILE_ROWS` tiles, or all of ``[0, n)`` if it
    reaches the last, partial tile (so each row is summed as in the full product)."""
    start = first - first % BLAS_TILE_ROWS
    stop = -(-last // BLAS_TILE_ROWS) * BLAS_TILE_ROWS
    if n % BLAS_TILE_ROWS and stop > n - n % BLAS_TILE_ROWS:
        return 0, n
    return start, stop


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


def _leading_dimension(a: np.ndarray) -> int:
    """BLAS leading dimension of a float32 2-D array with contiguous rows (a row-major matrix, the
    transpose of a column-major one); ValueError for any other layout."""
    rows, cols = a.shape
    step = a.strides[0] // a.itemsize if rows > 1 else cols
    if a.dtype != np.float32 or not a.flags.aligned or (cols > 1 and a.strides[1] != a.itemsize):
        raise ValueError(f"need aligned float32 rows with unit steps, got {a.dtype} strides {a.strides}")
    if rows > 1 and (a.strides[0] % a.itemsize or step < cols):
        raise ValueError(f"need rows at a positive step of at least one row, got strides {a.strides}")
    return max(step, cols, 1)


class RowBandProduct:
    """``out = x @ matrix.T`` for float32 ``x`` ``(rows, n_in)`` with contiguous rows: a 1-D linear map
    along the innermost axis, set up once (float32 band matrix, blocks, BLAS arguments) and applied
    to many arrays.

    One BLAS call per block of `block_rows` output columns (`_bands`), on the input columns its band
    reads, straight through `_fortran_sgemm`: the operands are strided views, nothing is copied.
    Each output is the dot product of its band with the input row, summed in index order by the BLAS
    kernel whatever the block's columns (zero terms add exactly nothing), so when the blocks are
    whole BLAS tiles (`n_out` a multiple of `BLAS_TILE_ROWS`) and there are enough rows for
    OpenBLAS's packed kernels, it equals the dense product ``x @ matrix.T`` of `_sgemm` bit for bit,
    at a fraction of its multiplies. That is how `window_area_resize` uses it (288 rows a call;
    tests/unit/test_preprocess_blas.py); a product of a few rows may take OpenBLAS's small-matrix
    kernels instead, which round differently. An observed property of the BLAS build, not a
    guarantee: on another one the last bits may differ from the dense product, within the fidelity
    suite's tolerances like any other change of BLAS.
    """

    def __init__(self, matrix: np.ndarray, block_rows: int = BAND_BLOCK_ROWS) -> None:
        if block_rows % BLAS_TILE_ROWS:
            raise ValueError(f"block_rows must be a multiple of {BLAS_TILE_ROWS}, got {block_rows}")
        self._matrix = _band_matrix32(matrix)  # C-contiguous; every call reads it by address
        self.n_out, self.n_in = self._matrix.shape
        blocks = _bands(matrix, block_rows)
        covered = np.zeros(self.n_out, dtype=bool)
        for r0, r1, _, _ in blocks:
            covered[r0:r1] = True
        self._uncovered = np.flatnonzero(~covered)
        item, address = self._matrix.itemsize, self._matrix.ctypes.data
        # column-major: out.T[r0:r1] (b x rows) = op(matrix block) (b x K) @ x[:, c0:c1].T (K x rows)
        self._calls = [
            (_ref(r1 - r0), _ref(c1 - c0), address + (r0 * self.n_in + c0) * item, c0 * item, r0 * item)
            for r0, r1, c0, c1 in blocks
        ]
        self._constants = (_ref(b"T"), _ref(b"N"), _ref(1.0), _ref(0.0), _ref(self.n_in))

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write ``x @ matrix.T`` into `out` (``(rows, n_out)``; both float32 with contiguous rows);
        returns `out`."""
        rows = x.shape[0]
        if x.shape != (rows, self.n_in) or out.shape != (rows, self.n_out):
            raise ValueError(f"RowBandProduct {self._matrix.shape} does not map {x.shape} to {out.shape}")
        ld_x, ld_out = _ref(_leading_dimension(x)), _ref(_leading_dimension(out))
        if rows == 0:
            return out
        trans, no_trans, one, zero, ld_matrix = self._constants
        n_rows, x_ptr, out_ptr = _ref(rows), x.ctypes.data, out.ctypes.data
        sgemm = _fortran_sgemm()
        for n_cols, k, matrix_ptr, x_offset, out_offset in self._calls:
            sgemm(
                trans, no_trans, n_cols, n_rows, k, one, matrix_ptr, ld_matrix,
                x_ptr + x_offset, ld_x, zero, out_ptr + out_offset, ld_out,
            )  # fmt: skip
        if self._uncovered.size:
            out[:, self._uncovered] = 0.0
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
    Both passes are block-banded BLAS products (`_bands`), called through BLAS's pointer interface
    (`_fortran_sgemm`) with every argument but the plane's address set up once: the operands are
    strided views of the plane, the matrices and the row-pass result, so nothing is copied. The row
    pass computes only the columns some column block reads (in whole BLAS tiles); writing the column
    pass as ``col_matrix @ rows.T`` puts the output columns on the middle axis, a transpose that
    costs nothing.

    Each output is its band's dot product, summed in index order by the BLAS kernel whatever the
    block's columns (zero terms add exactly nothing): the values are bit for bit those of one f2py
    `_sgemm` call per block on whole rows and contiguous copies, as long as the columns left out
    of the row pass are whole tiles (`_tile_aligned_range`).

    Args:
        x: float32 ``(n_planes, n_rows, n_cols)``, best with contiguous rows (e.g. the transposed
            view of a Fortran-ordered volume: slices outermost); other layouts are copied a plane
            at a time.
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
    out = np.zeros((n_planes, n_cols_out, n_rows_out), dtype=np.float32)
    if not row_blocks or not col_blocks or n_planes == 0:
        return out
    # The row pass computes the columns the column blocks read, [first, last), of every row block,
    # in whole BLAS tiles of the full row: see `_tile_aligned_range`.
    first, last = _tile_aligned_range(min(b[2] for b in col_blocks), max(b[3] for b in col_blocks), n_cols)
    width = last - first
    rows_out = np.zeros((n_rows_out, width), dtype=np.float32)  # one plane after the row pass
    x = np.asarray(x, dtype=np.float32)
    item = x.itemsize
    # BLAS reads a plane as a column-major (n_cols x n_rows) matrix: unit steps along a row, a
    # positive row step of at least a row; planes may lie anywhere (any plane stride). Other
    # layouts go through a contiguous copy of each plane.
    try:
        plane_step = _leading_dimension(x[0])
        plane_buffer = None
    except ValueError:
        plane_buffer = np.empty((n_rows, n_cols), dtype=np.float32)
        plane_step = n_cols
    sgemm = _fortran_sgemm()
    no_trans, trans, one, zero = _ref(b"N"), _ref(b"T"), _ref(1.0), _ref(0.0)
    rows_ptr, cols_ptr, rows_out_ptr = (a.ctypes.data for a in (rows32, cols32, rows_out))
    # row pass, block (r0, r1, c0, c1): rows_out[r0:r1] = rows32[r0:r1, c0:c1] @ plane[c0:c1, first:last]
    # (column-major: (width x b) = plane block (width x K) @ matrix block.T (K x b))
    row_calls = [
        (
            _ref(width), _ref(r1 - r0), _ref(c1 - c0),
            (c0 * plane_step + first) * item, _ref(plane_step),
            rows_ptr + (r0 * n_rows + c0) * item, _ref(n_rows),
            rows_out_ptr + r0 * width * item, _ref(width),
        )
        for r0, r1, c0, c1 in row_blocks
    ]  # fmt: skip
    # column pass: out[k, r0:r1] = cols32[r0:r1, c0:c1] @ rows_out[:, c0:c1].T
    # (column-major: (n_rows_out x b) = rows_out block (transposed) @ matrix block.T)
    col_calls = [
        (
            _ref(n_rows_out), _ref(r1 - r0), _ref(c1 - c0),
            rows_out_ptr + (c0 - first) * item, _ref(width),
            cols_ptr + (r0 * n_cols + c0) * item, _ref(n_cols),
            r0 * n_rows_out * item, _ref(n_rows_out),
        )
        for r0, r1, c0, c1 in col_blocks
    ]  # fmt: skip
    x_ptr, out_ptr = x.ctypes.data, out.ctypes.data
    buffer_ptr = 0 if plane_buffer is None else plane_buffer.ctypes.data
    plane_bytes = n_cols_out * n_rows_out * item
    for k in range(n_planes):
        if plane_buffer is None:
            plane_ptr = x_ptr + k * x.strides[0]
        else:
            np.copyto(plane_buffer, x[k])
            plane_ptr = buffer_ptr
        for m, n, kk, a_offset, lda, b_ptr, ldb, c_ptr, ldc in row_calls:
            sgemm(no_trans, no_trans, m, n, kk, one, plane_ptr + a_offset, lda, b_ptr, ldb, zero, c_ptr, ldc)
        out_plane = out_ptr + k * plane_bytes
        for m, n, kk, a_ptr, lda, b_ptr, ldb, c_offset, ldc in col_calls:
            sgemm(trans, no_trans, m, n, kk, one, a_ptr, lda, b_ptr, ldb, zero, out_plane + c_offset, ldc)
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


class WindowSums:
    """``out[:, i] = x[:, s] + x[:, s + 1] + ...`` over the area windows ``[s, e)`` of `_area_windows(n,
    m)` along axis 1, added left to right (the values of `_area_axis` with ``mean=False``), in a few
    whole-array operations: strided views when the windows are equal and disjoint, else gathers by
    window offset. Set up once, applied to many arrays."""

    def __init__(self, n: int, m: int) -> None:
        self.starts, ends = _area_windows(n, m)
        lengths = ends - self.starts
        self.step = n // m if n == m * (n // m) and np.all(lengths == n // m) else 0
        # window offset t -> the windows longer than t (None: all of them)
        self.longer = [
            None if np.all(lengths > t) else np.flatnonzero(lengths > t) for t in range(1, int(lengths.max()))
        ]

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        step = self.step
        if step == 1:
            np.copyto(out, x)
        elif step:
            np.add(x[:, 0::step], x[:, 1::step], out=out)
            for t in range(2, step):
                np.add(out, x[:, t::step], out=out)
        else:
            np.take(x, self.starts, axis=1, out=out)
            for t, longer in enumerate(self.longer, start=1):
                if longer is None:
                    np.add(out, np.take(x, self.starts + t, axis=1), out=out)
                else:
                    out[:, longer] += np.take(x, self.starts[longer] + t, axis=1)
        return out


def _area_last_axis(x: np.ndarray, m: int) -> np.ndarray:
    """`_area_axis` for the innermost axis: a banded product with `area_matrix` (slab sums along the
    innermost axis would stride through all of memory once per output)."""
    return apply_along_axis(x, area_matrix(x.shape[-1], m).astype(np.float64), x.ndim - 1)
