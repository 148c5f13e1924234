"""One prediction as a DICOM Structured Report, the answer a PACS files next to the CT it came from.

A Comprehensive 3D SR (built and encoded by highdicom) whose content follows TID 1500 "Measurement
Report", the template that PACS viewers (OHIF, Sectra, ...) and the IHE AI Results (AIR) profile read:

    Imaging Measurement Report (TID 1500)
    ├─ language en-US, observer = device (TID 1004): the algorithm; procedure reported LOINC 24725-4
    ├─ Image Library (TID 1600): every instance of the source series, once
    └─ Imaging Measurements
       └─ Measurement Group (TID 1501), one per finding
          ├─ Tracking Identifier = the finding name, Tracking UID
          ├─ Finding = the finding in our coding scheme (99HEADCT)
          ├─ Algorithm Identification (TID 4019): name, version, manufacturer, parameters
          │  (model sha256, the decision threshold, the synthetic-model notice)
          ├─ Probability (NUM, UCUM "1") and Decision threshold (NUM, UCUM "1")
          └─ the finding (SNOMED CT where known, else ours) = Present / Absent (CID 241)

The document belongs to the source study (patient and study attributes copied from the evidence, so
the PACS files it under the same study), in a new series; every source instance is listed in the
Current Requested Procedure Evidence Sequence. It is PRELIMINARY and UNVERIFIED: an algorithm's result
that no radiologist has signed. Pure: no I/O, and with the UIDs and `now` given, the same inputs give the
same bytes. Independent of the gateway's schemas: the caller maps its answer onto the dataclasses below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DT

from api.results.findings import SNOMED_FINDINGS

DICOM_MEDIA_TYPE: Final = "application/dicom"

#: Our private coding scheme (PS3.3 8.2: "99" + a name) for the finding names and the two numbers.
CODING_SCHEME: Final = "99HEADCT"
MANUFACTURER: Final = "HeadCT-Serve"
#: The SR's series number: far from the scanner's own series, so it sorts last in a viewer.
SERIES_NUMBER: Final = 9901
NOT_FOR_CLINICAL_USE: Final = "NOT FOR CLINICAL USE"

PROBABILITY: Final = hd.sr.CodedConcept("probability", CODING_SCHEME, "Probability")
THRESHOLD: Final = hd.sr.CodedConcept("threshold", CODING_SCHEME, "Decision threshold")
#: Dimensionless (a probability, a threshold): UCUM "1".
UNITY: Final = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
#: DICOM CID 241 "Present-Absent Only": SCT 52101004 "Present", SCT 272519000 "Absent".
PRESENT: Final = hd.sr.CodedConcept.from_code(codes.SCT.Present)
ABSENT: Final = hd.sr.CodedConcept.from_code(codes.SCT.Absent)
#: LOINC 24725-4 "CT Head", as in the FHIR DiagnosticReport (api/results/fhir.py).
CT_HEAD: Final = hd.sr.CodedConcept("24725-4", "LN", "CT Head")
#: An Image Library entry: SCT 260753009, with the meaning highdicom writes and reads.
SOURCE: Final = hd.sr.CodedConcept("260753009", "SCT", "Source")

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: What a DICOM LO value (series description, manufacturer model name) and a code meaning hold.
_LO_MAX = 64


@dataclass(frozen=True)
class FindingResult:
    """One finding of the model: its probability, the decision threshold, and the decision."""

    name: str
    probability: float
    threshold: float
    positive: bool

    def __post_init__(self) -> None:
        _check_text("finding name", self.name)
        for label, value in (("probability", self.probability), ("threshold", self.threshold)):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{self.name}: {label} {value!r} is not in [0, 1]")


@dataclass(frozen=True)
class Algorithm:
    """The model that made the findings (IHE AIR: name, version and the exact weights, by sha256)."""

    name: str
    version: str
    model_sha256: str
    synthetic_demo: bool = False

    def __post_init__(self) -> None:
        _check_text("algorithm name", self.name)
        _check_text("algorithm version", self.version)
        if not _SHA256.fullmatch(self.model_sha256):
            raise ValueError(f"model_sha256 is not 64 lowercase hex digits: {self.model_sha256!r}")


def _check_text(label: str, value: str) -> None:
    """Names end up in LO values and code meanings (64 characters, no backslash, no control chars),
    encoded in the evidence's character set: ASCII is the one every set holds."""
    if not value or len(value) > _LO_MAX or "\\" in value or not (value.isascii() and value.isprintable()):
        raise ValueError(f"{label} must be 1-{_LO_MAX} printable ASCII characters, no '\\': {value!r}")


def structured_report(
    evidence: Sequence[pydicom.Dataset],
    findings: Sequence[FindingResult],
    algorithm: Algorithm,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    now: datetime | None = None,
) -> pydicom.Dataset:
    """The findings as a Comprehensive 3D SR (TID 1500) in the study of `evidence`.

    `evidence`: the source series' instances, headers only (patient, study, series, SOP common; no pixel
    data needed). `series_instance_uid` / `sop_instance_uid`: the SR's UIDs (new ones when None).
    `now`: the content and creation date/time (the local clock when None; a timezone-aware value also
    sets TimezoneOffsetFromUTC). Returns a dataset with file meta, ready for `dcmwrite`.
    Raises ValueError for no evidence, evidence from several studies, or no / duplicate findings.
    """
    _check_inputs(evidence, findings)
    evidence = [_with_type2_attributes(evidence[0]), *evidence[1:]]
    now = now or datetime.now()
    sop_uid = sop_instance_uid or hd.UID()
    groups = [_group(finding, algorithm, sop_uid) for finding in findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=CT_HEAD,
        imaging_measurements=groups,
    )
    content = report[0].ContentSequence
    content.insert(len(content) - 1, image_library(evidence))  # before "Imaging Measurements"
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        series_description=series_description(algorithm),
        is_complete=True,
        coding_schemes=[_coding_scheme()],
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
    )
    _stamp(sr, now)
    return sr


def _check_inputs(evidence: Sequence[pydicom.Dataset], findings: Sequence[FindingResult]) -> None:
    """What highdicom would accept silently but a PACS would misfile: evidence from several studies
    (the SR belongs to one), and a report without findings or with one finding twice."""
    if not evidence:
        raise ValueError("no evidence: the SR needs the source series' instances")
    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) != 1:
        raise ValueError(f"evidence spans {len(studies)} studies; the SR belongs to one")
    names = [finding.name for finding in findings]
    if not names:
        raise ValueError("no findings to report")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate finding names: {names}")


#: What highdicom reads from the first evidence instance as attributes (type 2: present, maybe empty).
_TYPE2_COPIED: Final = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _with_type2_attributes(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds` (a shallow copy; the caller's dataset is not touched) with the patient / study attributes
    that highdicom copies present: a scanner or an anonymiser may leave a type 2 attribute out, where
    highdicom would fail with AttributeError; empty is what the standard allows instead."""
    missing = [keyword for keyword in _TYPE2_COPIED if keyword not in ds]
    if not missing:
        return ds
    patched = pydicom.Dataset()  # Dataset(ds) and copy.copy(ds) would share ds's elements dict
    patched.update(ds)
    for keyword in missing:
        setattr(patched, keyword, None)
    return patched


def image_library(evidence: Sequence[pydicom.Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: each source instance once, as a bare IMAGE entry (TID 1601; its TID 1602
    descriptors are optional), in one group that states the shared frame of reference.

    TID 1501 groups without their own source images refer to the whole library, so the findings of
    the series point at every instance without repeating them per finding. highdicom's own library
    (`MeasurementReport(referenced_images=...)`) copies ~15 descriptors per instance: with it, the SR of
    a 300-slice series took 4.3 s of CPU and 1.2 MB; with this one, 0.4 s and 0.11 MB.
    """
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence()
    frames = {str(ds.FrameOfReferenceUID) for ds in evidence if "FrameOfReferenceUID" in ds}
    if len(frames) == 1 and all("FrameOfReferenceUID" in ds for ds in evidence):
        group.ContentSequence.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=frames.pop(),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
        )
    for ds in evidence:
        group.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=SOURCE,
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def series_description(algorithm: Algorithm) -> str:
    """``<name> <version> results``, with the notice of a synthetic demo model, within 64 characters
    (the name and version are shortened first: the notice must survive)."""
    suffix = f" - {NOT_FOR_CLINICAL_USE}" if algorithm.synthetic_demo else ""
    head = f"{algorithm.name} {algorithm.version}"[: _LO_MAX - len(" results") - len(suffix)].rstrip()
    return f"{head} results{suffix}"


def finding_concept(name: str) -> hd.sr.CodedConcept:
    """Our code for the finding: the name itself in the 99HEADCT scheme (a name over 16 characters
    becomes a Long Code Value)."""
    return hd.sr.CodedConcept(name, CODING_SCHEME, name)


def evaluation_concept(name: str) -> hd.sr.CodedConcept:
    """What the Present/Absent evaluation is about: the SNOMED CT concept where one is known (what
    other systems understand), else our own code."""
    if name in SNOMED_FINDINGS:
        code, meaning = SNOMED_FINDINGS[name]
        return hd.sr.CodedConcept(code, "SCT", meaning)
    return finding_concept(name)


def algorithm_parameters(finding: FindingResult, algorithm: Algorithm) -> list[str]:
    """TID 4019 "Algorithm Parameters": the exact weights (sha256), the threshold the decision used,
    and the synthetic-model notice; free text, ``key=value``, so they read and parse alike."""
    parameters = [f"model_sha256={algorithm.model_sha256}", f"decision_threshold={finding.threshold!r}"]
    if algorithm.synthetic_demo:
        parameters.append(f"notice=synthetic demo model, {NOT_FOR_CLINICAL_USE}")
    return parameters


def _group(
    finding: FindingResult, algorithm: Algorithm, sop_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one finding. The tracking UID derives from the SR's UID and the name: stable for
    one document, distinct across documents (a tracking UID names one finding in one report)."""
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=algorithm_parameters(finding, algorithm),
        manufacturer=MANUFACTURER,
    )
    tracking = hd.sr.TrackingIdentifier(
        uid=generate_uid(entropy_srcs=[str(sop_uid), "tracking", finding.name]),
        identifier=finding.name,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_concept(finding.name),
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability), unit=UNITY),
            hd.sr.Measurement(name=THRESHOLD, value=float(finding.threshold), unit=UNITY),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=evaluation_concept(finding.name), value=PRESENT if finding.positive else ABSENT
            )
        ],
    )


def _observation_context(algorithm: Algorithm) -> hd.sr.ObservationContext:
    """The observer is a device, the algorithm (IHE AIR). Its UID derives from name, version and
    weights: the same model always has the same observer UID, another model never does."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm),
        name=algorithm.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{algorithm.name} {algorithm.version}",
        serial_number=algorithm.model_sha256,
    )
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DCM.Device),
        observer_identifying_attributes=device,
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def device_uid(algorithm: Algorithm) -> str:
    """The Device Observer UID of `algorithm` (deterministic, see `_observation_context`)."""
    return str(
        generate_uid(
            entropy_srcs=["headct-serve-device", algorithm.name, algorithm.version, algorithm.model_sha256]
        )
    )


def _coding_scheme() -> CodingSchemeIdentificationItem:
    """PS3.3 C.12.1.1.4: a private coding scheme used in the document is identified in it."""
    return CodingSchemeIdentificationItem(
        designator=CODING_SCHEME,
        name="HeadCT-Serve finding names and measurements",
        responsible_organization=MANUFACTURER,
    )


def _stamp(sr: pydicom.Dataset, now: datetime) -> None:
    """Replace the wall-clock times highdicom writes (instance creation, its own contribution) with
    `now`, so that the document is a function of its inputs."""
    sr.InstanceCreationDate = now.strftime("%Y%m%d")
    sr.InstanceCreationTime = now.strftime("%H%M%S.%f")
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(now)
    if now.tzinfo is not None:
        sr.TimezoneOffsetFromUTC = now.strftime("%z")
