"""`Volume`: a CT volume in Hounsfield units plus the affine that places it in patient space.

This is the one object that flows from the loaders (NIfTI now, DICOM series later) into
`headct.preprocess`. The affine follows the nibabel convention: it maps a voxel index ``(i, j, k, 1)``
to world coordinates in millimetres in the RAS+ frame (+x toward the patient's Right, +y Anterior,
+z Superior). Array axis ``n`` runs along column ``n`` of ``affine[:3, :3]``; its length is the
voxel size along that axis.

No torch here (see `headct/__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True)
class Volume:
    """A 3-D CT volume.

    Attributes:
        hu: float32 array of shape ``(X, Y, Z)`` in Hounsfield units (rescale slope/intercept
            already applied).
        affine: float64 ``(4, 4)`` voxel-index -> RAS+ world (mm) matrix, nibabel convention.
    """

    hu: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        hu = np.asarray(self.hu)
        affine = np.asarray(self.affine, dtype=np.float64)
        if hu.ndim != 3:
            raise ValueError(f"Volume.hu must be 3-D, got shape {hu.shape}")
        if min(hu.shape) < 1:
            raise ValueError(f"Volume.hu has an empty axis: shape {hu.shape}")
        if hu.dtype != np.float32:
            # float32 is enough for HU (int16 range, ~1e-4 HU resolution) and halves memory vs float64.
            hu = hu.astype(np.float32)
        if affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise ValueError("Volume.affine contains non-finite values")
        if not np.allclose(affine[3], (0.0, 0.0, 0.0, 1.0)):
            raise ValueError(f"Volume.affine last row must be (0, 0, 0, 1), got {affine[3]}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise ValueError("Volume.affine is singular (zero voxel size or collinear axes)")
        # frozen dataclass: bypass __setattr__ once to store the normalised arrays.
        object.__setattr__(self, "hu", hu)
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(X, Y, Z)`` in voxels."""
        x, y, z = self.hu.shape
        return int(x), int(y), int(z)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along each array axis, in mm (column norms of the affine's 3x3 part)."""
        x, y, z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(x), float(y), float(z)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Nearest patient direction of each array axis, e.g. ``("R", "A", "S")`` or ``("L", "P", "S")``."""
        x, y, z = nib.aff2axcodes(self.affine)
        return x, y, z

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Physical size along each array axis (voxel count x spacing), in mm."""
        (nx, ny, nz), (sx, sy, sz) = self.shape, self.spacing_mm
        return nx * sx, ny * sy, nz * sz

    def is_on_grid(
        self, spacing_mm: float | Sequence[float] = 1.0, *, axcodes: str = "RAS", atol: float = 1e-3
    ) -> bool:
        """True when the volume is already axis-aligned in `axcodes` order at `spacing_mm` (mm).

        "Axis-aligned" means the 3x3 part of the affine is diagonal with positive entries (within
        `atol`), i.e. no obliquity, no flips, no axis permutation.
        """
        target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        if "".join(self.axcodes) != axcodes.upper():
            return False
        return bool(np.allclose(self.affine[:3, :3], np.diag(target), atol=atol))

    def with_hu(self, hu: np.ndarray) -> Volume:
        """Same geometry, new voxel values (must have the same shape)."""
        if np.shape(hu) != self.hu.shape:
            raise ValueError(f"shape mismatch: {np.shape(hu)} vs {self.hu.shape}")
        return Volume(hu=hu, affine=self.affine)

    # ---- NIfTI convenience -------------------------------------------------------------------------

    def to_nifti(self) -> nib.Nifti1Image:
        """A NIfTI-1 image holding the HU as float32 with sform = qform = `affine` (code 1, scanner)."""
        img = nib.Nifti1Image(self.hu, self.affine)
        img.header.set_xyzt_units("mm", "sec")
        # qform can only hold a rigid rotation + zooms; nibabel falls back to sform for shears.
        img.set_sform(self.affine, code=1)
        img.set_qform(self.affine, code=1)
        return img

    @classmethod
    def from_nifti(cls, img: nib.Nifti1Image | nib.Nifti2Image) -> Volume:
        """Read a 3-D NIfTI image (scl_slope/scl_inter applied) as a `Volume`.

        A trailing singleton 4th axis is squeezed; a real 4-D series is rejected because FM-HCT
        expects exactly one 3-D scan (the reference code silently fed such files as 6 channels).
        """
        data = np.asanyarray(img.dataobj, dtype=np.float32)  # applies the header's slope/intercept
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"expected a 3-D NIfTI volume, got shape {img.shape}")
        return cls(hu=np.ascontiguousarray(data), affine=np.asarray(img.affine, dtype=np.float64))
