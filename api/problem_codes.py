"""Every problem code the gateway answers with, in one typed catalogue.

A `ProblemCode` member carries what a caller can rely on: the machine-readable ``code`` (the value, sent
as ``code`` in problem+json and as ``headct-problem-code`` over gRPC), its HTTP status, its gRPC status,
a human title and a one-line description. `api.problems.ProblemError` takes a member, never a free
status or code; the README's problem-code table and the OpenAPI error responses are generated from here.

    python -m api.problem_codes --markdown   # print the README table
    python -m api.problem_codes --write      # rewrite it in README.md (between the marker comments)

Codes are part of the API: never rename or renumber one; add new members instead.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Iterable
from pathlib import Path

import grpc

_S = grpc.StatusCode

#: HTTP statuses in the catalogue, what they mean to a client (headings of the README table).
STATUS_MEANINGS: dict[int, str] = {
    400: "the request cannot be read",
    401: "API key missing or wrong (only when keys are configured); with `WWW-Authenticate`",
    403: "the API key may not do this (e.g. send a priority lane it is not allowed)",
    404: "no such route, or no such study in the PACS",
    405: "the route does not take this method",
    406: "the `Accept` header allows none of the answer's media types",
    413: "the upload is too large",
    415: "a media type or DICOM transfer syntax this gateway cannot decode",
    422: "a readable scan that is not a usable head CT (`field`, `observed`, `expected` say why)",
    429: "too many requests at once; with `Retry-After`",
    500: "the deployment is broken",
    502: "the inference server or the PACS failed the request",
    503: "not ready or going away; with `Retry-After` (also on `/readyz`); or a feature not configured",
    504: "the request's deadline passed",
}


class ProblemCode(enum.Enum):
    """One kind of problem. The value is the wire ``code``; ``ProblemCode.from_code("not_ct")`` finds one."""

    code: str
    http_status: int
    grpc_status: grpc.StatusCode
    title: str
    description: str

    def __new__(
        cls, code: str, http_status: int, grpc_status: grpc.StatusCode, title: str, description: str
    ) -> ProblemCode:
        member = object.__new__(cls)
        member._value_ = code
        member.code = code
        member.http_status = http_status
        member.grpc_status = grpc_status
        member.title = title
        member.description = description
        return member

    # --- 400: the request cannot be read ----------------------------------------------------------
    UNREADABLE_FILE = (
        "unreadable_file",
        400,
        _S.INVALID_ARGUMENT,
        "Unreadable file",
        "the body is not a readable scan: no NIfTI / NRRD / zip / DICOM signature, a corrupt file or "
        "archive, or a multipart body without boundary or with several scan files",
    )
    EMPTY_BODY = ("empty_body", 400, _S.INVALID_ARGUMENT, "Empty body", "the request body is empty")
    UNKNOWN_TASK = (
        "unknown_task",
        400,
        _S.INVALID_ARGUMENT,
        "Unknown task",
        "`tasks` names a finding the served model does not have",
    )
    INVALID_INCLUDE = (
        "invalid_include",
        400,
        _S.INVALID_ARGUMENT,
        "Invalid include",
        "`include` asks for an extra that does not exist (only `embedding`, `attention` and `preview` "
        "do), or maps (`attention`, `preview`, `format`) from a model exported without them",
    )
    INVALID_REQUEST = (
        "invalid_request",
        400,
        _S.INVALID_ARGUMENT,
        "Invalid request",
        "a query parameter (REST) or the order of the stream's messages (gRPC) is malformed; `field` says "
        "which",
    )
    INVALID_PRIORITY = (
        "invalid_priority",
        400,
        _S.INVALID_ARGUMENT,
        "Invalid priority",
        "`priority` (query, `X-HeadCT-Priority` header or gRPC option) is not one of `stat`, `routine`, "
        "`bulk`",
    )
    # --- 401: API keys ------------------------------------------------------------------------------
    MISSING_API_KEY = (
        "missing_api_key",
        401,
        _S.UNAUTHENTICATED,
        "Missing API key",
        "API keys are configured and the request carries none (`X-API-Key` or `Authorization: Bearer`)",
    )
    INVALID_API_KEY = (
        "invalid_api_key",
        401,
        _S.UNAUTHENTICATED,
        "Invalid API key",
        "the request's API key is not one of the configured keys",
    )
    # --- 403: API key not allowed this ----------------------------------------------------------------
    PRIORITY_NOT_ALLOWED = (
        "priority_not_allowed",
        403,
        _S.PERMISSION_DENIED,
        "Priority not allowed",
        "the API key may not send this priority lane (its `lanes=` in the keys file; e.g. a bulk key "
        "sending `stat`)",
    )
    # --- 404 / 405: routing (REST only) ---------------------------------------------------------------
    NOT_FOUND = ("not_found", 404, _S.NOT_FOUND, "Not found", "no route at this path (REST only)")
    METHOD_NOT_ALLOWED = (
        "method_not_allowed",
        405,
        _S.UNIMPLEMENTED,
        "Method not allowed",
        "the route exists but not for this HTTP method (REST only)",
    )
    STUDY_NOT_FOUND = (
        "study_not_found",
        404,
        _S.NOT_FOUND,
        "Study not found",
        "the DICOMweb server (`HEADCT_DICOMWEB_URL`) has no study with this StudyInstanceUID (REST only)",
    )
    # --- 406: no acceptable answer format -----------------------------------------------------------------
    NOT_ACCEPTABLE = (
        "not_acceptable",
        406,
        _S.INVALID_ARGUMENT,
        "Not acceptable",
        "the `Accept` header allows no answer this request can have (JSON, FHIR, or DICOM for a DICOM "
        "upload; its Parametric Map with `include=attention` too) (REST only)",
    )
    # --- 413: too large -------------------------------------------------------------------------------
    PAYLOAD_TOO_LARGE = (
        "payload_too_large",
        413,
        _S.RESOURCE_EXHAUSTED,
        "Payload too large",
        "the body exceeds `HEADCT_MAX_UPLOAD_BYTES`, or an archive / multipart body holds too many "
        "entries, too many uncompressed bytes, too large an entry or too high a compression ratio "
        "(`field` says which limit)",
    )
    # --- 415: cannot decode ---------------------------------------------------------------------------
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported_media_type",
        415,
        _S.INVALID_ARGUMENT,
        "Unsupported media type",
        "the `Content-Type` is not one the gateway accepts",
    )
    UNSUPPORTED_TRANSFER_SYNTAX = (
        "unsupported_transfer_syntax",
        415,
        _S.INVALID_ARGUMENT,
        "Unsupported transfer syntax",
        "the DICOM pixel data is compressed in a transfer syntax no installed decoder reads",
    )
    # --- 422: not a usable head CT ----------------------------------------------------------------------
    NOT_CT = ("not_ct", 422, _S.INVALID_ARGUMENT, "Not CT", "the series (or upload) is not a CT image series")
    NOT_HEAD = (
        "not_head",
        422,
        _S.INVALID_ARGUMENT,
        "Not a head",
        "the DICOM tags name a body part other than the head",
    )
    MIXED_SERIES = (
        "mixed_series",
        422,
        _S.INVALID_ARGUMENT,
        "Mixed series",
        "the instances of the series do not form one image stack (several stacks, sizes or positions)",
    )
    INCONSISTENT_ORIENTATION = (
        "inconsistent_orientation",
        422,
        _S.INVALID_ARGUMENT,
        "Inconsistent orientation",
        "ImageOrientationPatient is invalid or differs between slices",
    )
    MISSING_SLICES = (
        "missing_slices",
        422,
        _S.INVALID_ARGUMENT,
        "Missing slices",
        "the slice positions have gaps",
    )
    NON_UNIFORM_SPACING = (
        "non_uniform_spacing",
        422,
        _S.INVALID_ARGUMENT,
        "Non-uniform spacing",
        "the distance between slices varies",
    )
    GANTRY_TILT = (
        "gantry_tilt",
        422,
        _S.INVALID_ARGUMENT,
        "Gantry tilt",
        "the slices are sheared like a gantry tilt of more than 30°",
    )
    TOO_FEW_SLICES = (
        "too_few_slices",
        422,
        _S.INVALID_ARGUMENT,
        "Too few slices",
        "the series or volume is too thin to be a head CT",
    )
    INSUFFICIENT_COVERAGE = (
        "insufficient_coverage",
        422,
        _S.INVALID_ARGUMENT,
        "Insufficient coverage",
        "the scan covers too little of the head",
    )
    BAD_SPACING = (
        "bad_spacing",
        422,
        _S.INVALID_ARGUMENT,
        "Bad spacing",
        "the voxel sizes are missing, not finite or outside the range of clinical head CT",
    )
    NOT_3D = ("not_3d", 422, _S.INVALID_ARGUMENT, "Not 3-D", "the scan is not a single 3-D volume")
    NON_FINITE_VALUES = (
        "non_finite_values",
        422,
        _S.INVALID_ARGUMENT,
        "Non-finite values",
        "the volume holds NaN or infinite voxel values",
    )
    HU_OUT_OF_RANGE = (
        "hu_out_of_range",
        422,
        _S.INVALID_ARGUMENT,
        "Values out of the Hounsfield range",
        "the voxel values are not Hounsfield units (far outside the scale, or no air around the head)",
    )
    MISSING_GEOMETRY = (
        "missing_geometry",
        422,
        _S.INVALID_ARGUMENT,
        "Missing geometry",
        "the volume cannot be placed in patient space (no ImagePositionPatient, NRRD space, ...)",
    )
    AMBIGUOUS_SERIES = (
        "ambiguous_series",
        422,
        _S.INVALID_ARGUMENT,
        "Ambiguous series",
        "several series of the upload are equally suitable; choose one with `series_uid`",
    )
    UNSUITABLE_SERIES = (
        "unsuitable_series",
        422,
        _S.INVALID_ARGUMENT,
        "Unsuitable series",
        "no series is an original axial CT image stack (localizers, secondary captures, reformats, colour)",
    )
    SERIES_NOT_FOUND = (
        "series_not_found",
        422,
        _S.INVALID_ARGUMENT,
        "Series not found",
        "the requested `series_uid` is not in the upload",
    )
    VOLUME_TOO_LARGE = (
        "volume_too_large",
        422,
        _S.INVALID_ARGUMENT,
        "Volume too large",
        "the decoded or resampled volume would exceed `HEADCT_MAX_VOXELS` or the 1 mm grid limit",
    )
    NO_FOREGROUND = (
        "no_foreground",
        422,
        _S.INVALID_ARGUMENT,
        "No foreground",
        "no head in the volume: nothing but air or thin structures",
    )
    INVALID_VOLUME = (
        "invalid_volume",
        422,
        _S.INVALID_ARGUMENT,
        "Invalid volume",
        "preprocessing found NaN or infinite voxel values",
    )
    PREPROCESSING_FAILED = (
        "preprocessing_failed",
        422,
        _S.INVALID_ARGUMENT,
        "Preprocessing failed",
        "the volume could not be turned into the model's input",
    )
    # --- 429: too many at once --------------------------------------------------------------------------
    GATEWAY_BUSY = (
        "gateway_busy",
        429,
        _S.RESOURCE_EXHAUSTED,
        "Gateway busy",
        "the request's priority lane has no room: its queue (`HEADCT_MAX_QUEUE`, "
        "`HEADCT_BULK_MAX_QUEUE`) is full behind `HEADCT_MAX_INFLIGHT`; bulk is refused first, STAT last; "
        "`Retry-After` is `HEADCT_BUSY_RETRY_AFTER_S`",
    )
    KEY_CONCURRENCY_EXCEEDED = (
        "key_concurrency_exceeded",
        429,
        _S.RESOURCE_EXHAUSTED,
        "Key concurrency exceeded",
        "this API key has `HEADCT_PER_KEY_CONCURRENCY` predictions in flight; `Retry-After` is "
        "`HEADCT_BUSY_RETRY_AFTER_S`",
    )
    # --- 500: broken deployment -------------------------------------------------------------------------
    MODEL_CARD_MISSING = (
        "model_card_missing",
        500,
        _S.INTERNAL,
        "Model card missing",
        "the Triton model's config has no model card (not written by `python -m export`)",
    )
    # --- 502: inference server failed -------------------------------------------------------------------
    INFERENCE_FAILED = (
        "inference_failed",
        502,
        _S.INTERNAL,
        "Inference failed",
        "Triton failed the request or answered something malformed",
    )
    PACS_UNREACHABLE = (
        "pacs_unreachable",
        502,
        _S.INTERNAL,
        "PACS unreachable",
        "the DICOMweb server (`HEADCT_DICOMWEB_URL`) cannot be reached: connection refused or reset, "
        "unknown host, TLS failure",
    )
    PACS_ERROR = (
        "pacs_error",
        502,
        _S.INTERNAL,
        "PACS error",
        "the DICOMweb server answered an error (5xx, or a 4xx other than 404 / 401 / 403) or something "
        "that is not DICOM, or refused the stored SR",
    )
    PACS_AUTH_FAILED = (
        "pacs_auth_failed",
        502,
        _S.INTERNAL,
        "PACS authentication failed",
        "the DICOMweb server refused the gateway's credentials (401 / 403): check "
        "`HEADCT_DICOMWEB_USERNAME` / `_PASSWORD` / `_TOKEN`",
    )
    # --- 503: not ready / going away ----------------------------------------------------------------------
    MODEL_UNAVAILABLE = (
        "model_unavailable",
        503,
        _S.UNAVAILABLE,
        "Model unavailable",
        "Triton is unreachable, the model is not ready, or Triton's queue is full",
    )
    PREPROCESSING_WORKER_LOST = (
        "preprocessing_worker_lost",
        503,
        _S.UNAVAILABLE,
        "Preprocessing worker lost",
        "the process preprocessing this scan died (out of memory?); the pool replaces it",
    )
    SHUTTING_DOWN = (
        "shutting_down",
        503,
        _S.UNAVAILABLE,
        "Shutting down",
        "this instance received SIGTERM; another instance will answer",
    )
    MODEL_CONTRACT_MISMATCH = (
        "model_contract_mismatch",
        503,
        _S.UNAVAILABLE,
        "Model contract mismatch",
        "the served model was exported for another preprocessing version or input contract; `detail` "
        "names the model's and the gateway's",
    )
    MODEL_CARD_INVALID = (
        "model_card_invalid",
        503,
        _S.UNAVAILABLE,
        "Model card invalid",
        "the model card fails this release's schema (e.g. an older export)",
    )
    MODEL_CARD_STALE = (
        "model_card_stale",
        503,
        _S.UNAVAILABLE,
        "Model card stale",
        "Triton serves another version than its config's card describes (e.g. mid-update)",
    )
    PACS_NOT_CONFIGURED = (
        "pacs_not_configured",
        503,
        _S.UNAVAILABLE,
        "PACS not configured",
        "this gateway has no DICOMweb server to read studies from (`HEADCT_DICOMWEB_URL` is unset)",
    )
    # --- 504: deadline --------------------------------------------------------------------------------
    DEADLINE_EXCEEDED = (
        "deadline_exceeded",
        504,
        _S.DEADLINE_EXCEEDED,
        "Deadline exceeded",
        "the request's deadline (`HEADCT_REQUEST_TIMEOUT_S`) passed",
    )
    INFERENCE_TIMEOUT = (
        "inference_timeout",
        504,
        _S.DEADLINE_EXCEEDED,
        "Inference timeout",
        "Triton did not answer within `HEADCT_INFERENCE_TIMEOUT_S`",
    )
    PACS_TIMEOUT = (
        "pacs_timeout",
        504,
        _S.DEADLINE_EXCEEDED,
        "PACS timeout",
        "the DICOMweb server did not answer within `HEADCT_DICOMWEB_TIMEOUT_S`",
    )

    @classmethod
    def from_code(cls, code: str) -> ProblemCode:
        """The member whose wire ``code`` is `code` (what ``ProblemCode(code)`` does, in a form type
        checkers read as a lookup rather than a call of `__new__`); ValueError for an unknown code."""
        member = cls._value2member_map_.get(code)
        if not isinstance(member, cls):
            raise ValueError(f"{code!r} is not a valid {cls.__name__}")
        return member

    @classmethod
    def with_status(cls, *statuses: int) -> list[ProblemCode]:
        """The members answered with one of `statuses`, in catalogue order."""
        return [member for member in cls if member.http_status in statuses]

    @classmethod
    def for_http_status(cls, status: int) -> ProblemCode | None:
        """The member Starlette's own HTTP errors (404, 405) map to, if any."""
        return {404: cls.NOT_FOUND, 405: cls.METHOD_NOT_ALLOWED}.get(status)


#: What reading the served model's card can answer with (`TritonModel.card`): every route that needs the
#: model (`/readyz`, `/v1/models`, `/v1/predict`, gRPC) documents these.
MODEL_CARD_PROBLEMS: tuple[ProblemCode, ...] = (
    ProblemCode.MODEL_UNAVAILABLE,
    ProblemCode.MODEL_CONTRACT_MISMATCH,
    ProblemCode.MODEL_CARD_INVALID,
    ProblemCode.MODEL_CARD_STALE,
    ProblemCode.MODEL_CARD_MISSING,
)

# ---- docs generated from the catalogue ----------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
START_MARKER = "<!-- problem-codes:start -->"
END_MARKER = "<!-- problem-codes:end -->"
REGENERATE = "python -m api.problem_codes --write"


def markdown_table(codes: Iterable[ProblemCode] = ProblemCode) -> str:
    """The README table: grouped by HTTP status (a row saying what the status means), one row per code."""
    lines = [
        f"<!-- generated from api/problem_codes.py by `{REGENERATE}`; do not edit by hand -->",
        "",
        "| HTTP | gRPC | code | meaning |",
        "|---|---|---|---|",
    ]
    members = list(codes)
    for status in sorted({member.http_status for member in members}):
        lines.append(f"| **{status}** | | | *{STATUS_MEANINGS[status]}* |")
        lines.extend(
            f"| {status} | `{m.grpc_status.name}` | `{m.code}` | {m.description} |"
            for m in members
            if m.http_status == status
        )
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, table: str) -> str:
    """`text` with what lies between the marker comments replaced by `table`."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"{START_MARKER} ... {END_MARKER} not found")
    return text[: start + len(START_MARKER)] + "\n" + table + text[end:]


def readme_table(text: str) -> str:
    """What lies between the marker comments of `text`."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"{START_MARKER} ... {END_MARKER} not found")
    return text[start + len(START_MARKER) : end].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.problem_codes", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the README problem-code table")
    action.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    table = markdown_table()
    if args.markdown:
        sys.stdout.write(table)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    updated = replace_between_markers(text, table)
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
