"""Turn an uploaded file into a `Volume` in Hounsfield units: format sniffing and decoding.

Formats are recognised by their magic bytes, never by the declared content type alone.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from api.problems import ProblemError
from headct.volume import Volume

# Declared content types under which we sniff the body for a NIfTI file.
NIFTI_CONTENT_TYPES = frozenset(
    {
        "",
        "application/octet-stream",
        "application/gzip",
        "application/x-gzip",
        "application/nifti",
        "application/x-nifti",
        "image/nifti",
    }
)


@dataclass(frozen=True)
class DecodedScan:
    volume: Volume
    source_format: str
    file_shape: tuple[int, ...]
    file_spacing_mm: tuple[float, ...]


def _read_header_bytes(path: Path, size: int = 544) -> tuple[bytes, bool]:
    with path.open("rb") as handle:
        head = handle.read(size)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as handle:
                return handle.read(size), True
        except (OSError, EOFError, zlib.error):
            return b"", True
    return head, False


def sniff_format(path: Path) -> str | None:
    """'nifti' / 'nifti-gz', 'dicom', 'zip', 'nrrd', or None when the bytes are of no known format."""
    head, gzipped = _read_header_bytes(path)
    if len(head) >= 348:
        for endian in "<>":
            (sizeof_hdr,) = struct.unpack(f"{endian}i", head[:4])
            if sizeof_hdr == 348 and head[344:348] == b"n+1\x00":
                return "nifti-gz" if gzipped else "nifti"
            if sizeof_hdr == 540 and len(head) >= 12 and head[4:8] == b"n+2\x00":
                return "nifti-gz" if gzipped else "nifti"
    if gzipped:
        return None
    if head[:4] == b"NRRD":
        return "nrrd"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def decode_nifti(path: Path, gzipped: bool) -> DecodedScan:
    """Read a single-file NIfTI-1/2 with nibabel; nibabel applies scl_slope/inter and picks the sform
    (or the qform when the sform is unset), which is the affine the file means."""
    # nibabel chooses the decompressor from the file name, so give it the right one.
    named = path.with_name(path.name + (".nii.gz" if gzipped else ".nii"))
    path.rename(named)
    try:
        image = nib.load(named)
        data = np.asarray(image.dataobj, dtype=np.float32)
        affine = np.asarray(image.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
        raise ProblemError(400, "unreadable_file", f"the NIfTI file could not be read: {error}") from error
    finally:
        named.rename(path)
    file_shape = tuple(int(s) for s in data.shape)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ProblemError(
            422,
            "not_3d",
            "the scan must be a single 3-D volume",
            field="shape",
            observed=list(file_shape),
            expected="3 spatial dimensions (a 4th of size 1 is accepted)",
        )
    try:
        volume = Volume(hu=data, affine=affine)
    except ValueError as error:  # singular or non-finite affine: no usable geometry
        raise ProblemError(
            422,
            "bad_spacing",
            f"the file's voxel geometry is unusable: {error}",
            field="affine",
            observed=[round(z, 4) for z in zooms],
            expected="positive finite voxel sizes",
        ) from error
    return DecodedScan(
        volume=volume,
        source_format="nifti",
        file_shape=file_shape,
        file_spacing_mm=zooms,
    )


def decode_upload(path: Path, content_type: str) -> DecodedScan:
    """Decode the spooled upload. Runs in a worker thread (blocking I/O and CPU)."""
    media_type = content_type.split(";")[0].strip().lower()
    kind = sniff_format(path)
    if kind in ("nifti", "nifti-gz") and media_type in NIFTI_CONTENT_TYPES:
        return decode_nifti(path, gzipped=kind == "nifti-gz")
    if kind in ("dicom", "zip", "nrrd"):
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"{kind} input is not supported by this release yet; send a NIfTI file",
            observed=media_type or None,
            expected="NIfTI (.nii, .nii.gz)",
        )
    if media_type not in NIFTI_CONTENT_TYPES:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"content type {media_type!r} is not accepted",
            observed=media_type,
            expected="application/octet-stream or application/gzip carrying NIfTI",
        )
    raise ProblemError(
        400,
        "unreadable_file",
        "the body is not a NIfTI file (no NIfTI header found)",
        expected="NIfTI (.nii, .nii.gz)",
    )
