"""Synthetic full heads on clinical acquisition grids, for preprocessing fidelity tests and benchmarks.

SYNTHETIC TEST DATA - NOT FOR CLINICAL USE. The head comes from `demo.synthetic_head` (brain CT
template + CSF, skull, scalp, neck, a table and head holder below, air around) on its 1 mm RAS grid;
`acquire` samples it (trilinear) on another grid -- voxel size, slab, axis order -- the way a scanner
reconstruction with that geometry would see the same head, without regenerating the anatomy at
0.45 mm (which takes tens of seconds).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from headct.volume import Volume

AIR_HU = -1000.0


def acquire(
    head: Volume,
    spacing_mm: tuple[float, float, float],
    *,
    z_range_mm: tuple[float, float] | None = None,
    shape: tuple[int, int, int] | None = None,
) -> Volume:
    """`head` (RAS, axis-aligned) resampled onto a RAS grid of `spacing_mm` covering the same field of view.

    Args:
        head: source volume on an axis-aligned RAS grid (e.g. the 1 mm synthetic head).
        spacing_mm: new voxel size per axis.
        z_range_mm: keep only this slab (mm from the bottom of the head volume), e.g. ``(40, 80)``.
        shape: exact output shape (the far end of each axis is cut or padded with air).

    Returns:
        float32 HU `Volume`, RAS; voxel centres of index 0 coincide with the source's.
    """
    src_spacing = np.asarray(head.spacing_mm)
    extent = (np.asarray(head.shape) - 1) * src_spacing
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    start = np.zeros(3)
    stop = extent.copy()
    if z_range_mm is not None:
        start[2], stop[2] = z_range_mm
    n = np.floor((stop - start) / spacing).astype(int) + 1
    if shape is not None:
        n = np.asarray(shape)
    scale = spacing / src_spacing
    offset = start / src_spacing
    hu = ndi.affine_transform(
        head.hu,
        scale,
        offset=offset,
        output_shape=tuple(int(v) for v in n),
        order=1,
        mode="constant",
        cval=AIR_HU,
        prefilter=False,
    )
    affine = head.affine.copy()
    affine[:3, :3] = head.affine[:3, :3] @ np.diag(scale)
    affine[:3, 3] = head.affine[:3, :3] @ offset + head.affine[:3, 3]
    return Volume(hu=hu.astype(np.float32), affine=affine)
