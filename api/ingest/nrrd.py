"""NRRD (.nrrd, attached header) read with pynrrd.

Geometry comes from ``space`` (``right-anterior-superior``, ``left-anterior-superior`` or
``left-posterior-superior``, or their RAS/LAS/LPS short forms), ``space directions`` (one column of
the affine per axis) and ``space origin``. Files without a named anatomical space or without space
directions are refused (``missing_geometry``): their orientation is unknown. Detached headers
(``data file:``) are refused before anything is opened: a header must never make the gateway read a
path of the uploader's choosing. Values are taken as HU (NRRD has no rescale fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import nrrd
import numpy as np

from api.ingest.errors import not_3d, too_large, unreadable
from api.ingest.nifti import squeeze_to_3d
from api.ingest.scan import DecodedScan, IngestLimits
from api.problems import ProblemCode, ProblemError
from headct.volume import Volume

#: NRRD space -> sign flips taking its x, y, z to RAS.
SPACE_TO_RAS: Final = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
#: Every `space` the NRRD format defines (those without an anatomical meaning are refused).
NRRD_SPACES: Final = frozenset(
    {
        *SPACE_TO_RAS,
        *(f"{name}-time" for name in SPACE_TO_RAS if "-" in name),
        *("rast", "last", "lpst", "scanner-xyz", "scanner-xyz-time", "3d-right-handed", "3d-left-handed"),
        *("3d-right-handed-time", "3d-left-handed-time"),
    }
)
#: The header (text up to the first blank line) must end within this many bytes.
MAX_HEADER_BYTES: Final = 64 << 10


def _missing_geometry(detail: str, observed: object = None) -> ProblemError:
    return ProblemError(
        ProblemCode.MISSING_GEOMETRY,
        detail,
        field="space",
        observed=observed,
        expected="space right-anterior-superior / left-posterior-superior / left-anterior-superior "
        "with space directions and space origin",
    )


def decode_nrrd(path: Path, limits: IngestLimits) -> DecodedScan:
    with path.open("rb") as handle:
        start = handle.read(MAX_HEADER_BYTES)
    if b"\n\n" not in start and b"\r\n\r\n" not in start:
        raise unreadable("NRRD", f"no end of header within the first {MAX_HEADER_BYTES} bytes")
    try:
        with path.open("rb") as handle:
            header = nrrd.read_header(handle)
            if "data file" in header or "datafile" in header:
                raise unreadable("NRRD", "detached data files are not accepted; send an attached .nrrd")
            sizes = tuple(int(s) for s in header["sizes"])
            spatial = squeeze_to_3d(sizes)
            if int(np.prod(spatial, dtype=np.int64)) > limits.max_voxels:
                raise too_large(spatial, limits.max_voxels)
            space = str(header.get("space", "")).strip().lower()
            if space not in SPACE_TO_RAS:
                raise _missing_geometry(
                    "the NRRD has no anatomical space (RAS, LAS or LPS), so its orientation is unknown",
                    # only a space the NRRD format defines is echoed, never the upload's free text
                    observed=space if space in NRRD_SPACES else None,
                )
            if "space directions" not in header:
                raise _missing_geometry("the NRRD has no space directions, so its voxel geometry is unknown")
            directions = np.asarray(header["space directions"], dtype=np.float64)
            origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
            data = nrrd.read_data(header, handle, None, index_order="F")
    except ProblemError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # any parser failure on untrusted bytes is "unreadable"
        raise unreadable("NRRD", error) from error
    if data.ndim != len(sizes) or directions.shape[0] != len(sizes):
        raise unreadable("NRRD", "sizes, data and space directions disagree")
    spatial_directions = directions[:3]
    if spatial_directions.shape != (3, 3) or not np.all(np.isfinite(spatial_directions)):
        raise not_3d(sizes)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise _missing_geometry("the NRRD space origin is not 3 finite numbers")
    flips = np.diag([*SPACE_TO_RAS[space], 1.0])
    affine = np.eye(4)
    affine[:3, :3] = spatial_directions.T  # row n of "space directions" is array axis n
    affine[:3, 3] = origin
    affine = flips @ affine
    hu = np.asarray(data, dtype=np.float32).reshape(spatial, order="F")
    try:
        volume = Volume(hu=hu, affine=affine)
    except ValueError as error:
        raise ProblemError(
            ProblemCode.BAD_SPACING,
            f"the NRRD voxel geometry is unusable: {error}",
            field="space directions",
            observed=[[round(float(v), 4) for v in row] for row in spatial_directions],
            expected="three independent, non-zero axis vectors",
        ) from error
    return DecodedScan(
        volume=volume,
        source_format="nrrd",
        file_shape=sizes,
        file_spacing_mm=volume.spacing_mm,
    )
