"""Answers as the hospital's formats: one prediction (`api.schemas.PredictResponse`) rendered in a
standard that clinical systems read without knowing this API.

- `api.results.fhir`: a FHIR R4 DiagnosticReport (``Accept: application/fhir+json`` on
  ``POST /v1/predict``).

Each renderer is a pure function of the JSON answer and the few facts the JSON answer leaves out (the
StudyInstanceUID of a DICOM upload): no I/O, no clock, so its output is reproducible and testable alone.
"""
