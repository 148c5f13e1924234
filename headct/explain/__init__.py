"""Explanation maps in the caller's voxel grid: what the gateway returns next to a prediction.

The model gives, per task, a map over its input (attention over the 8x8x8 patch grid, in the model
input's RAS axis order). This package takes such maps back onto the source volume and writes them:

=============  ======================================================================================
`inverse`      `map_to_source`: a map over the model input sampled at every source voxel (the inverse
               of `headct.preprocess`'s geometry: RAS, 1 mm, crop, area resize), `source_to_map_affine`
`nifti`        `attention_nifti`: the maps as one gzip NIfTI (4-D, one volume per task) in the source's
               affine; `read_attention_nifti` reads it back
`preview`      `attention_preview`: a PNG montage per task, three orthogonal slices through the map's
               hottest point, CT brain window with the map as a colour overlay
=============  ======================================================================================

The DICOM Parametric Map is `api.results.parametric_map` (it needs the source series' datasets).
Pure functions, no torch: they run in the gateway.
"""

from __future__ import annotations

from headct.explain.inverse import map_to_source, source_to_map_affine
from headct.explain.nifti import attention_nifti, read_attention_nifti
from headct.explain.preview import attention_preview, preview_size

__all__ = [
    "attention_nifti",
    "attention_preview",
    "map_to_source",
    "preview_size",
    "read_attention_nifti",
    "source_to_map_affine",
]
