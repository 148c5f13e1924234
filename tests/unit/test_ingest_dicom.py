"""DICOM reading: every container (zip, multipart, single multi-frame object), every transfer syntax
with an encoder (and JPEG Lossless from a real slice), HU rescale, geometry (LPS / flipped / oblique /
tilted), the series-structure rules, limits, and that no patient identifier leaves the reader."""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import scipy.ndimage as ndi
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from api.ingest import DecodedScan, IngestLimits, decode_upload
from api.ingest.selection import group_series, select_series
from api.ingest.validation import validate
from api.problems import ProblemError
from demo.dicom_writer import (
    available_transfer_syntaxes,
    ct_series,
    enhanced_ct,
    multipart_body,
    phantom_head,
    reorient,
    tile_slice,
    tilt_gantry,
    to_bytes,
    zip_bytes,
)
from headct.preprocess import reorient_to_ras
from headct.volume import Volume

ZIP = "application/zip"


@pytest.fixture(scope="module")
def head() -> Volume:
    """64 x 64 x 24 phantom at 3.5 x 3.5 x 5 mm (RAS), HU rounded so integer storage is exact."""
    volume = phantom_head()
    return volume.with_hu(np.rint(volume.hu))


@pytest.fixture(scope="module")
def head_lps(head: Volume) -> Volume:
    return reorient(head, "LPS")


def decode(tmp_path: Path, body: bytes, content_type: str = ZIP, **kwargs: object) -> DecodedScan:
    path = tmp_path / "upload"
    path.write_bytes(body)
    return decode_upload(path, content_type, **kwargs)  # type: ignore[arg-type]


def refusal(tmp_path: Path, body: bytes, content_type: str = ZIP, **kwargs: object) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        scan = decode(tmp_path, body, content_type, **kwargs)
        validate(scan)
    return raised.value


def same_head(decoded: Volume, original: Volume) -> None:
    """The decoded volume is the original one: same voxels and world positions after RAS reorientation."""
    ras = reorient_to_ras(decoded)
    np.testing.assert_allclose(ras.affine, original.affine, atol=1e-4)
    np.testing.assert_array_equal(ras.hu, original.hu)


@pytest.mark.parametrize("transfer_syntax", available_transfer_syntaxes())
def test_zip_series_round_trips_in_every_transfer_syntax(
    tmp_path: Path, head: Volume, head_lps: Volume, transfer_syntax: str
) -> None:
    body = zip_bytes(ct_series(head_lps, transfer_syntax=transfer_syntax), shuffle_seed=3)
    scan = decode(tmp_path, body)
    assert scan.source_format == "dicom"
    assert scan.file_shape == (64, 64, 24)
    assert scan.file_spacing_mm == pytest.approx((3.5, 3.5, 5.0))
    assert scan.dicom is not None and scan.dicom.slices == 24
    assert scan.volume.axcodes == ("L", "P", "S")
    same_head(scan.volume, head)
    assert validate(scan) == []


def test_all_expected_encoders_are_installed() -> None:
    assert set(available_transfer_syntaxes()) == {
        "explicit",
        "implicit",
        "deflated",
        "rle",
        "jpeg-ls",
        "jpeg2000",
    }


@pytest.mark.parametrize(
    ("slope", "intercept", "signed", "bits"),
    [(1.0, -1024.0, False, 12), (0.5, -1000.0, True, 16), (2.0, 0.0, True, 16), (1.0, -8192.0, False, 16)],
)
def test_hu_come_from_rescale_slope_and_intercept(
    tmp_path: Path, head: Volume, slope: float, intercept: float, signed: bool, bits: int
) -> None:
    datasets = ct_series(head, slope=slope, intercept=intercept, signed=signed, bits_stored=bits)
    stored = datasets[5].pixel_array
    assert stored.dtype == (np.int16 if signed else np.uint16)
    scan = decode(tmp_path, zip_bytes(datasets))
    expected = np.clip(head.hu, intercept, None) if not signed else head.hu
    assert np.abs(scan.volume.hu - expected).max() <= slope / 2 + 1e-3


def test_per_slice_rescale_is_applied_per_slice(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    # Re-store slice 7 with another intercept: its HU must not change.
    other = ct_series(head, intercept=-2000.0)[7]
    datasets[7] = other
    scan = decode(tmp_path, zip_bytes(datasets))
    np.testing.assert_array_equal(scan.volume.hu[:, :, 7], head.hu[:, :, 7])


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LPI", "RPI", "PSL", "ASR"])
def test_any_axis_order_and_direction_gives_the_same_head(tmp_path: Path, head: Volume, axcodes: str) -> None:
    scan = decode(tmp_path, zip_bytes(ct_series(reorient(head, axcodes)), shuffle_seed=5))
    # rows and columns keep the file's directions; slices are always stacked along row x column
    assert "".join(scan.volume.axcodes)[:2] == axcodes[:2]
    lps = np.diag([-1.0, -1.0, 1.0]) @ scan.volume.affine[:3, :3]
    assert np.dot(np.cross(lps[:, 0], lps[:, 1]), lps[:, 2]) > 0
    same_head(scan.volume, head)


def test_oblique_series_keeps_its_rotation(tmp_path: Path, head: Volume) -> None:
    angle = np.radians(20.0)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    oblique = Volume(hu=head.hu, affine=rotation @ head.affine)
    scan = decode(tmp_path, zip_bytes(ct_series(oblique)))
    np.testing.assert_allclose(scan.volume.affine, oblique.affine, atol=1e-5)
    assert "gantry_tilt" not in dict(scan.warnings)


def test_spacing_between_slices_is_ignored(tmp_path: Path, head: Volume) -> None:
    body = zip_bytes(ct_series(head, overrides={"SpacingBetweenSlices": "2.0", "SliceThickness": "1.0"}))
    assert decode(tmp_path, body).file_spacing_mm[2] == pytest.approx(5.0)


def test_tilted_gantry_is_read_with_its_true_geometry_and_a_warning(tmp_path: Path, head_lps: Volume) -> None:
    tilted = tilt_gantry(head_lps, 15.0)
    scan = decode(tmp_path, zip_bytes(ct_series(tilted)))
    assert ("gantry_tilt" in dict(scan.warnings)) and scan.dicom is not None
    assert scan.dicom.tilt_deg == pytest.approx(15.0, abs=0.01)
    np.testing.assert_allclose(scan.volume.affine, tilted.affine, atol=1e-4)
    # Geometry check: sample the decoded (sheared) volume at the original grid's world points.
    index = np.indices(head_lps.shape).reshape(3, -1).astype(np.float64)
    points = head_lps.affine @ np.vstack([index, np.ones((1, index.shape[1]))])
    source = np.linalg.solve(scan.volume.affine, points)[:3]
    resampled = ndi.map_coordinates(scan.volume.hu, source, order=1, mode="nearest").reshape(head_lps.shape)
    inside = np.zeros(head_lps.shape, bool)
    inside[8:-8, 8:-8, 3:-3] = True
    brain = inside & (np.abs(head_lps.hu - 35) < 20)
    assert np.median(np.abs(resampled[brain] - head_lps.hu[brain])) < 15.0


def test_enhanced_ct_multiframe_object(tmp_path: Path, head: Volume, head_lps: Volume) -> None:
    for transfer_syntax in ("explicit", "jpeg2000"):
        body = to_bytes(enhanced_ct(head_lps, transfer_syntax=transfer_syntax))
        scan = decode(tmp_path, body, "application/dicom")
        assert scan.dicom is not None and scan.dicom.multiframe and scan.dicom.slices == 24
        same_head(scan.volume, head)
    # the same object inside a zip, and as the only part of a multipart body
    assert decode(tmp_path, zip_bytes([enhanced_ct(head_lps)])).file_shape == (64, 64, 24)
    body, content_type = multipart_body([to_bytes(enhanced_ct(head_lps))])
    assert decode(tmp_path, body, content_type).file_shape == (64, 64, 24)


def test_large_zip_members_are_spooled_not_held_in_memory(
    tmp_path: Path, head: Volume, head_lps: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("api.ingest.members.IN_MEMORY_MEMBER_BYTES", 0)
    same_head(decode(tmp_path, zip_bytes([enhanced_ct(head_lps, transfer_syntax="rle")])).volume, head)
    same_head(decode(tmp_path, zip_bytes(ct_series(head_lps)[::-1])).volume, head)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]  # scratch copies removed


@pytest.mark.parametrize("subtype", ["form-data", "related"])
def test_multipart_series(tmp_path: Path, head: Volume, head_lps: Volume, subtype: str) -> None:
    parts = [to_bytes(ds) for ds in ct_series(head_lps, transfer_syntax="rle")][::-1]
    body, content_type = multipart_body(parts, subtype=subtype)
    scan = decode(tmp_path, body, content_type)
    same_head(scan.volume, head)
    # the parser spooled parts into a private directory that is gone afterwards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]


def test_multipart_framing_errors(tmp_path: Path, head: Volume) -> None:
    body, content_type = multipart_body([to_bytes(ct_series(head)[0])])
    assert refusal(tmp_path, body, "multipart/form-data").code == "unreadable_file"  # no boundary
    truncated = refusal(tmp_path, body[: len(body) // 2], content_type)
    assert (truncated.status, truncated.code) == (400, "unreadable_file")
    junk, junk_type = multipart_body([b"hello", b"world"], part_type="text/plain")
    assert refusal(tmp_path, junk, junk_type).code == "unreadable_file"


def test_bare_dataset_without_preamble(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head, transfer_syntax="implicit")
    bare = []
    for ds in datasets:
        buffer = pydicom.filebase.DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, True
        pydicom.filewriter.write_dataset(buffer, ds)  # implicit VR little endian, no preamble/meta
        bare.append(buffer.getvalue())
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        for n, data in enumerate(bare):
            out.writestr(f"{n}", data)
    same_head(decode(tmp_path, archive.getvalue()).volume, head)


def test_junk_entries_are_skipped_and_counted(tmp_path: Path, head: Volume) -> None:
    extra = {"README.txt": b"hello", "__MACOSX/._x": b"\0\5\26\7" * 20, "../../etc/passwd": b"root"}
    scan = decode(tmp_path, zip_bytes(ct_series(head), shuffle_seed=1, extra_files=extra))
    assert dict(scan.warnings)["ignored_files"].startswith("3 file(s)")
    assert not (tmp_path.parent / "etc").exists()


def test_real_head_slice_tiled_into_a_series(tmp_path: Path) -> None:
    source = pydicom.dcmread(get_testdata_file("693_UNCI.dcm"))
    scan = decode(tmp_path, zip_bytes(tile_slice(source, 20, 5.0)))
    assert scan.file_shape == (512, 512, 20)
    assert scan.file_spacing_mm == pytest.approx((0.478516, 0.478516, 5.0))
    expected = source.pixel_array.astype(np.float32) + float(source.RescaleIntercept)
    np.testing.assert_array_equal(scan.volume.hu[:, :, 11].T, expected)
    codes = [code for code, _ in validate(scan)]
    assert "lossy_compression" in codes  # the file says LossyImageCompression 01
    assert "body_part_unknown" in codes  # "5/5mm Plain" names no body part


@pytest.mark.parametrize("name", ["bad_sequence.dcm", "693_J2KR.dcm"])
def test_real_compressed_slices_decode(tmp_path: Path, name: str) -> None:
    """JPEG Lossless (process 14 SV1; no encoder exists, so a real slice is tiled) and JPEG 2000."""
    source = pydicom.dcmread(get_testdata_file(name))
    scan = decode(tmp_path, zip_bytes(tile_slice(source, 16, 2.5, overrides={"BodyPartExamined": "HEAD"})))
    assert scan.dicom is not None and scan.dicom.transfer_syntax_uid == source.file_meta.TransferSyntaxUID
    expected = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    np.testing.assert_array_equal(scan.volume.hu[:, :, 0].T, expected)


def test_unsupported_transfer_syntax(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head, transfer_syntax="rle")
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    problem = refusal(tmp_path, zip_bytes(datasets))
    assert (problem.status, problem.code) == (415, "unsupported_transfer_syntax")
    assert problem.observed == pydicom.uid.MPEG2MPML


def _series_problem(tmp_path: Path, datasets: list[Dataset]) -> ProblemError:
    problem = refusal(tmp_path, zip_bytes(datasets))
    assert problem.status == 422, (problem.code, problem.detail)
    return problem


def test_missing_slice(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    del datasets[10]
    problem = _series_problem(tmp_path, datasets)
    assert problem.code == "missing_slices" and problem.observed["missing_slices"] == 1


def test_non_uniform_spacing(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    for ds in datasets[12:]:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.5]
    assert _series_problem(tmp_path, datasets).code == "non_uniform_spacing"


def test_two_stacks_in_one_series(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    repeat = ct_series(head, seed="repeat")[:5]
    for ds in repeat:  # another acquisition at the same positions, filed under the same series
        ds.SeriesInstanceUID = datasets[0].SeriesInstanceUID
        ds.StudyInstanceUID = datasets[0].StudyInstanceUID
        ds.FrameOfReferenceUID = datasets[0].FrameOfReferenceUID
    assert _series_problem(tmp_path, datasets + repeat).code == "mixed_series"


def test_mixed_image_sizes(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    small = ct_series(Volume(hu=head.hu[:32], affine=head.affine))[3]
    small.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    datasets[3] = small
    problem = _series_problem(tmp_path, datasets)
    assert problem.code == "mixed_series" and problem.field == "Rows/Columns"


def test_mixed_frames_of_reference(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    datasets[4].FrameOfReferenceUID = pydicom.uid.generate_uid()
    assert _series_problem(tmp_path, datasets).field == "FrameOfReferenceUID"


def test_inconsistent_orientation(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(
        head, slice_overrides={6: {"ImageOrientationPatient": [1, 0, 0, 0, 0.9962, -0.0872]}}
    )
    assert _series_problem(tmp_path, datasets).code == "inconsistent_orientation"


def test_missing_geometry(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head, slice_overrides={2: {"ImagePositionPatient": None}})
    problem = _series_problem(tmp_path, datasets)
    assert problem.code == "missing_geometry" and problem.field == "ImagePositionPatient"


def test_gantry_tilt_beyond_range_is_refused(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(tilt_gantry(head, 40.0))
    assert _series_problem(tmp_path, datasets).code == "gantry_tilt"


def test_single_slice_and_short_series(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    problem = refusal(tmp_path, to_bytes(datasets[0]), "application/dicom")
    assert (problem.code, problem.observed) == ("too_few_slices", 1)
    assert _series_problem(tmp_path, datasets[:5]).code == "too_few_slices"


def test_not_ct_and_not_head(tmp_path: Path, head: Volume) -> None:
    assert _series_problem(tmp_path, ct_series(head, overrides={"Modality": "MR"})).code == "not_ct"
    chest = ct_series(
        head,
        overrides={
            "BodyPartExamined": "CHEST",
            "StudyDescription": "CT CHEST",
            "ProtocolName": "CHEST",
            "SeriesDescription": "AX 5mm",
        },
    )
    problem = _series_problem(tmp_path, chest)
    assert (problem.code, problem.observed) == ("not_head", "CHEST")
    del chest[5]  # what the series is is judged before its geometry
    assert _series_problem(tmp_path, chest).code == "not_head"


def test_contrast_is_a_warning(tmp_path: Path, head: Volume) -> None:
    scan = decode(tmp_path, zip_bytes(ct_series(head, overrides={"ContrastBolusAgent": "IOHEXOL"})))
    assert "contrast_enhanced" in dict(validate(scan))


def test_duplicate_files_are_dropped(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    scan = decode(tmp_path, zip_bytes(datasets + datasets[:3]))
    assert scan.file_shape == (64, 64, 24)
    assert "duplicate_instances" in dict(scan.warnings)


def test_zip_limits(tmp_path: Path, head: Volume) -> None:
    body = zip_bytes(ct_series(head))
    problem = refusal(tmp_path, body, limits=IngestLimits(max_members=10))
    assert (problem.status, problem.code, problem.observed) == (413, "payload_too_large", 24)
    problem = refusal(tmp_path, body, limits=IngestLimits(max_uncompressed_bytes=100_000))
    assert (problem.status, problem.field) == (413, "uncompressed_bytes")
    problem = refusal(tmp_path, body, limits=IngestLimits(max_voxels=64 * 64 * 20))
    assert (problem.status, problem.code) == (422, "volume_too_large")


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    archive = io.BytesIO()
    with (
        zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out,
        out.open("bomb", "w", force_zip64=True) as entry,
    ):
        for _ in range(64):
            entry.write(b"\0" * (1 << 20))
    problem = refusal(tmp_path, archive.getvalue(), limits=IngestLimits(max_uncompressed_bytes=32 << 20))
    assert (problem.status, problem.field) == (413, "uncompressed_bytes")


def test_encrypted_and_corrupt_zips(tmp_path: Path, head: Volume) -> None:
    body = bytearray(zip_bytes(ct_series(head)[:2]))
    central = body.find(b"PK\x01\x02")
    body[central + 8] |= 0x1  # "encrypted" flag in the central directory
    assert refusal(tmp_path, bytes(body)).code == "unreadable_file"
    assert refusal(tmp_path, b"PK\x03\x04" + b"\0" * 600).code == "unreadable_file"
    assert refusal(tmp_path, zip_bytes([], extra_files={"a.txt": b"x"})).code == "unreadable_file"


def test_truncated_pixel_data_is_unreadable(tmp_path: Path, head: Volume) -> None:
    datasets = ct_series(head)
    data = to_bytes(datasets[9])
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        for n, ds in enumerate(datasets):
            out.writestr(str(n), data[: len(data) - 4000] if n == 9 else to_bytes(ds))
    problem = refusal(tmp_path, archive.getvalue())
    assert (problem.status, problem.code) == (400, "unreadable_file")


def test_no_patient_identifier_reaches_problems_warnings_or_logs(
    tmp_path: Path, head: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    name, patient_id, birth, accession = "DOE^JANE", "MRN99887766", "19770412", "ACC55443322"
    identifying = {
        "PatientName": name,
        "PatientID": patient_id,
        "PatientBirthDate": birth,
        "AccessionNumber": accession,
        "SeriesDescription": "JANE DOE head 5mm",
        "StudyDescription": f"ACC {accession}",
        "BodyPartExamined": None,
    }
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)
    cases = [
        ct_series(head, overrides=identifying),  # accepted, with warnings
        ct_series(head, overrides={**identifying, "Modality": "MR"}),
        ct_series(head, overrides={**identifying, "BodyPartExamined": "CHEST"}),
        ct_series(head, overrides=identifying)[:4],
        ct_series(head, overrides=identifying) + ct_series(head, seed=9, overrides=identifying),  # ambiguous
    ]
    broken = ct_series(head, overrides=identifying)
    del broken[7]
    cases.append(broken)
    for datasets in cases:
        try:
            scan = decode(tmp_path, zip_bytes(datasets))
            texts.append(json.dumps(validate(scan)) + repr(scan.dicom))
        except ProblemError as error:
            texts.append(error.to_problem("r").model_dump_json())
    texts.append(caplog.text)
    blob = "\n".join(texts).upper()
    assert "AMBIGUOUS_SERIES" in blob and "NOT_CT" in blob and "MISSING_SLICES" in blob
    for identifier in ("DOE", "JANE", patient_id, birth, accession):
        assert identifier not in blob, identifier
    assert "[REDACTED]" in blob


def test_group_series_drops_a_localizer_filed_with_the_axials(head: Volume) -> None:
    from api.ingest.dicom import _headers_of

    datasets = ct_series(head)
    datasets[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    headers = [h for n, ds in enumerate(datasets) for h in _headers_of(ds, n, set())]
    candidates, warnings = group_series(headers)
    chosen, _ = select_series(candidates, None)
    assert len(chosen.headers) == 23 and "localizer_removed" in dict(warnings)


def test_evidence_holds_the_series_instances_without_pixels_only_when_asked(
    tmp_path: Path, head: Volume
) -> None:
    series = ct_series(head, seed="evidence")
    body = zip_bytes(series)
    assert decode(tmp_path, body).evidence == ()  # by default nothing with patient identifiers leaves
    evidence = decode(tmp_path, body, evidence=True).evidence
    assert sorted(ds.SOPInstanceUID for ds in evidence) == sorted(ds.SOPInstanceUID for ds in series)
    assert all("PixelData" not in ds for ds in evidence)
    assert {str(ds.PatientID) for ds in evidence} == {str(series[0].PatientID)}  # for the SR's patient
    assert len(pickle.loads(pickle.dumps(evidence))) == len(series)  # it crosses the worker process boundary


@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("bits_stored", [8, 12, 15, 16])
@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
def test_native_plane_equals_pixel_array(signed: int, bits_stored: int, syntax: str) -> None:
    """The fast read of an uncompressed 16-bit plane gives pydicom's values and dtype, also when the
    unused high bits hold garbage (pydicom shifts them out; so must we)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    from api.ingest.dicom import _native_plane

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 7, 5, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        16,
        bits_stored,
        bits_stored - 1,
        signed,
    )
    ds.PixelData = (
        np.random.default_rng(bits_stored).integers(0, 65536, 35, dtype=np.uint16).astype("<u2").tobytes()
    )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    native = _native_plane(read)
    assert native is not None
    assert native.dtype == read.pixel_array.dtype
    np.testing.assert_array_equal(native, read.pixel_array)
    # Anything else (here: a plane whose byte count is not rows x columns x 2) is left to pydicom.
    read.PixelData = read.PixelData + b"\0\0"
    assert _native_plane(read) is None
