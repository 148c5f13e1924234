"""Recognise an upload by its magic bytes (the declared content type only decides multipart framing
and which media types are accepted at all)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Final

#: Media types under which a single-file body is accepted; the format itself comes from magic bytes.
SINGLE_FILE_MEDIA_TYPES: Final = frozenset(
    {
        "",
        "application/octet-stream",
        "application/gzip",
        "application/x-gzip",
        "application/nifti",
        "application/x-nifti",
        "image/nifti",
        "application/dicom",
        "application/zip",
        "application/x-zip-compressed",
        "application/x-nrrd",
        "image/x-nrrd",
        "application/nrrd",
    }
)
#: Multipart bodies: one DICOM instance (or one scan file) per part.
MULTIPART_MEDIA_TYPES: Final = frozenset({"multipart/form-data", "multipart/related", "multipart/mixed"})

ACCEPTED_DESCRIPTION: Final = (
    "application/octet-stream (or application/gzip, application/zip, application/dicom, "
    "application/x-nrrd) carrying NIfTI, NRRD, a DICOM file or a zip of DICOM files; "
    "or multipart/form-data / multipart/related with one DICOM instance per part"
)


def read_head(path: Path, size: int = 544) -> tuple[bytes, bool]:
    """The first `size` bytes of the file, gunzipped when it is gzip; and whether it was."""
    with path.open("rb") as handle:
        head = handle.read(size)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as handle:
                return handle.read(size), True
        except (OSError, EOFError, zlib.error):
            return b"", True
    return head, False


def looks_like_dicom(head: bytes) -> bool:
    """Part 10 file ("DICM" after the 128-byte preamble) or a bare dataset starting with group 0002/0008."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    # No preamble: the first element is (0002,xxxx) or (0008,xxxx), little endian, with a sane VR/length.
    return (
        len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] in (b"\x00\x00", b"\x05\x00")
    )


def sniff_bytes(head: bytes, gzipped: bool) -> str | None:
    """'nifti' / 'nifti-gz' / 'nifti-pair', 'dicom', 'zip', 'nrrd', or None."""
    if len(head) >= 348:
        for endian in "<>":
            (sizeof_hdr,) = struct.unpack(f"{endian}i", head[:4])
            if sizeof_hdr == 348 and head[344:348] == b"n+1\x00":
                return "nifti-gz" if gzipped else "nifti"
            if sizeof_hdr == 540 and len(head) >= 12 and head[4:8] == b"n+2\x00":
                return "nifti-gz" if gzipped else "nifti"
            if (sizeof_hdr == 348 and head[344:348] == b"ni1\x00") or (
                sizeof_hdr == 540 and head[4:8] == b"ni2\x00"
            ):
                return "nifti-pair"  # a .hdr whose voxels are in a separate .img: not readable alone
    if gzipped:
        return None
    if head[:4] == b"NRRD":
        return "nrrd"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if looks_like_dicom(head):
        return "dicom"
    return None


def sniff_format(path: Path) -> str | None:
    """'nifti' / 'nifti-gz', 'dicom', 'zip', 'nrrd', or None when the bytes are of no known format."""
    head, gzipped = read_head(path)
    return sniff_bytes(head, gzipped)


def media_type_of(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def content_type_parameter(content_type: str, name: str) -> str | None:
    """A parameter of a Content-Type header value (quotes removed), e.g. the multipart boundary."""
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None
