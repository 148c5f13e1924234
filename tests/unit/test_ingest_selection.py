"""Series selection in uploads that hold several series: the rules, the tie -> ambiguous_series, the
caller's ?series_uid=, and the refusals when nothing fits."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from api.ingest import DecodedScan, decode_upload
from api.ingest.selection import kernel_class
from api.problems import ProblemError
from demo.dicom_writer import ct_series, phantom_head, zip_bytes
from headct.volume import Volume

SOFT = {"ConvolutionKernel": "H30s", "SeriesDescription": "HEAD 5mm brain"}
BONE = {"ConvolutionKernel": "H70h", "SeriesDescription": "HEAD 5mm bone"}
LOCALIZER = ("ORIGINAL", "PRIMARY", "LOCALIZER")


@pytest.fixture(scope="module")
def head() -> Volume:
    return phantom_head(shape=(48, 48, 20), spacing_mm=(4.5, 4.5, 5.0))


def series(head: Volume, seed: str, number: int, **kwargs: object) -> list[Dataset]:
    return ct_series(head, seed=seed, series_number=number, **kwargs)  # type: ignore[arg-type]


def decode(tmp_path: Path, datasets: list[Dataset], series_uid: str | None = None) -> DecodedScan:
    path = tmp_path / "upload"
    path.write_bytes(zip_bytes(datasets, shuffle_seed=7))
    return decode_upload(path, "application/zip", series_uid=series_uid)


def refusal(tmp_path: Path, datasets: list[Dataset], series_uid: str | None = None) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        decode(tmp_path, datasets, series_uid)
    assert raised.value.status == 422
    return raised.value


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("H30s", 2),
        ("J40s", 2),
        ("Hr38", 2),
        ("Qr40d", 2),
        ("STANDARD", 2),
        ("SOFT", 2),
        ("FC21", 2),
        ("UB", 2),
        ("H70h", 0),
        ("Br64", 0),
        ("BONE", 0),
        ("BONEPLUS", 0),
        ("FC30", 0),
        ("YC", 0),
        ("LUNG", 0),
        ("", 1),
        ("XYZ", 1),
    ],
)
def test_kernel_classes(kernel: str, expected: int) -> None:
    assert kernel_class(kernel) == expected


def test_soft_tissue_series_is_preferred_over_bone_and_localizer(tmp_path: Path, head: Volume) -> None:
    brain = series(head, "brain", 2, overrides=SOFT)
    bone = series(head, "bone", 3, overrides=BONE)
    scout = series(head, "scout", 1, image_type=LOCALIZER)[:2]
    scan = decode(tmp_path, bone + scout + brain)
    assert scan.dicom is not None and scan.dicom.series_uid == brain[0].SeriesInstanceUID
    detail = dict(scan.warnings)["series_selected"]
    assert brain[0].SeriesInstanceUID in detail and "2 other series" in detail


def test_original_axial_beats_a_reformat(tmp_path: Path, head: Volume) -> None:
    axial = series(head, "axial", 2, overrides=SOFT)
    mpr = series(head, "mpr", 4, overrides=SOFT, image_type=("DERIVED", "SECONDARY", "MPR"))
    derived = series(head, "derived", 5, overrides=SOFT, image_type=("DERIVED", "PRIMARY", "AXIAL"))
    scan = decode(tmp_path, mpr + derived + axial)
    assert scan.dicom is not None and scan.dicom.series_uid == axial[0].SeriesInstanceUID


def test_more_slices_win_between_otherwise_equal_series(tmp_path: Path, head: Volume) -> None:
    thin = phantom_head(shape=(48, 48, 40), spacing_mm=(4.5, 4.5, 2.5))
    thick = series(head, "thick", 2, overrides=SOFT)
    thin_series = series(thin, "thin", 3, overrides=SOFT)
    scan = decode(tmp_path, thick + thin_series)
    assert scan.dicom is not None and scan.dicom.series_uid == thin_series[0].SeriesInstanceUID


def test_a_tie_is_ambiguous_and_lists_the_candidates(tmp_path: Path, head: Volume) -> None:
    first = series(head, "a", 2, overrides=SOFT)
    second = series(head, "b", 3, overrides=SOFT)
    problem = refusal(tmp_path, first + second)
    assert problem.code == "ambiguous_series" and problem.field == "series_uid"
    listed = {candidate["series_uid"]: candidate for candidate in problem.observed}
    assert set(listed) == {first[0].SeriesInstanceUID, second[0].SeriesInstanceUID}
    assert listed[first[0].SeriesInstanceUID]["slices"] == 20
    assert listed[first[0].SeriesInstanceUID]["kernel"] == "H30s"
    # the caller resolves it
    chosen = decode(tmp_path, first + second, series_uid=second[0].SeriesInstanceUID)
    assert chosen.dicom is not None and chosen.dicom.series_uid == second[0].SeriesInstanceUID
    assert "series_selected" not in dict(chosen.warnings)


def test_series_uid_can_pick_the_bone_series(tmp_path: Path, head: Volume) -> None:
    brain = series(head, "brain", 2, overrides=SOFT)
    bone = series(head, "bone", 3, overrides=BONE)
    scan = decode(tmp_path, brain + bone, series_uid=f" {bone[0].SeriesInstanceUID} ")
    assert scan.dicom is not None and scan.dicom.kernel == "H70h"


def test_unknown_series_uid(tmp_path: Path, head: Volume) -> None:
    problem = refusal(tmp_path, series(head, "a", 2), series_uid="1.2.3.4")
    assert problem.code == "series_not_found" and problem.observed == "1.2.3.4"
    assert problem.expected[0]["series_uid"]


def test_requested_series_must_still_be_suitable(tmp_path: Path, head: Volume) -> None:
    axial = series(head, "axial", 2)
    scout = series(head, "scout", 1, image_type=LOCALIZER)
    problem = refusal(tmp_path, axial + scout, series_uid=scout[0].SeriesInstanceUID)
    assert problem.code == "unsuitable_series" and "LOCALIZER" in problem.detail


def test_nothing_suitable(tmp_path: Path, head: Volume) -> None:
    mr = series(head, "mr", 1, overrides={"Modality": "MR"})
    pet = series(head, "pt", 2, overrides={"Modality": "PT"})
    problem = refusal(tmp_path, mr + pet)
    assert (problem.code, problem.observed) == ("not_ct", ["MR", "PT"])
    scout = series(head, "scout", 1, image_type=LOCALIZER)
    mpr = series(head, "mpr", 2, image_type=("DERIVED", "SECONDARY", "MPR"))
    problem = refusal(tmp_path, scout + mpr + mr)
    assert problem.code == "unsuitable_series"
    assert {c.get("excluded") for c in problem.observed} == {
        "ImageType LOCALIZER",
        "ImageType MPR, SECONDARY",
        "modality MR",
    }


def test_secondary_capture_is_not_ct(tmp_path: Path, head: Volume) -> None:
    capture = series(head, "sc", 1, overrides={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"})
    assert refusal(tmp_path, capture).code == "not_ct"
