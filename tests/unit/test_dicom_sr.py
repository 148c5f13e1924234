"""The DICOM SR answer (api/results/dicom_sr.py): valid for dciodvfy (dicom3tools, zero errors) and, where
installed, DCMTK; read back with pydicom and highdicom it gives the inputs (findings, probabilities,
algorithm, references, patient and study); the same inputs, UIDs and time give the same bytes."""

from __future__ import annotations

import copy
import hashlib
import io
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from api.results import dicom_sr
from api.results.dicom_sr import (
    ABSENT,
    PRESENT,
    Algorithm,
    FindingResult,
    evaluation_concept,
    finding_concept,
    structured_report,
)
from demo.dicom_writer import ct_series, phantom_head

SHA256 = hashlib.sha256(b"synthetic weights").hexdigest()
ALGORITHM = Algorithm(name="fm-hct-demo", version="0.1.0", model_sha256=SHA256, synthetic_demo=True)
FINDINGS = (
    FindingResult("hemorrhage", probability=0.91, threshold=0.5, positive=True),
    FindingResult("edema", probability=0.1 + 0.2, threshold=0.45, positive=False),  # 0.30000000000000004
    FindingResult("midline_shift", probability=0.02, threshold=0.35, positive=False),  # no SNOMED code
)
NOW = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
SERIES_UID = "1.2.826.0.1.3680043.8.498.1001"
SOP_UID = "1.2.826.0.1.3680043.8.498.1002"


@pytest.fixture(scope="module")
def evidence() -> list[Dataset]:
    """A small synthetic CT series, headers only (as the ingest reader hands them over)."""
    volume = phantom_head(shape=(32, 32, 6), spacing_mm=(7.0, 7.0, 10.0))
    series = ct_series(volume.with_hu(np.rint(volume.hu)), seed="dicom-sr")
    for ds in series:
        del ds.PixelData
    return series


def build(evidence: list[Dataset], **kwargs: object) -> Dataset:
    """The SR of FINDINGS / ALGORITHM with fixed UIDs and time unless overridden."""
    arguments: dict[str, object] = {
        "findings": FINDINGS,
        "algorithm": ALGORITHM,
        "series_instance_uid": SERIES_UID,
        "sop_instance_uid": SOP_UID,
        "now": NOW,
    }
    arguments.update(kwargs)
    return structured_report(evidence, **arguments)  # type: ignore[arg-type]


def encode(sr: Dataset) -> bytes:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(sr: Dataset, path: Path) -> Path:
    path.write_bytes(encode(sr))
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's error and warning lines for `path`. Missing binary: a failure, not a skip (the
    validation is the point of these tests)."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed: run `make tools` (as root)")
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [
        line for line in lines if line.startswith("Warning")
    ]


def content_items(item: Dataset) -> Iterator[Dataset]:
    """Every content item below `item`, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from content_items(child)


def texts(item: Dataset, meaning: str) -> list[str]:
    """The TEXT values below `item` whose concept name has `meaning`."""
    return [
        child.TextValue
        for child in content_items(item)
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def report(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    """The TID 1500 content of a read-back SR (highdicom types `content` as a plain sequence)."""
    return cast(hd.sr.MeasurementReport, sr.content)


# --- validation ------------------------------------------------------------------------------------


def without(evidence: list[Dataset], *keywords: str) -> list[Dataset]:
    """Copies of `evidence` without `keywords` (a scanner or anonymiser that left type 2 attributes out)."""
    stripped = [copy.deepcopy(ds) for ds in evidence]
    for ds in stripped:
        for keyword in keywords:
            delattr(ds, keyword)
    return stripped


VARIANTS: dict[str, dict[str, Any]] = {
    "synthetic": {},
    "clinical": {"algorithm": replace(ALGORITHM, synthetic_demo=False)},
    "naive-time": {"now": NOW.replace(tzinfo=None)},
    "long-names": {
        "findings": (
            FindingResult("intracranial_hemorrhage_subdural", 0.7, 0.5, positive=True),  # Long Code Value
            FindingResult("x" * 64, 0.3, 0.5, positive=False),
        ),
        "algorithm": Algorithm("a" * 64, "v" * 64, SHA256, synthetic_demo=True),
    },
    "one-finding": {"findings": FINDINGS[:1]},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dciodvfy_finds_no_error(evidence: list[Dataset], tmp_path: Path, variant: str) -> None:
    errors, _warnings = dciodvfy(write(build(evidence, **VARIANTS[variant]), tmp_path / "sr.dcm"))
    assert errors == []


def test_dciodvfy_no_error_without_type2_patient_attributes(evidence: list[Dataset], tmp_path: Path) -> None:
    stripped = without(evidence, "PatientSex", "StudyID", "AccessionNumber", "PatientBirthDate")
    sr = build(stripped)
    errors, _warnings = dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert errors == []
    for keyword in ("PatientSex", "StudyID", "AccessionNumber", "PatientBirthDate"):
        assert sr[keyword].is_empty, keyword  # type 2: present, empty
    assert "PatientSex" not in stripped[0]  # the caller's datasets are not modified


def test_dciodvfy_sees_errors(tmp_path: Path, evidence: list[Dataset]) -> None:
    """The check can fail: a broken SR (no Value Type on the root) is reported as an error."""
    sr = build(evidence)
    del sr.ValueType
    errors, _warnings = dciodvfy(write(sr, tmp_path / "broken.dcm"))
    assert errors


def test_dcmtk_reads_it_without_complaint(evidence: list[Dataset], tmp_path: Path) -> None:
    """DCMTK checks the SR IOD's relationship constraints and value types (optional: package dcmtk)."""
    if shutil.which("dsrdump") is None or shutil.which("dsr2xml") is None:
        pytest.skip("DCMTK (dsrdump, dsr2xml) not installed")
    path = write(build(evidence), tmp_path / "sr.dcm")
    dump = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    complaints = [line for line in dump.stderr.splitlines() if line[:2] in {"W:", "E:", "F:"}]
    assert complaints == []
    assert "Intracranial hemorrhage" in dump.stdout
    xml = subprocess.run(["dsr2xml", str(path)], capture_output=True, timeout=60, check=True)
    root = ET.fromstring(xml.stdout)
    assert root.get("type") == "Comprehensive 3D SR"


# --- read back -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_back(evidence: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> hd.sr.Comprehensive3DSR:
    path = write(build(evidence), tmp_path_factory.mktemp("sr") / "sr.dcm")
    assert pydicom.dcmread(path).SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def test_findings_read_back(read_back: hd.sr.Comprehensive3DSR) -> None:
    """One TID 1501 group per finding: its name, Present/Absent, probability and threshold, exactly."""
    groups = {group.tracking_identifier: group for group in report(read_back).get_image_measurement_groups()}
    assert list(groups) == [finding.name for finding in FINDINGS]
    for finding in FINDINGS:
        group = groups[finding.name]
        assert group.finding_type == finding_concept(finding.name)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == evaluation_concept(finding.name)
        assert evaluation.value == (PRESENT if finding.positive else ABSENT)
        (probability,) = group.get_measurements(name=dicom_sr.PROBABILITY)
        (threshold,) = group.get_measurements(name=dicom_sr.THRESHOLD)
        assert (probability.value, threshold.value) == (finding.probability, finding.threshold)
        assert probability.unit == dicom_sr.UNITY


def test_snomed_where_known(read_back: hd.sr.Comprehensive3DSR) -> None:
    (group, *_) = report(read_back).get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.name.scheme_designator) == ("1386000", "SCT")
    assert evaluation_concept("midline_shift").scheme_designator == dicom_sr.CODING_SCHEME
    schemes = [item.CodingSchemeDesignator for item in read_back.CodingSchemeIdentificationSequence]
    assert schemes == [dicom_sr.CODING_SCHEME]


def test_algorithm_read_back(read_back: hd.sr.Comprehensive3DSR) -> None:
    """IHE AIR: algorithm name, version and weights in every group and in the device observer."""
    for group in report(read_back).get_image_measurement_groups():
        item = group[0]
        assert texts(item, "Algorithm Name") == [ALGORITHM.name]
        assert texts(item, "Algorithm Version") == [ALGORITHM.version]
        parameters = texts(item, "Algorithm Parameters")
        assert f"model_sha256={SHA256}" in parameters
        threshold = next(f.threshold for f in FINDINGS if f.name == group.tracking_identifier)
        assert f"decision_threshold={threshold!r}" in parameters
        assert any("NOT FOR CLINICAL USE" in parameter for parameter in parameters)
    (observer,) = report(read_back).get_observer_contexts()
    assert observer.observer_type == hd.sr.CodedConcept.from_code(codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == dicom_sr.device_uid(ALGORITHM)
    assert attributes.model_name == f"{ALGORITHM.name} {ALGORITHM.version}"
    assert attributes.serial_number == SHA256
    assert (read_back.Manufacturer, read_back.ManufacturerModelName) == ("HeadCT-Serve", ALGORITHM.name)
    assert read_back.SoftwareVersions == ALGORITHM.version


def test_every_source_instance_referenced(
    read_back: hd.sr.Comprehensive3DSR, evidence: list[Dataset]
) -> None:
    """Evidence sequence and image library both list exactly the source series' instances."""
    (study,) = read_back.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == evidence[0].StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == evidence[0].SeriesInstanceUID
    expected = {(ds.SOPClassUID, ds.SOPInstanceUID) for ds in evidence}
    listed = {
        (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) for ref in series.ReferencedSOPSequence
    }
    assert listed == expected
    library = [
        (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
        for item in content_items(read_back)
        if item.ValueType == "IMAGE"
        for ref in item.ReferencedSOPSequence
    ]
    assert sorted(library) == sorted(expected)  # each once


def test_filed_under_the_source_study(read_back: hd.sr.Comprehensive3DSR, evidence: list[Dataset]) -> None:
    """Patient and study attributes are the evidence's, so the PACS files the SR under the same study;
    the series is new and says what it is."""
    source = evidence[0]
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
    ):
        assert read_back[keyword].value == source[keyword].value, keyword
    assert (read_back.SeriesInstanceUID, read_back.SOPInstanceUID) == (SERIES_UID, SOP_UID)
    assert read_back.Modality == "SR" and read_back.SeriesNumber == dicom_sr.SERIES_NUMBER
    assert read_back.SeriesDescription == "fm-hct-demo 0.1.0 results - NOT FOR CLINICAL USE"
    assert (read_back.CompletionFlag, read_back.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (read_back.ContentDate, read_back.ContentTime) == ("20240506", "070809.123456")
    assert read_back.TimezoneOffsetFromUTC == "+0000"


# --- determinism and inputs ------------------------------------------------------------------------


def test_deterministic_given_uids_and_time(evidence: list[Dataset]) -> None:
    assert encode(build(evidence)) == encode(build(evidence))


def test_new_uids_when_not_given(evidence: list[Dataset]) -> None:
    first, second = (
        build(evidence, series_instance_uid=None, sop_instance_uid=None, now=None) for _ in range(2)
    )
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    tracking = [
        {
            g.tracking_uid
            for g in report(hd.sr.Comprehensive3DSR.from_dataset(sr)).get_image_measurement_groups()
        }
        for sr in (first, second)
    ]
    assert not tracking[0] & tracking[1]  # a tracking UID names one finding in one report


def test_series_description_keeps_the_notice() -> None:
    description = dicom_sr.series_description(Algorithm("n" * 64, "1.0", SHA256, synthetic_demo=True))
    assert len(description) <= 64
    assert description.endswith("results - NOT FOR CLINICAL USE")
    clinical = dicom_sr.series_description(replace(ALGORITHM, synthetic_demo=False))
    assert clinical == "fm-hct-demo 0.1.0 results"


@pytest.mark.parametrize(
    "make",
    [
        lambda: FindingResult("hemorrhage", 1.2, 0.5, True),
        lambda: FindingResult("hemorrhage", float("nan"), 0.5, True),
        lambda: FindingResult("hemorrhage", 0.5, -0.1, False),
        lambda: FindingResult("", 0.5, 0.5, True),
        lambda: FindingResult("a\\b", 0.5, 0.5, True),
        lambda: FindingResult("n" * 65, 0.5, 0.5, True),
        lambda: FindingResult("hémorragie", 0.5, 0.5, True),
        lambda: Algorithm("fm-hct", "1", "ABC"),
        lambda: Algorithm("fm-hct", "", SHA256),
    ],
)
def test_invalid_inputs_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_invalid_report_refused(evidence: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="no evidence"):
        build([])
    with pytest.raises(ValueError, match="no findings"):
        build(evidence, findings=())
    with pytest.raises(ValueError, match="duplicate"):
        build(evidence, findings=(FINDINGS[0], FINDINGS[0]))
    other = copy.deepcopy(evidence[0])
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="studies"):
        build([*evidence, other])
