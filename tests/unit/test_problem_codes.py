"""The problem catalogue (`api.problem_codes.ProblemCode`): one entry per code with its HTTP and gRPC
status; every `ProblemError` in api/ names an entry; every code headct can raise is in it; problems
survive the process pool; the README table and the OpenAPI error responses are generated from it."""

from __future__ import annotations

import ast
import multiprocessing
import pickle
import re
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import pytest

import headct.preprocess as preprocess_module
from api.grpc.problems import grpc_status
from api.inference import pipeline as prediction
from api.main import create_app
from api.problem_codes import (
    MODEL_CARD_PROBLEMS,
    README,
    REGENERATE,
    STATUS_MEANINGS,
    ProblemCode,
    markdown_table,
    readme_table,
    replace_between_markers,
)
from api.problems import PROBLEM_MEDIA_TYPE, ProblemError, problem_responses
from headct.preprocess import PreprocessingError

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "api"


def _api_sources() -> list[Path]:
    return sorted(path for path in API.rglob("*.py") if "proto" not in path.parts)


# --- the catalogue itself ----------------------------------------------------------------------------


def test_every_code_is_unique_snake_case_and_complete() -> None:
    # An Enum silently turns a repeated value into an alias: no member may be one.
    assert len(ProblemCode.__members__) == len(ProblemCode)
    for name, member in ProblemCode.__members__.items():
        assert member.code == member.value and name == member.code.upper(), name
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", member.code), member.code
        assert member.http_status in STATUS_MEANINGS and 400 <= member.http_status < 600, member
        assert isinstance(member.grpc_status, grpc.StatusCode), member
        assert member.grpc_status not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN), member
        assert member.title and member.title[0].isupper() and "\n" not in member.title, member
        assert member.description and "\n" not in member.description and "|" not in member.description
    assert {member.http_status for member in ProblemCode} == set(STATUS_MEANINGS)
    assert ProblemCode("not_ct") is ProblemCode.NOT_CT
    with pytest.raises(ValueError):
        ProblemCode("no_such_code")
    assert all(ProblemCode.from_code(member.code) is member for member in ProblemCode)
    with pytest.raises(ValueError, match="no_such_code"):
        ProblemCode.from_code("no_such_code")


#: The gRPC statuses problems had before the catalogue (mapped from the HTTP status): unchanged on the
#: wire. 404 / 405 never reach gRPC (REST routing and the REST-only studies route).
_LEGACY_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,  # study_not_found: REST only (the studies route); never sent over gRPC
    406: grpc.StatusCode.INVALID_ARGUMENT,  # REST only (content negotiation); never sent over gRPC
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@pytest.mark.parametrize("member", list(ProblemCode), ids=lambda member: member.code)
def test_grpc_status_comes_from_the_catalogue(member: ProblemCode) -> None:
    error = ProblemError(member, "detail")
    assert grpc_status(error) is member.grpc_status is grpc_status(member)
    assert (error.status, error.code, error.title) == (member.http_status, member.code, member.title)
    if member not in (ProblemCode.NOT_FOUND, ProblemCode.METHOD_NOT_ALLOWED):
        assert member.grpc_status is _LEGACY_GRPC.get(member.http_status, grpc.StatusCode.INTERNAL)


# --- every producer of codes uses the catalogue --------------------------------------------------------


def _problem_calls() -> list[tuple[Path, ast.Call]]:
    calls = []
    for path in _api_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name == "ProblemError":
                    calls.append((path, node))
    return calls


def test_every_problem_error_in_api_names_a_catalogue_member() -> None:
    calls = _problem_calls()
    assert len(calls) > 40  # the scan sees them (api/ raises ~60)
    for path, call in calls:
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        assert call.args, where
        first = call.args[0]
        assert not isinstance(first, ast.Constant), f"{where}: ProblemError(<status>, ...): use ProblemCode.X"
        assert len(call.args) <= 2, f"{where}: ProblemError(ProblemCode.X, detail, *, field=...)"
        assert "title" not in {keyword.arg for keyword in call.keywords}, (
            f"{where}: the title is the catalogue's"
        )
        if isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name):
            assert first.value.id == "ProblemCode" and first.attr in ProblemCode.__members__, where


def test_no_code_is_spelled_as_a_string_outside_the_catalogue() -> None:
    """A code as a string literal in api/ bypasses the catalogue (a typo there is a new code on the wire).
    Validation warnings, ``(code, detail)`` pairs, are not problems and may share a name (gantry_tilt)."""
    codes = {member.code for member in ProblemCode}
    found = []
    for path in _api_sources():
        if path.name == "problem_codes.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        warnings = {
            id(node.elts[0]) for node in ast.walk(tree) if isinstance(node, ast.Tuple) and len(node.elts) == 2
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in codes and id(node) not in warnings:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, "use ProblemCode.X instead of:\n" + "\n".join(found)


def _preprocessing_codes() -> set[str]:
    """Every `PreprocessingError.code` headct can raise: the class attributes of the error classes, and
    any `code="..."` passed where one is raised."""
    codes = set()
    for value in vars(preprocess_module).values():
        if isinstance(value, type) and issubclass(value, PreprocessingError):
            codes.add(value.code)
    for source in Path(preprocess_module.__file__).parent.glob("*.py"):  # every module of the package
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "code" and isinstance(node.value, ast.Constant):
                codes.add(node.value.value)
    return codes


def _geometry_codes() -> set[str]:
    """Every code `headct.dicom_geometry.GeometryError` is raised with (its first argument)."""
    import headct.dicom_geometry as geometry

    codes = set()
    for node in ast.walk(ast.parse(Path(geometry.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "GeometryError":
            first = node.args[0]
            assert isinstance(first, ast.Constant), f"dicom_geometry.py:{node.lineno}: code not a literal"
            codes.add(first.value)
    return codes


def test_every_code_headct_can_raise_is_a_422_in_the_catalogue() -> None:
    preprocessing, geometry = _preprocessing_codes(), _geometry_codes()
    assert {"preprocessing_failed", "no_foreground", "invalid_volume", "volume_too_large"} <= preprocessing
    assert {"gantry_tilt", "missing_slices", "non_uniform_spacing"} <= geometry
    for code in preprocessing | geometry:
        assert ProblemCode(code).http_status == 422, code


@pytest.mark.parametrize("code", sorted(_preprocessing_codes()))
def test_a_preprocessing_error_becomes_its_catalogue_problem(
    code: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fail(volume: object, stats: object = None, out: object = None) -> None:
        raise PreprocessingError("cannot", code=code)

    volume = types.SimpleNamespace(hu=types.SimpleNamespace(size=1))
    monkeypatch.setattr(
        prediction,
        "decode_upload",
        lambda *args, **kwargs: types.SimpleNamespace(volume=volume, plane_stats=None),
    )
    monkeypatch.setattr(prediction, "source_plane_stats", lambda hu: None)
    monkeypatch.setattr(prediction, "validate", lambda scan, stats=None: [])
    monkeypatch.setattr(prediction, "preprocess", fail)
    with pytest.raises(ProblemError) as raised:
        prediction.prepare_scan(str(tmp_path / "scan"), "application/octet-stream", None)
    assert raised.value.problem is ProblemCode(code)
    assert (raised.value.status, raised.value.code, raised.value.detail) == (422, code, "cannot")


# --- across processes -------------------------------------------------------------------------------------


def _raise_in_worker(code: str) -> None:
    raise ProblemError(
        ProblemCode(code),
        "from a worker",
        field="shape",
        observed=[1, 2],
        expected="3-D",
        headers={"Retry-After": "3"},
    )


@pytest.mark.parametrize("member", list(ProblemCode), ids=lambda member: member.code)
def test_every_problem_survives_pickling(member: ProblemCode) -> None:
    error = ProblemError(
        member, "detail", field="f", observed={"a": [1]}, expected=">= 1", headers={"X": "1"}
    )
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ProblemError) and copy.problem is member
    assert copy.to_problem("r") == error.to_problem("r")
    assert copy.headers == {"X": "1"} and copy.grpc_status is member.grpc_status


def test_a_problem_raised_in_a_spawned_worker_arrives_whole() -> None:
    """Like the preprocessing pool (spawn): the problem raised in the child is the one the parent gets."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool, pytest.raises(ProblemError) as raised:
        pool.submit(_raise_in_worker, "not_3d").result(timeout=120)
    error = raised.value
    assert error.problem is ProblemCode.NOT_3D and (error.status, error.code) == (422, "not_3d")
    assert (error.detail, error.field, error.observed, error.expected) == (
        "from a worker",
        "shape",
        [1, 2],
        "3-D",
    )
    assert error.headers == {"Retry-After": "3"}


def test_uncatalogued_http_errors_keep_their_http_code() -> None:
    """Starlette's 404 / 405 are catalogue members; any other status it might raise stays `http_<status>`."""
    assert ProblemError.from_http_exception(404, "Not Found", {}).problem is ProblemCode.NOT_FOUND
    assert ProblemError.from_http_exception(405, "no", {"Allow": "GET"}).headers == {"Allow": "GET"}
    teapot = ProblemError.from_http_exception(418, "teapot", {"X": "1"})
    assert (teapot.problem, teapot.status, teapot.code) == (None, 418, "http_418")
    assert teapot.grpc_status is grpc.StatusCode.INTERNAL
    copy = pickle.loads(pickle.dumps(teapot))
    assert copy.to_problem("r") == teapot.to_problem("r") and copy.headers == {"X": "1"}


# --- docs generated from the catalogue ------------------------------------------------------------------


def test_readme_problem_table_is_the_generated_one() -> None:
    assert readme_table(README.read_text(encoding="utf-8")) == markdown_table(), (
        f"README.md's problem-code table differs from api/problem_codes.py; regenerate it: {REGENERATE}"
    )


def test_markdown_table_lists_every_code_once_grouped_by_status() -> None:
    table = markdown_table()
    for member in ProblemCode:
        assert table.count(f"| `{member.code}` |") == 1, member
    statuses = [int(row.split("|")[1]) for row in table.splitlines() if re.match(r"\| \d{3} \|", row)]
    assert statuses == sorted(statuses)
    text = "a\n<!-- problem-codes:start -->\nold\n<!-- problem-codes:end -->\nb\n"
    assert readme_table(replace_between_markers(text, table)) == table


def test_openapi_problem_responses_come_from_the_catalogue() -> None:
    openapi = create_app().openapi()
    documented: dict[str, set[str]] = {}
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if PROBLEM_MEDIA_TYPE not in response.get("content", {}):
                    continue
                listed = set(re.findall(r"- `(\w+)`:", response["description"]))
                assert listed, (path, method, status)
                for code in listed:
                    assert ProblemCode(code).http_status == int(status), (path, method, code)
                    assert f"- `{code}`: {ProblemCode(code).description}" in response["description"]
                documented.setdefault(f"{method} {path}", set()).update(listed)
    predict = documented["post /v1/predict"]
    every_prediction_status = {400, 401, 413, 415, 422, 429, 500, 502, 503, 504}
    assert {member.code for member in ProblemCode.with_status(*every_prediction_status)} <= predict
    assert {member.code for member in MODEL_CARD_PROBLEMS} <= documented["get /v1/models"]
    assert {"shutting_down", *(member.code for member in MODEL_CARD_PROBLEMS)} <= documented["get /readyz"]


def test_problem_responses_group_codes_by_status() -> None:
    responses = problem_responses(ProblemCode.GATEWAY_BUSY, 504, ProblemCode.GATEWAY_BUSY)
    assert sorted(responses) == [429, 504]
    assert responses[429]["description"].count("`gateway_busy`") == 1
    assert "`deadline_exceeded`" in responses[504]["description"]
    assert "`inference_timeout`" in responses[504]["description"]


def test_the_problem_json_response_is_built_in_one_place() -> None:
    """No hand-written copy of the problem+json OpenAPI response outside `api.problems`."""
    copies = [
        str(path.relative_to(ROOT))
        for path in _api_sources()
        if path.name != "problems.py"
        and (
            "application/problem+json" in path.read_text(encoding="utf-8")
            or "PROBLEM_MEDIA_TYPE" in path.read_text(encoding="utf-8")
        )
    ]
    assert not copies, copies
