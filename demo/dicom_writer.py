"""Write a synthetic head `Volume` as DICOM CT: a classic series (one CT Image Storage object per
slice) or one Enhanced CT multi-frame object. SYNTHETIC TEST DATA - NOT FOR CLINICAL USE.

Used by the gateway's tests (every reader path, every validation rule) and by the benchmarks. What
is written follows the CT Image IOD as far as a reader cares:

* patient / study / series / frame-of-reference / equipment / image-plane / image-pixel / CT-image
  modules, with synthetic, obviously fake identifiers (``SYNTHETIC^PATIENT``) and deterministic UIDs
  (derived from `seed`, so a test can rebuild the same series);
* HU stored as integers through RescaleSlope / RescaleIntercept (default: signed 16-bit,
  intercept -1024, slope 1, so stored = HU + 1024), RescaleType ``HU``;
* geometry from the volume's affine: ImagePositionPatient per slice, ImageOrientationPatient and
  PixelSpacing (LPS, the DICOM patient frame). A sheared affine (third column not normal to the
  first two) is a tilted-gantry acquisition and is written as such (positions offset in-plane,
  GantryDetectorTilt set); `tilt_gantry` makes one from an untilted head;
* transfer syntaxes: the native ones always, plus each compressed one whose encoder is installed
  (`available_transfer_syntaxes`): RLE Lossless, JPEG-LS Lossless (pyjpegls), JPEG 2000 Lossless
  (pylibjpeg-openjpeg), Deflated. pydicom has no JPEG Lossless (process 14) encoder; to test that
  decoder, tile a real JPEG Lossless slice with `tile_slice`.

The array axes of the volume become: axis 0 -> image columns (along the row cosine), axis 1 -> rows,
axis 2 -> slices. Reorient first (`reorient`) to get the usual LPS layout of scanners.
"""

from __future__ import annotations

import copy
import io
import math
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders import (
    JPEG2000LosslessEncoder,
    JPEGLSLosslessEncoder,
    RLELosslessEncoder,
)
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from headct.dicom_geometry import LPS_TO_RAS
from headct.volume import Volume

CT_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.2.1")

#: Short names -> transfer syntax UIDs that this module can write.
TRANSFER_SYNTAXES: Final[dict[str, UID]] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
_ENCODERS: Final = {
    "rle": RLELosslessEncoder,
    "jpeg-ls": JPEGLSLosslessEncoder,
    "jpeg2000": JPEG2000LosslessEncoder,
}

#: Obviously fake identifiers: tests check that none of them ever reaches a response or a log.
SYNTHETIC_PATIENT: Final = {
    "PatientName": "SYNTHETIC^PATIENT",
    "PatientID": "SYN-000001",
    "PatientBirthDate": "19000101",
    "AccessionNumber": "SYNACC0001",
}


def available_transfer_syntaxes() -> list[str]:
    """Names in `TRANSFER_SYNTAXES` that can be written here (encoder plugins installed)."""
    return [name for name in TRANSFER_SYNTAXES if name not in _ENCODERS or _ENCODERS[name].is_available]


def reorient(volume: Volume, axcodes: str) -> Volume:
    """The same physical volume with its array axes flipped/permuted to `axcodes` (e.g. ``"LPS"``)."""
    start = nib.orientations.io_orientation(volume.affine)
    transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(axcodes.upper())))
    hu = np.ascontiguousarray(nib.orientations.apply_orientation(volume.hu, transform))
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    return Volume(hu=hu, affine=affine)


def tilt_gantry(volume: Volume, tilt_deg: float, *, order: int = 1, cval: float = -1000.0) -> Volume:
    """Resample `volume` onto the grid a gantry tilted by `tilt_deg` would have acquired.

    Slices keep their in-plane grid (axes 0, 1) but each slice is offset along axis 1 (the image
    column direction, i.e. anterior-posterior for an axial scan) by ``k * step * tan(tilt)``, as on a
    scanner whose gantry is tilted about the left-right axis. The result's affine is sheared; the
    anatomy is the same (up to interpolation), so a correct reader + preprocessing gives back the
    untilted head.
    """
    affine = volume.affine.copy()
    col = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    step = float(np.linalg.norm(affine[:3, 2]))
    tilted = affine.copy()
    tilted[:3, 2] = affine[:3, 2] + col * step * math.tan(math.radians(tilt_deg))
    # index in the original volume of each index of the tilted grid
    xform = np.linalg.solve(affine, tilted)
    hu = ndi.affine_transform(
        volume.hu, xform[:3, :3], offset=xform[:3, 3], order=order, mode="constant", cval=cval
    )
    return Volume(hu=hu.astype(np.float32), affine=tilted)


def phantom_head(
    shape: tuple[int, int, int] = (64, 64, 24),
    spacing_mm: tuple[float, float, float] = (3.5, 3.5, 5.0),
    *,
    seed: int = 0,
    table: bool = True,
    lesion_hu: float | None = None,
) -> Volume:
    """A small, fast head-like phantom on a RAS grid (for unit tests; `synthetic_head` is the real one).

    Ellipsoid brain (~35 HU, noise sd 3) inside a 6 mm skull (~1000 HU) and 4 mm scalp (~40 HU), air
    (-1000 HU) around, a 2 mm-skinned table (300 HU, foam core -850 HU) below it; optionally a
    hyperdense blob of `lesion_hu`. The field of view is ``shape x spacing`` centred on the head.
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    extent = np.asarray(shape) * spacing
    semi = np.minimum(np.asarray([75.0, 92.0, 80.0]), extent * np.asarray([0.4, 0.4, 0.45]))

    def inside(margin: float) -> np.ndarray:
        a, b, c = semi - margin
        return (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1.0

    hu = np.full(shape, -1000.0, np.float32)
    hu[inside(0.0)] = 40.0
    hu[inside(4.0)] = 1000.0
    hu[inside(10.0)] = 35.0
    if lesion_hu is not None:
        blob = ((x - semi[0] / 3) ** 2 + (y - semi[1] / 4) ** 2 + z**2) <= (min(semi) / 5) ** 2
        hu[blob] = lesion_hu
    if table:
        y_top = -semi[1] - 8.0
        hu[:, (y <= y_top)[0, :, 0] & (y > y_top - 2.0)[0, :, 0], :] = 300.0
        hu[:, (y <= y_top - 2.0)[0, :, 0] & (y > y_top - 12.0)[0, :, 0], :] = -850.0
        hu[:, (y <= y_top - 12.0)[0, :, 0] & (y > y_top - 14.0)[0, :, 0], :] = 300.0
    hu += rng.normal(0.0, 3.0, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in axes]
    return Volume(hu=hu, affine=affine)


def _lps_geometry(volume: Volume) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray]:
    """Row cosine, column cosine, PixelSpacing and slice positions (all LPS) of the volume's grid."""
    lps = LPS_TO_RAS @ volume.affine
    c0, c1 = lps[:3, 0], lps[:3, 1]
    s0, s1 = float(np.linalg.norm(c0)), float(np.linalg.norm(c1))
    if abs(float(c0 @ c1)) > 1e-6 * s0 * s1:
        raise ValueError("the first two array axes must be orthogonal to be written as DICOM image planes")
    k = np.arange(volume.shape[2], dtype=np.float64)
    positions = lps[:3, 3][None, :] + k[:, None] * lps[:3, 2][None, :]
    return c0 / s0, c1 / s1, [s1, s0], positions


def _ds_str(value: float) -> str:
    """A DS (decimal string, at most 16 characters) holding `value`."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _stored(hu: np.ndarray, slope: float, intercept: float, signed: bool, bits_stored: int) -> np.ndarray:
    if signed:
        lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        lo, hi = 0, (1 << bits_stored) - 1
    values = np.clip(np.rint((hu.astype(np.float64) - intercept) / slope), lo, hi)
    return values.astype(np.int16 if signed else np.uint16)


def _uids(seed: int | str) -> tuple[UID, UID, UID]:
    study = generate_uid(entropy_srcs=[f"headct-synthetic-study-{seed}"])
    series = generate_uid(entropy_srcs=[f"headct-synthetic-series-{seed}"])
    frame = generate_uid(entropy_srcs=[f"headct-synthetic-for-{seed}"])
    return study, series, frame


def _common(
    ds: Dataset,
    *,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    description: str,
    kernel: str,
    rows: int,
    columns: int,
    slope: float,
    intercept: float,
    signed: bool,
    bits_stored: int,
    slice_thickness: float,
    tilt_deg: float,
) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword, value in SYNTHETIC_PATIENT.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = description
    ds.ProtocolName = "HEAD ROUTINE"
    ds.BodyPartExamined = "HEAD"
    ds.Modality = "CT"
    ds.SeriesNumber = series_number
    ds.Manufacturer = "HeadCT-Serve synthetic"
    ds.ManufacturerModelName = "dicom_writer"
    ds.ConvolutionKernel = kernel
    ds.KVP = "120"
    ds.SliceThickness = _ds_str(slice_thickness)
    ds.GantryDetectorTilt = _ds_str(tilt_deg)
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = _ds_str(intercept)
    ds.RescaleSlope = _ds_str(slope)
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _encode(ds: Dataset, stored: np.ndarray, transfer_syntax: str) -> None:
    """Set PixelData from `stored` (frames, rows, cols) or (rows, cols) in `transfer_syntax`."""
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; one of {sorted(TRANSFER_SYNTAXES)}")
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax in _ENCODERS:
        ds.compress(uid, np.ascontiguousarray(stored), generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = uid
        return
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.file_meta.TransferSyntaxUID = uid


def ct_series(
    volume: Volume,
    *,
    transfer_syntax: str = "explicit",
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = True,
    bits_stored: int = 16,
    seed: int | str = 0,
    series_number: int = 1,
    description: str = "HEAD 1mm H30s",
    kernel: str = "H30s",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    overrides: dict[str, Any] | None = None,
    slice_overrides: dict[int, dict[str, Any]] | None = None,
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of `volume` (axis 2), in slice order.

    Args:
        volume: HU volume; its first two axes must be orthogonal (the image plane).
        transfer_syntax: a key of `TRANSFER_SYNTAXES`.
        slope, intercept: RescaleSlope / RescaleIntercept; stored = round((HU - intercept) / slope).
        signed, bits_stored: PixelRepresentation 1/0 and BitsStored (values are clipped to that range).
        seed: makes the study/series/frame-of-reference UIDs (same seed -> same UIDs).
        overrides: attributes set on every slice after the defaults (e.g. ``{"Modality": "MR"}``);
            a value of None deletes the attribute.
        slice_overrides: per-slice attributes, by slice index (e.g. a different IOP on one slice).
    """
    row, col, pixel_spacing, positions = _lps_geometry(volume)
    normal = np.cross(row, col)
    step = (LPS_TO_RAS @ volume.affine)[:3, 2]
    thickness = abs(float(step @ normal))
    tilt = math.degrees(math.atan2(float(np.linalg.norm(step - (step @ normal) * normal)), thickness))
    study_uid, series_uid, frame_uid = _uids(seed)
    iop = [_ds_str(v) for v in (*row, *col)]
    datasets = []
    for k in range(volume.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[f"headct-synthetic-sop-{seed}-{k}"])
        ds = Dataset()
        ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = list(image_type)
        _common(
            ds,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            series_number=series_number,
            description=description,
            kernel=kernel,
            rows=volume.shape[1],
            columns=volume.shape[0],
            slope=slope,
            intercept=intercept,
            signed=signed,
            bits_stored=bits_stored,
            slice_thickness=thickness,
            tilt_deg=tilt,
        )
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [_ds_str(v) for v in positions[k]]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_ds_str(v) for v in pixel_spacing]
        ds.SliceLocation = _ds_str(float(positions[k] @ normal))
        for keyword, value in {**(overrides or {}), **((slice_overrides or {}).get(k, {}))}.items():
            _set(ds, keyword, value)
        # image rows = axis 1, columns = axis 0
        stored = _stored(volume.hu[:, :, k].T, slope, intercept, signed, bits_stored)
        _encode(ds, stored, transfer_syntax)
        datasets.append(ds)
    return datasets


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def enhanced_ct(
    volume: Volume,
    *,
    transfer_syntax: str = "explicit",
    slope: float = 1.0,
    intercept: float = -1024.0,
    seed: int | str = 0,
    description: str = "HEAD 1mm enhanced",
    kernel: str = "H30s",
    overrides: dict[str, Any] | None = None,
) -> Dataset:
    """One Enhanced CT Image Storage object holding every slice as a frame (functional groups:
    pixel measures, plane orientation and pixel value transformation shared; plane position per
    frame)."""
    row, col, pixel_spacing, positions = _lps_geometry(volume)
    normal = np.cross(row, col)
    step = (LPS_TO_RAS @ volume.affine)[:3, 2]
    thickness = abs(float(step @ normal))
    study_uid, series_uid, frame_uid = _uids(seed)
    sop_uid = generate_uid(entropy_srcs=[f"headct-synthetic-enhanced-{seed}"])
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_uid)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    _common(
        ds,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        series_number=1,
        description=description,
        kernel=kernel,
        rows=volume.shape[1],
        columns=volume.shape[0],
        slope=slope,
        intercept=intercept,
        signed=True,
        bits_stored=16,
        slice_thickness=thickness,
        tilt_deg=0.0,
    )
    # In the enhanced IOD these live in functional groups, not at the top level.
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "SliceThickness", "WindowCenter"):
        delattr(ds, keyword)
    del ds.WindowWidth
    ds.InstanceNumber = 1
    ds.ContentQualification = "RESEARCH"
    ds.NumberOfFrames = volume.shape[2]
    ds.AcquisitionDateTime = "20000101120000"
    _add_dimensions(ds, seed)
    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [_shared_groups(row, col, pixel_spacing, thickness, slope=slope, intercept=intercept)]
    )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [_frame_groups(k, positions[k]) for k in range(volume.shape[2])]
    )
    for keyword, value in (overrides or {}).items():
        _set(ds, keyword, value)
    stored = _stored(np.transpose(volume.hu, (2, 1, 0)), slope, intercept, True, 16)
    _encode(ds, stored, transfer_syntax)
    return ds


def _add_dimensions(ds: Dataset, seed: int | str) -> None:
    """One dimension: frames are indexed by their Image Position (Plane Position Sequence)."""
    dimension_uid = generate_uid(entropy_srcs=[f"headct-synthetic-dim-{seed}"])
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00200032,
                FunctionalGroupPointer=0x00209113,
                DimensionDescriptionLabel="Image Position",
            )
        ]
    )


def _shared_groups(
    row: np.ndarray,
    col: np.ndarray,
    pixel_spacing: list[float],
    thickness: float,
    *,
    slope: float,
    intercept: float,
) -> Dataset:
    """The functional groups every frame shares: pixel measures, orientation, rescale, frame type."""
    return _item(
        PixelMeasuresSequence=DicomSequence(
            [_item(PixelSpacing=[_ds_str(v) for v in pixel_spacing], SliceThickness=_ds_str(thickness))]
        ),
        PlaneOrientationSequence=DicomSequence(
            [_item(ImageOrientationPatient=[_ds_str(v) for v in (*row, *col)])]
        ),
        PixelValueTransformationSequence=DicomSequence(
            [_item(RescaleIntercept=_ds_str(intercept), RescaleSlope=_ds_str(slope), RescaleType="HU")]
        ),
        CTImageFrameTypeSequence=DicomSequence([_item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])]),
    )


def _frame_groups(k: int, position: np.ndarray) -> Dataset:
    """Frame `k`'s own functional groups: its position and its dimension index."""
    return _item(
        PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[_ds_str(v) for v in position])]),
        FrameContentSequence=DicomSequence(
            [_item(DimensionIndexValues=[k + 1], StackID="1", InStackPositionNumber=k + 1)]
        ),
    )


def tile_slice(
    source: Dataset,
    n_slices: int,
    step_mm: float,
    *,
    seed: int | str = 0,
    overrides: dict[str, Any] | None = None,
) -> list[Dataset]:
    """A series made of `n_slices` copies of one real slice, `step_mm` apart along its normal.

    The pixel data (compressed or not) is copied as it is, so a real JPEG Lossless / JPEG 2000 slice
    gives a series in that transfer syntax. New study/series/instance UIDs; patient identifiers are
    replaced by the synthetic ones.
    """
    row = np.asarray([float(v) for v in source.ImageOrientationPatient[:3]])
    col = np.asarray([float(v) for v in source.ImageOrientationPatient[3:]])
    normal = np.cross(row, col)
    origin = np.asarray([float(v) for v in source.ImagePositionPatient])
    study_uid, series_uid, frame_uid = _uids(f"tile-{seed}")
    datasets = []
    for k in range(n_slices):
        ds = copy.deepcopy(source)
        sop_uid = generate_uid(entropy_srcs=[f"headct-synthetic-tile-{seed}-{k}"])
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        for keyword, value in SYNTHETIC_PATIENT.items():
            setattr(ds, keyword, value)
        ds.InstanceNumber = k + 1
        position = origin + k * step_mm * normal
        ds.ImagePositionPatient = [_ds_str(v) for v in position]
        ds.SliceLocation = _ds_str(float(position @ normal))
        for keyword, value in (overrides or {}).items():
            _set(ds, keyword, value)
        datasets.append(ds)
    return datasets


def to_bytes(ds: Dataset) -> bytes:
    """The DICOM Part 10 file (preamble, file meta, dataset) of `ds`."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_series(datasets: Iterable[Dataset], directory: Path) -> list[Path]:
    """Write each dataset to ``directory/IM<n>.dcm``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = directory / f"IM{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_zip(
    datasets: Iterable[Dataset],
    target: Path | io.BytesIO,
    *,
    compression: int = zipfile.ZIP_DEFLATED,
    shuffle_seed: int | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write the datasets into a zip (entry names are meaningless on purpose; readers must not care).

    `shuffle_seed` shuffles the entry order; `extra_files` adds non-DICOM entries (a README, a
    DICOMDIR-like junk file) that readers must skip.
    """
    items = [to_bytes(ds) for ds in datasets]
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(items)
    with zipfile.ZipFile(target, "w", compression=compression) as archive:
        for data in items:
            archive.writestr(f"series/{uuid.uuid4().hex[:12]}", data)
        for name, data in (extra_files or {}).items():
            archive.writestr(name, data)


def zip_bytes(datasets: Iterable[Dataset], **kwargs: Any) -> bytes:
    """`write_zip` into memory."""
    buffer = io.BytesIO()
    write_zip(datasets, buffer, **kwargs)
    return buffer.getvalue()


def multipart_body(
    parts: Sequence[bytes], *, subtype: str = "form-data", part_type: str = "application/dicom"
) -> tuple[bytes, str]:
    """A multipart body carrying `parts` and its Content-Type header value.

    ``subtype="form-data"`` gives a browser-style upload (one ``file`` field per part);
    ``subtype="related"`` a DICOMweb STOW-RS style ``multipart/related; type="application/dicom"``.
    """
    boundary = f"headct-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for n, data in enumerate(parts):
        headers = [f"Content-Type: {part_type}"]
        if subtype == "form-data":
            headers.insert(0, f'Content-Disposition: form-data; name="file"; filename="slice{n:05d}.dcm"')
        header_block = "".join(f"{header}\r\n" for header in headers)
        chunks.append(f"--{boundary}\r\n{header_block}\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f"multipart/{subtype}; boundary={boundary}"
    if subtype == "related":
        content_type += f'; type="{part_type}"'
    return b"".join(chunks), content_type
