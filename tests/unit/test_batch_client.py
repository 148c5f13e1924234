"""`headct batch` (headct/client/batch/) against an httpx MockTransport: discovery of a tree and a
manifest, retries that honour Retry-After, refusals and run-stopping problems, the journal, resume,
the embedding column and the CSV output."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headct.client import HeadCTClient, cli
from headct.client.batch.discovery import InputError, Scan, discover, discover_tree, read_manifest
from headct.client.batch.journal import Journal, fold, journal_path
from headct.client.batch.retry import RetryPolicy, parse_retry_after
from headct.client.batch.runner import BatchOptions, RunAborted, run_batch, score_scan
from headct.client.batch.table import read_output

DIM = 4
MODEL = {"name": "fmhct", "version": "demo-1", "sha256": "b" * 64}
DICOM_PREAMBLE = b"\0" * 128 + b"DICM"


def prediction(body: bytes, embedding: bool, priority: str = "routine") -> dict[str, Any]:
    """A prediction that depends on the bytes sent, so that rows can be told apart."""
    p = int(hashlib.sha256(body).hexdigest()[:8], 16) / 0xFFFFFFFF
    result: dict[str, Any] = {
        "request_id": f"r-{p:.6f}",
        "model": MODEL,
        "findings": [
            {"name": "hemorrhage", "probability": p, "threshold": 0.5, "positive": p >= 0.5},
            {"name": "edema", "probability": 1 - p, "threshold": 0.3, "positive": 1 - p >= 0.3},
        ],
        "input": {"shape": [64, 64, 24], "spacing_mm": [3.5, 3.5, 5.0], "source_format": "nifti"},
        "warnings": [{"code": "w", "detail": "a warning"}] if p > 0.5 else [],
        "timings_ms": {"total": 1.0},
        "priority": priority,
    }
    if embedding:
        result["embedding"] = [p, 0.5, -p, 1.0]
    return result


class Gateway:
    """Answers like the gateway: a body starting with ``bad`` is refused (422 not_head), ``busy`` gets
    429 the first `busy_times` times, ``down`` always 503; `interrupt_at` raises KeyboardInterrupt
    (a Ctrl-C) on that request."""

    def __init__(self, busy_times: int = 1, interrupt_at: int | None = None) -> None:
        self.busy_times = busy_times
        self.interrupt_at = interrupt_at
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"models": [{**MODEL, "embedding_dim": DIM}]})
        body = request.read()
        with self._lock:
            self.requests.append(request)
            self.bodies.append(body)
            count = len(self.requests)
            busy = self.bodies.count(body) <= self.busy_times
        if count == self.interrupt_at:
            raise KeyboardInterrupt
        if body.startswith(b"bad"):
            return problem(422, "not_head", "no head")
        if body.startswith(b"busy") and busy:
            return problem(429, "gateway_busy", "busy", {"Retry-After": "0"})
        if body.startswith(b"down"):
            return problem(503, "model_unavailable", "not ready", {"Retry-After": "0"})
        params = request.url.params
        return httpx.Response(
            200, json=prediction(body, params.get("include") == "embedding", params["priority"])
        )

    def scored(self) -> list[bytes]:
        return [body for body in self.bodies if not body.startswith(b"bad")]


def problem(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"status": status, "code": code, "detail": detail, "request_id": f"r-{code}"}
    return httpx.Response(
        status, json=body, headers={"Content-Type": "application/problem+json", **(headers or {})}
    )


def factory(gateway: Gateway) -> Callable[[], HeadCTClient]:
    return partial(HeadCTClient, "http://gw:8080", transport=httpx.MockTransport(gateway))


FAST = BatchOptions(concurrency=2, retry=RetryPolicy(max_retries=3, max_wait_s=0.0), progress=False)


def archive(root: Path, names: dict[str, bytes]) -> Path:
    for name, content in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


COHORT = {
    "a/one.nii.gz": b"good one",
    "a/two.nii": b"good two",
    "b/three.nrrd": b"good three",
    "b/bad.nii.gz": b"bad scan",
    "c/series/IM0001": DICOM_PREAMBLE + b"slice 1",
    "c/series/IM0002": DICOM_PREAMBLE + b"slice 2",
    "d/busy.nii": b"busy scan",
}


def run(tmp_path: Path, gateway: Gateway, out: str = "results.parquet", **options: Any) -> tuple[int, str]:
    err = io.StringIO()
    opts = BatchOptions(**{**FAST.__dict__, **options})
    code = run_batch(tmp_path / "archive", tmp_path / out, opts, factory(gateway), err=err)
    return code, err.getvalue()


# --- discovery -------------------------------------------------------------------------------------


def test_discover_a_tree(tmp_path: Path) -> None:
    archive(
        tmp_path,
        {
            "site/p1/head.nii.gz": b"x",
            "site/p1/head.NII": b"x",
            "site/p2/scan.nrrd": b"x",
            "site/p2/notes.txt": b"not a scan",
            "study/ct/IM0001": DICOM_PREAMBLE,
            "study/ct/IM0002": DICOM_PREAMBLE,
            "study/ct/localizer/IM9": DICOM_PREAMBLE,  # a series of its own
            "study/named/slice.dcm": b"no preamble, but the name says DICOM",
            "study/other/readme.md": b"text",
            ".hidden/scan.nii": b"x",
            "site/.scan.nii": b"x",
        },
    )
    scans = discover_tree(tmp_path)
    assert [s.scan_id for s in scans] == [
        "site/p1/head.NII",
        "site/p1/head.nii.gz",
        "site/p2/scan.nrrd",
        "study/ct",
        "study/ct/localizer",
        "study/named",
    ]
    assert {s.scan_id: s.whole_tree for s in scans}["study/ct"] is False
    assert scans[0].path == tmp_path / "site/p1/head.NII"
    assert discover_tree(tmp_path / "study/ct") == [
        Scan(".", tmp_path / "study/ct", whole_tree=False),
        Scan("localizer", tmp_path / "study/ct/localizer", whole_tree=False),
    ]


def test_discover_a_manifest(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.nii.gz"
    manifest = tmp_path / "lists" / "cohort.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path,scan_id,site\nscans/a.nii.gz,A,x\n{elsewhere},,y\nseries/,S,z\n")
    assert discover(manifest) == [
        Scan("A", tmp_path / "lists/scans/a.nii.gz"),
        Scan(str(elsewhere), elsewhere),
        Scan("S", tmp_path / "lists/series"),
    ]
    manifest.write_text("file\nscan.nii\n")
    with pytest.raises(InputError, match="no `path` column"):
        read_manifest(manifest)
    manifest.write_text("path,scan_id\na.nii,X\nb.nii,X\n")
    with pytest.raises(InputError, match="more than once: X"):
        read_manifest(manifest)
    with pytest.raises(InputError, match=r"not a folder or a \.csv"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no scans found"):
        discover(tmp_path / "empty")


# --- one scan: retries, refusals -------------------------------------------------------------------


def test_retry_on_429_honours_retry_after(tmp_path: Path) -> None:
    scan = archive(tmp_path, {"busy.nii": b"busy"}) / "busy.nii"
    answers = iter(
        [
            problem(429, "gateway_busy", "full", {"Retry-After": "3"}),
            problem(503, "shutting_down", "bye", {"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}),
            httpx.Response(200, json=prediction(b"busy", False)),
        ]
    )
    sent: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return next(answers)

    waits: list[float] = []

    def pause(seconds: float) -> bool:
        waits.append(seconds)
        return False  # not stopping

    options = BatchOptions(retry=RetryPolicy(max_retries=5, max_wait_s=60.0, backoff_s=0.5))
    with HeadCTClient("http://gw", transport=httpx.MockTransport(gateway)) as client:
        row = score_scan(client, Scan("busy.nii", scan), options, pause)
    assert row is not None and row["status"] == "ok" and row["attempts"] == 3
    assert 3.0 <= waits[0] <= 3.75  # Retry-After, plus at most 25 % jitter
    assert 1.0 <= waits[1] <= 1.25  # a date in the past: the backoff (0.5 s x 2) instead
    assert [r.url.params["priority"] for r in sent] == ["bulk"] * 3


def test_retry_delay_and_retry_after_parsing() -> None:
    policy = RetryPolicy(max_wait_s=10.0, backoff_s=1.0)
    assert [policy.delay(n, None, 0.0) for n in range(5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert policy.delay(0, "120", 0.0) == 10.0  # capped
    assert policy.delay(0, "7", 1.0) == 7.0 * 1.25
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_give_up_refuse_and_stop(tmp_path: Path) -> None:
    scan = Scan("s.nii", archive(tmp_path, {"s.nii": b"x"}) / "s.nii")
    options = BatchOptions(retry=RetryPolicy(max_retries=2, max_wait_s=0.0))

    def score(answer: Callable[[httpx.Request], httpx.Response]) -> tuple[dict[str, Any] | None, int]:
        calls: list[int] = []

        def gateway(request: httpx.Request) -> httpx.Response:
            calls.append(1)
            return answer(request)

        with HeadCTClient("http://gw", transport=httpx.MockTransport(gateway)) as client:
            return score_scan(client, scan, options, lambda s: False), len(calls)

    busy, calls = score(lambda r: problem(429, "gateway_busy", "full", {"Retry-After": "0"}))
    assert busy is not None and (busy["status"], busy["problem_code"], calls) == ("failed", "gateway_busy", 3)
    refused, calls = score(lambda r: problem(422, "not_head", "no skull"))
    assert refused is not None and calls == 1
    assert (refused["status"], refused["problem_code"], refused["problem_status"]) == (
        "refused",
        "not_head",
        422,
    )
    assert refused["problem_detail"] == "no skull" and refused["request_id"] == "r-not_head"

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    down, calls = score(unreachable)
    assert down is not None and (down["status"], down["problem_code"], calls) == (
        "failed",
        "transport_error",
        3,
    )
    for status, code in ((401, "invalid_api_key"), (403, "priority_not_allowed"), (400, "unknown_task")):
        with pytest.raises(RunAborted):
            score(lambda r, s=status, c=code: problem(s, c, "no"))
    with HeadCTClient("http://gw", transport=httpx.MockTransport(lambda r: problem(503, "x", "y"))) as client:
        assert score_scan(client, scan, options, lambda s: True) is None  # stopping: nothing recorded
    missing = Scan("gone.nii", tmp_path / "gone.nii")
    with HeadCTClient("http://gw", transport=httpx.MockTransport(unreachable)) as client:
        row = score_scan(client, missing, options, lambda s: False)
    assert row is not None and (row["status"], row["problem_code"]) == ("failed", "local_file_error")


# --- the run: output, resume, journal --------------------------------------------------------------


def test_a_run_writes_one_row_per_scan_with_an_embedding_column(tmp_path: Path) -> None:
    archive(tmp_path / "archive", COHORT)
    gateway = Gateway()
    code, err = run(tmp_path, gateway, embeddings=True)
    assert code == 0, err
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    rows = {row["scan_id"]: row for row in table.to_pylist()}
    assert sorted(rows) == [
        "a/one.nii.gz",
        "a/two.nii",
        "b/bad.nii.gz",
        "b/three.nrrd",
        "c/series",
        "d/busy.nii",
    ]
    one = rows["a/one.nii.gz"]
    expected = prediction(b"good one", True)
    assert one["findings"] == expected["findings"] and one["status"] == "ok"
    assert one["hemorrhage_probability"] == expected["findings"][0]["probability"]
    assert one["embedding"] == pytest.approx(expected["embedding"], abs=1e-7)
    assert (one["model_version"], one["model_sha256"], one["priority"]) == ("demo-1", "b" * 64, "bulk")
    assert rows["b/bad.nii.gz"]["status"] == "refused" and rows["b/bad.nii.gz"]["problem_code"] == "not_head"
    assert rows["b/bad.nii.gz"]["hemorrhage_probability"] is None
    assert rows["d/busy.nii"]["attempts"] == 2
    assert "ok 5, refused 1 (not_head 1), failed 0" in err
    assert not journal_path(tmp_path / "results.parquet").exists()
    assert all(r.url.params["include"] == "embedding" for r in gateway.requests)
    read_back = {row["scan_id"]: row for row in read_output(tmp_path / "results.parquet", "parquet")}
    assert read_back["b/bad.nii.gz"]["embedding"] is None  # stored as a vector of nulls


def test_interrupted_run_resumes_without_scoring_twice(tmp_path: Path) -> None:
    archive(tmp_path / "archive", COHORT | {"e/down.nii": b"down"})
    first = Gateway(busy_times=0, interrupt_at=4)
    code, err = run(tmp_path, first, concurrency=1)
    assert code == 130 and "interrupted" in err
    done = {row["scan_id"]: row for row in read_output(tmp_path / "results.parquet", "parquet")}
    # The 4th request was the Ctrl-C; the next scan, queued behind it, may already have been running
    # on the worker thread: its answer is kept too.
    assert len(done) in (3, 4) and "e/down.nii" not in done
    second = Gateway(busy_times=0)
    code, err = run(tmp_path, second)
    assert code == 1 and "failed 1 (model_unavailable 1)" in err  # e/down.nii: 503 after 3 retries
    assert f"7 scans, {len(done)} already done; scoring {7 - len(done)}" in err
    rows = {row["scan_id"]: row for row in read_output(tmp_path / "results.parquet", "parquet")}
    assert len(rows) == 7 and all(rows[s] == row for s, row in done.items())  # kept, not scored again
    assert len(second.requests) == (7 - len(done)) - 1 + 4  # e/down.nii tried 4 times
    third = Gateway(busy_times=0)
    code, err = run(tmp_path, third)
    assert code == 1 and [r.url.path for r in third.requests] == ["/v1/predict"] * 4  # only the failed one


def test_journal_is_folded_after_a_kill(tmp_path: Path) -> None:
    archive(tmp_path / "archive", COHORT)
    assert run(tmp_path, Gateway())[0] == 0
    output = tmp_path / "results.parquet"
    before = {row["scan_id"]: row for row in read_output(output, "parquet")}
    # What a SIGKILLed later run leaves: a journal with a failed retry of a finished scan, a new row and
    # a torn last line.
    extra = before["a/one.nii.gz"] | {"scan_id": "z/new.nii", "request_id": "r-new"}
    failed = before["a/two.nii"] | {"status": "failed", "problem_code": "gateway_busy"}
    journal = journal_path(output)
    journal.write_text(json.dumps(extra) + "\n" + json.dumps(failed) + "\n" + '{"scan_id": "torn')
    held = Journal(journal)
    with pytest.raises(InputError, match="another `headct batch` is writing"):
        Journal(journal)
    rows = fold(output, "parquet", held)
    held.close(remove=held.empty)
    assert rows["z/new.nii"]["request_id"] == "r-new"
    assert rows["a/two.nii"] == before["a/two.nii"]  # a failure never hides a finished row
    assert set(rows) == {*before, "z/new.nii"}
    assert {row["scan_id"] for row in read_output(output, "parquet")} == set(rows)
    assert not journal.exists()


def patch_cli(monkeypatch: pytest.MonkeyPatch, gateway: Gateway) -> list[dict[str, Any]]:
    """`cli.HeadCTClient` talking to `gateway`; returns the keyword arguments of each client made."""
    made: list[dict[str, Any]] = []

    def client(*args: Any, **kwargs: Any) -> HeadCTClient:
        made.append(kwargs)
        return HeadCTClient(*args, **kwargs, transport=httpx.MockTransport(gateway))

    monkeypatch.setattr(cli, "HeadCTClient", client)
    return made


def test_cli_priority_and_keepalive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive(tmp_path / "archive", {"a.nii": b"good"})
    gateway = Gateway()
    made = patch_cli(monkeypatch, gateway)
    argv = ["batch", str(tmp_path / "archive"), "--out", str(tmp_path / "r.parquet"), "--no-progress"]
    assert cli.run([*argv, "--priority", "routine", "--keepalive"], err=io.StringIO()) == 0
    assert [r.url.params["priority"] for r in gateway.requests] == ["routine"]
    assert made[0]["keepalive"] is True
    assert cli.run([*argv, "--priority", "urgent"], err=io.StringIO()) == 2


def test_csv_output_via_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive(tmp_path / "archive", COHORT)
    gateway = Gateway()
    made = patch_cli(monkeypatch, gateway)
    out, err = io.StringIO(), io.StringIO()
    argv = ["batch", str(tmp_path / "archive"), "--out", str(tmp_path / "r.csv"), "--embeddings"]
    argv += ["--no-progress", "--tasks", "hemorrhage", "--max-retry-wait", "0"]
    assert cli.run(argv, out=out, err=err) == 0, err.getvalue()
    with (tmp_path / "r.csv").open(newline="") as handle:
        records = {record["scan_id"]: record for record in csv.DictReader(handle)}
    one = records["a/one.nii.gz"]
    expected = prediction(b"good one", True)
    assert float(one["hemorrhage_probability"]) == expected["findings"][0]["probability"]
    assert json.loads(one["findings"]) == expected["findings"] and len(json.loads(one["embedding"])) == DIM
    assert (
        records["b/bad.nii.gz"]["problem_code"] == "not_head" and records["b/bad.nii.gz"]["embedding"] == ""
    )
    assert {r.url.params["tasks"] for r in gateway.requests} == {"hemorrhage"}
    assert {r.url.params["priority"] for r in gateway.requests} == {"bulk"}
    rows = {row["scan_id"]: row for row in read_output(tmp_path / "r.csv", "csv")}
    assert rows["a/one.nii.gz"]["findings"] == expected["findings"] and rows["c/series"]["attempts"] == 1
    assert rows["b/bad.nii.gz"]["problem_status"] == 422 and rows["b/bad.nii.gz"]["embedding"] is None
    # A rerun finds every scan done and sends nothing.
    assert cli.run(argv, out=out, err=err) == 0
    assert len(gateway.requests) == 7
    assert made[0]["keepalive"] is False  # a connection per scan: a Service spreads them over the pods


def test_cli_batch_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive(tmp_path / "archive", {"a.nii": b"good"})

    def gateway(request: httpx.Request) -> httpx.Response:
        return problem(401, "invalid_api_key", "the API key is not valid")

    monkeypatch.setattr(cli, "HeadCTClient", partial(HeadCTClient, transport=httpx.MockTransport(gateway)))
    err = io.StringIO()
    argv = ["batch", str(tmp_path / "archive"), "--out", str(tmp_path / "r.parquet"), "--no-progress"]
    assert cli.run(argv, err=err) == 1 and "401 invalid_api_key" in err.getvalue()
    assert cli.run(["batch", str(tmp_path / "nowhere"), "--out", "r.parquet"], err=err) == 2
    assert cli.run(["batch", str(tmp_path / "archive")], err=err) == 2  # --out is required
    assert cli.run([*argv, "--concurrency", "0"], err=err) == 2
    no_folder = ["batch", str(tmp_path / "archive"), "--out", str(tmp_path / "no" / "r.parquet")]
    assert cli.run(no_folder, err=err) == 2
