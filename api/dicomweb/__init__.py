"""The gateway as a DICOMweb client of a PACS: read a study (QIDO-RS, WADO-RS), store an answer (STOW-RS)."""

from __future__ import annotations

from api.dicomweb.client import DicomwebConfig, PacsClient, RetrievedStudy, StoredObject, problem_for

__all__ = ["DicomwebConfig", "PacsClient", "RetrievedStudy", "StoredObject", "problem_for"]
