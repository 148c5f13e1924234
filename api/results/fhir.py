"""One prediction as a FHIR DiagnosticReport (``Accept: application/fhir+json`` on ``POST /v1/predict``).

The report is what a radiology information system or EHR files next to the study: FHIR R4, built and
validated with the `fhir.resources` models (their R4B package: for DiagnosticReport, Observation and
Device R4B is R4 unchanged; the package's default, R5, renamed ``imagingStudy`` and ``deviceName``, which
R4 servers, still the hospital norm, do not read).

    DiagnosticReport  status final, category RAD, code LOINC 24725-4 "CT Head", identifier = request id,
    │                 conclusion = the positive findings (and the synthetic-model notice)
    ├─ imagingStudy   a logical reference by StudyInstanceUID (DICOM uploads only: NIfTI / NRRD have none)
    ├─ contained Device         the model: name, version, checkpoint sha256, notice
    └─ contained Observation    one per finding, id ``obs-<finding>``: code (ours + SNOMED CT where
                                 known), probability, POS/NEG, threshold component, device

No patient data: the gateway has none for NIfTI / NRRD, and deliberately copies none from DICOM headers.
``subject`` is optional in R4 and left out; the receiving system links the report to its patient through
the ImagingStudy it already holds. Everything is derived from the arguments (ids included, no clock, no
random ids), so one answer always renders to the same report.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from api.results.findings import SNOMED_FINDINGS
from api.schemas import Finding, PredictResponse

FHIR_MEDIA_TYPE: Final = "application/fhir+json"

# Our own code systems and identifier systems. URNs in the namespace of the problem types
# (``urn:headct:problem:<code>``): stable, and no web domain to own or keep serving.
#: The finding names of the model card (``hemorrhage``, ``edema``, ...), as they appear in the JSON answer.
FINDING_SYSTEM: Final = "urn:headct:finding"
#: Parts of a finding's Observation; ``decision-threshold``: probability at or above which it is positive.
COMPONENT_SYSTEM: Final = "urn:headct:observation-component"
THRESHOLD_CODE: Final = "decision-threshold"
#: The served model's checkpoint sha256 (`ModelRef.sha256`), which names the exact weights.
MODEL_SHA256_SYSTEM: Final = "urn:headct:model-sha256"
#: The gateway's request id (`X-Request-ID`), which finds the access log line and the JSON answer.
REQUEST_ID_SYSTEM: Final = "urn:headct:request-id"

SNOMED: Final = "http://snomed.info/sct"
LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
V2_0074: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"  # diagnostic service section
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
#: How FHIR names a DICOM UID: identifier system RFC 3986, value ``urn:oid:<uid>``.
URI_SYSTEM: Final = "urn:ietf:rfc:3986"

DEVICE_ID: Final = "device"
#: A DICOM UID: dot-separated digit runs (PS3.5 9.1). Anything else is not linked as ``urn:oid:``.
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_NOT_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9.-]+")


def diagnostic_report(
    response: PredictResponse, *, study_uid: str | None, issued: datetime
) -> dict[str, Any]:
    """`response` as a FHIR R4 DiagnosticReport, JSON-ready (``resourceType`` first).

    `study_uid`: the StudyInstanceUID of a DICOM upload (None for NIfTI / NRRD): the report's link to
    the ImagingStudy. `issued`: when the answer was made (timezone-aware; FHIR instants must be).
    Raises pydantic's ValidationError if the resources would not be valid FHIR.
    """
    observations = [_observation(finding, issued) for finding in response.findings]
    report = DiagnosticReport(
        identifier=[Identifier(system=REQUEST_ID_SYSTEM, value=response.request_id)],
        status="final",
        category=[_concept(V2_0074, "RAD", "Radiology")],
        code=_concept(LOINC, "24725-4", "CT Head"),
        issued=issued,
        imagingStudy=_study_link(study_uid),
        contained=[_device(response), *observations],
        result=[Reference(reference=f"#{observation.id}") for observation in observations],
        conclusion=_conclusion(response),
    )
    return report.model_dump(mode="json")


def observation_id(name: str) -> str:
    """``obs-<name>``, stable per finding; a name that is not a valid FHIR id (characters, length) is
    cleaned and given a hash suffix, so two names never share an id."""
    slug = _NOT_ID_CHARACTERS.sub("-", name).strip("-")[:40]
    if slug != name:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug}-{digest}" if slug else digest
    return f"obs-{slug}"


def finding_code(name: str) -> CodeableConcept:
    """Our code for the finding (its name; runs of whitespace, which a FHIR code may not hold, as one
    space), and the SNOMED CT concept where one is known."""
    coding = [Coding(system=FINDING_SYSTEM, code=" ".join(name.split()), display=name)]
    if name in SNOMED_FINDINGS:
        code, display = SNOMED_FINDINGS[name]
        coding.append(Coding(system=SNOMED, code=code, display=display))
    return CodeableConcept(coding=coding, text=name)


def _concept(system: str, code: str, display: str) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=system, code=code, display=display)], text=display)


def _unity(value: float) -> Quantity:
    """A probability or threshold: a dimensionless number, UCUM unit ``1``. The decimal is the float's
    shortest repr, so the JSON number reads back as the same float as in the JSON answer."""
    return Quantity(value=Decimal(repr(value)), unit="1", system=UCUM, code="1")


def _observation(finding: Finding, issued: datetime) -> Observation:
    """One finding: its probability, positive or not (as the JSON answer says), and its threshold."""
    interpretation = (
        _concept(INTERPRETATION, "POS", "Positive")
        if finding.positive
        else _concept(INTERPRETATION, "NEG", "Negative")
    )
    return Observation(
        id=observation_id(finding.name),
        status="final",
        category=[_concept(OBSERVATION_CATEGORY, "imaging", "Imaging")],
        code=finding_code(finding.name),
        issued=issued,
        valueQuantity=_unity(finding.probability),
        interpretation=[interpretation],
        component=[
            ObservationComponent(
                code=_concept(COMPONENT_SYSTEM, THRESHOLD_CODE, "Decision threshold"),
                valueQuantity=_unity(finding.threshold),
            )
        ],
        device=Reference(reference=f"#{DEVICE_ID}"),
    )


def _device(response: PredictResponse) -> Device:
    """The algorithm that made the findings. A synthetic demo model says so in a note (its notice)."""
    model = response.model
    return Device(
        id=DEVICE_ID,
        identifier=[Identifier(system=MODEL_SHA256_SYSTEM, value=model.sha256)],
        deviceName=[DeviceDeviceName(name=model.name, type="model-name")],
        version=[DeviceVersion(value=model.version)],
        type=CodeableConcept(text="head CT finding classifier (HeadCT-Serve)"),
        note=[Annotation(text=response.notice)] if response.notice else None,
    )


def _study_link(study_uid: str | None) -> list[Reference] | None:
    """A logical reference to the ImagingStudy (the receiving system resolves it in its own store)."""
    if not study_uid or not _DICOM_UID.fullmatch(study_uid):
        return None
    identifier = Identifier(system=URI_SYSTEM, value=f"urn:oid:{study_uid}")
    return [Reference(type="ImagingStudy", identifier=identifier)]


def _conclusion(response: PredictResponse) -> str:
    """The positive findings in words (what a reader of the report sees first), after the notice of a
    synthetic demo model, so that nobody takes its findings for real ones."""
    positive = [finding for finding in response.findings if finding.positive]
    if positive:
        listed = "; ".join(
            f"{f.name} (probability {f.probability:.2f}, threshold {f.threshold:.2f})" for f in positive
        )
        text = f"Positive: {listed}."
    else:
        names = ", ".join(finding.name for finding in response.findings)
        text = f"No finding at or above its threshold ({names})."
    return f"{response.notice} {text}" if response.notice else text
