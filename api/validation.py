"""Rules a decoded volume must satisfy before preprocessing. Each failure is a 422 with its own code."""

from __future__ import annotations

import numpy as np

from api.problems import ProblemError
from headct.volume import Volume


def require_finite(volume: Volume) -> None:
    if not np.isfinite(volume.hu).all():
        count = int(volume.hu.size - np.isfinite(volume.hu).sum())
        raise ProblemError(
            422,
            "non_finite_values",
            "the volume contains NaN or infinite voxel values",
            field="pixel_data",
            observed=f"{count} non-finite voxels",
            expected="finite Hounsfield units",
        )


def require_valid_spacing(volume: Volume) -> None:
    spacing = [float(s) for s in volume.spacing_mm]
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ProblemError(
            422,
            "bad_spacing",
            "voxel spacing must be positive and finite",
            field="spacing_mm",
            observed=spacing,
            expected="> 0 mm on every axis",
        )


def validate(volume: Volume) -> list[tuple[str, str]]:
    """Run every rule; return the warnings (code, detail) of rules that pass with a caveat."""
    require_finite(volume)
    require_valid_spacing(volume)
    return []
