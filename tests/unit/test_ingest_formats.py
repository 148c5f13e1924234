"""Single-file formats (NIfTI-1/2, .nii.gz, NRRD), sniffing and media types, and that the same head
decodes to the same volume from NIfTI, NRRD and DICOM."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from api.ingest import DecodedScan, decode_upload, sniff_format
from api.problems import ProblemError
from demo.dicom_writer import ct_series, multipart_body, phantom_head, reorient, zip_bytes
from headct.preprocess import preprocess, reorient_to_ras
from headct.volume import Volume

OCTET = "application/octet-stream"


@pytest.fixture(scope="module")
def head() -> Volume:
    volume = phantom_head()
    return volume.with_hu(np.rint(volume.hu))


def decode(tmp_path: Path, body: bytes, content_type: str = OCTET, **kwargs: object) -> DecodedScan:
    path = tmp_path / "upload"
    path.write_bytes(body)
    return decode_upload(path, content_type, **kwargs)  # type: ignore[arg-type]


def refusal(tmp_path: Path, body: bytes, content_type: str = OCTET) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        decode(tmp_path, body, content_type)
    return raised.value


def nrrd_bytes(
    tmp_path: Path, volume: Volume, space: str = "left-posterior-superior", **header: object
) -> bytes:
    lps = volume.affine.copy()
    if space in ("left-posterior-superior", "LPS"):
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    fields = {
        "space": space,
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "encoding": "gzip",
        **header,
    }
    path = tmp_path / "scan.nrrd"
    nrrd.write(str(path), volume.hu.astype(np.int16), header=fields)
    return path.read_bytes()


def test_nifti_plain_gzip_and_nifti2(tmp_path: Path, head: Volume) -> None:
    nifti1 = head.to_nifti().to_bytes()
    nifti2 = nib.Nifti2Image(head.hu, head.affine).to_bytes()
    for body, content_type in ((nifti1, OCTET), (gzip.compress(nifti1), "application/gzip"), (nifti2, OCTET)):
        scan = decode(tmp_path, body, content_type)
        assert scan.source_format == "nifti" and scan.file_shape == (64, 64, 24)
        np.testing.assert_array_equal(scan.volume.hu, head.hu)
        np.testing.assert_allclose(scan.volume.affine, head.affine)
        assert scan.warnings == []
    # the upload file is left where it was, under its own name
    assert (tmp_path / "upload").is_file()


def test_nifti_scaling_and_sform_are_respected(tmp_path: Path, head: Volume) -> None:
    stored = ((head.hu + 1024.0) / 2.0).astype(np.int16)
    image = nib.Nifti1Image(stored, None)
    image.header.set_slope_inter(2.0, -1024.0)
    affine = reorient(head, "LPS").affine
    image.set_sform(affine, code=1)
    image.set_qform(np.diag([9.0, 9.0, 9.0, 1.0]), code=0)
    scan = decode(tmp_path, image.to_bytes())
    np.testing.assert_allclose(scan.volume.affine, affine)
    np.testing.assert_allclose(scan.volume.hu, stored * 2.0 - 1024.0)


def test_nifti_without_orientation_warns(tmp_path: Path, head: Volume) -> None:
    image = nib.Nifti1Image(head.hu, None)
    image.header.set_zooms((3.5, 3.5, 5.0))
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    scan = decode(tmp_path, image.to_bytes())
    assert "no_orientation" in dict(scan.warnings)


def test_nifti_shapes(tmp_path: Path, head: Volume) -> None:
    singleton = nib.Nifti1Image(head.hu[..., None], head.affine).to_bytes()
    assert decode(tmp_path, singleton).volume.shape == (64, 64, 24)
    problem = refusal(tmp_path, nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)).to_bytes())
    assert (problem.code, problem.observed) == ("not_3d", [8, 8, 8, 2])
    problem = refusal(tmp_path, nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)).to_bytes())
    assert problem.code == "not_3d"


def test_broken_niftis(tmp_path: Path, head: Volume) -> None:
    body = head.to_nifti().to_bytes()
    problem = refusal(tmp_path, body[:5000])
    assert (problem.status, problem.code) == (400, "unreadable_file")
    assert "/" not in problem.detail.replace("<file>", "")  # no server paths in the detail
    assert refusal(tmp_path, gzip.compress(body)[:3000], "application/gzip").code == "unreadable_file"
    singular = nib.Nifti1Image(head.hu, head.affine)
    singular.set_qform(None, code=0)
    singular.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a zero voxel size
    assert refusal(tmp_path, singular.to_bytes()).code == "bad_spacing"
    pair = nib.Nifti1Pair(head.hu, head.affine)
    header_only = pair.header.binaryblock + b"\0" * 200
    assert refusal(tmp_path, header_only).code == "unreadable_file"


def test_nrrd(tmp_path: Path, head: Volume) -> None:
    for space, extra in (("left-posterior-superior", {}), ("RAS", {"encoding": "raw"})):
        scan = decode(tmp_path, nrrd_bytes(tmp_path, head, space, **extra), "application/x-nrrd")
        assert scan.source_format == "nrrd"
        np.testing.assert_array_equal(scan.volume.hu, head.hu)
        np.testing.assert_allclose(scan.volume.affine, head.affine, atol=1e-9)
    lps = reorient(head, "LPS")
    scan = decode(tmp_path, nrrd_bytes(tmp_path, lps))
    np.testing.assert_array_equal(reorient_to_ras(scan.volume).hu, head.hu)


def test_nrrd_refusals(tmp_path: Path, head: Volume) -> None:
    no_space = nrrd_bytes(tmp_path, head, "scanner-xyz")
    problem = refusal(tmp_path, no_space)
    assert (problem.code, problem.observed) == ("missing_geometry", "scanner-xyz")
    (tmp_path / "secret.raw").write_bytes(b"\0" * 100)
    detached = b"NRRD0004\ntype: int16\ndimension: 3\nsizes: 5 5 2\nencoding: raw\ndata file: secret.raw\n\n"
    problem = refusal(tmp_path, detached)
    assert problem.code == "unreadable_file" and "detached" in problem.detail
    absolute = detached.replace(b"secret.raw", str(tmp_path / "secret.raw").encode())
    assert refusal(tmp_path, absolute).code == "unreadable_file"
    four_d = tmp_path / "4d.nrrd"
    nrrd.write(
        str(four_d),
        np.zeros((2, 8, 8, 8), np.int16),
        header={"kinds": ["list", "domain", "domain", "domain"]},
    )
    assert refusal(tmp_path, four_d.read_bytes()).code in ("not_3d", "missing_geometry")
    assert refusal(tmp_path, b"NRRD0004\n" + b"x" * 70000).code == "unreadable_file"


def test_sniffing_by_magic_bytes(tmp_path: Path, head: Volume) -> None:
    nifti = head.to_nifti().to_bytes()
    cases = {
        "nifti": nifti,
        "nifti-gz": gzip.compress(nifti),
        "nifti-pair": nib.Nifti1Pair(head.hu, head.affine).header.binaryblock + b"\0" * 200,
        "dicom": b"\0" * 128 + b"DICM" + b"\0" * 600,
        "zip": b"PK\x03\x04" + b"\0" * 600,
        "nrrd": b"NRRD0004\n" + b"\0" * 600,
        None: b"definitely not medical" * 40,
    }
    for expected, content in cases.items():
        path = tmp_path / "upload"
        path.write_bytes(content)
        assert sniff_format(path) == expected


def test_media_types(tmp_path: Path, head: Volume) -> None:
    nifti = head.to_nifti().to_bytes()
    for accepted in ("", OCTET, "application/gzip", "application/dicom", "application/zip; charset=x"):
        assert decode(tmp_path, nifti, accepted).source_format == "nifti"
    for refused in ("text/plain", "image/png", "multipart/alternative; boundary=x"):
        problem = refusal(tmp_path, nifti, refused)
        assert (problem.status, problem.code) == (415, "unsupported_media_type")
    problem = refusal(tmp_path, b"certainly not a scan" * 40)
    assert (problem.status, problem.code) == (400, "unreadable_file")


def test_multipart_with_one_nifti_part(tmp_path: Path, head: Volume) -> None:
    body, content_type = multipart_body([head.to_nifti().to_bytes()], part_type=OCTET)
    scan = decode(tmp_path, body, content_type)
    assert scan.source_format == "nifti"
    np.testing.assert_array_equal(scan.volume.hu, head.hu)


def test_series_uid_is_ignored_with_a_warning_for_single_volume_formats(tmp_path: Path, head: Volume) -> None:
    scan = decode(tmp_path, head.to_nifti().to_bytes(), series_uid="1.2.3")
    assert "series_uid_ignored" in dict(scan.warnings)


def test_the_same_head_from_every_format_gives_the_same_model_input(tmp_path: Path) -> None:
    head = phantom_head(shape=(40, 40, 20), spacing_mm=(4.0, 4.0, 5.0), lesion_hu=70.0)
    head = head.with_hu(np.rint(head.hu))
    lps = reorient(head, "LPS")
    volumes = {
        "nifti": decode(tmp_path, head.to_nifti().to_bytes()).volume,
        "nifti-lps": decode(tmp_path, lps.to_nifti().to_bytes()).volume,
        "nrrd": decode(tmp_path, nrrd_bytes(tmp_path, lps)).volume,
        "dicom": decode(
            tmp_path, zip_bytes(ct_series(lps, transfer_syntax="jpeg-ls")), "application/zip"
        ).volume,
    }
    reference = preprocess(volumes["nifti"])
    for name, volume in volumes.items():
        # Equal up to float16 rounding: RAS and LPS copies are resampled with sums in opposite orders
        # (~1e-7 relative), so a value on a rounding boundary may land one fp16 step apart.
        diff = np.abs(preprocess(volume).astype(np.float32) - reference.astype(np.float32))
        assert diff.max() <= 2.0**-11 and (diff > 0).mean() < 1e-3, name  # measured 1.1e-4
