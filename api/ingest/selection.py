"""Pick the one series to read when an upload (zip, multipart) holds several.

Instances are grouped by SeriesInstanceUID. Localizer planes found inside an axial series are
dropped (some scanners file the scout with the axials). Then each series is either **excluded**
(hard rules) or ranked:

* excluded: not an image; Modality not CT; SOP class not CT / Enhanced CT / Legacy Enhanced CT;
  ImageType LOCALIZER / SECONDARY / a derived reconstruction (MIP, MPR, REFORMATTED, PROJECTION,
  ...); colour; fewer than `api.ingest.validation.MIN_SLICES` planes;
* ranked, best first, by: ImageType ORIGINAL; axial (slice normal closest to head-foot);
  convolution kernel soft tissue > unknown > sharp/bone (`kernel_class`); more slices (thinner).

The best series is taken when it is strictly better than the next; the response then carries the
warning ``series_selected`` naming it. A tie is refused with 422 ``ambiguous_series`` listing the
candidates (UID, description, kernel, slices) so the caller can resend with ``?series_uid=``. With
``series_uid`` the caller's series is taken (``series_not_found`` when absent), but it must still
pass the hard rules. When nothing passes: ``not_ct`` if no series is CT, the series' own reason if
there is one series (e.g. ``too_few_slices`` for a single slice), else ``unsuitable_series``
listing why each was excluded.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Final

from api.ingest import validation
from api.ingest.dicom import InstanceHeader, dedupe
from api.ingest.scan import ScanWarning
from api.problems import ProblemCode, ProblemError
from headct.dicom_geometry import GeometryError, is_axial

#: ImageType values that mark a series that is not an original axial acquisition.
EXCLUDED_IMAGE_TYPES: Final = frozenset(
    {
        "LOCALIZER",
        "SCOUT",
        "TOPOGRAM",
        "SECONDARY",
        "MIP",
        "MINIP",
        "MPR",
        "REFORMATTED",
        "PROJECTION IMAGE",
        "VOLUME RENDER",
        "CURVED",
        "CPR",
        "SCREEN SAVE",
    }
)
_LOCALIZER: Final = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})
# Reconstruction kernels. Siemens: letter(s) + number, < 50 soft, >= 60 sharp (H30s, J40s, Hr38, Qr40,
# Br64); GE: SOFT / STANDARD / DETAIL vs BONE / BONEPLUS / LUNG / EDGE; Philips: UA-UC, A-C vs D, E,
# L, Y*; Canon/Toshiba: FC1x-FC2x vs FC3x+.
_SOFT_WORDS: Final = ("SOFT", "STANDARD", "STND", "BRAIN", "HEAD", "DETAIL")
_SHARP_WORDS: Final = ("BONE", "LUNG", "SHARP", "EDGE", "SKULL", "SPINE")
_SIEMENS: Final = re.compile(r"^[A-Z]{1,2}(\d{2})[A-Z]?\b")
_CANON: Final = re.compile(r"^FC(\d{2})")
_PHILIPS_SOFT: Final = re.compile(r"^(U?[ABC])$")
_PHILIPS_SHARP: Final = re.compile(r"^(U?[DEL]|Y[A-D]?)$")


def kernel_class(kernel: str) -> int:
    """2 = soft tissue, 1 = unknown, 0 = sharp / bone."""
    text = kernel.strip().upper()
    if not text:
        return 1
    if any(word in text for word in _SHARP_WORDS):
        return 0
    if any(word in text for word in _SOFT_WORDS):
        return 2
    for pattern, sharp_from in ((_CANON, 30), (_SIEMENS, 55)):
        match = pattern.match(text)
        if match:
            return 0 if int(match.group(1)) >= sharp_from else 2
    if _PHILIPS_SOFT.match(text):
        return 2
    if _PHILIPS_SHARP.match(text):
        return 0
    return 1


@dataclass
class Candidate:
    """One series of the upload."""

    series_uid: str
    headers: list[InstanceHeader]
    excluded: str | None = None
    code: ProblemCode | None = None  # the refusal code if this series were the only / the requested one
    score: tuple[int, ...] = ()

    @property
    def first(self) -> InstanceHeader:
        return self.headers[0]

    def summary(self) -> dict[str, Any]:
        first = self.first
        out: dict[str, Any] = {
            "series_uid": self.series_uid,
            "modality": first.modality,
            "description": first.series_description,
            "image_type": list(first.image_type),
            "kernel": first.kernel,
            "slices": len(self.headers),
        }
        if self.excluded:
            out["excluded"] = self.excluded
        return out


def group_series(headers: list[InstanceHeader]) -> tuple[list[Candidate], list[ScanWarning]]:
    """Group planes by series; drop duplicate copies and stray localizers inside axial series."""
    warnings: list[ScanWarning] = []
    groups: dict[str, list[InstanceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_uid or "(no SeriesInstanceUID)"].append(header)
    candidates = []
    for uid, members in groups.items():
        members, dropped = dedupe(members)
        if dropped:
            warnings.append(
                ("duplicate_instances", f"{dropped} repeated instance(s) of series {uid} ignored")
            )
        localizers = [h for h in members if _LOCALIZER & set(h.image_type)]
        if localizers and len(localizers) < len(members):
            members = [h for h in members if not (_LOCALIZER & set(h.image_type))]
            warnings.append(
                ("localizer_removed", f"{len(localizers)} localizer image(s) inside series {uid} ignored")
            )
        candidates.append(Candidate(series_uid=uid, headers=members))
    for candidate in candidates:
        _judge(candidate)
    return candidates, warnings


def _judge(candidate: Candidate) -> None:
    first = candidate.first
    image_types = set(first.image_type)
    if not first.is_image:
        candidate.excluded, candidate.code = "no image data", ProblemCode.NOT_CT
    elif first.modality != "CT":
        candidate.excluded, candidate.code = f"modality {first.modality or '(none)'}", ProblemCode.NOT_CT
    elif first.sop_class_uid not in validation.CT_SOP_CLASSES:
        candidate.excluded, candidate.code = "not a CT image object", ProblemCode.NOT_CT
    elif image_types & EXCLUDED_IMAGE_TYPES:
        kinds = ", ".join(sorted(image_types & EXCLUDED_IMAGE_TYPES))
        candidate.excluded, candidate.code = f"ImageType {kinds}", ProblemCode.UNSUITABLE_SERIES
    elif first.samples_per_pixel != 1:
        candidate.excluded, candidate.code = "colour images", ProblemCode.UNSUITABLE_SERIES
    elif len(candidate.headers) < validation.MIN_SLICES:
        candidate.excluded = f"{len(candidate.headers)} slice(s), fewer than {validation.MIN_SLICES}"
        candidate.code = ProblemCode.TOO_FEW_SLICES
    if candidate.excluded:
        return
    try:
        axial = first.iop is not None and is_axial(first.iop)
    except GeometryError:
        axial = False
    candidate.score = (
        int("ORIGINAL" in image_types),
        int(axial),
        kernel_class(first.kernel),
        len(candidate.headers),
    )


def _refuse(candidate: Candidate, many: bool) -> ProblemError:
    code = candidate.code or ProblemCode.UNSUITABLE_SERIES
    first = candidate.first
    if code is ProblemCode.TOO_FEW_SLICES:
        return ProblemError(
            code,
            "a head CT volume needs many slices; this series has too few",
            field="slices",
            observed=len(candidate.headers),
            expected=f">= {validation.MIN_SLICES} slices",
        )
    if code is ProblemCode.NOT_CT:
        return ProblemError(
            code,
            f"the series is not a CT image series ({candidate.excluded})",
            field="Modality",
            observed=first.modality or None,
            expected="Modality CT with CT image objects",
        )
    return ProblemError(
        ProblemCode.UNSUITABLE_SERIES,
        f"the series cannot be read as an axial head CT volume ({candidate.excluded})"
        if not many
        else "no series in the upload is an original CT image stack",
        field="ImageType",
        observed=candidate.summary() if not many else None,
        expected="ORIGINAL/PRIMARY CT image series (not a localizer, secondary capture or reformat)",
    )


def select_series(candidates: list[Candidate], series_uid: str | None) -> tuple[Candidate, list[ScanWarning]]:
    """The series to read, with a warning when it was chosen among several; or the refusal."""
    if series_uid is not None:
        wanted = series_uid.strip()
        chosen = next((c for c in candidates if c.series_uid == wanted), None)
        if chosen is None:
            raise ProblemError(
                ProblemCode.SERIES_NOT_FOUND,
                "the requested series_uid is not in the upload",
                field="series_uid",
                observed=wanted,
                expected=[c.summary() for c in candidates][:20],
            )
        if chosen.excluded:
            raise _refuse(chosen, many=False)
        return chosen, []
    eligible = sorted((c for c in candidates if not c.excluded), key=lambda c: c.score, reverse=True)
    if not eligible:
        if len(candidates) == 1:
            raise _refuse(candidates[0], many=False)
        if all(c.code is ProblemCode.NOT_CT for c in candidates):
            modalities = sorted({c.first.modality or "(none)" for c in candidates})
            raise ProblemError(
                ProblemCode.NOT_CT,
                "the upload holds no CT image series",
                field="Modality",
                observed=modalities,
                expected="a CT image series",
            )
        error = _refuse(candidates[0], many=True)
        error.observed = [c.summary() for c in candidates][:20]
        raise error
    best = eligible[0]
    if len(eligible) > 1 and eligible[1].score == best.score:
        tied = [c for c in eligible if c.score == best.score]
        raise ProblemError(
            ProblemCode.AMBIGUOUS_SERIES,
            f"{len(tied)} series are equally suitable; choose one with ?series_uid=",
            field="series_uid",
            observed=[c.summary() for c in tied][:20],
            expected="exactly one series, or ?series_uid= naming one of the observed series",
        )
    warnings: list[ScanWarning] = []
    if len(candidates) > 1:
        others = len(candidates) - 1
        warnings.append(
            (
                "series_selected",
                f"read series {best.series_uid} ({best.first.series_description or 'no description'}, "
                f"kernel {best.first.kernel or 'unknown'}, {len(best.headers)} slices) and ignored {others} "
                "other series; send ?series_uid= to choose another",
            )
        )
    return best, warnings
