"""Standard codes of the finding names, shared by every result format (FHIR, DICOM SR)."""

from __future__ import annotations

from typing import Final

#: SNOMED CT concepts of the finding names we know (the demo's and FM-HCT's usual spellings); only
#: concepts whose code is certain. Other names carry our own code alone.
SNOMED_FINDINGS: Final[dict[str, tuple[str, str]]] = {
    "hemorrhage": ("1386000", "Intracranial hemorrhage"),
    "intracranial_hemorrhage": ("1386000", "Intracranial hemorrhage"),
    "ich": ("1386000", "Intracranial hemorrhage"),
    "edema": ("2032001", "Cerebral edema"),
    "cerebral_edema": ("2032001", "Cerebral edema"),
}
