"""Turn an uploaded file into a `Volume` in Hounsfield units.

Formats (recognised by magic bytes; the content type only selects multipart framing):

* NIfTI-1/2 ``.nii`` / ``.nii.gz`` (`api.ingest.nifti`), NRRD with attached data (`api.ingest.nrrd`);
* DICOM: a zip of a series (or of a whole study: `api.ingest.selection` picks the series), a
  ``multipart/form-data`` or DICOMweb-style ``multipart/related`` body with one instance per part,
  or one Enhanced / Legacy Enhanced CT multi-frame object (`api.ingest.dicom`, geometry in
  `headct.dicom_geometry`).

The public interface is `decode_upload` -> `DecodedScan`; limits are `IngestLimits`.
"""

from api.ingest.decode import decode_upload
from api.ingest.scan import DEFAULT_LIMITS, DecodedScan, DicomInfo, IngestLimits, ScanWarning
from api.ingest.sniff import sniff_format

__all__ = [
    "DEFAULT_LIMITS",
    "DecodedScan",
    "DicomInfo",
    "IngestLimits",
    "ScanWarning",
    "decode_upload",
    "sniff_format",
]
