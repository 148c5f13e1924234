"""`decode_upload`: the spooled upload -> `DecodedScan`, whatever the format.

Dispatch: a ``multipart/*`` content type is split into parts; otherwise the media type must be one
of `SINGLE_FILE_MEDIA_TYPES` and the bytes decide the format (magic numbers): NIfTI(.gz), NRRD, a
zip of DICOM files, or one DICOM file (a multi-frame object is a whole series; a single slice is
refused as ``too_few_slices``). Runs in a worker thread or process: plain data in, plain data out.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

from api.ingest import dicom, validation
from api.ingest.errors import unreadable
from api.ingest.members import MemberSource, MultipartSource, SingleFile, ZipSource
from api.ingest.nifti import decode_nifti
from api.ingest.nrrd import decode_nrrd
from api.ingest.scan import DEFAULT_LIMITS, AcquisitionText, DecodedScan, DicomInfo, IngestLimits
from api.ingest.selection import group_series, select_series
from api.ingest.sniff import (
    ACCEPTED_DESCRIPTION,
    MULTIPART_MEDIA_TYPES,
    SINGLE_FILE_MEDIA_TYPES,
    content_type_parameter,
    media_type_of,
    read_head,
    sniff_bytes,
)
from api.ingest.volume_memory import VolumeMemory
from api.problems import ProblemCode, ProblemError


@dataclass(frozen=True)
class DecodeOptions:
    """What `decode_upload` was asked for, handed down to each format's decoder."""

    series_uid: str | None
    limits: IngestLimits
    scratch: Path  # a private directory for members that must be read from a file
    evidence: bool
    memory: VolumeMemory | None


def volume_memory_bytes(limits: IngestLimits) -> int:
    """The `VolumeMemory` a decode under `limits` may need: a DICOM upload's stored planes (at most the
    header pass's budget) or the largest volume allowed, as float32."""
    return max(dicom.PARSED_MEMBERS_BUDGET_BYTES, 4 * limits.max_voxels)


def decode_dicom(source: MemberSource, options: DecodeOptions) -> DecodedScan:
    """Headers of all members -> series selection -> header rules -> geometry -> pixels. The series'
    stored planes, then its HU stack, are kept in ``options.memory`` (a new one when None): the volume
    is valid until that memory is used again."""
    series_uid, limits, scratch = options.series_uid, options.limits, options.scratch
    memory = options.memory or VolumeMemory(volume_memory_bytes(limits))
    parsed = dicom.ParsedMembers(planes=memory.planes())
    headers, skipped = dicom.read_headers(source, parsed)
    if not headers:
        raise unreadable(
            "DICOM",
            f"none of the {source.count()} file(s) is a readable DICOM object"
            if source.count() > 1
            else "the file is not a readable DICOM object",
        )
    candidates, warnings = group_series(headers)
    chosen, selection_warnings = select_series(candidates, series_uid)
    warnings = [*selection_warnings, *warnings]
    if skipped:
        warnings.append(
            ("ignored_files", f"{skipped} file(s) in the upload are not DICOM images and were ignored")
        )
    series = chosen.headers
    first = series[0]
    acquisition = {f.name: getattr(first, f.name) for f in fields(AcquisitionText)}
    info = DicomInfo(
        **acquisition,
        series_uid=chosen.series_uid,
        study_uid=first.study_uid,  # one per series (`dicom.series_geometry` refuses a mix)
        sop_class_uid=first.sop_class_uid,
        modality=first.modality,
        transfer_syntax_uid=first.transfer_syntax,
        slice_thickness_mm=first.slice_thickness,
        instances=len({h.sop_instance_uid for h in series}),
        slices=len(series),
        multiframe=first.frame is not None,
    )
    info = replace(info, lossy=any(h.lossy for h in series))
    # cheapest and most fundamental first: what the series is, then its geometry, then its pixels
    warnings.extend(validation.check_dicom_header(info))
    geometry = dicom.series_geometry(series)
    info = replace(info, tilt_deg=round(geometry.tilt_deg, 3))
    warnings.extend(dicom.transfer_syntax_warnings(series))
    if geometry.tilted:
        warnings.append(
            (
                "gantry_tilt",
                f"acquired with a gantry tilt of {geometry.tilt_deg:.1f} deg; corrected by resampling onto "
                "an orthogonal grid (in the 1 mm resample of preprocessing)",
            )
        )
    volume, plane_stats = dicom.assemble(source, series, geometry, limits, scratch, parsed)
    instances = dicom.read_evidence(source, series) if options.evidence else ()
    spacing = first.pixel_spacing or (0.0, 0.0)
    return DecodedScan(
        volume=volume,
        source_format="dicom",
        file_shape=volume.shape,
        file_spacing_mm=(float(spacing[1]), float(spacing[0]), round(geometry.slice_step_mm, 6)),
        warnings=warnings,
        dicom=info,
        evidence=instances,
        plane_stats=plane_stats,
    )


def _decode_single(path: Path, kind: str | None, options: DecodeOptions) -> DecodedScan:
    if kind in ("nifti", "nifti-gz"):
        scan = decode_nifti(path, gzipped=kind == "nifti-gz", limits=options.limits, memory=options.memory)
    elif kind == "nrrd":
        scan = decode_nrrd(path, options.limits)
    elif kind == "zip":
        with ZipSource(path, options.limits) as source:
            return decode_dicom(source, options)
    elif kind == "dicom":
        return decode_dicom(SingleFile(path), options)
    elif kind == "nifti-pair":
        raise unreadable("NIfTI", "a NIfTI header pair (.hdr/.img) cannot be sent as one file; send a .nii")
    else:
        raise ProblemError(
            ProblemCode.UNREADABLE_FILE,
            "the body is not a recognised scan (no NIfTI, NRRD, zip or DICOM signature found)",
            expected=ACCEPTED_DESCRIPTION,
        )
    if options.series_uid is not None:
        scan.warnings.append(
            ("series_uid_ignored", f"series_uid applies to DICOM only; {kind} has one volume")
        )
    return scan


def _decode_multipart(path: Path, content_type: str, options: DecodeOptions) -> DecodedScan:
    boundary = content_type_parameter(content_type, "boundary")
    if not boundary:
        raise ProblemError(
            ProblemCode.UNREADABLE_FILE,
            "a multipart body needs a boundary parameter in its Content-Type",
            field="content-type",
            expected='multipart/form-data; boundary="..."',
        )
    with MultipartSource(path, boundary, options.limits) as source:
        kinds = [sniff_bytes(*read_head(source.path(i))) for i in range(source.count())]
        if "dicom" in kinds:
            return decode_dicom(source, options)
        scans = [(i, kind) for i, kind in enumerate(kinds) if kind is not None]
        if len(scans) != 1:
            raise ProblemError(
                ProblemCode.UNREADABLE_FILE,
                "a multipart body must carry DICOM instances, or exactly one NIfTI / NRRD / zip file"
                f" (found {len(scans)} scan files)",
                expected=ACCEPTED_DESCRIPTION,
            )
        index, kind = scans[0]
        return _decode_single(source.path(index), kind, options)


def decode_upload(
    path: Path,
    content_type: str,
    *,
    series_uid: str | None = None,
    limits: IngestLimits = DEFAULT_LIMITS,
    evidence: bool = False,
    memory: VolumeMemory | None = None,
) -> DecodedScan:
    """Decode the spooled upload at `path` (left in place; the caller deletes it); with `evidence`, a
    DICOM scan also carries its series' instances without pixel data (`DecodedScan.evidence`). A DICOM
    series or a NIfTI volume is built in `memory` when given (a worker's, reused scan after scan: the
    volume is valid until its next use), else in memory of its own.

    Raises:
        ProblemError: 400 ``unreadable_file``, 413 ``payload_too_large``, 415
            ``unsupported_media_type`` / ``unsupported_transfer_syntax``, 422 for scans that are
            readable but not acceptable (codes in `api.ingest.validation`, `api.ingest.selection`,
            `headct.dicom_geometry`).
    """
    media_type = media_type_of(content_type)
    with tempfile.TemporaryDirectory(prefix="headct-scratch-", dir=path.parent) as scratch_dir:
        options = DecodeOptions(series_uid, limits, Path(scratch_dir), evidence, memory)
        if media_type in MULTIPART_MEDIA_TYPES:
            return _decode_multipart(path, content_type, options)
        if media_type.startswith("multipart/") or media_type not in SINGLE_FILE_MEDIA_TYPES:
            raise ProblemError(
                ProblemCode.UNSUPPORTED_MEDIA_TYPE,
                f"content type {media_type!r} is not accepted",
                observed=media_type,
                expected=ACCEPTED_DESCRIPTION,
            )
        head, gzipped = read_head(path)
        return _decode_single(path, sniff_bytes(head, gzipped), options)
