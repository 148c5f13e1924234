"""What the readers hand to validation and preprocessing: plain, picklable data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from headct.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from headct.preprocess import SourcePlaneStats

#: A warning is ``(code, detail)``; it ends up in the response's ``warnings``.
ScanWarning = tuple[str, str]


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on what one upload may make the gateway read (each breach is a 413 or 422).

    Attributes:
        max_members: files in a zip / parts in a multipart body (a 0.5 mm head is ~500 slices;
            a whole study with several series a few thousand).
        max_uncompressed_bytes: sum of the declared uncompressed sizes of the zip entries (zip bombs).
        max_member_bytes: one zip entry or multipart part (a multi-frame object holds a whole series).
        max_compression_ratio: declared uncompressed / compressed bytes of a whole zip. A DICOM
            series deflates 2-10x (air around the head compresses well); deflate tops out at ~1030x,
            which zip bombs use.
        max_voxels: voxels of the decoded volume (2**28 = 1 GiB as float32; 512 x 512 x 1024).

    `api.settings.ingest_limits` builds one from the ``HEADCT_MAX_*`` settings.
    """

    max_members: int = 5000
    max_uncompressed_bytes: int = 4 << 30
    max_member_bytes: int = 2 << 30
    max_compression_ratio: float = 250.0
    max_voxels: int = 1 << 28


DEFAULT_LIMITS: Final = IngestLimits()


@dataclass(frozen=True, kw_only=True)
class AcquisitionText:
    """What the DICOM headers say about the acquisition (the validation rules read it): the same fields
    on each plane's header (`api.ingest.dicom.InstanceHeader`) and on the chosen series (`DicomInfo`).

    Holds no patient identifier: the reader never copies PatientName, PatientID, birth date or
    accession number here, and free-text descriptions are redacted if they contain one.
    """

    image_type: tuple[str, ...] = ()
    body_part: str = ""
    study_description: str = ""
    series_description: str = ""
    protocol_name: str = ""
    kernel: str = ""
    contrast_agent: str = ""
    kvp: float | None = None
    lossy: bool = False


@dataclass(frozen=True, kw_only=True)
class DicomInfo(AcquisitionText):
    """Series-level facts read from DICOM headers, for validation and for the response.

    `study_uid` (StudyInstanceUID) is not a patient identifier but links the answer to the study in the
    hospital's archive (the FHIR report's ImagingStudy); like the rest of this class it is never logged.
    """

    series_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax_uid: str
    slice_thickness_mm: float | None = None
    instances: int = 0
    slices: int = 0
    multiframe: bool = False
    tilt_deg: float = 0.0
    study_uid: str = ""  # "" when the headers lack it


@dataclass(frozen=True)
class DecodedScan:
    """A decoded upload.

    Attributes:
        volume: HU volume + RAS affine.
        source_format: ``"nifti"``, ``"nrrd"`` or ``"dicom"``.
        file_shape: voxels in file array order (DICOM: columns, rows, slices).
        file_spacing_mm: voxel size per array axis (DICOM: column spacing, row spacing, slice step).
        warnings: caveats found while decoding (series picked, gantry tilt corrected, ...).
        dicom: series facts when the source was DICOM, else None.
        evidence: the chosen series' instances without pixel data, only when the caller asked for them
            (a DICOM SR answer is filed under the source's patient and study, so these hold the patient
            identifiers that nothing else here carries; never logged).
        plane_stats: `headct.preprocess.source_plane_stats` of the volume, when the decoder gathered
            them while writing it (validation and preprocessing then need not read it again).
    """

    volume: Volume
    source_format: str
    file_shape: tuple[int, ...]
    file_spacing_mm: tuple[float, ...]
    warnings: list[ScanWarning] = field(default_factory=list)
    dicom: DicomInfo | None = None
    evidence: tuple[Dataset, ...] = ()
    plane_stats: SourcePlaneStats | None = None
