"""`api.ingest.validation`: each volume rule and each DICOM header rule, with a case that passes and one
that fails."""

from __future__ import annotations

import numpy as np
import pytest

from api.ingest import DecodedScan, DicomInfo
from api.ingest.validation import (
    MIN_COVERAGE_MM,
    MIN_SLICES,
    check_dicom_header,
    eroded,
    head_volume_ml,
    validate,
)
from api.problems import ProblemError
from demo.dicom_writer import phantom_head
from headct.volume import Volume

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def head() -> Volume:
    return phantom_head()


def code_of(volume: Volume) -> str:
    with pytest.raises(ProblemError) as raised:
        validate(volume)
    assert raised.value.status == 422
    return raised.value.code


def info(**values: object) -> DicomInfo:
    fields: dict[str, object] = {
        "series_uid": "1.2.3",
        "sop_class_uid": CT,
        "modality": "CT",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "body_part": "HEAD",
        "study_description": "CT HEAD WO CONTRAST",
    }
    fields.update(values)
    return DicomInfo(**fields)  # type: ignore[arg-type]


def test_a_head_passes(head: Volume) -> None:
    assert validate(head) == []
    assert head_volume_ml(head) > 500


def test_non_finite(head: Volume) -> None:
    hu = head.hu.copy()
    hu[3, 4, 5] = np.inf
    assert code_of(head.with_hu(hu)) == "non_finite_values"


@pytest.mark.parametrize("spacing", [(0.1, 0.5, 0.5), (1.0, 1.0, 7.5), (0.5, 0.5, 1e-5)])
def test_bad_spacing(head: Volume, spacing: tuple[float, float, float]) -> None:
    volume = Volume(hu=head.hu, affine=np.diag([*spacing, 1.0]))
    with pytest.raises(ProblemError) as raised:
        validate(volume)
    assert raised.value.code == "bad_spacing" and raised.value.field == "spacing_mm"


def test_values_that_are_not_hounsfield_units(head: Volume) -> None:
    assert code_of(head.with_hu(head.hu + 1024.0)) == "hu_out_of_range"  # raw stored values, no intercept
    assert code_of(head.with_hu(head.hu / 1000.0)) == "hu_out_of_range"  # normalised
    assert code_of(head.with_hu(head.hu * 100.0)) == "hu_out_of_range"  # beyond the scale
    stripped = np.where(head.hu < -500, 0.0, head.hu).astype(np.float32)  # skull-stripped, background 0
    with pytest.raises(ProblemError) as raised:
        validate(head.with_hu(stripped))
    assert raised.value.code == "hu_out_of_range" and raised.value.observed["air_fraction"] == 0.0
    padded = head.hu.copy()
    padded[:4] = -3024.0  # padding outside the reconstruction circle is fine
    assert validate(head.with_hu(padded)) == []


def test_too_few_slices(head: Volume) -> None:
    thin = Volume(hu=head.hu[:, :, : MIN_SLICES - 1], affine=np.diag([3.5, 3.5, 5.0, 1.0]))
    assert code_of(thin) == "too_few_slices"


def test_no_head_only_air_or_table(head: Volume) -> None:
    assert code_of(head.with_hu(np.full(head.shape, -1000.0, np.float32))) == "no_foreground"
    table_only = head.hu.copy()
    table_only[(table_only > -300) & (table_only < 200)] = -1000.0  # remove brain and scalp ...
    table_only[table_only > 500] = -1000.0  # ... and skull: the table (300 HU skins) remains
    assert (table_only > 0).any()  # the training pipeline's "> 0 HU" crop would still find it
    assert code_of(head.with_hu(table_only)) == "no_foreground"


def test_insufficient_coverage() -> None:
    short = phantom_head(shape=(64, 64, 12), spacing_mm=(3.5, 3.5, 5.0))  # 60 mm
    assert short.extent_mm[2] < MIN_COVERAGE_MM
    assert code_of(short) == "insufficient_coverage"


def test_validate_returns_the_decoder_warnings(head: Volume) -> None:
    scan = DecodedScan(head, "dicom", head.shape, head.spacing_mm, warnings=[("gantry_tilt", "corrected")])
    assert validate(scan) == [("gantry_tilt", "corrected")]


def test_not_ct() -> None:
    for values in ({"modality": "MR"}, {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}):
        with pytest.raises(ProblemError) as raised:
            check_dicom_header(info(**values))
        assert raised.value.code == "not_ct"
    assert check_dicom_header(info(sop_class_uid="1.2.840.10008.5.1.4.1.1.2.1")) == []


@pytest.mark.parametrize(
    "values",
    [
        {"body_part": "CHEST", "study_description": "CT THORAX"},
        {"body_part": "ABDOMEN", "study_description": ""},
        {"body_part": "", "study_description": "CT ABDOMEN PELVIS W/O", "series_description": "AX 5"},
        {"body_part": "LSPINE", "study_description": ""},
    ],
)
def test_not_head(values: dict[str, str]) -> None:
    with pytest.raises(ProblemError) as raised:
        check_dicom_header(info(**values))
    assert raised.value.code == "not_head"


@pytest.mark.parametrize(
    "values",
    [
        {"body_part": "BRAIN"},
        {"body_part": "", "study_description": "CT HEAD"},
        {"body_part": "NECK", "study_description": "CTA HEAD NECK"},  # head named: accepted (with contrast)
        {"body_part": "", "study_description": "", "protocol_name": "Routine Cerebrum"},
    ],
)
def test_head_is_recognised(values: dict[str, str]) -> None:
    assert "body_part_unknown" not in dict(check_dicom_header(info(**values)))


def test_body_part_unknown_is_a_warning() -> None:
    warnings = check_dicom_header(info(body_part="", study_description="", series_description="5/5mm Plain"))
    assert [code for code, _ in warnings] == ["body_part_unknown"]


@pytest.mark.parametrize(
    ("values", "contrast"),
    [
        ({"contrast_agent": "OMNIPAQUE 350"}, True),
        ({"contrast_agent": "NONE"}, False),
        ({"study_description": "CTA HEAD"}, True),
        ({"study_description": "CT HEAD W CONTRAST"}, True),
        ({"series_description": "HEAD C+ 5mm"}, True),
        ({"study_description": "CT HEAD WO CONTRAST"}, False),
        ({"study_description": "CT HEAD W/O CONTRAST"}, False),
        ({"study_description": "CT BRAIN NON-CONTRAST"}, False),
        ({"study_description": "CT HEAD"}, False),
    ],
)
def test_contrast_warning(values: dict[str, str], contrast: bool) -> None:
    assert ("contrast_enhanced" in dict(check_dicom_header(info(**values)))) is contrast


@pytest.mark.parametrize("air_fraction", [0.0, 0.005, 0.0099, 0.01, 0.0101, 0.5])
def test_air_count_stops_early_with_the_same_decision(air_fraction: float) -> None:
    """`_air_voxels` may stop counting once enough air is found: the rule's decision must be the one a
    full count gives, at and around the threshold."""
    from api.ingest import validation

    rng = np.random.default_rng(3)
    sample = np.full((40, 30, 20), 40.0, dtype=np.float32, order="F")
    flat = sample.reshape(-1, order="F")
    flat[rng.choice(flat.size, round(air_fraction * flat.size), replace=False)] = -1000.0
    full = int(np.count_nonzero((sample >= validation.AIR_HU[0]) & (sample <= validation.AIR_HU[1])))
    enough = int(np.ceil(validation.MIN_AIR_FRACTION * sample.size))
    counted = validation._air_voxels(sample, enough)
    assert (counted / sample.size < validation.MIN_AIR_FRACTION) == (
        full / sample.size < validation.MIN_AIR_FRACTION
    )
    assert counted == full or counted >= enough


def test_value_range_sees_nan_and_infinity(head: Volume) -> None:
    """require_finite relies on min/max propagating NaN and infinities (no pass of its own)."""
    for bad in (np.nan, np.inf, -np.inf):
        hu = head.hu.copy()
        hu[3, 4, 5] = bad
        assert code_of(Volume(hu=hu, affine=head.affine)) == "non_finite_values"


@pytest.mark.parametrize("seed", range(4))
def test_eroded_is_scipys_minimum_filter(seed: int) -> None:
    """The head check's erosion equals scipy's minimum filter with outside = False: random masks and
    radii, axes shorter than the box, radius 0, C and Fortran order."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    for _ in range(150):
        shape = tuple(int(n) for n in rng.integers(1, 14, 3))
        radii = tuple(int(r) for r in rng.integers(0, 5, 3))
        mask = rng.random(shape) < rng.uniform(0.6, 1.0)
        if rng.random() < 0.5:
            mask = np.asfortranarray(mask)
        size = tuple(2 * r + 1 for r in radii)
        expected = ndi.minimum_filter(mask.view(np.uint8), size=size, mode="constant", cval=0)
        np.testing.assert_array_equal(eroded(mask, radii), expected.astype(bool), err_msg=f"{shape} {radii}")
