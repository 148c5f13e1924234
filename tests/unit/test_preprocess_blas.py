"""The preprocessing's direct BLAS products (headct/preprocess/linear.py) give the bits of the plain
f2py products they replace: `RowBandProduct`, slab by slab, those of one dense product over all slabs;
`resample_planes` those of one product per band block on whole rows and contiguous copies (the earlier
implementation, kept here as the reference). These bits are what the model input is made of; the
fidelity suite checks the whole pipeline against MONAI with tolerances, this checks that the faster
route changed nothing at all (on this BLAS build: see `RowBandProduct`)."""

from __future__ import annotations

import numpy as np
import pytest

from headct.preprocess.linear import (
    PLANE_BLOCK_ROWS,
    RowBandProduct,
    _band_matrix32,
    _bands,
    _sgemm,
    apply_along_axis,
    area_matrix,
    resample_planes,
    spline_matrix,
)


def resampling(n_in: int, n_out: int, shift: float = 0.3) -> np.ndarray:
    """A cubic-spline resampling matrix (n_out, n_in), as the preprocessing builds them."""
    return spline_matrix(n_in, np.linspace(shift, n_in - 1 - shift, n_out))


def reference_resample_planes(x: np.ndarray, row_matrix: np.ndarray, col_matrix: np.ndarray) -> np.ndarray:
    """One f2py product per band block, on whole rows and on contiguous copies of the column blocks."""
    n_planes, _, n_cols = x.shape
    row_blocks, col_blocks = _bands(row_matrix, PLANE_BLOCK_ROWS), _bands(col_matrix, PLANE_BLOCK_ROWS)
    rows32, cols32 = _band_matrix32(row_matrix), _band_matrix32(col_matrix)
    rows_out = np.zeros((row_matrix.shape[0], n_cols), dtype=np.float32)
    out = np.zeros((n_planes, col_matrix.shape[0], row_matrix.shape[0]), dtype=np.float32)
    for k in range(n_planes):
        plane = x[k]
        for r0, r1, c0, c1 in row_blocks:
            _sgemm(rows32[r0:r1, c0:c1], plane[c0:c1], rows_out[r0:r1])
        for r0, r1, c0, c1 in col_blocks:
            _sgemm(cols32[r0:r1, c0:c1], np.ascontiguousarray(rows_out[:, c0:c1]).T, out[k, r0:r1])
    return out


@pytest.mark.parametrize("n_in", [97, 131, 180, 217, 256])
def test_row_band_product_slab_by_slab_equals_one_dense_product_to_the_last_bits(n_in: int) -> None:
    """As `window_area_resize` uses it: the area map to 96 along the innermost axis, one output slab
    (3 windows x 96 rows) at a time, against the earlier single product over all slabs (dense: a head
    crop is at most `DENSE_INNER_MAX` wide). Bit for bit on the Intel host where it was written; on an
    AMD EPYC host the same OpenBLAS wheel sums some of them in another order (up to 2 float32 ulp, on
    3-10 % of the values, none for n_in 97): `RowBandProduct`'s docstring says why that is allowed."""
    rng = np.random.default_rng(n_in)
    matrix = area_matrix(n_in, 96).astype(np.float64)
    slab_rows, slabs = 3 * 96, 24
    x = (rng.random((slabs * slab_rows, n_in), dtype=np.float32) * 3.0).astype(np.float32)
    whole = apply_along_axis(x, matrix, 1)
    product = RowBandProduct(matrix)
    by_slab = np.empty_like(whole)
    for i in range(slabs):
        rows = slice(i * slab_rows, (i + 1) * slab_rows)
        product(x[rows], by_slab[rows])
    ulp = np.abs(by_slab.view(np.int32).astype(np.int64) - whole.view(np.int32))  # (all values > 0)
    assert ulp.max() <= 2
    assert np.mean(ulp > 0) < 0.15


@pytest.mark.parametrize(
    ("shape", "out_rows", "out_cols"),
    [((6, 512, 512), 230, 230), ((4, 300, 217), 135, 98), ((3, 64, 80), 29, 181)],
)
def test_resample_planes_equals_the_per_block_products_bit_for_bit(
    shape: tuple[int, int, int], out_rows: int, out_cols: int
) -> None:
    rng = np.random.default_rng(sum(shape))
    x = (rng.random(shape, dtype=np.float32) * 3000.0 - 1000.0).astype(np.float32)
    x[:, : shape[1] // 5] = -1024.0  # air, as around a head
    row_matrix, col_matrix = resampling(shape[1], out_rows), resampling(shape[2], out_cols, shift=1.7)
    expected = reference_resample_planes(x, row_matrix, col_matrix)
    assert resample_planes(x, row_matrix, col_matrix).tobytes() == expected.tobytes()
    # A plane layout BLAS cannot read directly (a strided view) takes the copying route: same bits.
    wide = np.zeros((shape[0], shape[1], shape[2] + 3), np.float32)
    wide[:, :, 1 : shape[2] + 1] = x
    assert (
        resample_planes(wide[:, :, 1 : shape[2] + 1], row_matrix, col_matrix).tobytes() == expected.tobytes()
    )
