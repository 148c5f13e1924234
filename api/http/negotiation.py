"""Content negotiation for prediction answers: which media type the `Accept` header asks for.

Hand-written because neither Starlette nor FastAPI negotiates; it follows RFC 9110 12.5.1 (q-values,
``type/subtype`` over ``type/*`` over ``*/*``) for the few answer types we have.
"""

from __future__ import annotations

from api.problem_codes import ProblemCode
from api.problems import ProblemError
from api.results.dicom_sr import DICOM_MEDIA_TYPE
from api.results.fhir import FHIR_MEDIA_TYPE

JSON_MEDIA_TYPE = "application/json"
#: What the answer can be, in the order that breaks ties: today's JSON first.
ANSWER_MEDIA_TYPES = (JSON_MEDIA_TYPE, FHIR_MEDIA_TYPE, DICOM_MEDIA_TYPE)


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """The Accept header's well-formed media ranges as ``(type/subtype, q)``, lower-cased; a malformed
    range (no ``/``, ``*/x``, a q that is not a number in [0, 1]) is skipped, as if not sent."""
    ranges = []
    for item in accept.split(","):
        media, *parameters = (part.strip() for part in item.split(";"))
        kind, slash, subtype = media.lower().partition("/")
        if not (kind and slash and subtype) or (kind == "*" and subtype != "*"):
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = -1.0
        if 0.0 <= quality <= 1.0:
            ranges.append((f"{kind}/{subtype}", quality))
    return ranges


def _quality(media_type: str, ranges: list[tuple[str, float]]) -> tuple[float, int]:
    """``(q, specificity)`` the ranges give `media_type`: the q of its most specific matching range
    (RFC 9110 12.5.1: ``type/subtype`` over ``type/*`` over ``*/*``); ``(0, -1)`` when none matches."""
    specificity = {media_type: 2, f"{media_type.partition('/')[0]}/*": 1, "*/*": 0}
    matches = [(specificity[media], quality) for media, quality in ranges if media in specificity]
    if not matches:
        return 0.0, -1
    most_specific = max(rank for rank, _ in matches)
    return max(quality for rank, quality in matches if rank == most_specific), most_specific


def negotiate(accept: str | None) -> str:
    """The answer's media type for this Accept header: `FHIR_MEDIA_TYPE` or `DICOM_MEDIA_TYPE` (a DICOM
    SR) where the client prefers it, JSON otherwise (no header, ``*/*``, ``application/json``, or nothing
    well-formed in it).

    Higher q wins; at equal q the type named more specifically (``application/fhir+json, */*``, what
    FHIR clients send, is FHIR), and then JSON, the answer before FHIR existed (``max`` keeps the first
    of equals). Raises ProblemError ``not_acceptable`` (406) when the header allows neither."""
    ranges = _media_ranges(accept or "")
    if not ranges:
        return JSON_MEDIA_TYPE
    chosen = max(ANSWER_MEDIA_TYPES, key=lambda media_type: _quality(media_type, ranges))
    if _quality(chosen, ranges)[0] <= 0.0:
        raise ProblemError(
            ProblemCode.NOT_ACCEPTABLE,
            f"the answer is {' or '.join(ANSWER_MEDIA_TYPES)}; the Accept header allows none of them",
            field="Accept",
            observed=(accept or "")[:200],
            expected=list(ANSWER_MEDIA_TYPES),
        )
    return chosen
