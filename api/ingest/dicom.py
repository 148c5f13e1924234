"""DICOM CT: headers of every instance in an upload, then the pixels of the chosen series -> `Volume`.

Two passes, each member read and parsed once:

1. **headers** (`read_headers`): each member is read whole (a zip member inflated once) and parsed
   for a whitelist of tags (`HEADER_TAGS`) and its pixel data (`PIXEL_TAGS`); an Enhanced / Legacy
   Enhanced CT multi-frame object becomes one `InstanceHeader` per frame (per-frame functional groups
   first, shared ones as fallback). Files that are not DICOM (README, DICOMDIR, ``.DS_Store``) are
   skipped and counted. What the pixel pass needs is kept (`ParsedMembers`) up to a byte budget: an
   uncompressed 16-bit plane is copied straight from the member's bytes into `StoredPlanes` (pydicom
   defers the pixel data), any other member's dataset is kept with its pixel data; members beyond
   the budget, and members too large to read whole, are parsed up to their pixel data only and read
   again in the pixel pass. The header values a series repeats from slice to slice (most of them)
   are converted from their bytes once per upload (`ElementValues`).
2. **pixels** (`assemble`), for the selected series only: after the geometry checks pass, the stored
   planes become the float32 stack in place (`StoredPlanes.stack`) when the header pass stored them
   all; otherwise each slice is decoded (pydicom with the pylibjpeg / pyjpegls plugins: JPEG
   Lossless, JPEG baseline / extended, JPEG-LS, JPEG 2000, HTJ2K, RLE, deflated, native) and
   converted to HU with its own RescaleSlope / RescaleIntercept into one preallocated float32 array.

Patient identifiers: PatientName, PatientID, PatientBirthDate and AccessionNumber are read only to
redact free-text descriptions that contain them (a technologist may type a name into a series
description); they never leave this module. pydicom's read-time value validation is switched off
(its warnings can quote values).

Geometry (positions -> affine, spacing/tilt tolerances) is `headct.dicom_geometry`; its docstring
documents the missing-slice / non-uniform-spacing tolerance and the gantry-tilt decision.
"""

from __future__ import annotations

import contextlib
import io
import re
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, overload

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels
from pydicom.pixels.decoders.base import get_decoder
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import AMBIGUOUS_VR, VR

from api.ingest.errors import too_large, unreadable
from api.ingest.members import IN_MEMORY_MEMBER_BYTES, MemberSource
from api.ingest.scan import AcquisitionText, IngestLimits, ScanWarning
from api.ingest.sniff import looks_like_dicom
from api.ingest.volume_memory import StoredPlanes, rescale, stored_values
from api.problems import ProblemCode, ProblemError
from headct.dicom_geometry import GeometryError, StackGeometry, check_same_orientation, stack_geometry
from headct.preprocess import PlaneStatsBuilder, SourcePlaneStats
from headct.volume import Volume

# Read-time validation warnings can quote element values (possibly a patient's); never emit them.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

DICOMDIR_SOP_CLASS: Final = "1.2.840.10008.1.3.10"
_NATIVE: Final = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
#: Transfer syntaxes whose compression loses information.
LOSSY_TRANSFER_SYNTAXES: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 part 2 multi-component
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_IDENTIFIER_TAGS: Final = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
HEADER_TAGS: Final = [
    "SpecificCharacterSet",
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDescription",
    "SeriesDescription",
    "Modality",
    "BodyPartExamined",
    "ProtocolName",
    "ContrastBolusAgent",
    "ContrastBolusAgentSequence",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "AcquisitionNumber",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "FrameOfReferenceUID",
    "SamplesPerPixel",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "PixelSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "LossyImageCompression",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    *_IDENTIFIER_TAGS,
]
PIXEL_TAGS: Final = [
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
]
_HEADER_AND_PIXEL_TAGS: Final = list(dict.fromkeys([*HEADER_TAGS, *PIXEL_TAGS]))


def _tags(keywords: Iterable[str]) -> list[BaseTag]:
    # `dcmread` turns each `specific_tags` keyword into a tag on every call, through a failed hex
    # parse (an exception) per keyword: ~45 per member, ~30 % of a CT slice's parse. Tags it keeps.
    return [Tag(keyword) for keyword in keywords]


_HEADER_TAG_VALUES: Final = _tags(HEADER_TAGS)
_PIXEL_TAG_VALUES: Final = _tags(PIXEL_TAGS)
_HEADER_AND_PIXEL_TAG_VALUES: Final = _tags(_HEADER_AND_PIXEL_TAGS)
_SOP_CLASS_UID: Final = Tag("SOPClassUID")
_PIXEL_DATA: Final = Tag("PixelData")
_TRANSFER_SYNTAX_UID: Final = Tag("TransferSyntaxUID")
#: Parsed members (their pixel bytes) kept from the header pass for the pixel pass, at most.
PARSED_MEMBERS_BUDGET_BYTES: Final = 1 << 30
# Values longer than this are left in the member's bytes by `dcmread` and filled in afterwards: the
# pixel data of the smallest plane kept in `StoredPlanes` (a few header values are copied either way).
_DEFER_BYTES: Final = 256
_REDACTED: Final = "[redacted]"
#: Tolerance for "the same PixelSpacing" between slices of a series (mm).
PIXEL_SPACING_TOL_MM: Final = 1e-3


@dataclass(frozen=True, kw_only=True)
class InstanceHeader(AcquisitionText):
    """One image plane (a single-frame instance, or one frame of a multi-frame one). Plain data."""

    member: int
    frame: int | None
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    image_type: tuple[str, ...]
    rows: int | None
    columns: int | None
    samples_per_pixel: int
    pixel_spacing: tuple[float, float] | None
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    slope: float
    intercept: float
    number_of_frames: int
    slice_thickness: float | None = None

    @property
    def is_image(self) -> bool:
        return bool(self.rows) and bool(self.columns)


# ---- header pass ---------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(_text(v) for v in value)
    return str(value).strip()


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        if isinstance(value, list | tuple | pydicom.multival.MultiValue):
            value = value[0]
        result = float(value)
    except (TypeError, ValueError, IndexError):
        return default
    return result if np.isfinite(result) else default


@overload
def _floats(value: Any, count: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats(value: Any, count: Literal[3]) -> tuple[float, float, float] | None: ...
@overload
def _floats(value: Any, count: int) -> tuple[float, ...] | None: ...
def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """The `count` numbers of a multi-valued element, or None (missing, unreadable or another count)."""
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == count else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_NOT_WORD: Final = re.compile(r"[^0-9A-Z]+")


def _words(text: str) -> list[str]:
    return [word for word in _NOT_WORD.split(text.upper()) if word]


_UNSHAREABLE_VRS: Final = frozenset({VR.SQ, VR.OB, VR.OW, VR.OV, VR.UN, *AMBIGUOUS_VR})
#: Keyword -> (tag, VR) of the elements `ElementValues` reads: the header's, the pixel description's
#: and the file meta's. The VR is None for those whose values are not shared between members:
#: sequences (their items are datasets), bulk data, and elements of an ambiguous VR (pydicom
#: resolves those from other elements of the dataset).
_ELEMENTS: Final = {
    keyword: (Tag(keyword), None if vr in _UNSHAREABLE_VRS else VR(vr))
    for keyword in [*HEADER_TAGS, *PIXEL_TAGS, "MediaStorageSOPClassUID", "TransferSyntaxUID"]
    for vr in [dictionary_VR(keyword)]
}


class ElementValues:
    """``ds.get(keyword)`` for the members of one upload, each distinct encoded value converted once;
    and the redaction of their descriptions, each distinct one once.

    The slices of a series repeat most of their header (UIDs of study and series, descriptions,
    orientation, spacing, rescale, pixel description, file meta) byte for byte, and pydicom's
    conversion of an element's bytes to its value was most of the header pass's cost. An element
    still in its encoded form is converted the first time its (tag, VR, length, bytes, endianness,
    character set) comes up, by ``ds.get`` itself; later members with the same bytes get that value
    (shared, never modified). An absent element is None and a converted one its value, as from
    ``ds.get``; anything else (a keyword not in `_ELEMENTS`, a sequence or bulk data, an unexpected
    explicit VR, a dataset not read from bytes) goes to ``ds.get``, and so does every conversion
    that raises: the answers are ``ds.get``'s, errors included.

    Held for one upload only: it holds patient identifiers.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._identifiers: dict[tuple[str, ...], frozenset[str]] = {}
        self._redacted: dict[tuple[str, frozenset[str]], str] = {}

    def identifiers(self, get: Callable[[str], Any]) -> frozenset[str]:
        """`_identifier_words` of the patient identifiers that `get` (a `reader`) reads."""
        texts = tuple(_text(get(keyword)) for keyword in _IDENTIFIER_TAGS)
        words = self._identifiers.get(texts)
        if words is None:
            words = self._identifiers[texts] = _identifier_words(texts)
        return words

    def redact(self, text: str, identifiers: frozenset[str]) -> str:
        """`_redact` (a frozenset keeps its hash: the key costs one lookup)."""
        key = (text, identifiers)
        redacted = self._redacted.get(key)
        if redacted is None:
            redacted = self._redacted[key] = _redact(text, identifiers)
        return redacted

    def reader(self, ds: Dataset) -> Callable[[str], Any]:
        """``ds.get`` (keyword -> value, None when absent), sharing conversions with other members."""
        encoding = ds.original_character_set  # what ``ds[tag]`` decodes text with ("": built in code)
        charset = encoding if isinstance(encoding, str) else tuple(encoding)
        memo = self._memo

        def get(keyword: str) -> Any:
            known = _ELEMENTS.get(keyword)
            if known is None:
                return ds.get(keyword)
            tag, vr = known
            element = ds.get_item(tag, keep_deferred=True)
            if element is None:
                return None
            if isinstance(element, DataElement):
                return element.value
            if vr is None or not charset or element.VR not in (None, vr) or element.value is None:
                return ds.get(keyword)
            key = (tag, element.VR, element.length, element.value, element.is_little_endian, charset)
            try:
                return memo[key]
            except KeyError:
                value = memo[key] = ds.get(keyword)
                return value

        return get


def _identifier_words(texts: Iterable[str]) -> frozenset[str]:
    """Words (>= 3 characters) of the patient identifiers' `texts`, to redact descriptions that quote
    them."""
    words: set[str] = set()
    for text in texts:
        words.update(word for word in _words(text) if len(word) >= 3)
        compact = _NOT_WORD.sub("", text.upper())
        if len(compact) >= 3:
            words.add(compact)
    return frozenset(words)


def _redact(text: str, identifiers: AbstractSet[str]) -> str:
    """`text` (at most 64 characters), or "[redacted]" when a word of it is a patient identifier."""
    words = set(_words(text))
    compact = _NOT_WORD.sub("", text.upper())
    if words & identifiers or any(len(word) >= 6 and word in compact for word in identifiers):
        return _REDACTED
    return text[:64]


def _first(item: Dataset | None, sequence: str) -> Dataset | None:
    if item is None:
        return None
    seq = item.get(sequence)
    return seq[0] if seq else None


def _group(per_frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """A functional-group macro of one frame: the per-frame one, else the shared one."""
    return _first(per_frame, sequence) or _first(shared, sequence)


def _transfer_syntax(ds: Dataset, values: ElementValues | None = None) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = (values or ElementValues()).reader(meta)("TransferSyntaxUID") if meta is not None else None
    if uid:
        return str(uid)
    implicit, little = ds.original_encoding
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _headers_of(
    ds: Dataset, member: int, identifiers: AbstractSet[str], values: ElementValues | None = None
) -> list[InstanceHeader]:
    values = values or ElementValues()
    get = values.reader(ds)
    words = frozenset(identifiers)  # (the same object when it is one already)
    transfer_syntax = _transfer_syntax(ds, values)
    agent = _text(get("ContrastBolusAgent"))
    if not agent and get("ContrastBolusAgentSequence"):
        agent = "CONTRAST AGENT SEQUENCE"
    base = InstanceHeader(
        member=member,
        frame=None,
        transfer_syntax=transfer_syntax,
        sop_class_uid=_text(get("SOPClassUID")),
        sop_instance_uid=_text(get("SOPInstanceUID")),
        series_uid=_text(get("SeriesInstanceUID")),
        study_uid=_text(get("StudyInstanceUID")),
        frame_of_reference_uid=_text(get("FrameOfReferenceUID")),
        modality=_text(get("Modality")).upper(),
        image_type=tuple(v.strip().upper() for v in _text(get("ImageType")).split("\\") if v.strip()),
        rows=_int(get("Rows")),
        columns=_int(get("Columns")),
        samples_per_pixel=_int(get("SamplesPerPixel")) or 1,
        pixel_spacing=_floats(get("PixelSpacing"), 2),
        iop=_floats(get("ImageOrientationPatient"), 6),
        ipp=_floats(get("ImagePositionPatient"), 3),
        slope=_float(get("RescaleSlope"), 1.0) or 1.0,
        intercept=_float(get("RescaleIntercept"), 0.0) or 0.0,
        number_of_frames=_int(get("NumberOfFrames")) or 1,
        body_part=_text(get("BodyPartExamined"))[:16],
        study_description=values.redact(_text(get("StudyDescription")), words),
        series_description=values.redact(_text(get("SeriesDescription")), words),
        protocol_name=values.redact(_text(get("ProtocolName")), words),
        kernel=_text(get("ConvolutionKernel"))[:32],
        contrast_agent=values.redact(agent, words),
        kvp=_float(get("KVP")),
        slice_thickness=_float(get("SliceThickness")),
        lossy=transfer_syntax in LOSSY_TRANSFER_SYNTAXES or _text(get("LossyImageCompression")) == "01",
    )
    per_frame = get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return [base]
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    headers = []
    for index, frame in enumerate(per_frame):
        measures = _group(frame, shared, "PixelMeasuresSequence")
        orientation = _group(frame, shared, "PlaneOrientationSequence")
        position = _group(frame, shared, "PlanePositionSequence")
        rescale = _group(frame, shared, "PixelValueTransformationSequence")
        frame_type = _group(frame, shared, "CTImageFrameTypeSequence")
        headers.append(
            replace(
                base,
                frame=index,
                pixel_spacing=_floats(measures.get("PixelSpacing"), 2) if measures else None,
                slice_thickness=_float(measures.get("SliceThickness")) if measures else None,
                iop=_floats(orientation.get("ImageOrientationPatient"), 6) if orientation else None,
                ipp=_floats(position.get("ImagePositionPatient"), 3) if position else None,
                slope=(_float(rescale.get("RescaleSlope"), 1.0) or 1.0) if rescale else base.slope,
                intercept=(_float(rescale.get("RescaleIntercept"), 0.0) or 0.0)
                if rescale
                else base.intercept,
                image_type=tuple(
                    v.strip().upper() for v in _text(frame_type.get("FrameType")).split("\\") if v.strip()
                )
                if frame_type
                else base.image_type,
            )
        )
    return headers


class ParsedMembers:
    """What the header pass keeps for the pixel pass while it fits in `budget_bytes`: the stored planes
    of uncompressed 16-bit slices, copied into `planes` (where the float32 stack is then built in
    place), and the datasets of any other member with their pixel data."""

    def __init__(
        self, budget_bytes: int = PARSED_MEMBERS_BUDGET_BYTES, planes: StoredPlanes | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self.kept_bytes = 0
        self.planes = planes
        self._datasets: dict[int, Dataset] = {}
        self._plane_of: dict[int, int] = {}

    def keep(self, member: int, ds: Dataset, size: int) -> bool:
        if self.kept_bytes + size > self.budget_bytes:
            return False
        self._datasets[member] = ds
        self.kept_bytes += size
        return True

    def keep_plane(
        self, member: int, data: bytes, offset: int, shape: tuple[int, int], dtype: np.dtype, bits_stored: int
    ) -> bool:
        """Copy the member's one stored plane at ``data[offset:]`` into `planes`, if there is room."""
        size = shape[0] * shape[1] * 2
        if self.planes is None or self.kept_bytes + size > self.budget_bytes:
            return False
        index = self.planes.add(data, offset, shape, dtype, bits_stored)
        if index is None:
            return False
        self._plane_of[member] = index
        self.kept_bytes += size
        return True

    def plane_of(self, member: int) -> int | None:
        """The index in `planes` of the member's stored plane, if it was kept there."""
        return self._plane_of.get(member)

    def take(self, member: int) -> Dataset | None:
        return self._datasets.pop(member, None)


def read_headers(
    source: MemberSource, parsed: ParsedMembers | None = None
) -> tuple[list[InstanceHeader], int]:
    """Headers of every DICOM image plane in `source`, and how many members were skipped; the
    datasets `parsed` keeps spare the pixel pass a second read."""
    try:
        return _read_headers(source, parsed or ParsedMembers(0))
    except (zipfile.BadZipFile, zlib.error) as error:
        # A zip member's deflate stream or CRC is corrupt: zipfile raises these while the member is
        # *read*, not when it is opened; the archive itself is broken (400, never a 500).
        raise unreadable("zip", error) from error


def _parse_member(
    source: MemberSource, member: int, parsed: ParsedMembers, values: ElementValues
) -> Dataset | None:
    """The member's dataset (None: not DICOM). A small member is read whole and parsed once, its pixel
    data kept for the pixel pass while the budget lasts (`_keep_pixels`); a large one is parsed only up
    to its pixel data."""
    whole = source.size(member) <= IN_MEMORY_MEMBER_BYTES
    data = source.read(member) if whole else source.head(member, 132)
    if not looks_like_dicom(data[:132]):
        return None
    force = data[128:132] != b"DICM"
    try:
        if whole:
            ds = _read_whole(data, force, defer=True)
            transfer_syntax = _transfer_syntax(ds, values)
            if transfer_syntax == DeflatedExplicitVRLittleEndian:
                # pydicom parsed an inflated copy: the deferred values' offsets are not offsets in `data`
                ds = _read_whole(data, force, defer=False)
            _keep_pixels(ds, member, data, transfer_syntax, parsed, values)
            return ds
        with source.open(member) as handle:
            return pydicom.dcmread(
                handle, stop_before_pixels=True, specific_tags=_HEADER_TAG_VALUES, force=force
            )
    except ProblemError:
        raise
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None


def _read_whole(data: bytes, force: bool, *, defer: bool) -> Dataset:
    """A whole member's header and pixel tags. With `defer`, values over `_DEFER_BYTES` are left in
    `data` (pydicom notes where they start; `_keep_pixels` fills them in): the pixel data is then
    copied once, straight into the stored planes, instead of into a bytes object of its own."""
    ds = pydicom.dcmread(
        io.BytesIO(data),
        specific_tags=_HEADER_AND_PIXEL_TAG_VALUES,
        force=force,
        defer_size=_DEFER_BYTES if defer else None,
    )
    # The dataset holds its values: without this it would also keep the member's bytes.
    if isinstance(ds, FileDataset):
        ds.buffer = None
    return ds


def _keep_pixels(
    ds: Dataset, member: int, data: bytes, transfer_syntax: str, parsed: ParsedMembers, values: ElementValues
) -> None:
    """Fill in the values `dcmread` deferred from `data`. An uncompressed 16-bit plane goes to
    ``parsed.planes`` (and out of the dataset); other pixel data stays in the dataset, which `parsed`
    keeps while the budget lasts (else the pixel pass reads the member again)."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.value is not None or not raw.length:
            continue
        start = raw.value_tell
        if tag == _PIXEL_DATA:
            layout = _native_layout(ds, values, transfer_syntax)
            if (
                layout is not None
                and raw.length == layout.shape[0] * layout.shape[1] * 2
                and start + raw.length <= len(data)  # (truncated: refused in the pixel pass)
                and parsed.keep_plane(member, data, start, layout.shape, layout.dtype, layout.bits_stored)
            ):
                del ds[tag]
                continue
        ds[tag] = raw._replace(value=data[start : start + raw.length])
    if _PIXEL_DATA in ds and not parsed.keep(member, ds, len(data)):
        del ds[_PIXEL_DATA]  # over the budget: the pixel pass reads the member again


def _read_headers(source: MemberSource, parsed: ParsedMembers) -> tuple[list[InstanceHeader], int]:
    headers: list[InstanceHeader] = []
    skipped = 0
    values = ElementValues()
    for member in range(source.count()):
        ds = _parse_member(source, member, parsed, values)
        found = _image_headers(ds, member, values) if ds is not None else None
        if found is None:
            parsed.take(member)  # nothing of it will be decoded: free its pixels now
            skipped += 1
            continue
        headers.extend(found)
    return headers, skipped


def _image_headers(ds: Dataset, member: int, values: ElementValues) -> list[InstanceHeader] | None:
    """The image planes of one parsed member; None for a DICOMDIR, a non-image or broken header."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(values.reader(meta)("MediaStorageSOPClassUID") or "") == DICOMDIR_SOP_CLASS:
        return None
    if _SOP_CLASS_UID not in ds:
        return None
    try:
        return _headers_of(ds, member, values.identifiers(values.reader(ds)), values)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        return None


# ---- pixel pass ----------------------------------------------------------------------------------


def check_transfer_syntax(uid: str) -> None:
    """Refuse (415 ``unsupported_transfer_syntax``) pixel data this gateway cannot decode."""
    if UID(uid) in _NATIVE:
        return
    try:
        decoder = get_decoder(UID(uid))
    except NotImplementedError:
        available = False
    else:
        available = decoder.is_available
    if not available:
        raise ProblemError(
            ProblemCode.UNSUPPORTED_TRANSFER_SYNTAX,
            f"pixel data in transfer syntax {UID(uid).name} cannot be decoded here",
            field="TransferSyntaxUID",
            observed=uid,
            expected="native (implicit/explicit VR), deflated, RLE, JPEG (baseline, extended, lossless), "
            "JPEG-LS, JPEG 2000 or HTJ2K",
        )


def _problem(error: GeometryError) -> ProblemError:
    # headct's geometry codes are catalogue members (tests/unit/test_problem_codes.py checks).
    return ProblemError(
        ProblemCode.from_code(error.code),
        error.detail,
        field=error.field,
        observed=error.observed,
        expected=error.expected,
    )


def _mixed(detail: str, field: str, observed: Any) -> ProblemError:
    return ProblemError(
        ProblemCode.MIXED_SERIES,
        detail,
        field=field,
        observed=observed,
        expected="every instance of the series from one image stack",
    )


def _missing_geometry(field: str, count: int) -> ProblemError:
    return ProblemError(
        ProblemCode.MISSING_GEOMETRY,
        f"{count} slice(s) lack {field}; the volume cannot be placed in patient space",
        field=field,
        observed=f"{count} slices without it",
        expected=f"{field} on every slice",
    )


def dedupe(headers: Iterable[InstanceHeader]) -> tuple[list[InstanceHeader], int]:
    """Drop repeated copies of the same instance (frame); return the rest and how many were dropped."""
    seen: set[tuple[str, int | None]] = set()
    unique = []
    dropped = 0
    for header in headers:
        key = (header.sop_instance_uid, header.frame)
        if header.sop_instance_uid and key in seen:
            dropped += 1
            continue
        seen.add(key)
        unique.append(header)
    return unique, dropped


def series_geometry(headers: list[InstanceHeader]) -> StackGeometry:
    """Consistency and geometry checks of one series' planes (no pixel data read)."""
    sizes = sorted({(h.rows, h.columns) for h in headers}, key=str)
    if len(sizes) > 1:
        raise _mixed(
            "the series mixes images of different sizes", "Rows/Columns", [list(s) for s in sizes[:5]]
        )
    for field, values in (
        ("StudyInstanceUID", {h.study_uid for h in headers}),
        ("FrameOfReferenceUID", {h.frame_of_reference_uid for h in headers}),
    ):
        if len(values) > 1:
            raise _mixed(f"the series mixes instances with different {field}", field, f"{len(values)} values")
    iops = [h.iop for h in headers if h.iop is not None]
    ipps = [h.ipp for h in headers if h.ipp is not None]
    pixel_spacings = [h.pixel_spacing for h in headers if h.pixel_spacing is not None]
    for field, present in (
        ("ImageOrientationPatient", iops),
        ("ImagePositionPatient", ipps),
        ("PixelSpacing", pixel_spacings),
    ):
        missing = len(headers) - len(present)
        if missing:
            raise _missing_geometry(field, missing)
    spacings = np.asarray(pixel_spacings, dtype=np.float64)
    if float(np.ptp(spacings, axis=0).max()) > PIXEL_SPACING_TOL_MM:
        raise _mixed(
            "the series mixes images with different PixelSpacing",
            "PixelSpacing",
            [[round(float(v), 4) for v in row] for row in np.unique(np.round(spacings, 4), axis=0)[:5]],
        )
    try:
        iop = check_same_orientation(iops)
        return stack_geometry(ipps, iop, pixel_spacings[0])
    except GeometryError as error:
        raise _problem(error) from error


def _read_pixels(handle: Any, frames: list[int] | None) -> Iterable[np.ndarray]:
    """Stored pixel values of a single-frame instance, or of the listed frames of a multi-frame one.

    Frames of a Part 10 file are decoded one at a time straight from the (seekable) file, so a large
    multi-frame object never sits in memory whole.
    """
    if frames is not None:
        handle.seek(128)
        part10 = handle.read(4) == b"DICM"
        handle.seek(0)
        if part10:
            yield from iter_pixels(handle, indices=frames)
            return
    yield from _dataset_pixels(pydicom.dcmread(handle, specific_tags=_PIXEL_TAG_VALUES, force=True), frames)


def _dataset_pixels(
    ds: Dataset, frames: list[int] | None, values: ElementValues | None = None
) -> Iterable[np.ndarray]:
    """Stored pixel values from a dataset read with its pixel data (all of it, or the listed frames)."""
    if _PIXEL_DATA not in ds:
        raise unreadable("DICOM", "an instance of the series has no pixel data")
    if not getattr(ds, "file_meta", None) or _TRANSFER_SYNTAX_UID not in ds.file_meta:
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta.TransferSyntaxUID = _transfer_syntax(ds)
        ds.file_meta = meta
    if frames is None:
        native = _native_plane(ds, values)
        yield ds.pixel_array if native is None else native
        return
    yield from iter_pixels(ds, indices=frames)


_LITTLE_ENDIAN_NATIVE: Final = frozenset(
    {str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian), str(DeflatedExplicitVRLittleEndian)}
)


@dataclass(frozen=True)
class NativeLayout:
    """How an uncompressed little-endian single-frame 16-bit greyscale plane is stored."""

    shape: tuple[int, int]  #: (rows, columns)
    dtype: np.dtype  #: ``<i2`` or ``<u2``
    bits_stored: int


def _native_layout(ds: Dataset, values: ElementValues, transfer_syntax: str) -> NativeLayout | None:
    """`NativeLayout` of the instance's pixel data, None for anything else (pydicom decodes that)."""
    if transfer_syntax not in _LITTLE_ENDIAN_NATIVE:
        return None
    get = values.reader(ds)
    try:
        # A missing element is None here (AttributeError from ``ds.Rows``): int(None) is a TypeError.
        rows, columns = int(get("Rows")), int(get("Columns"))
        bits_allocated, bits_stored = int(get("BitsAllocated")), int(get("BitsStored"))
        signed = int(get("PixelRepresentation")) == 1
        frames = int(get("NumberOfFrames") or 1)
        samples = int(get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits_allocated != 16 or not 1 <= bits_stored <= 16 or frames != 1 or samples != 1:
        return None
    if min(rows, columns) < 1:
        return None
    return NativeLayout((rows, columns), np.dtype("<i2" if signed else "<u2"), bits_stored)


def _native_plane(ds: Dataset, values: ElementValues | None = None) -> np.ndarray | None:
    """The one plane of an uncompressed little-endian 16-bit greyscale instance (nearly every CT slice),
    read straight from its pixel bytes: the values ``ds.pixel_array`` gives (unused high bits shifted
    out the same way, ``correct_unused_bits``) at a third of its cost. None for anything else, which
    pydicom decodes."""
    values = values or ElementValues()
    layout = _native_layout(ds, values, str(values.reader(ds.file_meta)("TransferSyntaxUID")))
    if layout is None:
        return None
    pixel_bytes = ds.PixelData
    rows, columns = layout.shape
    if not isinstance(pixel_bytes, bytes) or len(pixel_bytes) != rows * columns * 2:
        return None
    plane = np.frombuffer(pixel_bytes, dtype=layout.dtype).reshape(rows, columns)
    return stored_values(plane, layout.bits_stored)


@contextlib.contextmanager
def _member_pixels(
    source: MemberSource,
    member: int,
    frames: list[int] | None,
    scratch: Path,
    parsed: ParsedMembers | None,
    values: ElementValues,
) -> Iterator[Iterable[np.ndarray]]:
    """The member's planes: kept by the header pass (a stored plane or a dataset), or read again."""
    index = parsed.plane_of(member) if parsed is not None else None
    if parsed is not None and parsed.planes is not None and index is not None and frames is None:
        yield [parsed.planes.plane(index)]
        return
    ds = parsed.take(member) if parsed is not None else None
    if ds is not None and _PIXEL_DATA in ds:
        yield _dataset_pixels(ds, frames, values)
        return
    with source.seekable(member, scratch) as handle:
        yield _read_pixels(handle, frames)


def _stack_in_place(
    headers: list[InstanceHeader], geometry: StackGeometry, parsed: ParsedMembers | None
) -> tuple[np.ndarray, SourcePlaneStats | None] | None:
    """The float32 HU stack built where the header pass stored the series' planes, when it stored them
    all (single-frame, uncompressed 16-bit slices of one size) and the stack fits there, with the
    volume's `SourcePlaneStats` gathered slice by slice; else None."""
    planes = parsed.planes if parsed is not None else None
    if parsed is None or planes is None:
        return None
    first = headers[0]
    rows, columns = int(first.rows or 0), int(first.columns or 0)
    if planes.shape != (rows, columns) or not planes.fits_stack(len(headers)):
        return None
    ordered = [headers[i] for i in geometry.order]
    order = [parsed.plane_of(h.member) if h.frame is None else None for h in ordered]
    if any(index is None for index in order) or len(set(order)) != len(order):
        return None
    # The volume is the stack transposed (`assemble`): its planes along its outer axis are the slices,
    # transposed, unless a slice is a single row (then another axis is outermost: no statistics here).
    builder = PlaneStatsBuilder(2, len(order)) if rows > 1 else None
    stack = planes.stack(
        [int(index) for index in order if index is not None],
        [h.slope for h in ordered],
        [h.intercept for h in ordered],
        each=(lambda k, plane: builder.add(k, plane.T)) if builder is not None else None,
    )
    return stack, builder.result() if builder is not None else None


def assemble(
    source: MemberSource,
    headers: list[InstanceHeader],
    geometry: StackGeometry,
    limits: IngestLimits,
    scratch: Path,
    parsed: ParsedMembers | None = None,
) -> tuple[Volume, SourcePlaneStats | None]:
    """Decode the series' pixels into a float32 HU `Volume` laid out by `geometry`: in place where the
    header pass stored every plane of it (`StoredPlanes.stack`, which also gives the volume's
    `SourcePlaneStats`), else into a new array (statistics None), from what the header pass kept in
    `parsed` or by reading the members again."""
    first = headers[0]
    rows, columns = int(first.rows or 0), int(first.columns or 0)
    n = len(headers)
    if rows * columns * n > limits.max_voxels:
        raise too_large((columns, rows, n), limits.max_voxels)
    for uid in sorted({h.transfer_syntax for h in headers}):
        check_transfer_syntax(uid)
    if any(h.samples_per_pixel != 1 for h in headers):
        raise unreadable("DICOM", "colour (SamplesPerPixel > 1) images are not CT")
    in_place = _stack_in_place(headers, geometry, parsed)
    if in_place is None:
        stack, stats = _stack_by_member(source, headers, geometry, scratch, parsed, (n, rows, columns)), None
    else:
        stack, stats = in_place
    # (slices, rows, columns) -> (columns, rows, slices): axis 0 along the row cosine. A transposed
    # view, Fortran-contiguous like the arrays nibabel returns for NIfTI; no copy.
    return Volume(hu=np.transpose(stack, (2, 1, 0)), affine=geometry.affine), stats


def _stack_by_member(
    source: MemberSource,
    headers: list[InstanceHeader],
    geometry: StackGeometry,
    scratch: Path,
    parsed: ParsedMembers | None,
    shape: tuple[int, int, int],
) -> np.ndarray:
    """The float32 HU stack in a new array, each member's planes decoded and rescaled into their slots."""
    slot = {index: k for k, index in enumerate(geometry.order)}
    stack = np.empty(shape, dtype=np.float32)
    values = ElementValues()  # the slices' pixel descriptions repeat: converted once
    by_member: dict[int, list[int]] = defaultdict(list)
    for index, header in enumerate(headers):
        by_member[header.member].append(index)
    try:
        for member, indices in sorted(by_member.items()):
            # A multi-frame instance: its planes in frame order, and the frame numbers to read.
            numbered = sorted((frame, i) for i in indices if (frame := headers[i].frame) is not None)
            if numbered and len(numbered) != len(indices):
                raise unreadable("DICOM", "an instance mixes framed and unframed image planes")
            frame_numbers = [frame for frame, _ in numbered] if numbered else None
            targets = [i for _, i in numbered] if numbered else indices
            with _member_pixels(source, member, frame_numbers, scratch, parsed, values) as planes:
                for index, pixels in zip(targets, planes, strict=True):
                    if pixels.shape != shape[1:]:
                        raise unreadable("DICOM", f"decoded pixel data has shape {pixels.shape}")
                    header = headers[index]
                    rescale(pixels, header.slope, header.intercept, out=stack[slot[index]])
    except ProblemError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # a decoder failing on corrupt or truncated pixel data
        raise unreadable("DICOM pixel", error) from error
    return stack


def read_evidence(source: MemberSource, headers: list[InstanceHeader]) -> tuple[Dataset, ...]:
    """The instances of the chosen series without pixel data, for a DICOM result object that must be
    filed under the same patient and study (patient identifiers included: only on request)."""
    instances = []
    for member in sorted({header.member for header in headers}):
        with source.open(member) as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
        # Let go of the member's file object (a zip stream with a lock: not picklable, and the evidence
        # crosses from the worker process to the gateway).
        ds.filename, ds.fileobj_type, ds.buffer = None, None, None
        instances.append(ds)
    return tuple(instances)


def transfer_syntax_warnings(headers: list[InstanceHeader]) -> list[ScanWarning]:
    if any(h.lossy for h in headers):
        return [
            (
                "lossy_compression",
                "the pixel data went through lossy compression; small, faint findings may be affected",
            )
        ]
    return []
